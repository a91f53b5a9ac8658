//! `custodian check`: the pre-deploy checks. Each check is a row: pass, warn, fail or
//! skip (with the reason). Nothing is skipped silently, and any fail makes the command
//! exit non-zero.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::config::{Config, Environment, rules};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    Skip,
}

impl Status {
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Skip => "skip",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub check: String,
    pub status: Status,
    pub detail: String,
}

fn row(check: impl Into<String>, status: Status, detail: impl Into<String>) -> Row {
    Row {
        check: check.into(),
        status,
        detail: detail.into(),
    }
}

/// The configuration rules: each finding fails in prod and warns elsewhere (as at
/// start-up); the advisories warn.
pub fn configuration(config: &Config) -> Vec<Row> {
    let mut out = Vec::new();
    let mut findings = rules::insecure_settings(config);
    findings.extend(rules::unreadable_secrets(config));
    let severity = if config.env == Environment::Prod {
        Status::Fail
    } else {
        Status::Warn
    };
    if findings.is_empty() {
        out.push(row(
            "configuration",
            Status::Pass,
            format!("every {} rule holds", config.env),
        ));
    }
    for f in findings {
        out.push(row(
            format!("configuration: {}", f.key),
            severity,
            f.problem,
        ));
    }
    for a in rules::advisories(config) {
        out.push(row(
            format!("configuration: {}", a.key),
            Status::Warn,
            a.problem,
        ));
    }
    out
}

/// Permissions of the keyring and of the TLS private key (any environment).
pub fn files(config: &Config) -> Vec<Row> {
    let mut out = Vec::new();
    let keyring = config.keyring_path();
    let missing = !keyring.exists();
    out.push(match rules::secret_file_problem(&keyring) {
        Some(_) if missing && config.env != Environment::Prod => row(
            "keyring file",
            Status::Warn,
            format!(
                "no keyring at {}: {} creates one at the first start (back it up)",
                keyring.display(),
                if config.env == Environment::Dev {
                    "dev"
                } else {
                    "`serve` in staging"
                }
            ),
        ),
        None => row(
            "keyring file",
            Status::Pass,
            format!("{} is readable by this user only", keyring.display()),
        ),
        Some(p) => row("keyring file", Status::Fail, p),
    });
    match &config.server.tls.key {
        Some(key) => out.push(match rules::secret_file_problem(key) {
            None => row(
                "TLS private key",
                Status::Pass,
                format!("{} is readable by this user only", key.display()),
            ),
            Some(p) => row("TLS private key", Status::Fail, p),
        }),
        None => out.push(row(
            "TLS private key",
            Status::Skip,
            "no server.tls.key configured",
        )),
    }
    out
}

/// The database: reachable, migrated, and its audit chain verifies.
pub async fn database(config: &Config) -> Vec<Row> {
    let mut out = Vec::new();
    // A SQLite file that does not exist is reported, not created.
    if let Ok(secrets) = config.resolve_secrets() {
        let url = secrets.database_url.expose();
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .map(|p| p.split('?').next().unwrap_or(p))
            .filter(|p| *p != ":memory:" && !p.is_empty())
            && !Path::new(path).exists()
        {
            out.push(row(
                "database reachable",
                Status::Fail,
                format!("no SQLite database at {path}: run `custodian migrate` to create it"),
            ));
            return out;
        }
    }
    let db = match crate::app::connect_database(config).await {
        Ok(db) => db,
        Err(e) => {
            out.push(row("database reachable", Status::Fail, format!("{e:#}")));
            return out;
        }
    };
    if let Err(e) = db.ping().await {
        out.push(row("database reachable", Status::Fail, e.to_string()));
        db.close().await;
        return out;
    }
    out.push(row(
        "database reachable",
        Status::Pass,
        db.backend().as_str(),
    ));
    let migrated = match crate::store::migrate::status(&db).await {
        Ok(st) if st.pending.is_empty() && st.changed.is_empty() && st.unknown.is_empty() => {
            out.push(row(
                "database migrated",
                Status::Pass,
                format!("schema version {}", crate::store::migrate::MIGRATIONS.len()),
            ));
            true
        }
        Ok(st) => {
            let mut why = Vec::new();
            if !st.pending.is_empty() {
                why.push(format!(
                    "migrations {:?} are not applied: run `custodian migrate`",
                    st.pending
                ));
            }
            if !st.changed.is_empty() {
                why.push(format!(
                    "migrations {:?} were changed after they were applied",
                    st.changed
                ));
            }
            if !st.unknown.is_empty() {
                why.push(format!(
                    "the database has migrations {:?} this binary does not know: run a newer custodian",
                    st.unknown
                ));
            }
            out.push(row("database migrated", Status::Fail, why.join("; ")));
            false
        }
        Err(e) => {
            out.push(row("database migrated", Status::Fail, e.to_string()));
            false
        }
    };
    if migrated && config.env == Environment::Staging && !config.keyring_path().exists() {
        out.push(row(
            "audit chain",
            Status::Skip,
            "no keyring yet to verify it with (see the keyring row)",
        ));
    } else if migrated {
        match crate::app::open_keyring(config, &crate::clock::SystemClock) {
            Ok(keys) => match crate::audit::service::verify(&db, &keys).await {
                Ok(r) if r.ok => out.push(row(
                    "audit chain",
                    Status::Pass,
                    format!("{} events verify", r.events),
                )),
                Ok(r) => out.push(row(
                    "audit chain",
                    Status::Fail,
                    format!(
                        "broken at {}: {}",
                        r.first_bad.unwrap_or_default(),
                        r.reason.unwrap_or_default()
                    ),
                )),
                Err(e) => out.push(row("audit chain", Status::Fail, e.to_string())),
            },
            Err(e) => out.push(row("audit chain", Status::Fail, format!("{e:#}"))),
        }
    } else {
        out.push(row(
            "audit chain",
            Status::Skip,
            "the database is not migrated",
        ));
    }
    db.close().await;
    out
}

