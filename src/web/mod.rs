//! The admin web pages (issue 5).
//!
//! Empty until its issue lands; the folder exists so the layout shows the architecture.
