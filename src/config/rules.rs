//! The start-up safety rules. `prod` refuses to start when any of them fails;
//! `staging` and `dev` start and print the same list as warnings.

use std::path::Path;

use super::{Config, Environment, Secret, read_secret};

/// One failed rule: the key(s) involved and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub key: &'static str,
    pub problem: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

/// The passkey origin outside dev: set (or `mail.base_url`), HTTPS, the same origin as
/// `mail.base_url`, and a name of this server's TLS certificate when it serves TLS.
fn passkey_findings(c: &Config, add: &mut impl FnMut(&'static str, String)) {
    let Some((origin, _)) = c.passkeys.effective_origin(c) else {
        add(
            "passkeys.origin",
            "set the https:// address people reach this server at (or mail.base_url): passkeys are bound to it".into(),
        );
        return;
    };
    if origin.scheme() != "https" {
        add(
            "passkeys.origin",
            format!("`{}` is not HTTPS", origin.origin().ascii_serialization()),
        );
    }
    if let Some(mail) = c.mail.base_url.as_deref()
        && let Ok(m) = url::Url::parse(mail)
        && m.origin() != origin.origin()
    {
        add(
            "passkeys.origin",
            format!(
                "`{}` differs from mail.base_url `{}`: the links in mails would open a site where the passkeys do not work",
                origin.origin().ascii_serialization(),
                m.origin().ascii_serialization()
            ),
        );
    }
    if let (Some(cert), Some(host)) = (&c.server.tls.cert, origin.host_str())
        && let Some(problem) = certificate_name_problem(cert, host)
    {
        add("passkeys.origin", problem);
    }
}

/// Whether the first certificate of a PEM chain is valid for `host` (None: it is, or
/// the file cannot be read, which the TLS rules report).
fn certificate_name_problem(cert: &Path, host: &str) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let first = CertificateDer::pem_file_iter(cert).ok()?.next()?.ok()?;
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let parsed = webpki::EndEntityCert::try_from(&first).ok()?;
    match parsed.verify_is_valid_for_subject_name(&name) {
        Ok(()) => None,
        Err(_) => Some(format!(
            "the TLS certificate ({}) is not valid for `{host}`, the passkey origin's host",
            cert.display()
        )),
    }
}

/// Largest idle timeout prod accepts.
pub const MAX_IDLE_MINUTES: u64 = 60;
/// Largest absolute session lifetime prod accepts.
pub const MAX_ABSOLUTE_HOURS: u64 = 24;

