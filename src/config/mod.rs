//! Configuration: layered, typed, checked once at start-up.
//!
//! Layers, later wins: built-in defaults for the environment (`Config::builtin`) <
//! `config/<env>.yaml` (or the file named by `CUSTODIAN_CONFIG`) < `CUSTODIAN_*`
//! environment variables < command-line `--set key=value` flags. Each layer is checked
//! on its own first, so an unknown or malformed key is reported with the file or variable
//! it came from. Then [`rules`] decides whether the result is safe for the environment.

mod load;
pub mod rules;
pub mod types;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use load::{ConfigError, Loader};
pub use types::{ByteSize, Duration, NetList, Per, Rate, Secret};

/// The deployment environment. It chooses the built-in defaults and how strict the
/// start-up checks are.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    #[default]
    Dev,
    Staging,
    Prod,
}

impl Environment {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "dev" | "development" => Ok(Self::Dev),
            "staging" => Ok(Self::Staging),
            "prod" | "production" => Ok(Self::Prod),
            other => Err(format!(
                "unknown environment `{other}` (use dev, staging or prod)"
            )),
        }
    }
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Dev => "dev",
            Self::Staging => "staging",
            Self::Prod => "prod",
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The whole configuration. Every section denies unknown keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Not a key: set by `CUSTODIAN_ENV` or `--env`.
    #[serde(skip)]
    pub env: Environment,
    /// Where the default SQLite file and the dev keyring live.
    pub data_dir: PathBuf,
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub keys: KeysConfig,
    pub session: SessionConfig,
    pub lockout: LockoutConfig,
    pub password: PasswordConfig,
    pub mfa: MfaConfig,
    pub passkeys: PasskeysConfig,
    pub api_tokens: ApiTokensConfig,
    pub rate_limit: RateLimitConfig,
    pub audit: AuditConfig,
    pub logging: LoggingConfig,
    pub monitoring: MonitoringConfig,
    pub security: SecurityConfig,
    pub smart: SmartConfig,
    pub mail: MailConfig,
    pub accounts: AccountsConfig,
    pub fhir: FhirConfig,
    pub oauth: OAuthConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    pub tls: TlsConfig,
    /// TLS ends at a proxy in front of this server (prod then accepts plain HTTP here).
    pub behind_tls_proxy: bool,
    /// Peers whose `X-Forwarded-For` is believed. Empty by default (loopback included).
    pub trusted_proxies: NetList,
    /// Largest request body accepted.
    pub max_body: ByteSize,
    /// A request still running after this answers 503.
    pub request_timeout: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish.
    pub shutdown_grace: Duration,
    /// Origins allowed by CORS (exact `https://host[:port]`); empty = CORS off.
    #[serde(deserialize_with = "types::string_list")]
    pub cors_origins: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key (a secret file: mode 0600 in prod).
    pub key: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` or `postgres://…`. Default: `sqlite://<data_dir>/custodian.sqlite`.
    pub url: Option<Secret>,
    /// A file holding the URL (for URLs that carry a password).
    pub url_file: Option<PathBuf>,
    /// Connections in the pool (PostgreSQL) or readers (SQLite; SQLite has one writer).
    pub max_connections: u32,
    /// How long a request waits for a free connection.
    pub acquire_timeout: Duration,
    /// SQLite only: `full` (default) fsyncs every commit, so an acknowledged write
    /// survives a power loss; `normal` fsyncs at checkpoints only, so it survives a crash
    /// of the process but the last commits may be lost with the machine.
    pub sqlite_synchronous: SqliteSync,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSync {
    Full,
    Normal,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://…` or `rediss://…`; when set, shared state lives there.
    pub url: Option<Secret>,
    /// A file holding the URL (for URLs that carry a password).
    pub url_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Path of the keyring file. Default: `<data_dir>/keyring`.
    pub keyring: Option<PathBuf>,
    /// Data keys wrapped under an older key version are refused (retire a version after
    /// `custodian keys rewrap`).
    pub min_decryption_version: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    pub idle_timeout: Duration,
    pub absolute_timeout: Duration,
    /// How long after a password sign-in a session counts as freshly authenticated:
    /// within it, TOTP enrolment needs no password again.
    pub reauth_window: Duration,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockoutConfig {
    /// Consecutive failures that lock a username; 0 disables lockout (refused in prod).
    pub max_failures: u32,
    pub duration: Duration,
    /// Failures from one address, across usernames, within `duration` that block that
    /// address for `duration` (password spraying); 0 disables it.
    pub ip_max_failures: u32,
    /// Failures from one address against one username within `address_window` after
    /// which that address may no longer try that username (429) until the window
    /// ends: one address cannot lock an account again and again. 0 disables it.
    pub address_max_failures: u32,
    pub address_window: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PasswordPolicyName {
    Hitrust,
    Nist,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasswordConfig {
    pub policy: PasswordPolicyName,
    /// Overrides of the policy's numbers.
    pub min_length: Option<u32>,
    pub max_age: Option<Duration>,
    pub history: Option<u32>,
    /// Argon2id memory in KiB (at least 19456 in prod).
    pub hash_memory_kib: u32,
    /// Argon2id passes (at least 2 in prod).
    pub hash_iterations: u32,
    /// Argon2id lanes.
    pub hash_parallelism: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MfaConfig {
    /// A second factor (TOTP or a passkey) required for every user (prod default: true).
    pub required: bool,
    /// Roles whose users must sign in with a passkey (phishing-resistant): without one,
    /// or in a session not signed in with one, they may only enrol one (prod default:
    /// `[admin]`).
    #[serde(deserialize_with = "types::string_list")]
    pub phishing_resistant_roles: Vec<String>,
}

/// Passkeys (WebAuthn): who the relying party is.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasskeysConfig {
    /// The address browsers reach the pages at, `https://host[:port]` (default:
    /// `mail.base_url`'s origin; in dev without one, `http://localhost` on any port).
    pub origin: Option<String>,
    /// The relying-party id: the origin's host or a parent domain of it (default: the
    /// origin's host). Passkeys are bound to it: changing it later orphans them.
    pub rp_id: Option<String>,
    /// The name authenticators show.
    pub rp_name: String,
    /// How long a ceremony's challenge may be answered (single use in any case).
    pub challenge_ttl: Duration,
}

impl Default for PasskeysConfig {
    fn default() -> Self {
        Self {
            origin: None,
            rp_id: None,
            rp_name: "Custodian".into(),
            challenge_ttl: Duration::from_mins(5),
        }
    }
}

impl PasskeysConfig {
    /// The origin passkeys are bound to, and whether any port of it is accepted (dev on
    /// `localhost` only).
    pub fn effective_origin(&self, c: &Config) -> Option<(url::Url, bool)> {
        let explicit = self.origin.as_deref().or(c.mail.base_url.as_deref());
        match explicit {
            Some(s) => url::Url::parse(s).ok().map(|u| {
                let any_port = c.env == Environment::Dev && u.host_str() == Some("localhost");
                (u, any_port)
            }),
            None if c.env == Environment::Dev => {
                url::Url::parse("http://localhost").ok().map(|u| (u, true))
            }
            None => None,
        }
    }

    /// The relying-party id: `rp_id`, or the origin's host.
    pub fn effective_rp_id(&self, c: &Config) -> Option<String> {
        self.rp_id.clone().or_else(|| {
            self.effective_origin(c)
                .and_then(|(u, _)| u.host_str().map(str::to_owned))
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiTokensConfig {
    pub max_lifetime: Duration,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub enabled: bool,
    /// The rate each client gets on each endpoint unless `routes` says otherwise.
    pub default: Rate,
    /// `"METHOD /path/pattern"` → rate.
    pub routes: BTreeMap<String, Rate>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Record every request (refused off in prod; off only for measuring its cost).
    pub enabled: bool,
    /// How long events are kept before a purge may remove them (HIPAA: 6 years).
    pub retention: Duration,
    /// Whether `custodian audit purge` may remove anything (off by default).
    pub purge_enabled: bool,
    /// Most events committed in one transaction (1 = one transaction per request).
    pub max_batch: u32,
    /// How long the writer waits for more events before committing (0 = commit what is
    /// queued at once; batches still form while a commit runs).
    pub batch_wait: Duration,
    /// Requests that may wait for the writer before new ones wait to enqueue.
    pub queue: u32,
    /// A request whose events are not committed in this time fails closed (503).
    pub commit_timeout: Duration,
    /// Copy of every committed event as JSON lines: `stdout` or a file path.
    pub sink: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `text` (dev) or `json` (staging, prod).
    pub format: LogFormat,
    /// `error`, `warn`, `info`, `debug` or `trace`, optionally with per-module
    /// directives (`info,custodian::http=debug`). `debug`/`trace` are refused in prod.
    pub level: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitoringConfig {
    /// Sentry DSN for error reports (off when unset).
    pub sentry_dsn: Option<Secret>,
    pub sentry_dsn_file: Option<PathBuf>,
    /// Name of this deployment in error reports (default: the environment).
    pub sentry_environment: Option<String>,
    /// Share of errors reported, 0.0–1.0 (default 1.0).
    pub sentry_sample_rate: f32,
    /// Share of requests traced, 0.0–1.0 (default 0: no performance tracing).
    pub sentry_traces_sample_rate: f32,
    /// Dev only: addresses that may read `GET /metrics` without a credential. Staging
    /// and prod always ask for one (the scrape token or a user with `audit:read`): behind
    /// a reverse proxy on the same machine, loopback is every client.
    pub metrics_allow: NetList,
    /// The scrape token: Prometheus sends it as `Authorization: Bearer …` (prefer
    /// `metrics_token_file`; prod refuses it inline). At least 32 characters.
    pub metrics_token: Option<Secret>,
    pub metrics_token_file: Option<PathBuf>,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        Self {
            sentry_dsn: None,
            sentry_dsn_file: None,
            sentry_environment: None,
            sentry_sample_rate: 1.0,
            sentry_traces_sample_rate: 0.0,
            metrics_allow: NetList::loopback(),
            metrics_token: None,
            metrics_token_file: None,
        }
    }
}

/// The rules that raise security events over the audit stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Failed sign-ins for one account within `window` that raise an event (0 = off).
    pub failed_logins_per_account: u32,
    /// Failed sign-ins from one address within `window` that raise an event (0 = off).
    pub failed_logins_per_address: u32,
    /// The window of the two counts above.
    pub window: Duration,
    /// Distinct patients one user may read within an hour before an event (0 = off).
    pub distinct_patients_per_hour: u32,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            failed_logins_per_account: 3,
            failed_logins_per_address: 10,
            window: Duration::from_secs(15 * 60),
            distinct_patients_per_hour: 50,
        }
    }
}

/// The SMART on FHIR app (`docs/smart.md`). Off until `allowed_issuers` lists a FHIR
/// server.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmartConfig {
    /// FHIR base URLs (the `iss` of a launch) the app may talk to, exactly as the EHR
    /// sends them (a trailing `/` is ignored). Any other `iss` is refused before any
    /// outbound request. Empty = the app is off.
    #[serde(deserialize_with = "types::string_list")]
    pub allowed_issuers: Vec<String>,
    /// The client id registered with the EHR's authorization server.
    pub client_id: String,
    /// A confidential client's secret (prefer `client_secret_file`); none = public client.
    pub client_secret: Option<Secret>,
    pub client_secret_file: Option<PathBuf>,
    /// The redirect URI registered with the EHR (`https://<host>/smart/callback`).
    /// Required in staging and prod; in dev it defaults to this server's address as the
    /// browser reached it.
    pub redirect_uri: Option<String>,
    /// Scopes asked for at an EHR launch (`launch/patient` is added for a standalone
    /// launch).
    pub scopes: String,
    /// EHR origins allowed to frame the app page (`frame-ancestors`); empty = no framing.
    #[serde(deserialize_with = "types::string_list")]
    pub frame_ancestors: Vec<String>,
    /// Connecting to the FHIR or authorization server may take this long.
    pub connect_timeout: Duration,
    /// One whole FHIR request may take this long.
    pub timeout: Duration,
    /// Retries of a GET answered 502, 503 or 504.
    pub retries: u32,
    /// Wait before the first retry (doubled each time).
    pub retry_backoff: Duration,
    /// Most pages read per search (`next` links).
    pub max_pages: u32,
    /// Largest FHIR or token response read.
    pub max_response: ByteSize,
    /// A launch not completed within this is refused.
    pub launch_ttl: Duration,
    /// The access token is refreshed when it expires within this.
    pub refresh_before: Duration,
}

/// How the SMTP connection is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (port 587); refused if the server does not
    /// offer it.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Implicit,
    /// No TLS: only to a server on this machine (refused for any other host, and in prod).
    None,
}

/// Outgoing mail (`docs/accounts.md`). Without `smtp_host`, dev writes each mail to a
/// folder under `data_dir` instead; staging and prod then send nothing and say so.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailConfig {
    pub smtp_host: Option<String>,
    pub smtp_port: u16,
    pub smtp_tls: SmtpTls,
    pub smtp_username: Option<String>,
    pub smtp_password: Option<Secret>,
    pub smtp_password_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for the SMTP server, e.g. a private relay's
    /// own CA; the public roots are trusted anyway.
    pub smtp_ca_file: Option<PathBuf>,
    /// The sender, e.g. `Custodian <no-reply@clinic.example>`.
    pub from: String,
    /// The address people reach this server at, for the links in mails (e.g.
    /// `https://custodian.clinic.example`). Required in staging and prod.
    pub base_url: Option<String>,
    /// Dev without SMTP: where mails are written (default `<data_dir>/mail`).
    pub folder: Option<PathBuf>,
    /// Attempts per mail before it is marked failed.
    pub max_attempts: u32,
    /// How often the outbox is looked at for mails due (new mails are sent at once).
    pub poll_interval: Duration,
    /// One SMTP conversation may take this long.
    pub timeout: Duration,
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            smtp_host: None,
            smtp_port: 587,
            smtp_tls: SmtpTls::Starttls,
            smtp_username: None,
            smtp_password: None,
            smtp_password_file: None,
            smtp_ca_file: None,
            from: "Custodian <no-reply@localhost>".into(),
            base_url: None,
            folder: None,
            max_attempts: 8,
            poll_interval: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
        }
    }
}

