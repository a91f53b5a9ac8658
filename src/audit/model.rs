//! What an audit event is, and how it is hashed into the chain.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The hash that precedes the first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened. The contract's vocabulary plus security events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Read,
    Update,
    Delete,
    Search,
    Export,
    Login,
    Logout,
    Access,
    LoginFailed,
    AccountLocked,
    BreakGlass,
    PermissionDenied,
    KeyRotated,
    AuditPurge,
    AuditVerify,
    Calculate,
}

impl Action {
    pub const ALL: [Action; 17] = [
        Action::Create,
        Action::Read,
        Action::Update,
        Action::Delete,
        Action::Search,
        Action::Export,
        Action::Login,
        Action::Logout,
        Action::Access,
        Action::LoginFailed,
        Action::AccountLocked,
        Action::BreakGlass,
        Action::PermissionDenied,
        Action::KeyRotated,
        Action::AuditPurge,
        Action::AuditVerify,
        Action::Calculate,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Read => "read",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Search => "search",
            Action::Export => "export",
            Action::Login => "login",
            Action::Logout => "logout",
            Action::Access => "access",
            Action::LoginFailed => "login_failed",
            Action::AccountLocked => "account_locked",
            Action::BreakGlass => "break_glass",
            Action::PermissionDenied => "permission_denied",
            Action::KeyRotated => "key_rotated",
            Action::AuditPurge => "audit_purge",
            Action::AuditVerify => "audit_verify",
            Action::Calculate => "calculate",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// How it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
    Denied,
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Success,
        Outcome::Failure,
        Outcome::Denied,
        Outcome::Error,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }

    /// The outcome a status code implies.
    pub const fn from_status(status: u16) -> Self {
        match status {
            401 | 403 => Outcome::Denied,
            500..=599 => Outcome::Error,
            400..=499 => Outcome::Failure,
            _ => Outcome::Success,
        }
    }
}

/// A value in an event's `context`. By construction it cannot hold PHI: text is either
/// a `'static` string written in the code, or an identifier restricted to
/// `[A-Za-z0-9._:-]{1,64}` (ids are opaque; names, values and free text do not fit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ContextValue {
    Int(i64),
    Bool(bool),
    Code(&'static str),
    Id(SafeId),
    Ids(Vec<SafeId>),
}

/// An identifier that is safe to record anywhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct SafeId(String);

impl SafeId {
    pub fn new(s: &str) -> Option<Self> {
        ((1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')))
        .then(|| Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ContextValue {
    /// An id, or the code `invalid_id` when it does not look like one.
    pub fn id(s: &str) -> Self {
        SafeId::new(s).map_or(ContextValue::Code("invalid_id"), ContextValue::Id)
    }
}

/// The context of an event: a small map of PHI-free values.
pub type Context = BTreeMap<&'static str, ContextValue>;

/// An event before it is given its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub id: String,
    pub at: String,
    pub actor_id: Option<String>,
    pub actor: Option<String>,
    pub action: Action,
    pub resource_type: Option<&'static str>,
    pub resource_id: Option<String>,
    pub patient_id: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub status: Option<u16>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub client_request_id: Option<String>,
    pub outcome: Outcome,
    pub break_glass: bool,
    pub reason: Option<String>,
    pub context: Context,
}

impl NewEvent {
    /// A bare event: `id` is fresh, `at` is the fixed-width timestamp of now.
    ///
    /// The id is a UUIDv7 (time-ordered, 74 random bits): its unique index then grows
    /// at its end, so a batch of events dirties one index page instead of one random
    /// page per event (a v4 id cost SQLite a 4 KiB WAL page per event;
    /// docs/performance.md § Audit write volume).
    pub fn new(action: Action, outcome: Outcome, at: String) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            at,
            actor_id: None,
            actor: None,
            action,
            resource_type: None,
            resource_id: None,
            patient_id: None,
            method: None,
            path: None,
            status: None,
            ip: None,
            user_agent: None,
            request_id: None,
            client_request_id: None,
            outcome,
            break_glass: false,
            reason: None,
            context: Context::new(),
        }
    }

    /// The context as stored: compact JSON with keys in order.
    pub fn context_json(&self) -> String {
        serde_json::to_string(&self.context).unwrap_or_else(|_| "{}".into())
    }
}

/// A stored event: the API, export and verification read these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEvent {
    pub seq: i64,
    pub id: String,
    /// RFC 3339 UTC, microseconds.
    pub at: String,
    pub actor_id: Option<String>,
    /// Username, or `anonymous`, or `system:<command>`.
    pub actor: Option<String>,
    pub action: String,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub patient_id: Option<String>,
    pub method: Option<String>,
    /// The route pattern (`/api/v1/patients/{id}`), never a query string.
    pub path: Option<String>,
    pub status: Option<i64>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// The `X-Request-Id` of the response this event belongs to: always an id the
    /// server made.
    pub request_id: Option<String>,
    /// The `X-Request-Id` the client sent, if any (well-formed ones only): what the
    /// client said, never the request's id.
    #[serde(default)]
    pub client_request_id: Option<String>,
    pub outcome: String,
    pub break_glass: bool,
    pub reason: Option<String>,
    /// PHI-free details (ids, counts, codes): a JSON object in the API, the JSON-lines
    /// export and the sink; the compact JSON text in CSV. The chain hashes the text as
    /// stored, so showing it as an object changes no hash.
    #[serde(serialize_with = "context_object", deserialize_with = "context_text")]
    #[schema(value_type = Object)]
    pub context: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The stored context text as the JSON object it is (the text itself, should it not parse).
fn context_object<S: serde::Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => v.serialize(s),
        Err(_) => s.serialize_str(text),
    }
}