/// Every insecure setting in `config`. Reads the file system (keyring, secret files)
/// but changes nothing.
pub fn insecure_settings(c: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |key: &'static str, problem: String| out.push(Finding { key, problem });

    // TLS.
    if c.server.tls.cert.is_none() && !c.server.behind_tls_proxy && c.env != Environment::Staging {
        add(
            "server.tls",
            "no TLS: set server.tls.cert and server.tls.key, or server.behind_tls_proxy: true when a proxy terminates TLS".into(),
        );
    }
    if let Some(key) = &c.server.tls.key
        && let Some(p) = secret_file_problem(key)
    {
        add("server.tls.key", p);
    }

    // Keyring.
    let keyring = c.keyring_path();
    match std::fs::metadata(&keyring) {
        Err(_) => add(
            "keys.keyring",
            format!(
                "no keyring at {} (create it with `custodian keys rotate` as the service user, mode 0600)",
                keyring.display()
            ),
        ),
        Ok(_) => {
            if let Some(p) = secret_file_problem(&keyring) {
                add("keys.keyring", p);
            }
        }
    }

    // Secrets given inline that must come from a file.
    if let Some(url) = &c.database.url
        && url_has_password(url)
    {
        add(
            "database.url",
            "the URL carries a password inline; put the URL in a file and set database.url_file"
                .into(),
        );
    }
    if let Some(url) = &c.redis.url
        && url_has_password(url)
    {
        add(
            "redis.url",
            "the URL carries a password inline; put the URL in a file and set redis.url_file"
                .into(),
        );
    }
    for (key, file) in secret_files(c) {
        if let Some(path) = file
            && let Some(p) = secret_file_problem(path)
        {
            add(key, p);
        }
    }
    for (key, inline, file) in [
        (
            "database.url",
            c.database.url.as_ref(),
            c.database.url_file.as_deref(),
        ),
        (
            "redis.url",
            c.redis.url.as_ref(),
            c.redis.url_file.as_deref(),
        ),
    ] {
        if inline.is_some() && file.is_some() {
            add(
                key,
                format!("{key} and {key}_file are both set; set only one"),
            );
        }
    }

    // Authentication strength.
    if !c.mfa.required {
        add(
            "mfa.required",
            "TOTP is not required for every user; set mfa.required: true".into(),
        );
    }
    if c.lockout.max_failures == 0 || c.lockout.duration.is_zero() {
        add(
            "lockout.max_failures",
            "account lockout is disabled; set lockout.max_failures and lockout.duration above 0"
                .into(),
        );
    }
    if c.session.idle_timeout.std().as_secs() > MAX_IDLE_MINUTES * 60 {
        add(
            "session.idle_timeout",
            format!("{} is over {MAX_IDLE_MINUTES}m", c.session.idle_timeout),
        );
    }
    if c.session.absolute_timeout.std().as_secs() > MAX_ABSOLUTE_HOURS * 3600 {
        add(
            "session.absolute_timeout",
            format!(
                "{} is over {MAX_ABSOLUTE_HOURS}h",
                c.session.absolute_timeout
            ),
        );
    }

    // Debug output.
    let level = c.logging.level.to_ascii_lowercase();
    if level.contains("debug") || level.contains("trace") {
        add(
            "logging.level",
            format!(
                "`{}` turns on debug output, which may log more than it should; use info",
                c.logging.level
            ),
        );
    }

    // CORS.
    if c.server
        .cors_origins
        .iter()
        .any(|o| o.trim() == "*" || o.contains('*'))
    {
        add(
            "server.cors_origins",
            "a wildcard origin lets any web site call the API; list exact origins".into(),
        );
    }
    for o in &c.server.cors_origins {
        if o.starts_with("http://") && !o.starts_with("http://localhost") {
            add("server.cors_origins", format!("`{o}` is not HTTPS"));
        }
    }

    // Password hashing strength (tests use lighter parameters; production may not).
    if c.password.hash_memory_kib < 19_456
        || c.password.hash_iterations < 2
        || c.password.hash_parallelism < 1
    {
        add(
            "password.hash_memory_kib",
            format!(
                "argon2id m={} KiB, t={}, p={} is weaker than m=19456, t=2, p=1",
                c.password.hash_memory_kib, c.password.hash_iterations, c.password.hash_parallelism
            ),
        );
    }

    // The audit trail.
    if !c.audit.enabled {
        add(
            "audit.enabled",
            "the audit trail is off: requests and PHI access are not recorded (HIPAA §164.312(b))"
                .into(),
        );
    }

    // The SMART app: TLS to the EHR, a registered HTTPS redirect, exact frame origins.
    for iss in &c.smart.allowed_issuers {
        if !iss.starts_with("https://") {
            add(
                "smart.allowed_issuers",
                format!("`{iss}` is not HTTPS: PHI and tokens would cross the network in clear"),
            );
        }
    }
    if !c.smart.allowed_issuers.is_empty() {
        match &c.smart.redirect_uri {
            None => add(
                "smart.redirect_uri",
                "set the redirect URI registered with the EHR (https://<host>/smart/callback)"
                    .into(),
            ),
            Some(u) if !u.starts_with("https://") => {
                add("smart.redirect_uri", format!("`{u}` is not HTTPS"));
            }
            Some(_) => {}
        }
    }
    for o in &c.smart.frame_ancestors {
        if !o.starts_with("https://") || o.contains('*') {
            add(
                "smart.frame_ancestors",
                format!("`{o}` is not an exact HTTPS origin"),
            );
        }
    }
    if c.smart.client_secret.is_some() {
        add(
            "smart.client_secret",
            "the client secret is inline; put it in a file (mode 0600) and set smart.client_secret_file".into(),
        );
    }

    // Mail: TLS to the SMTP server, a password from a file, links that say https.
    if c.mail.smtp_host.is_some() && c.mail.smtp_tls == super::SmtpTls::None {
        add(
            "mail.smtp_tls",
            "mail would cross the network without TLS; use starttls or implicit".into(),
        );
    }
    if c.mail.smtp_password.is_some() {
        add(
            "mail.smtp_password",
            "the SMTP password is inline; put it in a file (mode 0600) and set mail.smtp_password_file".into(),
        );
    }
    if c.mail.smtp_host.is_some() {
        match &c.mail.base_url {
            None => add(
                "mail.base_url",
                "set the https:// address of this server, for the links in mails".into(),
            ),
            Some(u) if !u.starts_with("https://") => {
                add("mail.base_url", format!("`{u}` is not HTTPS"));
            }
            Some(_) => {}
        }
    }

    // HIPAA keeps documentation six years (§164.316(b)(2)); the accounting of
    // disclosures (§164.528) looks back six years.
    if c.audit.retention.std() < std::time::Duration::from_secs(6 * 365 * 86_400) {
        add(
            "audit.retention",
            format!(
                "{} is under six years: HIPAA keeps audit records, and patients' accounting of disclosures looks back, six years",
                c.audit.retention
            ),
        );
    }

    // Passkeys: bound to the address people use, over HTTPS, and to the name the TLS
    // certificate proves.
    if c.env != Environment::Dev {
        passkey_findings(c, &mut add);
    }

    // Metrics: outside dev always behind a credential, and a credential worth the name.
    if c.env != Environment::Dev && !c.monitoring.metrics_allow.0.is_empty() {
        add(
            "monitoring.metrics_allow",
            "outside dev /metrics always needs a credential (behind a proxy on this machine, loopback is every client), so this list is not used: remove it and give Prometheus the scrape token (monitoring.metrics_token_file)".into(),
        );
    }
    if c.monitoring.metrics_token.is_some() {
        add(
            "monitoring.metrics_token",
            "the scrape token is inline; put it in a file (mode 0600) and set monitoring.metrics_token_file".into(),
        );
    }
    if let Ok(Some(token)) = read_secret(
        "monitoring.metrics_token",
        c.monitoring.metrics_token.as_ref(),
        c.monitoring.metrics_token_file.as_deref(),
    ) && token.expose().chars().count() < MIN_METRICS_TOKEN
    {
        add(
            "monitoring.metrics_token_file",
            format!(
                "the scrape token is shorter than {MIN_METRICS_TOKEN} characters; make one with `head -c 32 /dev/urandom | base64`"
            ),
        );
    }

    // Warnings that are not refusals are in `advisories`.
    out
}

