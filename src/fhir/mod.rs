//! FHIR R4 (4.0.1) over Custodian's own data: Patient (the patients table) and the
//! clinical resources Condition, Observation, MedicationRequest and Procedure, stored
//! as documents sealed under their patient's data key. See docs/fhir.md.

pub mod dates;
pub mod demo;
pub mod import;
pub mod outcome;
pub mod patient;
pub mod resources;
pub mod routes;
pub mod search;
pub mod service;
pub mod store;
pub mod types;

pub use service::Fhir;