/// The context text from either form: an object (as serialised now; written back in the
/// stored form, compact with its keys in order) or the text itself.
fn context_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        v => serde_json::to_string(&v).map_err(serde::de::Error::custom),
    }
}

/// The exact bytes hashed for an event: every field, in this order, as JSON. Fields
/// added after the chain began come last and are left out while unset, so the events
/// stored before them hash as they did.
#[derive(Serialize)]
struct Canonical<'a> {
    seq: i64,
    id: &'a str,
    at: &'a str,
    actor_id: Option<&'a str>,
    actor: Option<&'a str>,
    action: &'a str,
    resource_type: Option<&'a str>,
    resource_id: Option<&'a str>,
    patient_id: Option<&'a str>,
    method: Option<&'a str>,
    path: Option<&'a str>,
    status: Option<i64>,
    ip: Option<&'a str>,
    user_agent: Option<&'a str>,
    request_id: Option<&'a str>,
    outcome: &'a str,
    break_glass: bool,
    reason: Option<&'a str>,
    context: &'a str,
    /// Since migration 0011.
    #[serde(skip_serializing_if = "Option::is_none")]
    client_request_id: Option<&'a str>,
}

impl AuditEvent {
    /// The hash this event must have, given its `prev_hash`.
    pub fn compute_hash(&self) -> String {
        let c = Canonical {
            seq: self.seq,
            id: &self.id,
            at: &self.at,
            actor_id: self.actor_id.as_deref(),
            actor: self.actor.as_deref(),
            action: &self.action,
            resource_type: self.resource_type.as_deref(),
            resource_id: self.resource_id.as_deref(),
            patient_id: self.patient_id.as_deref(),
            method: self.method.as_deref(),
            path: self.path.as_deref(),
            status: self.status,
            ip: self.ip.as_deref(),
            user_agent: self.user_agent.as_deref(),
            request_id: self.request_id.as_deref(),
            outcome: &self.outcome,
            break_glass: self.break_glass,
            reason: self.reason.as_deref(),
            context: &self.context,
            client_request_id: self.client_request_id.as_deref(),
        };
        let json = serde_json::to_string(&c).unwrap_or_default();
        let mut input = String::with_capacity(self.prev_hash.len() + 1 + json.len());
        input.push_str(&self.prev_hash);
        input.push('\n');
        input.push_str(&json);
        crate::crypto::sha256_hex(input.as_bytes())
    }

    /// Places a new event in the chain after (`seq - 1`, `prev_hash`).
    pub fn chained(e: &NewEvent, seq: i64, prev_hash: &str) -> Self {
        let mut out = Self {
            seq,
            id: e.id.clone(),
            at: e.at.clone(),
            actor_id: e.actor_id.clone(),
            actor: e.actor.clone(),
            action: e.action.as_str().to_owned(),
            resource_type: e.resource_type.map(str::to_owned),
            resource_id: e.resource_id.clone(),
            patient_id: e.patient_id.clone(),
            method: e.method.clone(),
            path: e.path.clone(),
            status: e.status.map(i64::from),
            ip: e.ip.clone(),
            user_agent: e.user_agent.clone(),
            request_id: e.request_id.clone(),
            client_request_id: e.client_request_id.clone(),
            outcome: e.outcome.as_str().to_owned(),
            break_glass: e.break_glass,
            reason: e.reason.clone(),
            context: e.context_json(),
            prev_hash: prev_hash.to_owned(),
            hash: String::new(),
        };
        out.hash = out.compute_hash();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Event ids (and generated request ids) are created in ascending order, so their
    /// indexes grow at the end (one dirty page per batch, not one per event).
    #[test]
    fn event_and_request_ids_ascend() {
        let at = || "2026-01-01T00:00:00.000000Z".to_owned();
        let ids: Vec<String> = (0..1000)
            .map(|_| NewEvent::new(Action::Read, Outcome::Success, at()).id)
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "event ids out of order"
        );
        let requests: Vec<String> = (0..1000)
            .map(|_| crate::http::request_id::generate())
            .collect();
        assert!(
            requests.windows(2).all(|w| w[0] < w[1]),
            "request ids out of order"
        );
        assert!(
            ids.iter()
                .chain(&requests)
                .all(|i| uuid::Uuid::parse_str(i).is_ok())
        );
    }

