//! SMART scopes: v1 (`patient/Observation.read`), v2 (`patient/Observation.rs`,
//! `user/*.cruds`) and granular v2 (`patient/Observation.rs?category=…|laboratory`), all
//! read by one parser into one model. What a token may do is the intersection of these
//! and its user's role, decided on every FHIR request (`fhir::routes`).

use std::fmt;

/// Whose data a resource scope reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The launch patient's compartment only.
    Patient,
    /// Whatever the user's role may reach.
    User,
}

/// The interactions of a v2 scope, in its order: create, read, update, delete, search.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Ops(u8);

impl Ops {
    pub const C: Ops = Ops(1);
    pub const R: Ops = Ops(2);
    pub const U: Ops = Ops(4);
    pub const D: Ops = Ops(8);
    pub const S: Ops = Ops(16);
    pub const ALL: Ops = Ops(31);
    const LETTERS: [(char, Ops); 5] = [
        ('c', Ops::C),
        ('r', Ops::R),
        ('u', Ops::U),
        ('d', Ops::D),
        ('s', Ops::S),
    ];

    pub fn contains(self, o: Ops) -> bool {
        self.0 & o.0 == o.0
    }
    fn and(self, o: Ops) -> Ops {
        Ops(self.0 & o.0)
    }
    fn or(self, o: Ops) -> Ops {
        Ops(self.0 | o.0)
    }
    fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// `cruds` letters, in order, each at most once.
    fn parse_v2(s: &str) -> Option<Ops> {
        let mut out = Ops(0);
        let mut last = 0;
        for ch in s.chars() {
            let i = Self::LETTERS.iter().position(|(c, _)| *c == ch)? + 1;
            if i <= last {
                return None;
            }
            last = i;
            out = out.or(Self::LETTERS[i - 1].1);
        }
        (!out.is_empty()).then_some(out)
    }

    fn letters(self) -> String {
        Self::LETTERS
            .iter()
            .filter(|(_, o)| self.contains(*o))
            .map(|(c, _)| *c)
            .collect()
    }

    /// In words, for the consent page.
    pub fn words(self) -> String {
        let mut w = Vec::new();
        if self.contains(Ops::R) || self.contains(Ops::S) {
            w.push("read");
        }
        if self.contains(Ops::C) {
            w.push("add");
        }
        if self.contains(Ops::U) {
            w.push("change");
        }
        if self.contains(Ops::D) {
            w.push("delete");
        }
        w.join(", ")
    }
}

/// A category of a granular scope: `system|code`, or a bare code.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Category {
    pub system: Option<String>,
    pub code: String,
}

impl Category {
    fn parse(s: &str) -> Option<Category> {
        let (system, code) = match s.split_once('|') {
            Some((sys, code)) => (Some(sys.to_owned()).filter(|s| !s.is_empty()), code),
            None => (None, s),
        };
        let ok = |t: &str| {
            !t.is_empty()
                && t.len() <= 200
                && t.chars()
                    .all(|c| c.is_ascii_graphic() && !matches!(c, '|' | ',' | '&' | '?' | '%'))
        };
        if !ok(code) || system.as_deref().is_some_and(|s| !ok(s)) {
            return None;
        }
        Some(Category {
            system,
            code: code.to_owned(),
        })
    }

    /// Whether a coding (system, code) of a resource is this category.
    pub fn matches(&self, system: Option<&str>, code: &str) -> bool {
        self.code == code && self.system.as_deref().is_none_or(|s| Some(s) == system)
    }

    fn meet(&self, o: &Category) -> Option<Category> {
        if self.code != o.code {
            return None;
        }
        match (&self.system, &o.system) {
            (Some(a), Some(b)) if a != b => None,
            (a, b) => Some(Category {
                system: a.clone().or_else(|| b.clone()),
                code: self.code.clone(),
            }),
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.system {
            Some(s) => write!(f, "{s}|{}", self.code),
            None => f.write_str(&self.code),
        }
    }
}

/// One resource scope.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResourceScope {
    pub level: Level,
    /// A resource type, or `None` for `*`.
    pub resource: Option<String>,
    pub ops: Ops,
    /// Granular: only these categories (`None`: every category).
    pub categories: Option<Vec<Category>>,
    /// Written in v1 form (`read`/`write`/`*`).
    pub v1: bool,
}

