//! TOTP (being written).