fn tool_installed(args: &[&str]) -> bool {
    Command::new("cargo")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_tool(name: &str, dir: &Path, args: &[&str]) -> Row {
    match Command::new("cargo").args(args).current_dir(dir).output() {
        Ok(o) if o.status.success() => row(name, Status::Pass, format!("cargo {}", args.join(" "))),
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stderr);
            let tail: Vec<&str> = text.lines().rev().take(6).collect();
            row(
                name,
                Status::Fail,
                format!(
                    "cargo {} failed: {}",
                    args.join(" "),
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ),
            )
        }
        Err(e) => row(name, Status::Fail, format!("cannot run cargo: {e}")),
    }
}

/// Where a RustSec advisory database may be (for offline use).
fn advisory_db() -> Option<std::path::PathBuf> {
    let candidates = [
        std::env::var_os("CUSTODIAN_ADVISORY_DB").map(std::path::PathBuf::from),
        std::env::var_os("CARGO_HOME").map(|h| std::path::PathBuf::from(h).join("advisory-dbs")),
        std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo/advisory-dbs")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_dir())
}

/// The code checks (`--code`, in a source checkout): clippy, cargo-deny, cargo-audit.
pub fn code(dir: &Path) -> Vec<Row> {
    let mut out = Vec::new();
    let manifest = dir.join("Cargo.toml");
    let is_checkout =
        std::fs::read_to_string(&manifest).is_ok_and(|t| t.contains("name = \"custodian\""));
    if !is_checkout {
        out.push(row(
            "code checks",
            Status::Fail,
            format!(
                "{} is not a Custodian source checkout (run --code from the repository)",
                dir.display()
            ),
        ));
        return out;
    }
    out.push(run_tool(
        "cargo clippy",
        dir,
        &[
            "clippy",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ],
    ));
    let db = advisory_db();
    if tool_installed(&["deny", "--version"]) {
        match &db {
            // cargo-deny reads its advisory database from `db-path` in deny.toml, which
            // points at the same place (~/.cargo/advisory-dbs); --offline never fetches.
            Some(p) => out.push(run_tool(
                &format!(
                    "cargo deny (advisories from {}, licenses, bans, sources)",
                    p.display()
                ),
                dir,
                &["deny", "--offline", "check"],
            )),
            None => {
                out.push(run_tool(
                    "cargo deny (licenses, bans, sources)",
                    dir,
                    &["deny", "--offline", "check", "licenses", "bans", "sources"],
                ));
                out.push(row(
                    "cargo deny (advisories)",
                    Status::Skip,
                    "no local RustSec advisory database (clone github.com/rustsec/advisory-db into ~/.cargo/advisory-dbs, or set CUSTODIAN_ADVISORY_DB); no network is used",
                ));
            }
        }
    } else {
        out.push(row(
            "cargo deny",
            Status::Skip,
            "cargo-deny is not installed (cargo install cargo-deny --locked)",
        ));
    }
    if tool_installed(&["audit", "--version"]) {
        let db = std::env::var_os("CUSTODIAN_ADVISORY_DB")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|h| std::path::PathBuf::from(h).join(".cargo/advisory-db"))
            })
            .filter(|p| p.join("crates").is_dir());
        match &db {
            Some(p) => {
                let path = p.display().to_string();
                out.push(run_tool(
                    "cargo audit",
                    dir,
                    &["audit", "--no-fetch", "--db", &path],
                ));
            }
            None => out.push(row(
                "cargo audit",
                Status::Skip,
                "no local RustSec advisory database (set CUSTODIAN_ADVISORY_DB); no network is used",
            )),
        }
    } else {
        out.push(row(
            "cargo audit",
            Status::Skip,
            "cargo-audit is not installed (cargo install cargo-audit --locked)",
        ));
    }
    out
}

/// The rows as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let w = rows
        .iter()
        .map(|r| r.check.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut s = format!("{:<w$}  {:<6}  detail\n", "check", "status");
    for r in rows {
        s.push_str(&format!(
            "{:<w$}  {:<6}  {}\n",
            r.check,
            r.status.as_str(),
            r.detail
        ));
    }
    let fails = rows.iter().filter(|r| r.status == Status::Fail).count();
    let warns = rows.iter().filter(|r| r.status == Status::Warn).count();
    let skips = rows.iter().filter(|r| r.status == Status::Skip).count();
    s.push_str(&format!(
        "\n{} checks: {fails} failed, {warns} warnings, {skips} skipped\n",
        rows.len()
    ));
    s
}