impl ResourceScope {
    fn parse(s: &str) -> Option<ResourceScope> {
        let (level, rest) = s.split_once('/')?;
        let level = match level {
            "patient" => Level::Patient,
            "user" => Level::User,
            _ => return None,
        };
        let (body, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (resource, ops) = body.rsplit_once('.')?;
        let resource = match resource {
            "*" => None,
            r if !r.is_empty()
                && r.len() <= 64
                && r.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && r.chars().all(|c| c.is_ascii_alphanumeric()) =>
            {
                Some(r.to_owned())
            }
            _ => return None,
        };
        let (ops, v1) = match ops {
            "read" => (Ops::R.or(Ops::S), true),
            "write" => (Ops::C.or(Ops::U).or(Ops::D), true),
            "*" => (Ops::ALL, true),
            v2 => (Ops::parse_v2(v2)?, false),
        };
        let categories = match query {
            None => None,
            Some(q) => {
                if v1 {
                    return None;
                }
                let mut cats = Vec::new();
                for pair in q.split('&') {
                    let (k, v) = pair.split_once('=')?;
                    if k != "category" {
                        return None;
                    }
                    let v = percent_decode(v)?;
                    for one in v.split(',') {
                        cats.push(Category::parse(one)?);
                    }
                }
                cats.sort();
                cats.dedup();
                if cats.is_empty() {
                    return None;
                }
                Some(cats)
            }
        };
        Some(ResourceScope {
            level,
            resource,
            ops,
            categories,
            v1,
        })
    }

    /// The intersection of a requested scope and an allowed one, when not empty.
    fn meet(&self, allowed: &ResourceScope) -> Option<ResourceScope> {
        if self.level != allowed.level {
            return None;
        }
        let resource = match (&self.resource, &allowed.resource) {
            (None, r) | (r, None) => r.clone(),
            (Some(a), Some(b)) if a == b => Some(a.clone()),
            _ => return None,
        };
        let ops = self.ops.and(allowed.ops);
        if ops.is_empty() {
            return None;
        }
        let categories = match (&self.categories, &allowed.categories) {
            (None, c) | (c, None) => c.clone(),
            (Some(a), Some(b)) => {
                let mut both: Vec<Category> = a
                    .iter()
                    .flat_map(|x| b.iter().filter_map(move |y| x.meet(y)))
                    .collect();
                both.sort();
                both.dedup();
                if both.is_empty() {
                    return None;
                }
                Some(both)
            }
        };
        // v1 form only when it still says exactly this.
        let v1 = self.v1 && categories.is_none() && ops == self.ops;
        Some(ResourceScope {
            level: self.level,
            resource,
            ops,
            categories,
            v1,
        })
    }

    /// Whether this scope reaches a type (`*` reaches every type).
    pub fn reaches(&self, t: &str) -> bool {
        self.resource.as_deref().is_none_or(|r| r == t)
    }

    /// In words, for the consent page.
    pub fn describe(&self) -> String {
        let what = match &self.resource {
            None => "all kinds of data".to_owned(),
            Some(r) => match r.as_str() {
                "Patient" => "demographics (name, birth date, contact details)".to_owned(),
                "Observation" => "observations (labs, vital signs)".to_owned(),
                "Condition" => "conditions and diagnoses".to_owned(),
                "MedicationRequest" => "medications".to_owned(),
                "Procedure" => "procedures".to_owned(),
                other => other.to_owned(),
            },
        };
        let whose = match self.level {
            Level::Patient => "of the selected patient",
            Level::User => "of every patient you may see",
        };
        let cats = match &self.categories {
            None => String::new(),
            Some(c) => format!(
                " (only {})",
                c.iter()
                    .map(|c| c.code.replace('-', " "))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let ops = self.ops.words();
        let mut first = ops.chars();
        let ops = match first.next() {
            Some(c) => c.to_uppercase().collect::<String>() + first.as_str(),
            None => String::new(),
        };
        format!("{ops} {what}{cats} {whose}")
    }
}

impl fmt::Display for ResourceScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Patient => "patient",
            Level::User => "user",
        };
        let resource = self.resource.as_deref().unwrap_or("*");
        let ops = if self.v1 {
            if self.ops == Ops::ALL {
                "*".to_owned()
            } else if self.ops == Ops::R.or(Ops::S) {
                "read".to_owned()
            } else {
                "write".to_owned()
            }
        } else {
            self.ops.letters()
        };
        write!(f, "{level}/{resource}.{ops}")?;
        if let Some(c) = &self.categories {
            let list: Vec<String> = c.iter().map(ToString::to_string).collect();
            write!(f, "?category={}", list.join(","))?;
        }
        Ok(())
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes: Vec<u8> = percent_decode_bytes(s.as_bytes())?;
    String::from_utf8(bytes).ok()
}

fn percent_decode_bytes(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The scopes this server understands (others are not granted: OAuth lets a server
/// grant less than asked, and says so in the token's `scope`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes {
    pub resources: Vec<ResourceScope>,
    /// `launch`: the EHR launch context.
    pub launch: bool,
    /// `launch/patient`: pick a patient in a standalone launch.
    pub launch_patient: bool,
    pub offline_access: bool,
    pub online_access: bool,
}

/// The non-resource scopes this server grants.
pub const CONTEXT_SCOPES: [&str; 4] = [
    "launch",
    "launch/patient",
    "offline_access",
    "online_access",
];

impl Scopes {
    /// Reads a space-separated scope string; what it does not understand is dropped and
    /// returned second.
    pub fn parse(s: &str) -> (Scopes, Vec<String>) {
        let mut out = Scopes::default();
        let mut unknown = Vec::new();
        for tok in s.split_ascii_whitespace() {
            match tok {
                "launch" => out.launch = true,
                "launch/patient" => out.launch_patient = true,
                "offline_access" => out.offline_access = true,
                "online_access" => out.online_access = true,
                t => match ResourceScope::parse(t) {
                    Some(r) if !out.resources.contains(&r) => out.resources.push(r),
                    Some(_) => {}
                    None => unknown.push(t.to_owned()),
                },
            }
        }
        (out, unknown)
    }

    /// [`Self::parse`] of a token's stored scopes, kept: every request of an app's token
    /// reads the same few strings (at most 1,024 kept; the cache starts over when full).
    pub fn parse_cached(s: &str) -> std::sync::Arc<Scopes> {
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex, OnceLock};
        static CACHE: OnceLock<Mutex<HashMap<String, Arc<Scopes>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Ok(map) = cache.lock()
            && let Some(found) = map.get(s)
        {
            return found.clone();
        }
        let parsed = Arc::new(Scopes::parse(s).0);
        if let Ok(mut map) = cache.lock() {
            if map.len() >= 1024 {
                map.clear();
            }
            map.insert(s.to_owned(), parsed.clone());
        }
        parsed
    }

    /// What of `self` (asked for) `allowed` (an app's registration) lets through.
    pub fn within(&self, allowed: &Scopes) -> Scopes {
        let mut resources: Vec<ResourceScope> = Vec::new();
        for r in &self.resources {
            for a in &allowed.resources {
                if let Some(m) = r.meet(a)
                    && !resources.contains(&m)
                {
                    resources.push(m);
                }
            }
        }
        Scopes {
            resources,
            launch: self.launch && allowed.launch,
            launch_patient: self.launch_patient && allowed.launch_patient,
            offline_access: self.offline_access && allowed.offline_access,
            online_access: self.online_access && allowed.online_access,
        }
    }

    /// Whether `self` asks for nothing beyond `of`.
    pub fn subset_of(&self, of: &Scopes) -> bool {
        let mut a = self.within(of).resources;
        let mut b = self.within(self).resources;
        a.sort();
        b.sort();
        a == b
            && (!self.launch || of.launch)
            && (!self.launch_patient || of.launch_patient)
            && (!self.offline_access || of.offline_access)
            && (!self.online_access || of.online_access)
    }

    pub fn has_patient_level(&self) -> bool {
        self.resources.iter().any(|r| r.level == Level::Patient)
    }

    /// What a request of interaction `op` on type `t` may do under these scopes. Runs on
    /// every request of an app: no allocation unless granular categories apply.
    pub fn permit(&self, t: &str, op: Ops) -> Permit {
        let matches = |r: &ResourceScope| r.reaches(t) && r.ops.contains(op);
        if !self.resources.iter().any(matches) {
            return Permit::Denied;
        }
        // A user-level scope reaches beyond the launch patient; when both kinds match,
        // only the user-level ones are read (never a mix wider than either).
        let users = self
            .resources
            .iter()
            .any(|r| matches(r) && r.level == Level::User);
        let chosen = |r: &&ResourceScope| matches(r) && (!users || r.level == Level::User);
        let categories = if self
            .resources
            .iter()
            .filter(chosen)
            .any(|r| r.categories.is_none())
        {
            None
        } else {
            let mut all: Vec<Category> = self
                .resources
                .iter()
                .filter(chosen)
                .flat_map(|r| r.categories.iter().flatten().cloned())
                .collect();
            all.sort();
            all.dedup();
            Some(all)
        };
        Permit::Allowed {
            patient_only: !users,
            categories,
        }
    }
}

/// The answer of [`Scopes::permit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Permit {
    Denied,
    Allowed {
        /// Only the launch patient's compartment.
        patient_only: bool,
        /// Only resources of these categories (granular scopes).
        categories: Option<Vec<Category>>,
    },
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if self.launch {
            parts.push("launch".into());
        }
        if self.launch_patient {
            parts.push("launch/patient".into());
        }
        if self.offline_access {
            parts.push("offline_access".into());
        }
        if self.online_access {
            parts.push("online_access".into());
        }
        parts.extend(self.resources.iter().map(ToString::to_string));
        f.write_str(&parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> ResourceScope {
        ResourceScope::parse(s).unwrap()
    }

    #[test]
    fn v1_and_v2_read_the_same() {
        assert_eq!(one("patient/Observation.read").ops, Ops::R.or(Ops::S));
        assert_eq!(one("patient/Observation.rs").ops, Ops::R.or(Ops::S));
        assert_eq!(one("user/*.write").ops, Ops::C.or(Ops::U).or(Ops::D));
        assert_eq!(one("user/*.cruds").ops, Ops::ALL);
        assert_eq!(one("user/*.*").ops, Ops::ALL);
        assert_eq!(one("user/*.cruds").resource, None);
        assert_eq!(
            one("patient/Observation.read").to_string(),
            "patient/Observation.read"
        );
        assert_eq!(
            one("patient/Observation.rs").to_string(),
            "patient/Observation.rs"
        );
    }

    #[test]
    fn malformed_scopes_are_not_understood() {
        for bad in [
            "patient/Observation.sr",
            "patient/Observation.rr",
            "patient/Observation.",
            "patient/Observation.x",
            "system/Observation.rs",
            "patient/observation.rs",
            "patient/Observation.read?category=x",
            "patient/Observation.rs?code=x",
            "patient/Observation.rs?category=",
            "Observation.rs",
            "patient/../Observation.rs",
        ] {
            assert!(ResourceScope::parse(bad).is_none(), "{bad}");
        }
        let (s, unknown) = Scopes::parse("openid fhirUser launch patient/Patient.rs bogus");
        assert!(s.launch);
        assert_eq!(s.resources.len(), 1);
        assert_eq!(unknown, vec!["openid", "fhirUser", "bogus"]);
    }

    #[test]
    fn granular_categories() {
        let s = one(
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
        );
        let cats = s.categories.clone().unwrap();
        assert_eq!(cats.len(), 1);
        assert!(cats[0].matches(
            Some("http://terminology.hl7.org/CodeSystem/observation-category"),
            "laboratory"
        ));
        assert!(!cats[0].matches(Some("http://other"), "laboratory"));
        assert!(!cats[0].matches(None, "vital-signs"));
        // A value that would read differently once printed and parsed again (a `%` left
        // after decoding) is refused: what is stored is what was checked.
        assert!(
            ResourceScope::parse("patient/Observation.rs?category=vital-signs%252Cx%7Claboratory")
                .is_none()
        );
        for text in [
            "patient/Observation.rs?category=laboratory,vital-signs",
            "user/*.cruds",
            "patient/Condition.read",
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
        ] {
            let once = ResourceScope::parse(text).unwrap();
            assert_eq!(
                ResourceScope::parse(&once.to_string()),
                Some(once),
                "{text}"
            );
        }
        // Percent-encoded values read the same.
        let e = one(
            "patient/Observation.rs?category=http%3A%2F%2Fterminology.hl7.org%2FCodeSystem%2Fobservation-category%7Claboratory",
        );
        assert_eq!(e, s);
    }

    #[test]
    fn a_grant_is_the_intersection_with_the_app() {
        let (asked, _) =
            Scopes::parse("launch/patient patient/*.cruds user/Patient.rs offline_access");
        let (app, _) = Scopes::parse("launch/patient patient/Observation.rs patient/Patient.read");
        let got = asked.within(&app);
        assert!(got.launch_patient);
        assert!(!got.offline_access);
        let text = got.to_string();
        assert_eq!(
            text,
            "launch/patient patient/Observation.rs patient/Patient.rs"
        );
        assert!(got.subset_of(&asked));
        assert!(!asked.subset_of(&got));
        // The same scopes in another order are the same set.
        let (a, _) = Scopes::parse("patient/Patient.rs patient/Observation.rs offline_access");
        let (b, _) = Scopes::parse("offline_access patient/Observation.rs patient/Patient.rs");
        assert!(a.subset_of(&b) && b.subset_of(&a));
    }

    #[test]
    fn permits() {
        let (s, _) = Scopes::parse(
            "patient/Observation.rs?category=laboratory patient/Condition.read user/Patient.r",
        );
        assert_eq!(s.permit("MedicationRequest", Ops::R), Permit::Denied);
        assert_eq!(s.permit("Condition", Ops::C), Permit::Denied);
        assert_eq!(
            s.permit("Condition", Ops::S),
            Permit::Allowed {
                patient_only: true,
                categories: None
            }
        );
        assert_eq!(s.permit("Patient", Ops::S), Permit::Denied);
        assert_eq!(
            s.permit("Patient", Ops::R),
            Permit::Allowed {
                patient_only: false,
                categories: None
            }
        );
        match s.permit("Observation", Ops::S) {
            Permit::Allowed {
                patient_only: true,
                categories: Some(c),
            } => assert_eq!(c[0].code, "laboratory"),
            other => panic!("{other:?}"),
        }
    }
}