/// The FHIR API (`docs/fhir.md`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FhirConfig {
    /// The identifier system of this installation's MRNs (an absolute URI).
    pub mrn_system: String,
    /// The FHIR base URL clients reach, for `fullUrl`, links and `Location`
    /// (e.g. `https://ehr.clinic.example/fhir`). Default: from the request's Host.
    pub base_url: Option<String>,
}

impl Default for FhirConfig {
    fn default() -> Self {
        Self {
            mrn_system: "urn:custodian:mrn".into(),
            base_url: None,
        }
    }
}

/// The SMART App Launch authorization server (`docs/smart-server.md`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthConfig {
    /// How long an access token works.
    pub access_ttl: Duration,
    /// How long a refresh token works (each refresh gives a new one).
    pub refresh_ttl: Duration,
    /// How long an authorization code works (it is single-use).
    pub code_ttl: Duration,
    /// How long an EHR launch from a chart waits for its app (single-use).
    pub launch_ttl: Duration,
    /// Register this server's own PRECISE-HBR app (`smart.client_id`) with this FHIR
    /// server, so that a chart launches it with no outside EHR. On in dev.
    pub builtin_app: bool,
}

impl Default for OAuthConfig {
    fn default() -> Self {
        Self {
            access_ttl: Duration::from_mins(60),
            refresh_ttl: Duration::from_days(90),
            code_ttl: Duration::from_secs(120),
            launch_ttl: Duration::from_mins(5),
            builtin_app: false,
        }
    }
}

