//! Identity: users, passwords, lockout, login history, TOTP, sessions and API tokens.
//!
//! - `model`: usernames, emails, attempt reasons, the stored user;
//! - `password`: the two policies, the blocklist, argon2id on a bounded pool;
//! - `totp`: RFC 6238 codes, enrolment URI and QR code, recovery codes;
//! - `passkeys`: WebAuthn registration, second factor and sign-in with a passkey alone;
//! - `store`: the identity tables' queries;
//! - `delegation`: nobody hands out more than they hold (`Grantor`);
//! - `service`: the rules (sign-in with lockout, sessions, tokens, TOTP);
//! - `extract`: bearer authentication as an extractor (`Principal`);
//! - `routes`, `admin`: HTTP.

pub mod admin;
pub mod delegation;
pub mod extract;
pub mod model;
pub mod passkey_routes;
pub mod passkeys;
pub mod password;
pub mod roles;
pub mod routes;
pub mod service;
pub mod store;
pub mod totp;

pub use delegation::Grantor;
pub use service::{Identity, IdentityError};
