//! Identity: users, passwords, lockout, login history, TOTP, sessions and API tokens.

pub mod password;
pub mod totp;