/// Account lifecycle by email (`docs/accounts.md`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountsConfig {
    /// How long an invitation link works.
    pub invite_ttl: Duration,
    /// How long a password-reset link works.
    pub reset_ttl: Duration,
    /// How long an email-verification link works.
    pub verify_ttl: Duration,
    /// Whether anyone may create an account (off by default).
    pub self_registration: bool,
    /// The role of self-registered accounts: it must hold no PHI permission; an
    /// administrator grants a real role after checking who it is.
    pub self_registration_role: String,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        Self {
            invite_ttl: Duration::from_hours(72),
            reset_ttl: Duration::from_mins(30),
            verify_ttl: Duration::from_hours(24),
            self_registration: false,
            self_registration_role: "registered".into(),
        }
    }
}

pub const DEFAULT_SMART_SCOPES: &str = "launch openid fhirUser patient/Patient.rs \
patient/Observation.rs patient/Condition.rs patient/MedicationRequest.rs patient/Procedure.rs";

impl Default for SmartConfig {
    fn default() -> Self {
        Self {
            allowed_issuers: Vec::new(),
            client_id: "custodian".into(),
            client_secret: None,
            client_secret_file: None,
            redirect_uri: None,
            scopes: DEFAULT_SMART_SCOPES.into(),
            frame_ancestors: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(20),
            retries: 2,
            retry_backoff: Duration::from_millis(200),
            max_pages: 10,
            max_response: ByteSize(4 * 1024 * 1024),
            launch_ttl: Duration::from_secs(600),
            refresh_before: Duration::from_secs(60),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::builtin(Environment::Dev)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5005)),
            tls: TlsConfig::default(),
            behind_tls_proxy: false,
            trusted_proxies: NetList::default(),
            max_body: ByteSize(1024 * 1024),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            cors_origins: Vec::new(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            url_file: None,
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            sqlite_synchronous: SqliteSync::Full,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_mins(5),
            absolute_timeout: Duration::from_hours(12),
            reauth_window: Duration::from_mins(5),
        }
    }
}

