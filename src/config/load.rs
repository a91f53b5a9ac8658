//! Loading the layers and merging them.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{Config, Environment};

/// The environment-variable prefix of every configuration key.
pub const PREFIX: &str = "CUSTODIAN_";
/// Variables with the prefix that are not keys.
const META_VARS: [&str; 2] = ["CUSTODIAN_ENV", "CUSTODIAN_CONFIG"];

/// Everything that was wrong with the configuration, all at once.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the configuration is invalid:")?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Gathers the layers. `serve` and the other commands build one from the process
/// environment; tests build one by hand so that nothing leaks in from the machine.
#[derive(Clone, Debug, Default)]
pub struct Loader {
    /// `--env`, else `CUSTODIAN_ENV`, else dev.
    pub env: Option<String>,
    /// `--config`, else `CUSTODIAN_CONFIG`; when set the file must exist.
    pub file: Option<PathBuf>,
    /// Directory searched for `config/<env>.yaml` when no file is named.
    pub search_dir: Option<PathBuf>,
    /// `CUSTODIAN_*` variables (name, value).
    pub vars: Vec<(String, String)>,
    /// `--set key=value` flags, in order.
    pub sets: Vec<(String, String)>,
}

impl Loader {
    /// A loader reading the process environment, searching `./config/`.
    pub fn from_process_env() -> Self {
        let vars: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with(PREFIX))
            .collect();
        let env = vars
            .iter()
            .find(|(k, _)| k == "CUSTODIAN_ENV")
            .map(|(_, v)| v.clone());
        let file = vars
            .iter()
            .find(|(k, _)| k == "CUSTODIAN_CONFIG")
            .map(|(_, v)| PathBuf::from(v));
        Self {
            env,
            file,
            search_dir: Some(PathBuf::from(".")),
            vars,
            sets: Vec::new(),
        }
    }

    /// Builds the configuration, reporting every problem found.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let env = match self.env.as_deref().map(Environment::parse).transpose() {
            Ok(e) => e.unwrap_or_default(),
            Err(e) => {
                return Err(ConfigError {
                    problems: vec![format!("CUSTODIAN_ENV: {e}")],
                });
            }
        };

        let mut tree = match serde_json::to_value(Config::builtin(env)) {
            Ok(v) => v,
            Err(e) => {
                return Err(ConfigError {
                    problems: vec![format!("built-in defaults: {e}")],
                });
            }
        };

        // Layer 2: the file.
        let file = match (&self.file, &self.search_dir) {
            (Some(f), _) => Some((f.clone(), true)),
            (None, Some(dir)) => Some((dir.join("config").join(format!("{env}.yaml")), false)),
            (None, None) => None,
        };
        if let Some((path, required)) = file {
            match read_yaml_file(&path, required) {
                Ok(Some(layer)) => {
                    if let Err(e) = check_layer(&layer) {
                        problems.push(format!("{}: {e}", path.display()));
                    } else {
                        merge(&mut tree, layer);
                    }
                }
                Ok(None) => {}
                Err(e) => problems.push(e),
            }
        }

        // Layer 3: environment variables, each checked on its own so that every
        // unknown or malformed one is named.
        let mut vars: Vec<&(String, String)> = self
            .vars
            .iter()
            .filter(|(k, _)| !META_VARS.contains(&k.as_str()))
            .collect();
        vars.sort();
        for (name, raw) in vars {
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            apply_key(&mut tree, &mut problems, name, &path, raw);
        }

        // Layer 4: command-line flags.
        for (key, raw) in &self.sets {
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            apply_key(
                &mut tree,
                &mut problems,
                &format!("--set {key}"),
                &path,
                raw,
            );
        }

        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        match deserialize(tree) {
            Ok(mut config) => {
                config.env = env;
                let cross = cross_checks(&config);
                if cross.is_empty() {
                    Ok(config)
                } else {
                    Err(ConfigError { problems: cross })
                }
            }
            Err(e) => Err(ConfigError { problems: vec![e] }),
        }
    }
}