/// Shortest scrape token accepted for `/metrics`.
pub const MIN_METRICS_TOKEN: usize = 32;

/// Settings that are allowed everywhere but worth a warning.
pub fn advisories(c: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    if c.env != Environment::Dev && c.mail.smtp_host.is_none() {
        out.push(Finding {
            key: "mail.smtp_host",
            problem:
                "no SMTP server: invitations, email verification and password resets cannot be sent"
                    .into(),
        });
    }
    if c.env != Environment::Dev
        && c.monitoring.metrics_token.is_none()
        && c.monitoring.metrics_token_file.is_none()
    {
        out.push(Finding {
            key: "monitoring.metrics_token_file",
            problem: "no scrape token: only users with audit:read can read /metrics".into(),
        });
    }
    if !c.rate_limit.enabled {
        out.push(Finding {
            key: "rate_limit.enabled",
            problem: "rate limiting is off".into(),
        });
    }
    if c.server
        .trusted_proxies
        .0
        .iter()
        .any(|n| n.prefix_len() == 0)
    {
        out.push(Finding {
            key: "server.trusted_proxies",
            problem: "trusts X-Forwarded-For from every address; list only your proxies".into(),
        });
    }
    if c.dev_over_plain_http() {
        out.push(Finding {
            key: "server.tls",
            problem: "dev over plain HTTP: the sign-in cookies (`custodian`, `custodian_login`) are sent without `Secure`, so that signing in works from another machine; staging and prod always send `__Host-` cookies with `Secure`".into(),
        });
    }
    if c.env == Environment::Dev
        && !c.server.listen.ip().is_loopback()
        && c.server.tls.cert.is_none()
    {
        out.push(Finding {
            key: "server.listen",
            problem: format!(
                "{} is reachable from other machines over plain HTTP",
                c.server.listen
            ),
        });
    }
    out
}

