//! Captures FHIR answers for the outside validator (stub).
pub fn capture(_test: &str, _body: &serde_json::Value) {}
pub fn capture_ndjson(_test: &str, _text: &str) {}