/// The passkey settings, in every environment: a parsable http(s) origin and a
/// relying-party id that is its host or a parent domain of it (what browsers require).
fn passkey_checks(c: &Config) -> Vec<String> {
    let mut p = Vec::new();
    let ttl = c.passkeys.challenge_ttl.std().as_secs();
    if !(1..=600).contains(&ttl) {
        p.push("passkeys.challenge_ttl: must be more than 0 and at most 10m".into());
    }
    if let Some(o) = &c.passkeys.origin {
        match url::Url::parse(o) {
            Ok(u) if matches!(u.scheme(), "https" | "http") && u.host_str().is_some() => {
                if u.path() != "/" || u.query().is_some() {
                    p.push(format!(
                        "passkeys.origin: `{o}` must be an origin only (scheme, host, port), without a path"
                    ));
                }
            }
            _ => p.push(format!(
                "passkeys.origin: `{o}` is not an http(s) URL with a host"
            )),
        }
    }
    if let Some((origin, _)) = c.passkeys.effective_origin(c)
        && let (Some(host), Some(rp)) = (origin.host_str(), c.passkeys.effective_rp_id(c))
    {
        let rp_ok = !rp.is_empty()
            && !rp.starts_with('.')
            && (host == rp || host.ends_with(&format!(".{rp}")));
        if !rp_ok {
            p.push(format!(
                "passkeys.rp_id: `{rp}` must be the origin's host `{host}` or a parent domain of it"
            ));
        }
        if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
            p.push(format!(
                "passkeys.origin: browsers refuse passkeys on an IP address (`{host}`); use a host name (in dev: localhost)"
            ));
        }
    }
    if c.mfa
        .phishing_resistant_roles
        .iter()
        .any(|r| r.trim().is_empty())
    {
        p.push("mfa.phishing_resistant_roles: a role name is empty".into());
    }
    p
}

/// Rules that relate two keys; they hold in every environment.
fn cross_checks(c: &Config) -> Vec<String> {
    let mut p = Vec::new();
    if c.session.idle_timeout.is_zero() {
        p.push("session.idle_timeout: must be more than 0".into());
    }
    if c.session.idle_timeout > c.session.absolute_timeout {
        p.push(format!(
            "session.idle_timeout ({}) is longer than session.absolute_timeout ({})",
            c.session.idle_timeout, c.session.absolute_timeout
        ));
    }
    if c.server.tls.cert.is_some() != c.server.tls.key.is_some() {
        p.push("server.tls: set both cert and key, or neither".into());
    }
    if c.server.max_body.0 == 0 {
        p.push("server.max_body: must be more than 0".into());
    }
    if c.server.request_timeout.is_zero() {
        p.push("server.request_timeout: must be more than 0".into());
    }
    if c.database.max_connections == 0 {
        p.push("database.max_connections: must be at least 1".into());
    }
    if c.audit.max_batch == 0 || c.audit.queue == 0 {
        p.push("audit.max_batch and audit.queue: must be at least 1".into());
    }
    if c.audit.batch_wait.std() > std::time::Duration::from_millis(100) {
        p.push("audit.batch_wait: at most 100ms (every audited request waits for it)".into());
    }
    if c.audit.commit_timeout.is_zero() {
        p.push("audit.commit_timeout: must be more than 0".into());
    }
    if c.api_tokens.max_lifetime.is_zero() {
        p.push("api_tokens.max_lifetime: must be more than 0".into());
    }
    let uri = |s: &str| {
        s.contains(':') && !s.chars().any(char::is_whitespace) && (1..=512).contains(&s.len())
    };
    if !uri(&c.fhir.mrn_system) {
        p.push("fhir.mrn_system: must be an absolute URI (e.g. urn:oid:… or https://…)".into());
    }
    if let Some(b) = &c.fhir.base_url
        && !(uri(b) && (b.starts_with("https://") || b.starts_with("http://")))
    {
        p.push("fhir.base_url: must be an http(s) URL".into());
    }
    if c.oauth.builtin_app
        && c.env == Environment::Prod
        && !c
            .fhir
            .base_url
            .as_deref()
            .is_some_and(|b| b.starts_with("https://"))
    {
        p.push("oauth.builtin_app: set fhir.base_url to this server's https:// FHIR base (the built-in app launches against it)".into());
    }
    for (key, d, max) in [
        ("oauth.access_ttl", c.oauth.access_ttl, 24 * 3600),
        ("oauth.refresh_ttl", c.oauth.refresh_ttl, 366 * 24 * 3600),
        ("oauth.code_ttl", c.oauth.code_ttl, 600),
        ("oauth.launch_ttl", c.oauth.launch_ttl, 3600),
    ] {
        if d.is_zero() || d.std().as_secs() > max {
            p.push(format!(
                "{key}: must be more than 0 and at most {}",
                crate::config::Duration::from_secs(max)
            ));
        }
    }
    p.extend(passkey_checks(c));
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&c.logging.level) {
        p.push(format!(
            "logging.level: `{}` is not a level: {e}",
            c.logging.level
        ));
    }
    for route in c.rate_limit.routes.keys() {
        let ok = route.split_once(' ').is_some_and(|(m, path)| {
            matches!(
                m,
                "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS"
            ) && path.starts_with('/')
        });
        if !ok {
            p.push(format!(
                "rate_limit.routes: `{route}` is not `METHOD /path/pattern`"
            ));
        }
    }
    p
}

