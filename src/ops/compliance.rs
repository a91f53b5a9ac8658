//! `custodian compliance`: the control map (`compliance/controls.yaml`) evaluated
//! against the configuration, as text, JSON or a standalone HTML report.

use serde::{Deserialize, Serialize};

use crate::config::{Config, PasswordPolicyName};

const MAP: &str = include_str!("../../compliance/controls.yaml");

/// Longest idle timeout the session time-out controls accept.
pub const MAX_IDLE_MINUTES: u64 = 15;

/// What a control asks, and so what Custodian may claim for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The software does what the control asks (tested).
    Technical,
    /// The organisation's duty (a plan, a procedure, a review); the software helps.
    Supported,
    /// The organisation's duty alone.
    Organisational,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    pub id: String,
    pub framework: String,
    pub title: String,
    pub kind: Kind,
    /// What Custodian does (technical, supported), or what helps (organisational).
    #[serde(default)]
    pub feature: String,
    /// What the organisation must do (supported, organisational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duty: Option<String>,
    #[serde(default)]
    pub config: Vec<String>,
    #[serde(default)]
    pub tests: Vec<String>,
    #[serde(default)]
    pub evaluate: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Map {
    controls: Vec<Control>,
}

/// The map, parsed (a unit test proves it parses and every rule name is known).
pub fn controls() -> Result<Vec<Control>, String> {
    yaml_serde::from_str::<Map>(MAP)
        .map(|m| m.controls)
        .map_err(|e| format!("compliance/controls.yaml: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The configuration satisfies the rule of a technical control.
    Met,
    /// The configuration does not (a technical control, or the feature a supported one
    /// relies on).
    NotMet,
    /// A technical control served by built-in, tested behaviour (no configuration can
    /// turn it off).
    BuiltIn,
    /// The organisation's duty; the software provides the feature that helps.
    Supported,
    /// The organisation's duty alone.
    Organisational,
}

#[derive(Debug, Clone, Serialize)]
pub struct Evaluated {
    #[serde(flatten)]
    pub control: Control,
    pub verdict: Verdict,
    /// What was checked, e.g. "idle 5m ≤ 15m", and for the organisation's controls
    /// what helps and what the duty is.
    pub finding: String,
}

/// The rule names `evaluate:` may use.
pub const RULES: &[&str] = &[
    "session_timeout",
    "keyring",
    "audit",
    "mfa",
    "tls",
    "lockout",
    "password",
    "rate_limit",
    "logging",
];

fn rule(name: &str, c: &Config) -> (bool, String) {
    match name {
        "session_timeout" => {
            let idle = c.session.idle_timeout;
            let ok = idle.std().as_secs() <= MAX_IDLE_MINUTES * 60 && !idle.is_zero();
            (
                ok,
                format!(
                    "idle {idle} {} {MAX_IDLE_MINUTES}m, absolute {}",
                    if ok { "≤" } else { ">" },
                    c.session.absolute_timeout
                ),
            )
        }
        "keyring" => {
            let path = c.keyring_path();
            match crate::config::rules::secret_file_problem(&path) {
                None => (true, format!("keyring {} (mode 0600)", path.display())),
                Some(p) => (false, p),
            }
        }
        "audit" => {
            let six_years = 6 * 365;
            let days = c.audit.retention.std().as_secs() / 86_400;
            let ok = c.audit.enabled && days >= six_years;
            (
                ok,
                format!(
                    "audit {}, retention {} days (≥ {six_years})",
                    if c.audit.enabled { "on" } else { "OFF" },
                    days
                ),
            )
        }
        "mfa" => (
            c.mfa.required,
            format!(
                "TOTP {}",
                if c.mfa.required {
                    "required for every user"
                } else {
                    "optional (mfa.required: false)"
                }
            ),
        ),
        "tls" => {
            let ok = c.serves_tls() || c.server.behind_tls_proxy;
            let how = if c.server.tls.cert.is_some() {
                "served with server.tls.cert"
            } else if c.serves_tls() {
                "served with a generated certificate"
            } else if c.server.behind_tls_proxy {
                "ends at a proxy in front (server.behind_tls_proxy)"
            } else {
                "none: plain HTTP"
            };
            (ok, format!("TLS {how}"))
        }
        "lockout" => {
            let n = c.lockout.max_failures;
            let ok = (1..=10).contains(&n) && !c.lockout.duration.is_zero();
            (
                ok,
                format!("lock after {n} failures (1–10) for {}", c.lockout.duration),
            )
        }
        "password" => {
            let policy = match c.password.policy {
                PasswordPolicyName::Hitrust => "hitrust",
                PasswordPolicyName::Nist => "nist",
            };
            let strong = c.password.hash_memory_kib >= 19_456 && c.password.hash_iterations >= 2;
            let min = c.password.min_length.unwrap_or(match c.password.policy {
                PasswordPolicyName::Hitrust => 8,
                PasswordPolicyName::Nist => 15,
            });
            let ok = strong && min >= 8;
            (
                ok,
                format!(
                    "policy {policy}, minimum length {min}, argon2id m={} KiB t={}",
                    c.password.hash_memory_kib, c.password.hash_iterations
                ),
            )
        }
        "rate_limit" => (
            c.rate_limit.enabled,
            format!(
                "rate limits {}",
                if c.rate_limit.enabled { "on" } else { "OFF" }
            ),
        ),
        "logging" => {
            let level = c.logging.level.to_ascii_lowercase();
            let ok = !level.contains("debug") && !level.contains("trace");
            (ok, format!("log level `{}`", c.logging.level))
        }
        other => (false, format!("unknown rule `{other}`")),
    }
}

/// Evaluates every control against `config`. Only technical controls can be ✓: a
/// control that asks for a plan, a procedure or a review is at most supported.
pub fn evaluate(config: &Config) -> Result<Vec<Evaluated>, String> {
    Ok(controls()?
        .into_iter()
        .map(|control| {
            let checked = control.evaluate.as_deref().map(|r| rule(r, config));
            let duty = control.duty.clone().unwrap_or_default();
            let (verdict, finding) = match (control.kind, checked) {
                (Kind::Technical, Some((ok, text))) => {
                    (if ok { Verdict::Met } else { Verdict::NotMet }, text)
                }
                (Kind::Technical, None) => (Verdict::BuiltIn, "built in".to_owned()),
                (Kind::Supported, Some((false, text))) => (
                    Verdict::NotMet,
                    format!("{text}; and your organisation's duty: {duty}"),
                ),
                (Kind::Supported, checked) => (
                    Verdict::Supported,
                    format!(
                        "supported by: {}{} — your organisation's duty: {duty}",
                        control.feature,
                        checked.map(|(_, t)| format!(" ({t})")).unwrap_or_default()
                    ),
                ),
                (Kind::Organisational, _) => (
                    Verdict::Organisational,
                    if control.feature.is_empty() {
                        format!("your organisation's duty: {duty}")
                    } else {
                        format!(
                            "your organisation's duty: {duty} (what helps: {})",
                            control.feature
                        )
                    },
                ),
            };
            Evaluated {
                control,
                verdict,
                finding,
            }
        })
        .collect())
}

fn mark(v: Verdict) -> &'static str {
    match v {
        Verdict::Met | Verdict::BuiltIn => "✓",
        Verdict::NotMet => "✗",
        Verdict::Supported => "◐",
        Verdict::Organisational => "○",
    }
}

fn count(items: &[Evaluated], v: Verdict) -> usize {
    items.iter().filter(|e| e.verdict == v).count()
}

pub fn text(items: &[Evaluated], env: &str) -> String {
    let mut s = format!("Compliance map evaluated against the {env} configuration\n\n");
    for e in items {
        s.push_str(&format!(
            "{} {} {}: {} {}\n",
            e.control.framework,
            e.control.id,
            e.control.title,
            e.finding,
            mark(e.verdict)
        ));
    }
    s.push_str(&format!(
        "\n{} controls: {} met or built in (✓), {} not met by this configuration (✗), {} the organisation's with the software's help (◐), {} the organisation's alone (○)\n",
        items.len(),
        count(items, Verdict::Met) + count(items, Verdict::BuiltIn),
        count(items, Verdict::NotMet),
        count(items, Verdict::Supported),
        count(items, Verdict::Organisational),
    ));
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A standalone HTML report (no external resource).
pub fn html(items: &[Evaluated], env: &str, generated_at: &str) -> String {
    let mut rows = String::new();
    for e in items {
        let class = match e.verdict {
            Verdict::Met | Verdict::BuiltIn => "ok",
            Verdict::NotMet => "bad",
            Verdict::Supported | Verdict::Organisational => "org",
        };
        rows.push_str(&format!(
            "<tr class=\"{class}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} {}</td><td>{}</td></tr>\n",
            esc(&e.control.framework),
            esc(&e.control.id),
            esc(&e.control.title),
            esc(&e.control.feature),
            esc(&e.control.config.join(", ")),
            mark(e.verdict),
            esc(&e.finding),
            esc(&e.control.tests.join("\n")).replace('\n', "<br>"),
        ));
    }
    let not_met = count(items, Verdict::NotMet);
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Custodian compliance map ({env})</title>\n\
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;width:100%}}td,th{{border:1px solid #ccc;padding:4px 6px;vertical-align:top;font-size:13px}}\
tr.bad td{{background:#fde2e2}}tr.org td{{color:#555;background:#f4f4f4}}th{{background:#eee;text-align:left}}</style></head><body>\n\
<h1>Custodian compliance map</h1>\n<p>Evaluated against the <strong>{env}</strong> configuration at {generated_at}: {} controls, <strong>{not_met} not met</strong>. \
✓ met or built in (the software does it, tested); ✗ not met by this configuration; ◐ your organisation's duty, supported by the feature named; ○ your organisation's duty alone.</p>\n\
<table><thead><tr><th>Framework</th><th>Control</th><th>Title</th><th>What Custodian does or offers</th><th>Configuration</th><th>Evaluation</th><th>Tests</th></tr></thead><tbody>\n{rows}</tbody></table>\n</body></html>\n",
        items.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_parses_and_names_only_known_rules() {
        let all = controls().unwrap();
        assert!(all.len() >= 40, "{}", all.len());
        for c in &all {
            if let Some(r) = &c.evaluate {
                assert!(RULES.contains(&r.as_str()), "{}: {r}", c.id);
            }
            let duty = c.duty.as_deref().unwrap_or("");
            match c.kind {
                Kind::Technical => {
                    assert!(!c.feature.is_empty() && !c.tests.is_empty(), "{}", c.id);
                    assert!(duty.is_empty(), "{}: a technical control has no duty", c.id);
                }
                Kind::Supported => {
                    assert!(!c.feature.is_empty() && !c.tests.is_empty(), "{}", c.id);
                    assert!(!duty.is_empty(), "{}: say what the duty is", c.id);
                }
                Kind::Organisational => {
                    assert!(!duty.is_empty(), "{}", c.id);
                    assert!(c.tests.is_empty() && c.evaluate.is_none(), "{}", c.id);
                }
            }
        }
        for needed in [
            "164.312(a)(1)",
            "164.312(b)",
            "164.312(c)(1)",
            "164.312(d)",
            "164.312(e)(1)",
            "164.308(a)(1)(ii)(D)",
            "164.308(a)(5)(ii)(C)",
            "164.308(a)(5)(ii)(D)",
            "164.528",
            "164.514(b)",
            "01.b",
            "01.c",
            "01.d",
            "01.q",
            "01.r",
            "01.t",
            "01.v",
            "06.d",
            "09.aa",
            "09.ab",
            "09.ac",
            "09.ad",
            "10.b",
            "13.c",
            "13.j",
        ] {
            assert!(all.iter().any(|c| c.id == needed), "{needed} missing");
        }
    }

    #[test]
    fn rules_follow_the_configuration() {
        let mut c = Config::builtin(crate::config::Environment::Prod);
        assert!(rule("session_timeout", &c).0);
        assert_eq!(rule("session_timeout", &c).1, "idle 5m ≤ 15m, absolute 12h");
        c.session.idle_timeout = crate::config::Duration::from_mins(30);
        let (ok, text) = rule("session_timeout", &c);
        assert!(!ok);
        assert!(text.contains("30m > 15m"), "{text}");
        assert!(rule("mfa", &c).0);
        c.mfa.required = false;
        assert!(!rule("mfa", &c).0);
        c.logging.level = "info,custodian=debug".into();
        assert!(!rule("logging", &c).0);
        c.lockout.max_failures = 0;
        assert!(!rule("lockout", &c).0);
        assert!(!rule("nope", &c).0);
    }
}
