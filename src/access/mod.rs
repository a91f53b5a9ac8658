//! Access control: permissions, roles, `Principal::require`, break-glass (issue 5).
//!
//! Empty until its issue lands; the folder exists so the layout shows the architecture.
