//! Password policy and hashing (being written).
