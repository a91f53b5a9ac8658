//! The audit trail (HIPAA §164.312(b)): every request and every PHI access, recorded
//! before the response is sent, chained by SHA-256, with a signed head so that edits,
//! removals and truncation are found by `custodian audit verify`.
//!
//! - `model`: the event, its vocabulary, and the exact bytes that are hashed;
//! - `store`: the tables' queries (append-only; triggers refuse UPDATE and DELETE);
//! - `writer`: group commit — one transaction for the events of many requests;
//! - `local`: the same on a SQLite file, led by the requests themselves;
//! - `service`: recording, verification, queries, export, retention purge;
//! - `middleware`: one event per request, and the `Audit` handle handlers enrich.

pub mod export;
pub mod local;
pub mod middleware;
pub mod model;
pub mod routes;
pub mod service;
pub mod store;
pub mod syncer;
pub mod writer;

pub use middleware::{Actor, Audit};
pub use model::{Action, AuditEvent, ContextValue, NewEvent, Outcome};
pub use service::{AuditLog, VerifyReport};
pub use writer::AuditError;
