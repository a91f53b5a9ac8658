//! Identity: users, passwords, lockout, TOTP, sessions and API tokens (issue 4).
//!
//! Empty until its issue lands; the folder exists so the layout shows the architecture.
