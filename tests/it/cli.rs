//! The binary itself: start-up refusals, `migrate`, `openapi`, TLS, SIGTERM.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::both_backends;
use crate::support::{Backend, TestDb, command};

/// Runs the binary to completion: (exit code, stdout, stderr).
pub(crate) fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = command(dir);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `serve` child process and the address it listens on.
pub(crate) struct Served {
    pub(crate) child: Child,
    pub(crate) addr: String,
    pub(crate) lines: std::sync::mpsc::Receiver<String>,
    /// What the process printed before it was listening.
    pub(crate) early: Vec<String>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `custodian serve` on a free port and waits for its "listening" line.
pub(crate) fn serve(dir: &Path, env: &[(&str, &str)]) -> Served {
    let mut cmd = command(dir);
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("CUSTODIAN_LOGGING__FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    #[allow(clippy::zombie_processes)] // `Served::drop` waits for it
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Standard error joins the same stream (the dev bootstrap prints there).
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx2.send(format!("stderr: {line}")).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut early = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(remaining)
            .unwrap_or_else(|_| panic!("server did not start"));
        early.push(line.clone());
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("listening on"))
        {
            let addr = v["addr"].as_str().unwrap().to_owned();
            return Served {
                child,
                addr,
                lines: rx,
                early,
            };
        }
    }
}

/// `custodian user create --password-stdin` with `password`; panics with its stderr
/// unless it succeeds.
pub(crate) fn create_user(
    dir: &Path,
    env: &[(&str, &str)],
    name: &str,
    role: &str,
    password: &str,
) {
    use std::io::Write;
    let mut cmd = command(dir);
    cmd.args(["user", "create", "--username", name, "--role", role])
        .arg("--password-stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(password.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn kill_term(child: &Child) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn prod_without_tls_or_keyring_refuses_listing_every_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let (code, stdout, stderr) = run(
        dir.path(),
        &["serve"],
        &[
            ("CUSTODIAN_ENV", "prod"),
            ("CUSTODIAN_DATA_DIR", &data),
            ("CUSTODIAN_MFA__REQUIRED", "false"),
            ("CUSTODIAN_LOGGING__LEVEL", "debug"),
        ],
    );
    assert_eq!(code, 78, "{stderr}");
    for key in [
        "server.tls",
        "keys.keyring",
        "mfa.required",
        "logging.level",
    ] {
        assert!(stderr.contains(key), "{key} not named:\n{stderr}");
    }
    assert!(!stdout.contains("listening"), "{stdout}");
}

#[test]
fn prod_refuses_a_world_readable_keyring_and_inline_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring");
    std::fs::write(&keyring, "{}").unwrap();
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = dir.path().display().to_string();
    let (code, _, stderr) = run(
        dir.path(),
        &["serve"],
        &[
            ("CUSTODIAN_ENV", "prod"),
            ("CUSTODIAN_DATA_DIR", &data),
            ("CUSTODIAN_SERVER__BEHIND_TLS_PROXY", "true"),
            (
                "CUSTODIAN_DATABASE__URL",
                "postgres://app:PASSWORD-CANARY@localhost/x",
            ),
        ],
    );
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("keys.keyring") && stderr.contains("644"),
        "{stderr}"
    );
    assert!(stderr.contains("database.url"), "{stderr}");
    assert!(
        !stderr.contains("PASSWORD-CANARY"),
        "the password is never printed: {stderr}"
    );
}

#[test]
fn unknown_variables_and_bad_values_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(
        dir.path(),
        &["migrate"],
        &[
            ("CUSTODIAN_SESSION__IDEL_TIMEOUT", "5m"),
            ("CUSTODIAN_LOCKOUT__DURATION", "forever"),
        ],
    );
    assert_eq!(code, 78);
    assert!(
        stderr.contains("CUSTODIAN_SESSION__IDEL_TIMEOUT"),
        "{stderr}"
    );
    assert!(stderr.contains("CUSTODIAN_LOCKOUT__DURATION"), "{stderr}");
}

#[test]
fn a_malformed_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::write(
        dir.path().join("config/dev.yaml"),
        "session:\n  idle_timeout: [\n",
    )
    .unwrap();
    let (code, _, stderr) = run(dir.path(), &["migrate"], &[]);
    assert_eq!(code, 78);
    assert!(
        stderr.contains("config/dev.yaml") && stderr.contains("YAML"),
        "{stderr}"
    );
    std::fs::write(
        dir.path().join("config/dev.yaml"),
        "lockout:\n  max_failures: many\n",
    )
    .unwrap();
    let (code, _, stderr) = run(dir.path(), &["migrate"], &[]);
    assert_eq!(code, 78);
    assert!(stderr.contains("lockout.max_failures"), "{stderr}");
}