fn read_yaml_file(path: &Path, required: bool) -> Result<Option<Value>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(None),
        Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
    };
    let value: Value = yaml_serde::from_str(&text)
        .map_err(|e| format!("{}: not valid YAML: {e}", path.display()))?;
    match value {
        Value::Null => Ok(None),
        Value::Object(_) => Ok(Some(value)),
        _ => Err(format!(
            "{}: the top level must be a mapping of keys",
            path.display()
        )),
    }
}

/// Checks one key given by a variable or a flag (`source` names it in errors) and merges it.
fn apply_key(
    tree: &mut Value,
    problems: &mut Vec<String>,
    source: &str,
    path: &[String],
    raw: &str,
) {
    if path.iter().any(String::is_empty) {
        problems.push(format!("{source}: not a configuration key"));
        return;
    }
    let layer = layer_for(path, raw);
    match check_layer(&layer) {
        Ok(()) => merge(tree, layer),
        Err(e) => problems.push(format!("{source}: {e}")),
    }
}

/// A one-key layer from a path and a raw value, the value read as a YAML scalar
/// (`5` → number, `true` → boolean, `3s` → string, `[a, b]` → list).
fn layer_for(path: &[String], raw: &str) -> Value {
    let mut value: Value = if raw.trim().is_empty() {
        Value::Null
    } else {
        yaml_serde::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
    };
    for key in path.iter().rev() {
        let mut m = Map::new();
        m.insert(key.clone(), value);
        value = Value::Object(m);
    }
    value
}

/// Deserialises one layer alone, to find unknown keys and bad values with their path.
fn check_layer(layer: &Value) -> Result<(), String> {
    deserialize(layer.clone()).map(|_| ())
}

fn deserialize(tree: Value) -> Result<Config, String> {
    serde_path_to_error::deserialize::<_, Config>(tree).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let inner = inner
            .split(", expected one of")
            .next()
            .unwrap_or(&inner)
            .to_owned();
        if path == "." || path.is_empty() {
            inner
        } else if inner.starts_with("unknown field") {
            format!("unknown key `{path}` ({inner})")
        } else {
            format!("key `{path}`: {inner}")
        }
    })
}

