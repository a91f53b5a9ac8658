//! Patients and medical records: every field about a patient sealed with the patient's
//! data key, exact search through blind indexes, masking and de-identification, and the
//! accounting of disclosures from the audit trail.

pub mod demo;
pub mod model;
pub mod routes;
pub mod search;
pub mod service;
pub mod store;

pub use service::{Patients, PhiError};
