//! PHI protection: envelope encryption of patient fields, blind indexes, and (with the
//! records module) masking and de-identification.

pub mod envelope;
