//! Operations: pre-deploy checks, the compliance map, backups, and moving a database to
//! another backend (`docs/deploy.md`).

pub mod backup;
pub mod check;
pub mod compliance;
pub mod dump;
pub mod health;
