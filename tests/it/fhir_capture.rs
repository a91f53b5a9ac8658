//! Captures every FHIR answer the integration tests receive, for the outside validator
//! (`tests/fhir/run.sh`, run by `.ci/run` after the tests): an independent FHIR model
//! library then checks each resource and Bundle, so a malformed answer fails CI even
//! when no Rust assertion looks at that element.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// `<target>/fhir-capture`: `CARGO_TARGET_DIR`, else the crate's `target`.
fn dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let d = target.join("fhir-capture");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn name(test: &str, ext: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    dir().join(format!("{test}-{}-{n}.{ext}", std::process::id()))
}

/// Writes one answer (a resource: it has a `resourceType`).
pub fn capture(test: &str, body: &serde_json::Value) {
    assert!(body.get("resourceType").is_some(), "not a resource: {body}");
    std::fs::write(name(test, "json"), body.to_string()).unwrap();
}

/// Writes one NDJSON answer (a resource per line).
pub fn capture_ndjson(test: &str, text: &str) {
    std::fs::write(name(test, "ndjson"), text).unwrap();
}