#[test]
fn migrate_creates_and_migrates_the_default_sqlite_database() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.display().to_string();
    let (code, stdout, stderr) = run(dir.path(), &["migrate"], &[("CUSTODIAN_DATA_DIR", &data_s)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("schema version"), "{stdout}");
    assert!(data.join("custodian.sqlite").exists());
    let (code, _, stderr) = run(dir.path(), &["migrate"], &[("CUSTODIAN_DATA_DIR", &data_s)]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn openapi_command_prints_the_committed_document() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, _) = run(dir.path(), &["openapi"], &[]);
    assert_eq!(code, 0);
    let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(printed, committed);
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly_and_logs_no_request_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let mut s = serve(dir.path(), &[("CUSTODIAN_DATA_DIR", &data)]);
    let client = reqwest::Client::new();
    let res = client
        .get(format!("http://{}/health", s.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Canaries in the path, the query, a header and the body.
    let res = client
        .post(format!(
            "http://{}/api/v1/PATH-CANARY-1?ssn=QUERY-CANARY-2",
            s.addr
        ))
        .header("x-note", "HEADER-CANARY-3")
        .header("content-type", "application/json")
        .body(r#"{"name":"BODY-CANARY-4"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    kill_term(&s.child);
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // The reader thread ends at EOF, after the last line.
    let lines: Vec<String> = s.lines.iter().collect();
    assert!(
        lines.iter().any(|l| l.contains("shutdown complete")),
        "{lines:?}"
    );
    for l in &lines {
        assert!(!l.contains("CANARY"), "request data reached the log: {l}");
    }
    // One JSON line for the request, with the route pattern and no raw path.
    let line: serde_json::Value = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["request_id"] == rid.as_str())
        .unwrap_or_else(|| panic!("no log line for {rid}: {lines:?}"));
    assert_eq!(line["method"], "POST");
    assert_eq!(line["route"], "-");
    assert_eq!(line["status"], 404);
    assert!(line["latency_ms"].is_number());
}

#[tokio::test]
async fn staging_serves_tls_with_a_generated_certificate() {
    custodian::http::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    // The operator makes the keyring first (`serve` in staging would create one too).
    let env = [
        ("CUSTODIAN_ENV", "staging"),
        ("CUSTODIAN_DATA_DIR", data.as_str()),
    ];
    let (code, _, stderr) = run(dir.path(), &["keys", "rotate"], &env);
    assert_eq!(code, 0, "{stderr}");
    let s = serve(dir.path(), &env);
    let client = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let res = client
        .get(format!("https://{}/health", s.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    // Plain HTTP is not served on the TLS port.
    let plain = reqwest::get(format!("http://{}/health", s.addr)).await;
    assert!(!plain.is_ok_and(|r| r.status().is_success()));
}

#[tokio::test]
async fn prod_starts_with_a_secure_configuration() {
    custodian::http::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path, keyring) = (
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        dir.path().join("keyring"),
    );
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    custodian::crypto::Keyring::create(&keyring, "2026-01-01T00:00:00Z").unwrap();
    for p in [&key_path, &keyring] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (data, c, k) = (
        dir.path().display().to_string(),
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    let s = serve(
        dir.path(),
        &[
            ("CUSTODIAN_ENV", "prod"),
            ("CUSTODIAN_DATA_DIR", &data),
            ("CUSTODIAN_PASSKEYS__ORIGIN", "https://localhost"),
            ("CUSTODIAN_SERVER__TLS__CERT", &c),
            ("CUSTODIAN_SERVER__TLS__KEY", &k),
        ],
    );
    let client = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let res = client
        .get(format!("https://{}/ready", s.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("strict-transport-security"));
}

#[tokio::test]
async fn dev_prints_a_working_admin_password_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let s = serve(dir.path(), &[("CUSTODIAN_DATA_DIR", &data)]);
    let client = reqwest::Client::new();
    // The bootstrap lines come right after "listening".
    let mut password = s
        .early
        .iter()
        .find_map(|l| l.split("password: ").nth(1).map(|p| p.trim().to_owned()));
    for _ in 0..50 {
        if password.is_some() {
            break;
        }
        match s.lines.recv_timeout(Duration::from_secs(10)) {
            Ok(l) => {
                if let Some(p) = l.split("password: ").nth(1) {
                    password = Some(p.trim().to_owned());
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let password = password.expect("the first admin's password is printed");
    assert!(password.len() >= 20);
    let res = client
        .post(format!("http://{}/api/v1/auth/login", s.addr))
        .json(&serde_json::json!({"username": "admin", "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Dev's idle timeout is an hour (time to explore the API in Swagger UI).
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["expires_in"], 3600);
    // Over plain HTTP the sign-in cookies go without `Secure` (so signing in works from
    // another machine), and the server said so when it started.
    assert!(
        s.early.iter().any(|l| l.contains("WARN")
            && l.contains("server.tls")
            && l.contains("without `Secure`")),
        "{:#?}",
        s.early
    );
    let res = client
        .get(format!("http://{}/login", s.addr))
        .send()
        .await
        .unwrap();
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.starts_with("custodian_login=") && !cookie.contains("Secure"),
        "{cookie}"
    );
    drop(s);
    // A second start creates nobody and prints no password.
    let s = serve(dir.path(), &[("CUSTODIAN_DATA_DIR", &data)]);
    let _ = client
        .get(format!("http://{}/health", s.addr))
        .send()
        .await
        .unwrap();
    let rest: Vec<String> = s.lines.try_iter().collect();
    assert!(!rest.iter().any(|l| l.contains("password:")), "{rest:?}");
}

#[test]
fn user_create_reads_the_password_from_standard_input() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let create = |username: &str, password: &str, extra: &[&str]| {
        let mut cmd = command(dir.path());
        cmd.args([
            "user",
            "create",
            "--username",
            username,
            "--role",
            "auditor",
            "--password-stdin",
        ])
        .args(extra)
        .env("CUSTODIAN_DATA_DIR", &data)
        .env("CUSTODIAN_PASSWORD__HASH_MEMORY_KIB", "1024")
        .env("CUSTODIAN_PASSWORD__HASH_ITERATIONS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{password}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = create(
        "Auditor.One",
        "Correct-Horse-9!",
        &["--email", "a1@example.org"],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["username"], "auditor.one");
    assert!(!out.contains("Correct-Horse") && !err.contains("Correct-Horse"));
    // The policy applies, and the message names the rules, not the password.
    let (code, _, err) = create("auditor2", "weakpass", &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("missing_uppercase") && !err.contains("weakpass"),
        "{err}"
    );
    // Taken username, unknown role.
    let (code, _, err) = create("AUDITOR.ONE", "Correct-Horse-9!", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("taken"), "{err}");
    // Without --password-stdin: refused.
    let (code, _, _) = run(
        dir.path(),
        &["user", "create", "--username", "x", "--role", "nurse"],
        &[("CUSTODIAN_DATA_DIR", &data)],
    );
    assert_eq!(code, 2);
}

/// PHI canaries sent through every kind of request never reach the server's log.
#[tokio::test]
async fn phi_never_reaches_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let env = [
        ("CUSTODIAN_DATA_DIR", data.as_str()),
        ("CUSTODIAN_PASSWORD__HASH_MEMORY_KIB", "1024"),
        ("CUSTODIAN_PASSWORD__HASH_ITERATIONS", "1"),
        ("CUSTODIAN_LOGGING__LEVEL", "info"),
    ];
    create_user(dir.path(), &env, "logdoc", "doctor", "Correct-Horse-9!");
    let mut s = serve(dir.path(), &env);
    let c = reqwest::Client::new();
    let base = format!("http://{}", s.addr);
    let login: serde_json::Value = c
        .post(format!("{base}/api/v1/auth/login"))
        .json(&serde_json::json!({"username": "logdoc", "password": "Correct-Horse-9!"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t = login["access_token"].as_str().unwrap().to_owned();
    let p: serde_json::Value = c
        .post(format!("{base}/api/v1/patients"))
        .bearer_auth(&t)
        .json(&serde_json::json!({"given_name": "Logcanarygiven", "family_name": "Logcanaryfamily", "birth_date": "1970-01-01",
            "ssn": "512-34-5678", "email": "logcanary@example.org", "phone": "+1 555 0177", "address": "9 Logcanary Road"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = p["id"].as_str().unwrap();
    for url in [
        format!("{base}/api/v1/patients/{id}"),
        format!("{base}/api/v1/patients?q=Logcanaryfamily"),
        format!("{base}/api/v1/patients?q=512-34-5678&limit=0"),
        format!("{base}/api/v1/patients/Logcanarypath"),
    ] {
        c.get(url)
            .bearer_auth(&t)
            .header("x-note", "Logcanaryheader")
            .send()
            .await
            .unwrap();
    }
    c.patch(format!("{base}/api/v1/patients/{id}"))
        .bearer_auth(&t)
        .json(&serde_json::json!({"email": "Logcanarybad", "ssn": "Logcanaryssn"}))
        .send()
        .await
        .unwrap();
    kill_term(&s.child);
    s.child.wait().unwrap();
    let lines: Vec<String> = s.early.iter().cloned().chain(s.lines.iter()).collect();
    assert!(lines.len() > 5);
    for l in &lines {
        for canary in ["Logcanary", "logcanary", "512-34-5678", "0177"] {
            assert!(!l.contains(canary), "PHI reached the log: {l}");
        }
    }
}

#[test]
fn demo_seed_creates_fake_patients_and_records_itself() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let env = [("CUSTODIAN_DATA_DIR", data.as_str())];
    let (code, out, err) = run(dir.path(), &["demo", "seed", "--patients", "5"], &env);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["patients"], 5);
    assert!(v["records"].as_i64().unwrap() >= 5);
    assert!(!err.contains("could not be stored"), "{err}");
    let (code, out, _) = run(dir.path(), &["audit", "export"], &env);
    assert_eq!(code, 0);
    assert!(
        out.contains("system:demo-seed"),
        "the seeding is in the audit trail"
    );
    let (code, _, err) = run(dir.path(), &["audit", "verify"], &env);
    assert_eq!(code, 0, "{err}");
}

/// How many tables the database at `url` has (0 for a SQLite file that does not exist):
/// a command refused before it touched the database leaves 0.
async fn tables_in(url: &str) -> i64 {
    use sqlx::Connection;
    if let Some(path) = url.strip_prefix("sqlite://")
        && !Path::new(path).exists()
    {
        return 0;
    }
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    let sql = if url.starts_with("sqlite") {
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'"
    } else {
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'"
    };
    let n: i64 = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    n
}

/// Synthetic patients never land in a staging or prod database by accident: outside dev
/// `demo seed` needs the environment named again, and refuses before it opens anything.
async fn demo_seed_outside_dev_needs_the_environment_named(backend: Backend) {
    let db = TestDb::new(backend).await;
    let data = db.path().display().to_string();
    let base = [
        ("CUSTODIAN_DATA_DIR", data.as_str()),
        ("CUSTODIAN_DATABASE__URL", db.url.as_str()),
    ];
    for (env, confirm) in [
        ("staging", None),
        ("staging", Some("prod")),
        ("staging", Some("dev")),
        ("prod", None),
        ("prod", Some("staging")),
    ] {
        let mut args = vec!["--env", env, "demo", "seed", "--patients", "3"];
        if let Some(c) = confirm {
            args.extend(["--confirm-env", c]);
        }
        let (code, out, err) = run(db.path(), &args, &base);
        assert_eq!(code, 2, "{env} {confirm:?}: {out}{err}");
        assert!(err.contains(&format!("--confirm-env {env}")), "{err}");
        assert_eq!(
            tables_in(&db.url).await,
            0,
            "{env}: the database was touched"
        );
    }
    assert!(!db.path().join("keyring").exists());
    // Named: it seeds (the operator made the keyring, as staging commands need).
    let staging: Vec<(&str, &str)> = base
        .iter()
        .copied()
        .chain([("CUSTODIAN_ENV", "staging")])
        .collect();
    let (code, _, err) = run(db.path(), &["keys", "rotate"], &staging);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(
        db.path(),
        &[
            "demo",
            "seed",
            "--patients",
            "3",
            "--confirm-env",
            "staging",
        ],
        &staging,
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["patients"], 3);
}
both_backends!(demo_seed_outside_dev_needs_the_environment_named);

/// A command that needs the keyring and finds none (staging and prod do not create one
/// for offline commands) stops before it migrates or writes anything.
async fn a_missing_keyring_stops_a_command_before_the_database_is_touched(backend: Backend) {
    let db = TestDb::new(backend).await;
    let data = db.path().display().to_string();
    for env in ["staging", "prod"] {
        let vars = [
            ("CUSTODIAN_ENV", env),
            ("CUSTODIAN_DATA_DIR", data.as_str()),
            ("CUSTODIAN_DATABASE__URL", db.url.as_str()),
        ];
        for args in [
            &["audit", "verify"][..],
            &["audit", "export"],
            &[
                "patients",
                "shred",
                "--deleted-before",
                "2020-01-01T00:00:00Z",
            ],
        ] {
            let (code, _, err) = run(db.path(), args, &vars);
            assert_ne!(code, 0, "{env} {args:?}");
            assert!(err.contains("keyring"), "{env} {args:?}: {err}");
            assert_eq!(
                tables_in(&db.url).await,
                0,
                "{env} {args:?}: migrated before failing"
            );
        }
    }
}
both_backends!(a_missing_keyring_stops_a_command_before_the_database_is_touched);

/// Staging warns about a missing keyring, as it does about every setting prod refuses,
/// and starts: `serve` creates the keyring (mode 0600), as dev does.
#[tokio::test]
async fn staging_without_a_keyring_warns_creates_one_and_serves() {
    custodian::http::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let env = [
        ("CUSTODIAN_ENV", "staging"),
        ("CUSTODIAN_DATA_DIR", data.as_str()),
    ];
    let s = serve(dir.path(), &env);
    assert!(
        s.early
            .iter()
            .any(|l| l.contains("keys.keyring") && l.contains("WARN")),
        "{:#?}",
        s.early
    );
    let keyring = dir.path().join("keyring");
    let mode = std::fs::metadata(&keyring).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let client = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let res = client
        .get(format!("https://{}/ready", s.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// A missing keyring is created only for an empty database: a database that holds data
/// sealed and chained under a keyring makes staging's `serve` stop, naming the fix, and
/// no new keyring is made (data written under it would be lost to the real one).
async fn a_used_database_never_gets_a_new_keyring(backend: Backend) {
    custodian::http::tls::install_crypto_provider();
    let db = TestDb::new(backend).await;
    let data = db.path().display().to_string();
    let vars = [
        ("CUSTODIAN_ENV", "staging"),
        ("CUSTODIAN_DATA_DIR", data.as_str()),
        ("CUSTODIAN_DATABASE__URL", db.url.as_str()),
    ];
    let keyring = db.path().join("keyring");
    drop(serve(db.path(), &vars));
    assert!(keyring.exists(), "the first start made the keyring");
    std::fs::remove_file(&keyring).unwrap();

    let mut cmd = command(db.path());
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("serve started on a used database with a new keyring");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("restore the keyring"), "{err}");
    assert!(!keyring.exists(), "no new keyring");
}
both_backends!(a_used_database_never_gets_a_new_keyring);

/// `custodian user reset-totp --username U`: the operator resets a lost second factor
/// (the only administrator's, say), the sessions end, and it is audited as the command.
async fn the_operator_resets_a_lost_second_factor(backend: Backend) {
    let db = std::sync::Arc::new(TestDb::new(backend).await);
    let s =
        crate::support::TestServer::start_on(db.clone(), crate::support::Options::default()).await;
    s.user("solo", "admin", "Correct-Horse-9!").await;
    let t = s.login("solo", "Correct-Horse-9!").await;
    crate::identity::enrol(&s, &t).await;
    let data = db.path().display().to_string();
    let vars = [
        ("CUSTODIAN_DATA_DIR", data.as_str()),
        ("CUSTODIAN_DATABASE__URL", db.url.as_str()),
        ("CUSTODIAN_PASSWORD__HASH_MEMORY_KIB", "1024"),
        ("CUSTODIAN_PASSWORD__HASH_ITERATIONS", "1"),
    ];
    let (code, out, err) = run(
        db.path(),
        &["user", "reset-totp", "--username", "SOLO"],
        &vars,
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["username"], "solo");
    assert_eq!(v["notified"], false, "no verified address");
    assert!(err.contains("tell them yourself"), "{err}");
    let user = s
        .state
        .identity()
        .user_by_username("solo")
        .await
        .unwrap()
        .unwrap();
    assert!(!user.totp_enabled && user.totp_secret.is_none());
    assert_eq!(s.get_as("/api/v1/auth/me", &t).await.status(), 401);
    let events = custodian::audit::store::query(
        s.state.db(),
        &custodian::audit::store::Filter {
            actor: Some("system:user-reset-totp".into()),
            ..Default::default()
        },
        10,
        true,
    )
    .await
    .unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].resource_id.as_deref(), Some(user.id.as_str()));
    assert!(events[0].context.contains("totp_reset"));
    // Nothing left to reset, or nobody by that name: exit 2, nothing recorded.
    for (name, says) in [("solo", "no second factor"), ("nobody", "no such user")] {
        let (code, _, err) = run(
            db.path(),
            &["user", "reset-totp", "--username", name],
            &vars,
        );
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains(says), "{err}");
    }
}
both_backends!(the_operator_resets_a_lost_second_factor);