impl Default for LockoutConfig {
    fn default() -> Self {
        Self {
            max_failures: 5,
            duration: Duration::from_mins(15),
            ip_max_failures: 50,
            address_max_failures: 10,
            address_window: Duration::from_hours(24),
        }
    }
}

impl Default for PasswordConfig {
    fn default() -> Self {
        Self {
            policy: PasswordPolicyName::Hitrust,
            min_length: None,
            max_age: None,
            history: None,
            hash_memory_kib: 19_456,
            hash_iterations: 2,
            hash_parallelism: 1,
        }
    }
}

impl Default for ApiTokensConfig {
    fn default() -> Self {
        Self {
            max_lifetime: Duration::from_days(7),
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            default: Rate::new(100, Per::Second, 200),
            routes: BTreeMap::new(),
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            retention: Duration::from_days(6 * 365 + 2),
            purge_enabled: false,
            max_batch: 256,
            batch_wait: Duration::default(),
            queue: 8192,
            commit_timeout: Duration::from_secs(5),
            sink: None,
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Config {
    /// The built-in defaults of an environment: the lowest layer.
    pub fn builtin(env: Environment) -> Self {
        let mut c = Self {
            env,
            data_dir: PathBuf::from("data"),
            server: ServerConfig::default(),
            database: DatabaseConfig::default(),
            redis: RedisConfig::default(),
            keys: KeysConfig::default(),
            session: SessionConfig::default(),
            lockout: LockoutConfig::default(),
            password: PasswordConfig::default(),
            mfa: MfaConfig::default(),
            passkeys: PasskeysConfig::default(),
            api_tokens: ApiTokensConfig::default(),
            rate_limit: RateLimitConfig::default(),
            audit: AuditConfig::default(),
            logging: LoggingConfig::default(),
            monitoring: MonitoringConfig::default(),
            security: SecurityConfig::default(),
            smart: SmartConfig::default(),
            mail: MailConfig::default(),
            accounts: AccountsConfig::default(),
            fhir: FhirConfig::default(),
            oauth: OAuthConfig::default(),
        };
        match env {
            // Long enough to explore the API in Swagger UI without signing in again
            // every few minutes (staging and prod keep 5 minutes; prod refuses over 60).
            Environment::Dev => {
                c.session.idle_timeout = Duration::from_mins(60);
                // The PRECISE-HBR app launches against this server itself.
                c.oauth.builtin_app = true;
            }
            Environment::Staging => {
                c.logging.format = LogFormat::Json;
                c.monitoring.metrics_allow = NetList(Vec::new());
            }
            Environment::Prod => {
                c.data_dir = PathBuf::from("/var/lib/custodian");
                c.logging.format = LogFormat::Json;
                c.mfa.required = true;
                c.mfa.phishing_resistant_roles = vec!["admin".into()];
                c.monitoring.metrics_allow = NetList(Vec::new());
            }
        }
        c
    }

    /// The keyring path: `keys.keyring`, or `<data_dir>/keyring`.
    pub fn keyring_path(&self) -> PathBuf {
        self.keys
            .keyring
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keyring"))
    }

    /// The default SQLite file when `database.url` is not set.
    pub fn default_sqlite_path(&self) -> PathBuf {
        self.data_dir.join("custodian.sqlite")
    }

    /// Whether this server itself terminates TLS.
    pub fn serves_tls(&self) -> bool {
        self.server.tls.cert.is_some()
            || (self.env == Environment::Staging && !self.server.behind_tls_proxy)
    }

    /// Whether this is dev speaking plain HTTP to browsers (no TLS here, none at a proxy):
    /// the only case where the sign-in cookies are sent without `Secure` (and without
    /// the `__Host-` prefix, which requires it), so that signing in works from another
    /// machine on the network. Staging and prod never.
    pub fn dev_over_plain_http(&self) -> bool {
        self.env == Environment::Dev && !self.serves_tls() && !self.server.behind_tls_proxy
    }

    /// Whether responses carry `Strict-Transport-Security`.
    pub fn sends_hsts(&self) -> bool {
        self.serves_tls() || self.env != Environment::Dev
    }
}

/// The secrets named by the configuration, read from their inline value or `_file`.
pub struct ResolvedSecrets {
    pub database_url: Secret,
    pub redis_url: Option<Secret>,
    pub sentry_dsn: Option<Secret>,
    pub smart_client_secret: Option<Secret>,
    pub smtp_password: Option<Secret>,
    pub metrics_token: Option<Secret>,
}

impl fmt::Debug for ResolvedSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResolvedSecrets([REDACTED])")
    }
}

/// Reads a secret from its inline value or its file (never both).
pub fn read_secret(
    key: &str,
    inline: Option<&Secret>,
    file: Option<&Path>,
) -> Result<Option<Secret>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!("{key} and {key}_file are both set; set only one")),
        (Some(v), None) => Ok(Some(v.clone())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|s| Some(Secret::new(s.trim_end_matches(['\n', '\r']).to_owned())))
            .map_err(|e| format!("{key}_file: cannot read {}: {e}", path.display())),
        (None, None) => Ok(None),
    }
}