/// Whether a URL carries a password (`scheme://user:password@host`).
fn url_has_password(url: &Secret) -> bool {
    let s = url.expose();
    let Some((_, rest)) = s.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    match authority.rsplit_once('@') {
        Some((userinfo, _)) => userinfo.contains(':'),
        None => rest.contains("password="),
    }
}

/// A secret file must be readable by us and by nobody else.
pub fn secret_file_problem(path: &Path) -> Option<String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Some(format!("cannot read {}: {e}", path.display())),
    };
    if std::fs::File::open(path).is_err() {
        return Some(format!("cannot read {}", path.display()));
    }
    mode_problem(path, &meta)
}

#[cfg(unix)]
fn mode_problem(path: &Path, meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{} is readable by group or others (mode {mode:o}); chmod 600 it",
            path.display()
        )
    })
}

#[cfg(not(unix))]
fn mode_problem(_: &Path, _: &std::fs::Metadata) -> Option<String> {
    None
}

/// The `…_file` keys that name secret files.
fn secret_files(c: &Config) -> [(&'static str, Option<&Path>); 6] {
    [
        ("database.url_file", c.database.url_file.as_deref()),
        ("redis.url_file", c.redis.url_file.as_deref()),
        (
            "monitoring.sentry_dsn_file",
            c.monitoring.sentry_dsn_file.as_deref(),
        ),
        (
            "smart.client_secret_file",
            c.smart.client_secret_file.as_deref(),
        ),
        (
            "mail.smtp_password_file",
            c.mail.smtp_password_file.as_deref(),
        ),
        (
            "monitoring.metrics_token_file",
            c.monitoring.metrics_token_file.as_deref(),
        ),
    ]
}

/// Reads the secret files so that an unreadable one fails at start-up, not later.
pub fn unreadable_secrets(c: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    for (key, file) in secret_files(c) {
        if let Some(path) = file
            && let Err(problem) = read_secret(key.trim_end_matches("_file"), None, Some(path))
        {
            out.push(Finding { key, problem });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Duration, Loader};
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    /// A prod configuration that passes every rule, in a temporary directory.
    fn secure() -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        let keyring = dir.path().join("keyring");
        std::fs::write(&keyring, "{}").unwrap();
        std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600)).unwrap();
        let key = dir.path().join("tls.key");
        std::fs::write(&key, "k").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut c = Loader {
            env: Some("prod".into()),
            ..Loader::default()
        }
        .load()
        .unwrap();
        c.data_dir = dir.path().into();
        c.server.tls.cert = Some(dir.path().join("tls.crt"));
        c.server.tls.key = Some(key);
        c.passkeys.origin = Some("https://custodian.example.org".into());
        (dir, c)
    }

    #[test]
    fn rule_audit_retention_under_six_years() {
        let (_d, mut c) = secure();
        c.audit.retention = Duration::from_days(6 * 365 - 1);
        assert_eq!(keys(&c), ["audit.retention"]);
        c.audit.retention = Duration::from_days(6 * 365);
        assert!(keys(&c).is_empty());
    }

    #[test]
    fn rule_passkeys_need_the_https_address_people_use() {
        let (d, mut c) = secure();
        c.passkeys.origin = None;
        assert_eq!(keys(&c), ["passkeys.origin"], "no address at all");
        // mail.base_url stands in for it.
        c.mail.base_url = Some("https://custodian.example.org".into());
        assert!(keys(&c).is_empty());
        c.passkeys.origin = Some("http://custodian.example.org".into());
        c.mail.base_url = None;
        assert_eq!(keys(&c), ["passkeys.origin"], "not HTTPS");
        c.passkeys.origin = Some("https://custodian.example.org".into());
        c.mail.base_url = Some("https://records.example.org".into());
        assert_eq!(keys(&c), ["passkeys.origin"], "differs from mail.base_url");
        c.mail.base_url = None;
        // The certificate this server serves must name the passkey origin's host.
        let cert = rcgen::generate_simple_self_signed(vec!["other.example.org".to_owned()])
            .unwrap()
            .cert
            .pem();
        let path = d.path().join("tls.crt");
        std::fs::write(&path, cert).unwrap();
        let f = insecure_settings(&c);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(
            f[0].problem
                .contains("not valid for `custodian.example.org`"),
            "{f:?}"
        );
        let cert = rcgen::generate_simple_self_signed(vec!["custodian.example.org".to_owned()])
            .unwrap()
            .cert
            .pem();
        std::fs::write(&path, cert).unwrap();
        assert!(keys(&c).is_empty());
    }

    fn keys(c: &Config) -> Vec<&'static str> {
        insecure_settings(c).into_iter().map(|f| f.key).collect()
    }

    #[test]
    fn a_secure_prod_config_passes() {
        let (_d, c) = secure();
        assert_eq!(insecure_settings(&c), vec![]);
    }

    #[test]
    fn rule_no_tls() {
        let (_d, mut c) = secure();
        c.server.tls.cert = None;
        c.server.tls.key = None;
        assert_eq!(keys(&c), ["server.tls"]);
        c.server.behind_tls_proxy = true;
        assert!(keys(&c).is_empty());
    }

    #[test]
    fn rule_world_readable_tls_key() {
        let (_d, c) = secure();
        let key = c.server.tls.key.clone().unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(keys(&c), ["server.tls.key"]);
    }

    #[test]
    fn rule_missing_keyring() {
        let (_d, mut c) = secure();
        c.keys.keyring = Some(PathBuf::from("/nonexistent/keyring"));
        assert_eq!(keys(&c), ["keys.keyring"]);
    }

    #[test]
    fn rule_group_readable_keyring() {
        let (_d, c) = secure();
        std::fs::set_permissions(c.keyring_path(), std::fs::Permissions::from_mode(0o640)).unwrap();
        let f = insecure_settings(&c);
        assert_eq!(f.len(), 1);
        assert!(f[0].problem.contains("640"), "{}", f[0].problem);
    }

    #[test]
    fn rule_inline_database_password() {
        let (_d, mut c) = secure();
        c.database.url = Some(Secret::new("postgres://app:s3cret@db/custodian".into()));
        let f = insecure_settings(&c);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].key, "database.url");
        assert!(!f[0].problem.contains("s3cret"));
        c.database.url = Some(Secret::new(
            "postgres://app@db/custodian?sslmode=verify-full".into(),
        ));
        assert!(keys(&c).is_empty());
    }

    #[test]
    fn rule_inline_redis_password() {
        let (_d, mut c) = secure();
        c.redis.url = Some(Secret::new("redis://:pw@cache:6379".into()));
        assert_eq!(keys(&c), ["redis.url"]);
    }

    #[test]
    fn rule_readable_secret_file() {
        let (d, mut c) = secure();
        let f = d.path().join("db_url");
        std::fs::write(&f, "postgres://a:b@c/d").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o604)).unwrap();
        c.database.url_file = Some(f.clone());
        assert_eq!(keys(&c), ["database.url_file"]);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(keys(&c).is_empty());
        c.database.url_file = Some(d.path().join("absent"));
        assert_eq!(keys(&c), ["database.url_file"]);
        assert_eq!(unreadable_secrets(&c).len(), 1);
    }

    #[test]
    fn rule_mfa_not_required() {
        let (_d, mut c) = secure();
        c.mfa.required = false;
        assert_eq!(keys(&c), ["mfa.required"]);
    }

    #[test]
    fn rule_lockout_disabled() {
        let (_d, mut c) = secure();
        c.lockout.max_failures = 0;
        assert_eq!(keys(&c), ["lockout.max_failures"]);
        c.lockout.max_failures = 5;
        c.lockout.duration = Duration::default();
        assert_eq!(keys(&c), ["lockout.max_failures"]);
    }

    #[test]
    fn rule_idle_timeout_over_60m() {
        let (_d, mut c) = secure();
        c.session.idle_timeout = Duration::from_mins(60);
        assert!(keys(&c).is_empty());
        c.session.idle_timeout = Duration::from_mins(61);
        assert_eq!(keys(&c), ["session.idle_timeout"]);
    }

    #[test]
    fn rule_absolute_timeout_over_24h() {
        let (_d, mut c) = secure();
        c.session.absolute_timeout = Duration::from_hours(24);
        assert!(keys(&c).is_empty());
        c.session.absolute_timeout = Duration::from_hours(25);
        assert_eq!(keys(&c), ["session.absolute_timeout"]);
    }

    #[test]
    fn rule_debug_output() {
        let (_d, mut c) = secure();
        c.logging.level = "info,custodian=debug".into();
        assert_eq!(keys(&c), ["logging.level"]);
        c.logging.level = "trace".into();
        assert_eq!(keys(&c), ["logging.level"]);
    }

    #[test]
    fn rule_wildcard_cors() {
        let (_d, mut c) = secure();
        c.server.cors_origins = vec!["https://ehr.example.org".into()];
        assert!(keys(&c).is_empty());
        c.server.cors_origins = vec!["*".into()];
        assert_eq!(keys(&c), ["server.cors_origins"]);
        c.server.cors_origins = vec!["https://*.example.org".into()];
        assert_eq!(keys(&c), ["server.cors_origins"]);
    }

    #[test]
    fn rule_weak_password_hashing() {
        let (_d, mut c) = secure();
        c.password.hash_memory_kib = 1024;
        assert_eq!(keys(&c), ["password.hash_memory_kib"]);
        c.password.hash_memory_kib = 19_456;
        c.password.hash_iterations = 1;
        assert_eq!(keys(&c), ["password.hash_memory_kib"]);
    }

    #[test]
    fn rule_audit_off() {
        let (_d, mut c) = secure();
        c.audit.enabled = false;
        assert_eq!(keys(&c), ["audit.enabled"]);
    }

    #[test]
    fn rule_smart_needs_https_and_a_registered_redirect() {
        let (_d, mut c) = secure();
        c.smart.allowed_issuers = vec!["https://ehr.example/fhir".into()];
        assert_eq!(keys(&c), vec!["smart.redirect_uri"]);
        c.smart.redirect_uri = Some("https://app.example/smart/callback".into());
        assert!(keys(&c).is_empty());
        c.smart
            .allowed_issuers
            .push("http://ehr.example/fhir".into());
        c.smart.frame_ancestors = vec!["https://*.ehr.example".into()];
        c.smart.client_secret = Some(Secret::new("s".into()));
        c.smart.redirect_uri = Some("http://app.example/smart/callback".into());
        assert_eq!(
            keys(&c),
            vec![
                "smart.allowed_issuers",
                "smart.redirect_uri",
                "smart.frame_ancestors",
                "smart.client_secret"
            ]
        );
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let c = Loader {
            env: Some("prod".into()),
            ..Loader::default()
        }
        .load()
        .unwrap();
        let mut c = c;
        c.keys.keyring = Some(PathBuf::from("/nonexistent/keyring"));
        c.mfa.required = false;
        c.logging.level = "debug".into();
        let k = keys(&c);
        assert!(k.contains(&"server.tls"));
        assert!(k.contains(&"keys.keyring"));
        assert!(k.contains(&"mfa.required"));
        assert!(k.contains(&"logging.level"));
    }

    #[test]
    fn staging_generates_its_own_certificate_so_tls_is_not_missing() {
        let (_d, mut c) = secure();
        c.env = Environment::Staging;
        c.server.tls.cert = None;
        c.server.tls.key = None;
        assert!(keys(&c).is_empty());
    }

    #[test]
    fn advisories_warn_about_open_proxies_and_no_rate_limit() {
        let (_d, mut c) = secure();
        c.rate_limit.enabled = false;
        c.server.trusted_proxies = serde_json::from_str(r#""0.0.0.0/0""#).unwrap();
        let a: Vec<_> = advisories(&c).into_iter().map(|f| f.key).collect();
        assert_eq!(
            a,
            [
                "mail.smtp_host",
                "monitoring.metrics_token_file",
                "rate_limit.enabled",
                "server.trusted_proxies"
            ]
        );
    }

    #[test]
    fn dev_over_plain_http_warns_that_cookies_lose_secure() {
        let (_d, mut c) = secure();
        c.env = Environment::Dev;
        c.server.tls.cert = None;
        c.server.tls.key = None;
        let has = |c: &Config| advisories(c).iter().any(|f| f.key == "server.tls");
        assert!(has(&c), "dev without TLS warns");
        c.server.behind_tls_proxy = true;
        assert!(!has(&c), "TLS at a proxy: the cookies keep Secure");
        c.server.behind_tls_proxy = false;
        c.server.tls.cert = Some("/x.pem".into());
        c.server.tls.key = Some("/x.key".into());
        assert!(!has(&c), "dev with TLS");
        let (_d, prod) = secure();
        assert!(!has(&prod));
    }

    #[test]
    fn rule_metrics_need_a_credential_outside_dev() {
        let (d, mut c) = secure();
        c.monitoring.metrics_allow = serde_json::from_str(r#""127.0.0.1""#).unwrap();
        assert_eq!(keys(&c), ["monitoring.metrics_allow"]);
        c.monitoring.metrics_allow = serde_json::from_str("[]").unwrap();
        c.monitoring.metrics_token = Some(Secret::new("x".repeat(40)));
        assert_eq!(keys(&c), ["monitoring.metrics_token"]);
        c.monitoring.metrics_token = None;
        let file = d.path().join("metrics-token");
        std::fs::write(&file, "short\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        c.monitoring.metrics_token_file = Some(file.clone());
        assert_eq!(keys(&c), ["monitoring.metrics_token_file"]);
        std::fs::write(&file, format!("{}\n", "k".repeat(32))).unwrap();
        assert!(keys(&c).is_empty());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(keys(&c), ["monitoring.metrics_token_file"]);
    }

    #[test]
    fn rule_mail_needs_tls_a_password_file_and_an_https_base() {
        let (_d, mut c) = secure();
        c.mail.smtp_host = Some("smtp.example.org".into());
        assert_eq!(keys(&c), vec!["mail.base_url"]);
        c.mail.base_url = Some("https://custodian.example.org".into());
        assert!(keys(&c).is_empty());
        c.mail.smtp_tls = crate::config::SmtpTls::None;
        c.mail.smtp_password = Some(Secret::new("p".into()));
        c.mail.base_url = Some("http://custodian.example.org".into());
        // The passkey origin is the https:// one, the mail links' address is not.
        assert_eq!(
            keys(&c),
            vec![
                "mail.smtp_tls",
                "mail.smtp_password",
                "mail.base_url",
                "passkeys.origin"
            ]
        );
    }
}
