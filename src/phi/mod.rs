//! PHI protection: the keyring, envelope encryption, blind indexes and de-identification (issue 6).
//!
//! Empty until its issue lands; the folder exists so the layout shows the architecture.
