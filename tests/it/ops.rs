//! Operations: `custodian check`, `custodian compliance`, backup and restore, and moving
//! a database from SQLite to PostgreSQL.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use crate::both_backends;
use crate::cli::run;
use crate::support::{Backend, Options, TestDb, TestServer, json, postgres_url};
use custodian::ops::{backup, dump};

const PW: &str = "Correct-Horse-9!";

/// A secure prod setup in `dir`: TLS files and a keyring, all 0600. Answers the
/// environment variables for the binary.
fn secure_prod(dir: &Path) -> Vec<(String, String)> {
    custodian::http::tls::install_crypto_provider();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path, keyring) = (
        dir.join("tls.crt"),
        dir.join("tls.key"),
        dir.join("keyring"),
    );
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    custodian::crypto::Keyring::create(&keyring, "2026-01-01T00:00:00Z").unwrap();
    for p in [&key_path, &keyring] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    vec![
        ("CUSTODIAN_ENV".into(), "prod".into()),
        ("CUSTODIAN_DATA_DIR".into(), dir.display().to_string()),
        (
            "CUSTODIAN_SERVER__TLS__CERT".into(),
            cert_path.display().to_string(),
        ),
        (
            "CUSTODIAN_SERVER__TLS__KEY".into(),
            key_path.display().to_string(),
        ),
        // Passkeys are bound to the address people use: a name of the certificate.
        (
            "CUSTODIAN_PASSKEYS__ORIGIN".into(),
            "https://localhost".into(),
        ),
    ]
}

fn with<'a>(base: &'a [(String, String)], extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v: Vec<(&str, &str)> = base.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    v.extend_from_slice(extra);
    v
}

#[tokio::test]
async fn check_passes_a_secure_configuration_and_names_each_problem() {
    let dir = tempfile::tempdir().unwrap();
    let env = secure_prod(dir.path());
    let e = with(&env, &[]);

    // Not migrated yet: a failure that says what to do.
    let (code, out, _) = run(dir.path(), &["check"], &e);
    assert_eq!(code, 1, "{out}");
    let l = out
        .lines()
        .find(|l| l.starts_with("database reachable"))
        .unwrap();
    assert!(
        l.contains(" fail ") && l.contains("custodian migrate"),
        "{out}"
    );
    assert!(
        !dir.path().join("custodian.sqlite").exists(),
        "check creates nothing"
    );

    let (code, _, err) = run(dir.path(), &["migrate"], &e);
    assert_eq!(code, 0, "{err}");
    // Some audit events to verify.
    let (code, _, err) = run(dir.path(), &["audit", "verify"], &e);
    assert_eq!(code, 0, "{err}");

    let (code, out, err) = run(dir.path(), &["check"], &e);
    assert_eq!(code, 0, "{out}\n{err}");
    for line in [
        "configuration ",
        "keyring file",
        "TLS private key",
        "database reachable",
        "database migrated",
        "audit chain",
    ] {
        let l = out
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("{line}: {out}"));
        assert!(l.contains(" pass "), "{l}");
    }
    let (code, out, _) = run(dir.path(), &["check", "--format", "json"], &e);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["env"], "prod");
    assert!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["status"] != "fail")
    );

    // Each seeded misconfiguration fails, naming the problem.
    for (var, value, named) in [
        (
            "CUSTODIAN_SESSION__IDLE_TIMEOUT",
            "2h",
            "session.idle_timeout",
        ),
        ("CUSTODIAN_MFA__REQUIRED", "false", "mfa.required"),
        ("CUSTODIAN_LOGGING__LEVEL", "debug", "logging.level"),
        ("CUSTODIAN_AUDIT__ENABLED", "false", "audit.enabled"),
        (
            "CUSTODIAN_SMART__ALLOWED_ISSUERS",
            "http://ehr.example/fhir",
            "smart.allowed_issuers",
        ),
    ] {
        let (code, out, _) = run(dir.path(), &["check"], &with(&env, &[(var, value)]));
        assert_eq!(code, 1, "{var}: {out}");
        let l = out
            .lines()
            .find(|l| l.contains(named))
            .unwrap_or_else(|| panic!("{named}: {out}"));
        assert!(l.contains(" fail "), "{l}");
    }
    // A keyring readable by others.
    let keyring = dir.path().join("keyring");
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out, _) = run(dir.path(), &["check"], &e);
    assert_eq!(code, 1);
    let l = out.lines().find(|l| l.starts_with("keyring file")).unwrap();
    assert!(l.contains(" fail ") && l.contains("chmod 600"), "{l}");
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600)).unwrap();

    // An edit made directly in the database breaks the chain.
    sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}", dir.path().join("custodian.sqlite").display());
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    sqlx::raw_sql("DROP TRIGGER audit_events_no_update; UPDATE audit_events SET actor = 'mallory'")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let (code, out, _) = run(dir.path(), &["check"], &e);
    assert_eq!(code, 1);
    let l = out.lines().find(|l| l.starts_with("audit chain")).unwrap();
    assert!(l.contains(" fail ") && l.contains("broken at"), "{l}");

    // Dev: the same findings are warnings, not failures.
    let dev = [
        ("CUSTODIAN_DATA_DIR", dir.path().to_str().unwrap()),
        ("CUSTODIAN_DATABASE__URL", "sqlite://dev.sqlite"),
    ];
    let (_, out, _) = run(dir.path(), &["migrate"], &dev);
    let _ = out;
    let (code, out, _) = run(dir.path(), &["check", "--set", "mfa.required=false"], &dev);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("mfa.required") && l.contains(" warn ")),
        "{out}"
    );
}

