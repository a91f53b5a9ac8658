//! Patients and medical records, their search and the accounting of disclosures (issue 6).
//!
//! Empty until its issue lands; the folder exists so the layout shows the architecture.