    fn event() -> NewEvent {
        let mut e = NewEvent::new(
            Action::Read,
            Outcome::Success,
            "2026-01-01T00:00:00.000000Z".into(),
        );
        e.patient_id = Some("p-1".into());
        e.context.insert("count", ContextValue::Int(3));
        e
    }

    /// An event as stored before `client_request_id` existed: its hash, computed then,
    /// must still be what `compute_hash` gives (the chain of an existing database verifies).
    #[test]
    fn events_stored_before_client_request_ids_hash_as_they_did() {
        let mut e = event();
        e.id = "01a23ad3-6334-75b2-a389-464d0232d99f".into();
        e.request_id = Some("trace-1".into());
        let a = AuditEvent::chained(&e, 7, GENESIS);
        assert_eq!(
            a.hash,
            "f76daf3fe38f9e3f67a128542923d5d2e91b2c951e57ae11a5ec54b6f3e3f9da"
        );
        // A new event's client id is covered by the hash.
        let mut b = a.clone();
        b.client_request_id = Some("trace-2".into());
        assert_ne!(b.compute_hash(), a.hash);
        e.client_request_id = Some("trace-2".into());
        let c = AuditEvent::chained(&e, 7, GENESIS);
        assert_eq!(c.hash, b.compute_hash());
    }

    #[test]
    fn the_hash_covers_every_field_and_the_link() {
        let e = event();
        let a = AuditEvent::chained(&e, 1, GENESIS);
        assert_eq!(a.hash, a.compute_hash());
        let mut b = a.clone();
        b.patient_id = Some("p-2".into());
        assert_ne!(b.compute_hash(), a.hash);
        let mut c = a.clone();
        c.seq = 2;
        assert_ne!(c.compute_hash(), a.hash);
        let mut d = a.clone();
        d.prev_hash = "1".repeat(64);
        assert_ne!(d.compute_hash(), a.hash);
        let mut f = a.clone();
        f.context = r#"{"count":4}"#.into();
        assert_ne!(f.compute_hash(), a.hash);
        let mut g = a;
        g.break_glass = true;
        assert_ne!(g.compute_hash(), AuditEvent::chained(&e, 1, GENESIS).hash);
    }

    /// The API shows the context as an object; the hash is over the stored text, and the
    /// object reads back to that same text.
    #[test]
    fn context_is_an_object_outside_and_text_in_the_chain() {
        let a = AuditEvent::chained(&event(), 1, GENESIS);
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["context"], serde_json::json!({"count": 3}));
        let back: AuditEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back.context, a.context);
        assert_eq!(back.compute_hash(), a.hash);
        let mut old = serde_json::to_value(&a).unwrap();
        old["context"] = serde_json::Value::String(a.context.clone());
        let back: AuditEvent = serde_json::from_value(old).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn context_cannot_carry_free_text() {
        assert!(SafeId::new("1b4e28ba-2fa1-11d2-883f-0016d3cca427").is_some());
        assert!(SafeId::new("John Smith").is_none());
        assert!(SafeId::new("123-45-6789 ").is_none());
        assert!(SafeId::new(&"a".repeat(65)).is_none());
        assert_eq!(
            ContextValue::id("Jane Doe"),
            ContextValue::Code("invalid_id")
        );
        let e = event();
        assert_eq!(e.context_json(), r#"{"count":3}"#);
    }

    #[test]
    fn actions_round_trip_and_outcomes_follow_status() {
        for a in Action::ALL {
            assert_eq!(Action::parse(a.as_str()), Some(a));
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
        }
        assert_eq!(Action::parse("nope"), None);
        assert_eq!(Outcome::from_status(200), Outcome::Success);
        assert_eq!(Outcome::from_status(302), Outcome::Success);
        assert_eq!(Outcome::from_status(401), Outcome::Denied);
        assert_eq!(Outcome::from_status(403), Outcome::Denied);
        assert_eq!(Outcome::from_status(422), Outcome::Failure);
        assert_eq!(Outcome::from_status(503), Outcome::Error);
    }
}