/// Merges `layer` into `base`: mappings merge key by key, anything else replaces.
fn merge(base: &mut Value, layer: Value) {
    match (base, layer) {
        (Value::Object(b), Value::Object(l)) => {
            for (k, v) in l {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, l) => *slot = l,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn loader() -> Loader {
        Loader::default()
    }

    #[test]
    fn defaults_per_environment() {
        let dev = loader().load().unwrap();
        assert_eq!(dev.env, Environment::Dev);
        assert!(!dev.mfa.required);
        assert_eq!(dev.session.idle_timeout.to_string(), "1h");
        assert!(dev.dev_over_plain_http());
        let prod = Loader {
            env: Some("prod".into()),
            ..loader()
        }
        .load()
        .unwrap();
        assert!(prod.mfa.required);
        assert_eq!(prod.mfa.phishing_resistant_roles, ["admin"]);
        assert!(dev.mfa.phishing_resistant_roles.is_empty());
        assert_eq!(prod.logging.format, super::super::LogFormat::Json);
        assert_eq!(prod.session.idle_timeout.to_string(), "5m");
        assert!(!prod.dev_over_plain_http());
        let staging = Loader {
            env: Some("staging".into()),
            ..loader()
        }
        .load()
        .unwrap();
        assert_eq!(staging.session.idle_timeout.to_string(), "5m");
        assert!(!staging.dev_over_plain_http());
    }

    #[test]
    fn env_vars_override_and_parse_types() {
        let l = Loader {
            vars: vec![
                ("CUSTODIAN_SESSION__IDLE_TIMEOUT".into(), "3s".into()),
                ("CUSTODIAN_LOCKOUT__MAX_FAILURES".into(), "7".into()),
                ("CUSTODIAN_DATA_DIR".into(), "/tmp/x".into()),
                (
                    "CUSTODIAN_SERVER__TRUSTED_PROXIES".into(),
                    "10.0.0.0/8,127.0.0.1".into(),
                ),
                (
                    "CUSTODIAN_RATE_LIMIT__DEFAULT".into(),
                    "100/m burst 20".into(),
                ),
                ("CUSTODIAN_ENV".into(), "dev".into()),
            ],
            ..loader()
        };
        let c = l.load().unwrap();
        assert_eq!(c.session.idle_timeout.to_string(), "3s");
        assert_eq!(c.lockout.max_failures, 7);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.server.trusted_proxies.0.len(), 2);
        assert_eq!(c.rate_limit.default.burst, 20);
    }

    #[test]
    fn unknown_env_vars_are_named_all_at_once() {
        let l = Loader {
            vars: vec![
                ("CUSTODIAN_SESSION__IDLE_TIMOUT".into(), "3s".into()),
                ("CUSTODIAN_NOPE".into(), "1".into()),
                ("CUSTODIAN_LOCKOUT__DURATION".into(), "soon".into()),
            ],
            ..loader()
        };
        let e = l.load().unwrap_err();
        let all = e.to_string();
        assert_eq!(e.problems.len(), 3, "{all}");
        assert!(all.contains("CUSTODIAN_SESSION__IDLE_TIMOUT"), "{all}");
        assert!(all.contains("unknown key `session.idle_timout`"), "{all}");
        assert!(all.contains("CUSTODIAN_NOPE"), "{all}");
        assert!(all.contains("CUSTODIAN_LOCKOUT__DURATION"), "{all}");
        assert!(all.contains("lockout.duration"), "{all}");
    }

    #[test]
    fn file_layer_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(f, "session:\n  idle_timeout: 10m\n  idel: 3").unwrap();
        let load = || {
            Loader {
                file: Some(path.clone()),
                ..loader()
            }
            .load()
            .unwrap_err()
            .to_string()
        };
        let msg = load();
        assert!(msg.contains("c.yaml"), "{msg}");
        assert!(msg.contains("unknown key `session.idel`"), "{msg}");

        std::fs::write(&path, "session:\n  idle_timeout: 10\n").unwrap();
        let msg = load();
        assert!(msg.contains("session.idle_timeout"), "{msg}");
        assert!(msg.contains("no unit"), "{msg}");

        std::fs::write(&path, "session: [oops\n").unwrap();
        assert!(load().contains("not valid YAML"));
    }

    #[test]
    fn named_file_must_exist_but_default_file_may_not() {
        let dir = tempfile::tempdir().unwrap();
        let e = Loader {
            file: Some(dir.path().join("missing.yaml")),
            ..loader()
        }
        .load()
        .unwrap_err();
        assert!(e.to_string().contains("missing.yaml"));
        assert!(
            Loader {
                search_dir: Some(dir.path().into()),
                ..loader()
            }
            .load()
            .is_ok()
        );
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("config")).unwrap();
        std::fs::write(
            dir.path().join("config/staging.yaml"),
            "session:\n  idle_timeout: 10m\nlockout:\n  max_failures: 9\ndata_dir: /from/file\n",
        )
        .unwrap();
        let c = Loader {
            env: Some("staging".into()),
            search_dir: Some(dir.path().into()),
            vars: vec![("CUSTODIAN_SESSION__IDLE_TIMEOUT".into(), "2m".into())],
            sets: vec![("data_dir".into(), "/from/flag".into())],
            ..loader()
        }
        .load()
        .unwrap();
        assert_eq!(c.session.idle_timeout.to_string(), "2m"); // env beats file
        assert_eq!(c.lockout.max_failures, 9); // file beats default
        assert_eq!(c.data_dir, PathBuf::from("/from/flag")); // flag beats file
        assert_eq!(c.env, Environment::Staging);
    }

    #[test]
    fn cross_checks_hold_everywhere() {
        let e = Loader {
            sets: vec![
                ("session.idle_timeout".into(), "13h".into()),
                ("server.tls.cert".into(), "/x.pem".into()),
                ("rate_limit.routes".into(), "{\"FETCH /x\": 5/s}".into()),
            ],
            ..loader()
        }
        .load()
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("absolute_timeout"), "{msg}");
        assert!(msg.contains("server.tls"), "{msg}");
        assert!(msg.contains("FETCH /x"), "{msg}");
    }

    #[test]
    fn passkey_origin_and_rp_id_must_fit_together() {
        let load = |sets: &[(&str, &str)]| {
            Loader {
                sets: sets
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..loader()
            }
            .load()
        };
        let ok = load(&[
            ("passkeys.origin", "https://records.clinic.example"),
            ("passkeys.rp_id", "clinic.example"),
        ])
        .unwrap();
        assert_eq!(
            ok.passkeys.effective_rp_id(&ok).as_deref(),
            Some("clinic.example")
        );
        for (sets, needle) in [
            (
                vec![
                    ("passkeys.origin", "https://records.clinic.example"),
                    ("passkeys.rp_id", "other.example"),
                ],
                "passkeys.rp_id",
            ),
            (
                vec![("passkeys.origin", "https://clinic.example/app")],
                "without a path",
            ),
            (vec![("passkeys.origin", "ftp://clinic.example")], "http(s)"),
            (vec![("passkeys.origin", "https://10.0.0.5")], "IP address"),
            (vec![("passkeys.challenge_ttl", "1h")], "challenge_ttl"),
        ] {
            let msg = load(&sets).unwrap_err().to_string();
            assert!(msg.contains(needle), "{sets:?}: {msg}");
        }
        // Dev without any address: localhost, any port.
        let dev = load(&[]).unwrap();
        let (origin, any_port) = dev.passkeys.effective_origin(&dev).unwrap();
        assert_eq!((origin.host_str(), any_port), (Some("localhost"), true));
    }

    #[test]
    fn bad_environment_is_named() {
        let e = Loader {
            env: Some("production-ish".into()),
            ..loader()
        }
        .load()
        .unwrap_err();
        assert!(e.to_string().contains("production-ish"));
    }
}
