//! One integration-test binary: every test starts the real server on port 0 against a
//! fresh database (SQLite always; PostgreSQL + Redis when configured, see `support`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod access;
mod accounts;
mod audit;
mod bodies;
mod browser;
mod cli;
mod clinic;
mod conventions;
mod credentials;
mod delegation;
mod docs;
mod fhir;
mod fhir_capture;
mod health;
mod identity;
mod monitoring;
mod oauth;
mod ops;
mod passkeys;
mod phi;
mod portal;
mod privacy;
mod ratelimit;
mod search;
mod smart;
mod smart_fixture;
mod smtp_sink;
mod softkey;
mod storage;
mod web;