impl Config {
    /// Reads every secret the configuration names. Errors name the key, never a value.
    pub fn resolve_secrets(&self) -> Result<ResolvedSecrets, String> {
        let database_url = read_secret(
            "database.url",
            self.database.url.as_ref(),
            self.database.url_file.as_deref(),
        )?
        .unwrap_or_else(|| {
            Secret::new(format!("sqlite://{}", self.default_sqlite_path().display()))
        });
        let redis_url = read_secret(
            "redis.url",
            self.redis.url.as_ref(),
            self.redis.url_file.as_deref(),
        )?;
        let sentry_dsn = read_secret(
            "monitoring.sentry_dsn",
            self.monitoring.sentry_dsn.as_ref(),
            self.monitoring.sentry_dsn_file.as_deref(),
        )?;
        let smart_client_secret = read_secret(
            "smart.client_secret",
            self.smart.client_secret.as_ref(),
            self.smart.client_secret_file.as_deref(),
        )?;
        let smtp_password = read_secret(
            "mail.smtp_password",
            self.mail.smtp_password.as_ref(),
            self.mail.smtp_password_file.as_deref(),
        )?;
        let metrics_token = read_secret(
            "monitoring.metrics_token",
            self.monitoring.metrics_token.as_ref(),
            self.monitoring.metrics_token_file.as_deref(),
        )?;
        Ok(ResolvedSecrets {
            database_url,
            redis_url,
            sentry_dsn,
            smart_client_secret,
            smtp_password,
            metrics_token,
        })
    }
}
