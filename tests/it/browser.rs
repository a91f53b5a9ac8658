//! Swagger UI in a real browser (headless Chromium): it renders the document and the
//! strict content-security policy reports no violation. This is also the test that
//! computes the style hash: on a violation, Chromium names the hash it would accept.
//!
//! Runs when `/usr/bin/chromium` exists; with `TEST_REQUIRE_BROWSER=1` (set by
//! `.ci/run`, which installs Chromium) a missing browser fails instead of skipping.

use std::process::Stdio;

use crate::support::{Backend, TestServer};

fn chromium() -> Option<&'static str> {
    let path = "/usr/bin/chromium";
    if std::path::Path::new(path).exists() {
        return Some(path);
    }
    assert!(
        std::env::var("TEST_REQUIRE_BROWSER").as_deref() != Ok("1"),
        "TEST_REQUIRE_BROWSER=1 but {path} is missing"
    );
    eprintln!("skipped: {path} is not installed");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swagger_ui_renders_without_csp_violations() {
    let Some(browser) = chromium() else { return };
    let s = TestServer::start(Backend::Sqlite).await;
    let profile = tempfile::tempdir().unwrap();
    let url = s.url("/api/docs/");
    let user_data = format!("--user-data-dir={}", profile.path().display());
    let target = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=15000",
                "--dump-dom",
            ])
            .arg(user_data)
            .arg(target)
            .stdin(Stdio::null())
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    let violations: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Content Security Policy") || l.contains("Refused to"))
        .collect();
    assert!(
        violations.is_empty(),
        "CSP violations on {url}:\n{}",
        violations.join("\n")
    );
    // Rendered: the operations of the document are in the DOM.
    assert!(
        dom.contains("opblock"),
        "Swagger UI did not render operations:\n{}",
        &dom[..dom.len().min(2000)]
    );
    assert!(
        dom.contains("/health") && dom.contains("/ready"),
        "operations missing"
    );
    assert!(dom.contains("Custodian"), "title missing");
}