#[tokio::test]
async fn compliance_is_evaluated_against_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let env = secure_prod(dir.path());
    let e = with(&env, &[]);
    let (code, out, err) = run(dir.path(), &["compliance"], &e);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("HITRUST 01.t Session Time-out: idle 5m ≤ 15m, absolute 12h ✓"),
        "{out}"
    );
    assert!(
        out.contains("HIPAA 164.312(b) Audit controls: audit on, retention 2192 days"),
        "{out}"
    );
    assert!(out.contains("○"), "organisational controls are listed");

    let (code, out, err) = run(
        dir.path(),
        &["compliance"],
        &with(&env, &[("CUSTODIAN_SESSION__IDLE_TIMEOUT", "30m")]),
    );
    assert_eq!(code, 1);
    assert!(
        out.contains("01.t Session Time-out: idle 30m > 15m, absolute 12h ✗"),
        "{out}"
    );
    assert!(
        err.contains("01.t") && err.contains("164.312(a)(2)(iii)"),
        "{err}"
    );

    let (code, out, _) = run(dir.path(), &["compliance", "--format", "json"], &e);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = v["controls"].as_array().unwrap();
    assert!(
        c.iter()
            .any(|x| x["id"] == "09.aa" && x["verdict"] == "met")
    );
    assert!(
        c.iter()
            .any(|x| x["id"] == "08.b" && x["verdict"] == "organisational")
    );

    let report = dir.path().join("report.html");
    let (code, _, _) = run(
        dir.path(),
        &[
            "compliance",
            "--format",
            "html",
            "--output",
            report.to_str().unwrap(),
        ],
        &e,
    );
    assert_eq!(code, 0);
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(
        html.starts_with("<!doctype html>") && html.contains("<table>") && !html.contains("http"),
        "standalone"
    );
}

