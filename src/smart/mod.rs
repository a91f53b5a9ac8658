//! The SMART on FHIR app and the PRECISE-HBR score (issue 8).
//!
//! Empty until its issue lands; the folder exists so the layout shows the architecture.
