//! Custodian: a security-first healthcare API server.
//!
//! The module map follows the architecture (see `docs/architecture.md`):
//! plumbing (`config`, `store`, `http`, `clock`, `telemetry`) and one module per
//! capability. Dependencies point one way: routes → services → store.

pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod fhir;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod scrub;
pub mod store;
pub mod telemetry;

pub mod access;
pub mod accounts;
pub mod audit;
pub mod identity;
pub mod oauth;
pub mod phi;
pub mod portal;
pub mod privacy;
pub mod ratelimit;
pub mod records;
pub mod reporting;
pub mod routes;
pub mod security;
pub mod smart;
pub mod web;
