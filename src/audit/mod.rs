//! Audit trail: events, the group-commit writer, the hash chain, queries and export (issue 3).
//!
//! Empty until its issue lands; the folder exists so the layout shows the architecture.