/// The map claims only what the software does and tests: a control that asks for a
/// plan, a procedure, training or a review is never "built in ✓", but "supported by …"
/// with the organisation's duty, or the organisation's duty alone.
#[tokio::test]
async fn compliance_claims_only_what_the_software_does() {
    let dir = tempfile::tempdir().unwrap();
    let env = secure_prod(dir.path());
    let e = with(&env, &[]);
    let (code, out, err) = run(dir.path(), &["compliance", "--format", "json"], &e);
    assert_eq!(code, 0, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let controls = v["controls"].as_array().unwrap();
    let verdict = |id: &str| {
        controls
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing"))["verdict"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // Plans, procedures, reviews, training, vulnerability management: the organisation's.
    for id in [
        "164.308(a)(7)(ii)(A)", // data backup plan
        "09.l",                 // back-up
        "10.m",                 // technical vulnerabilities
        "164.308(a)(1)(ii)(D)", // activity review
        "164.308(a)(5)(ii)(C)", // log-in monitoring (under training)
        "164.308(a)(5)(ii)(D)", // password management (under training)
        "164.312(a)(2)(ii)",    // emergency access procedure
        "09.ab",                // monitoring system use
        "11.a",                 // reporting security events
    ] {
        assert_eq!(verdict(id), "supported", "{id}");
    }
    for id in ["02.e", "164.308(a)(5)(i)", "12.c", "00.a"] {
        assert_eq!(verdict(id), "organisational", "{id}");
    }
    // Only technical controls are ✓, and each names the tests that prove it.
    for c in controls {
        let ticked = matches!(c["verdict"].as_str(), Some("built_in" | "met"));
        if ticked {
            assert_eq!(c["kind"], "technical", "{}", c["id"]);
            assert!(!c["tests"].as_array().unwrap().is_empty(), "{}", c["id"]);
        }
        if c["kind"] != "technical" {
            assert!(
                c["duty"].as_str().is_some_and(|d| !d.is_empty()),
                "{}",
                c["id"]
            );
        }
    }

    let (_, text, _) = run(dir.path(), &["compliance"], &e);
    let line = |id: &str| {
        text.lines()
            .find(|l| l.contains(&format!(" {id} ")))
            .unwrap_or_else(|| panic!("{id}: {text}"))
            .to_owned()
    };
    let backup = line("164.308(a)(7)(ii)(A)");
    assert!(
        backup.contains("supported by: ")
            && backup.contains("custodian backup")
            && backup.contains("your organisation's duty: ")
            && backup.ends_with('◐')
            && !backup.contains("built in"),
        "{backup}"
    );
    let training = line("02.e");
    assert!(
        training.contains("your organisation's duty: ")
            && training.contains("PHI banner")
            && training.ends_with('○'),
        "{training}"
    );
    assert!(line("01.t").ends_with('✓'));
}

/// `check --code` fails when clippy finds something, and passes a clean checkout.
#[test]
fn check_code_fails_when_a_tool_finds_a_problem() {
    let clean = "pub fn add(a: u32, b: u32) -> u32 {\n    a + b\n}\n";
    let lint = "pub fn same(a: u32) -> bool {\n    a == a\n}\n";
    let mut statuses = Vec::new();
    for source in [clean, lint] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Cargo.toml"),
            "[package]\nname = \"custodian\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n[workspace]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("Cargo.lock"),
            "version = 4\n\n[[package]]\nname = \"custodian\"\nversion = \"0.0.0\"\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        std::fs::write(dir.path().join("src/lib.rs"), source).unwrap();
        let d = dir.path().display().to_string();
        let (_, out, err) = run(
            dir.path(),
            &["check", "--code", "--dir", &d, "--format", "json"],
            &[("CUSTODIAN_DATA_DIR", d.as_str())],
        );
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        let clippy = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["check"] == "cargo clippy")
            .unwrap_or_else(|| panic!("{out}"))
            .clone();
        statuses.push(clippy["status"].as_str().unwrap().to_owned());
    }
    assert_eq!(statuses, ["pass", "fail"]);
}

/// Every test the compliance map names exists.
#[test]
fn every_mapped_test_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for c in custodian::ops::compliance::controls().unwrap() {
        for t in &c.tests {
            let (file, name) = t
                .rsplit_once("::")
                .unwrap_or_else(|| panic!("{}: {t}", c.id));
            let text = std::fs::read_to_string(root.join(file))
                .unwrap_or_else(|_| panic!("{}: no file {file}", c.id));
            assert!(
                text.contains(&format!("fn {name}(")),
                "{}: no test {t}",
                c.id
            );
            n += 1;
        }
    }
    assert!(n > 50, "{n}");
}

/// The dump names every table of the schema, either copied or skipped with a reason.
#[tokio::test]
async fn the_dump_covers_every_table() {
    let s = TestServer::start(Backend::Sqlite).await;
    let tables: Vec<String> = s
        .state
        .db()
        .schema()
        .await
        .unwrap()
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    for t in &tables {
        assert!(
            dump::TABLES.contains(&t.as_str()) || dump::SKIPPED.iter().any(|(s, _)| s == t),
            "table {t} is neither copied nor skipped"
        );
    }
    for t in dump::TABLES {
        assert!(
            tables.contains(&(*t).to_owned()),
            "{t} is not in the schema"
        );
    }
}

/// A server with a doctor, a patient and an API token. Answers (server, token, patient id).
async fn populated(backend: Backend) -> (TestServer, String, String) {
    let s = TestServer::start(backend).await;
    s.user("doc", "doctor", PW).await;
    let token = s.login("doc", PW).await;
    let res = s
        .send_as(
            reqwest::Method::POST,
            "/api/v1/patients",
            &token,
            Some(json!({"given_name": "Ada", "family_name": "Lovelace", "birth_date": "1961-07-04", "ssn": "123-45-6789"})),
        )
        .await;
    assert_eq!(res.status(), 201);
    let id = json(res).await["id"].as_str().unwrap().to_owned();
    let res = s.get_as(&format!("/api/v1/patients/{id}"), &token).await;
    assert_eq!(res.status(), 200);
    // A search: its event names the patient in a list, which the patient index holds
    // (rebuilt by the target's trigger on restore; verify checks it).
    let res = s.get_as("/api/v1/patients?q=lovelace", &token).await;
    assert_eq!(res.status(), 200);
    (s, token, id)
}

/// A server on `db` that uses the keyring of `original`.
async fn on_copy(db: Arc<TestDb>, original: &TestServer) -> TestServer {
    let keyring = original.db.path().join("keyring");
    TestServer::start_on(
        db,
        Options {
            sets: vec![("keys.keyring", keyring.display().to_string())],
            ..Options::default()
        },
    )
    .await
}

async fn migrated(backend: Backend) -> (Arc<TestDb>, custodian::store::Db) {
    let tdb = Arc::new(TestDb::new(backend).await);
    let db = custodian::store::Db::connect(
        &custodian::config::Secret::new(tdb.url.clone()),
        &custodian::store::PoolSettings {
            max_connections: 4,
            acquire_timeout: std::time::Duration::from_secs(5),
            sqlite_synchronous_full: true,
        },
    )
    .await
    .unwrap();
    custodian::store::migrate::migrate(&db, &custodian::clock::SystemClock)
        .await
        .unwrap();
    (tdb, db)
}

both_backends!(backup_restore_verifies_the_chain);
async fn backup_restore_verifies_the_chain(backend: Backend) {
    let (s, token, id) = populated(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("custodian.backup");
    // Online: the server keeps running and answering during the backup.
    let summary = backup::backup(s.state.db(), s.state.keys(), &file, "2026-11-23T00:00:00Z")
        .await
        .unwrap();
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Encrypted: no plaintext, no blind index, no table name after the header.
    let bytes = std::fs::read(&file).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    for canary in ["Lovelace", "patients", "doc@example.org", &id] {
        assert!(!text.contains(canary), "{canary} is readable in the backup");
    }
    assert!(
        backup::backup(s.state.db(), s.state.keys(), &file, "x")
            .await
            .is_err(),
        "never overwrites"
    );

    // Restore into a fresh database of the same backend, with the same keyring.
    let (tdb, db) = migrated(backend).await;
    let restored = backup::restore(&db, s.state.keys(), &file).await.unwrap();
    assert_eq!(restored.tables, summary.tables);
    let report = custodian::audit::service::verify(&db, s.state.keys())
        .await
        .unwrap();
    assert!(report.ok, "{report:?}");
    let events = summary
        .tables
        .iter()
        .find(|(t, _)| t == "audit_events")
        .unwrap()
        .1;
    assert!(events >= 3, "{events}");
    assert_eq!(u64::try_from(report.events).unwrap(), events);
    // A second restore into the same (no longer empty) database is refused.
    let err = backup::restore(&db, s.state.keys(), &file)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    db.close().await;

    // The copy serves the same patient to the same token.
    let copy = on_copy(tdb, &s).await;
    let res = copy.get_as(&format!("/api/v1/patients/{id}"), &token).await;
    assert_eq!(res.status(), 200);
    assert_eq!(json(res).await["family_name"], "Lovelace");
}

#[tokio::test]
async fn a_damaged_backup_is_refused() {
    let (s, _, _) = populated(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("b");
    backup::backup(s.state.db(), s.state.keys(), &file, "t")
        .await
        .unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let header_len = bytes.iter().position(|b| *b == b'\n').unwrap() + 1;

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "flipped",
            {
                let mut b = bytes.clone();
                let i = header_len + (b.len() - header_len) / 2;
                b[i] ^= 1;
                b
            },
            "does not open",
        ),
        ("truncated", bytes[..bytes.len() - 10].to_vec(), "truncated"),
        (
            "header edited",
            {
                let mut b = bytes.clone();
                let h = String::from_utf8(b[..header_len].to_vec())
                    .unwrap()
                    .replace("\"source\":\"sqlite\"", "\"source\":\"postgres\"");
                b.splice(..header_len, h.into_bytes());
                b
            },
            "does not open",
        ),
        (
            "not a backup",
            b"hello\n".to_vec(),
            "not a Custodian backup",
        ),
    ];
    for (what, content, says) in cases {
        let f = dir.path().join(what.replace(' ', "_"));
        std::fs::write(&f, content).unwrap();
        let (_tdb, db) = migrated(Backend::Sqlite).await;
        let err = backup::restore(&db, s.state.keys(), &f)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{what}: {err}");
        // Nothing was kept.
        assert!(dump::is_empty(&db).await.unwrap(), "{what}");
        db.close().await;
    }
    // Another keyring cannot open it.
    let other = tempfile::tempdir().unwrap();
    let ring = custodian::crypto::Keyring::create(&other.path().join("k"), "t").unwrap();
    let keys = custodian::crypto::SharedKeyring::new(ring);
    let (_tdb, db) = migrated(Backend::Sqlite).await;
    let err = backup::restore(&db, &keys, &file)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("another keyring"), "{err}");
}

/// SQLite → PostgreSQL: everything copied, ciphertexts as they are, chain intact; a
/// non-empty target refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_moves_to_postgres() {
    if postgres_url().is_none() {
        return;
    }
    let (s, token, id) = populated(Backend::Sqlite).await;
    let (tdb, target) = migrated(Backend::Postgres).await;
    let copied = backup::copy(s.state.db(), &target).await.unwrap();
    let patients = copied.iter().find(|(t, _)| t == "patients").unwrap().1;
    assert_eq!(patients, 1);
    let report = custodian::audit::service::verify(&target, s.state.keys())
        .await
        .unwrap();
    assert!(report.ok, "{report:?}");
    // Ciphertexts are byte for byte the same.
    let q = "SELECT family_name FROM patients";
    let a: (String,) = sqlx::query_as(q)
        .fetch_one(s.state.db().reader())
        .await
        .unwrap();
    let b: (String,) = sqlx::query_as(q).fetch_one(target.reader()).await.unwrap();
    assert_eq!(a, b);
    let err = backup::copy(s.state.db(), &target).await.unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    target.close().await;
    let copy = on_copy(tdb, &s).await;
    let res = copy.get_as(&format!("/api/v1/patients/{id}"), &token).await;
    assert_eq!(res.status(), 200);
    assert_eq!(json(res).await["given_name"], "Ada");
}

/// The commands end to end: backup and restore with the binary, and migrate-db to
/// PostgreSQL when it is available.
#[tokio::test]
async fn the_commands_back_up_restore_and_move() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a");
    std::fs::create_dir(&data).unwrap();
    let a = data.display().to_string();
    let env_a = [("CUSTODIAN_DATA_DIR", a.as_str())];
    let (code, _, err) = run(dir.path(), &["demo", "seed", "--patients", "20"], &env_a);
    assert_eq!(code, 0, "{err}");
    let file = dir.path().join("x.backup");
    let f = file.display().to_string();
    let (code, out, err) = run(dir.path(), &["backup", "--to", &f], &env_a);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("backup_id") && err.contains("keyring is not in the backup"),
        "{out}{err}"
    );

    // Restore elsewhere with a copy of the keyring.
    let data_b = dir.path().join("b");
    std::fs::create_dir(&data_b).unwrap();
    std::fs::copy(data.join("keyring"), data_b.join("keyring")).unwrap();
    let b = data_b.display().to_string();
    let env_b = [("CUSTODIAN_DATA_DIR", b.as_str())];
    let (code, _, err) = run(dir.path(), &["restore", "--from", &f], &env_b);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("audit chain intact") && err.contains("patients"),
        "{err}"
    );
    let (code, _, err) = run(dir.path(), &["audit", "verify"], &env_b);
    assert_eq!(code, 0, "{err}");
    // Without the keyring: refused, nothing restored.
    let data_c = dir.path().join("c");
    std::fs::create_dir(&data_c).unwrap();
    let c = data_c.display().to_string();
    let (code, _, err) = run(
        dir.path(),
        &["restore", "--from", &f],
        &[("CUSTODIAN_DATA_DIR", c.as_str())],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nothing was restored"), "{err}");

    if postgres_url().is_some() {
        let target = TestDb::new(Backend::Postgres).await;
        let from = format!("sqlite://{}", data.join("custodian.sqlite").display());
        let (code, _, err) = run(
            dir.path(),
            &["migrate-db", "--from", &from, "--to", &target.url],
            &env_a,
        );
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("audit chain intact"), "{err}");
        let (code, _, err) = run(
            dir.path(),
            &["migrate-db", "--from", &from, "--to", &target.url],
            &env_a,
        );
        assert_eq!(code, 1);
        assert!(err.contains("not empty"), "{err}");
    }
}
