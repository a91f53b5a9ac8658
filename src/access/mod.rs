//! Access control: permissions, and the principal every protected handler must ask.
//!
//! Deny by default: a handler gets a [`Principal`] only through authentication, and the
//! only way a route gets one is through [`Authorized<R>`], whose requirement `R` (a
//! permission, or "signed in") is part of the handler's signature. A user who must still
//! enrol TOTP (`mfa.required`) is refused with `mfa_enrollment_required` except by the
//! few routes that enrolment needs (`need::SignedIn`).

use std::collections::BTreeSet;

use serde::Serialize;
use utoipa::ToSchema;

use crate::http::{ApiError, ErrorCode};

/// The built-in permissions of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, ToSchema)]
pub enum Permission {
    #[serde(rename = "patients:read")]
    PatientsRead,
    #[serde(rename = "patients:write")]
    PatientsWrite,
    #[serde(rename = "records:read")]
    RecordsRead,
    #[serde(rename = "records:write")]
    RecordsWrite,
    #[serde(rename = "phi:ssn")]
    PhiSsn,
    #[serde(rename = "audit:read")]
    AuditRead,
    #[serde(rename = "users:manage")]
    UsersManage,
    #[serde(rename = "roles:manage")]
    RolesManage,
    #[serde(rename = "breakglass")]
    BreakGlass,
    #[serde(rename = "amendments:review")]
    AmendmentsReview,
}

impl Permission {
    pub const ALL: [Permission; 10] = [
        Permission::PatientsRead,
        Permission::PatientsWrite,
        Permission::RecordsRead,
        Permission::RecordsWrite,
        Permission::PhiSsn,
        Permission::AuditRead,
        Permission::UsersManage,
        Permission::RolesManage,
        Permission::BreakGlass,
        Permission::AmendmentsReview,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Permission::PatientsRead => "patients:read",
            Permission::PatientsWrite => "patients:write",
            Permission::RecordsRead => "records:read",
            Permission::RecordsWrite => "records:write",
            Permission::PhiSsn => "phi:ssn",
            Permission::AuditRead => "audit:read",
            Permission::UsersManage => "users:manage",
            Permission::RolesManage => "roles:manage",
            Permission::BreakGlass => "breakglass",
            Permission::AmendmentsReview => "amendments:review",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// What the permission allows, in one sentence (the roles page and docs/api.md).
    pub const fn description(self) -> &'static str {
        match self {
            Permission::PatientsRead => {
                "Find and read patients' demographics (the SSN masked without phi:ssn), in the API, FHIR and the pages."
            }
            Permission::PatientsWrite => {
                "Register patients, change their demographics and delete them."
            }
            Permission::RecordsRead => {
                "Read patients' medical records and clinical data, and use the PRECISE-HBR calculator and SMART app."
            }
            Permission::RecordsWrite => "Add, change and delete medical records and clinical data.",
            Permission::PhiSsn => "See Social Security numbers in full, and search by them.",
            Permission::AuditRead => {
                "Read the audit trail, the security events, a patient's accounting of disclosures and /metrics (no patient data)."
            }
            Permission::UsersManage => {
                "Manage accounts: create, invite, change and deactivate them, reset passwords and second factors, end sessions and API tokens (only of accounts within one's own permissions)."
            }
            Permission::RolesManage => {
                "Create, change and delete roles (only with permissions one holds oneself, and never one's own role)."
            }
            Permission::BreakGlass => {
                "In an emergency, open one named patient without the read permission (or what the patient restricted), giving a reason; every use is flagged as a security event."
            }
            Permission::AmendmentsReview => {
                "Review patients' amendment requests: accept (the change is applied) or deny with a written reason."
            }
        }
    }
}

/// How the request authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// A login session (`cst_…`), by session id.
    Session(String),
    /// A personal API token (`cat_…`), by token id.
    ApiToken(String),
    /// A SMART app's access token (`sat_…`): accepted under `/fhir` only, and only
    /// within its grant's scopes.
    Smart(Box<SmartAccess>),
}

/// What a SMART access token was granted: its app, its scopes, its launch patient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmartAccess {
    pub token_id: String,
    pub grant_id: String,
    pub client_id: String,
    pub scopes: std::sync::Arc<crate::oauth::scopes::Scopes>,
    /// The launch patient (`patient/` scopes reach only this patient's compartment).
    pub patient: Option<String>,
}

/// An authenticated user, with the permissions of their role as of this request.
#[derive(Clone, Debug)]
pub struct Principal {
    pub user_id: String,
    pub username: String,
    pub email: Option<String>,
    pub role: String,
    pub permissions: BTreeSet<Permission>,
    pub credential: Credential,
    pub mfa_enabled: bool,
    /// `mfa.required` is on and this user has not confirmed TOTP yet.
    pub mfa_enrollment_pending: bool,
    /// When the password expires under the policy, RFC 3339.
    pub password_expires_at: Option<String>,
    /// A patient account's own patient record: the only one it may reach (its
    /// permissions are empty).
    pub patient: Option<String>,
}

impl Principal {
    /// Allows the request only with `permission` (and no pending TOTP enrolment).
    pub fn require(&self, permission: Permission) -> Result<(), ApiError> {
        if self.mfa_enrollment_pending {
            return Err(ApiError::new(ErrorCode::MfaEnrollmentRequired));
        }
        if self.permissions.contains(&permission) {
            Ok(())
        } else {
            Err(ApiError::new(ErrorCode::Forbidden))
        }
    }

    pub fn has(&self, permission: Permission) -> bool {
        !self.mfa_enrollment_pending && self.permissions.contains(&permission)
    }

    pub fn session_id(&self) -> Option<&str> {
        match &self.credential {
            Credential::Session(id) => Some(id),
            Credential::ApiToken(_) | Credential::Smart(_) => None,
        }
    }

    /// The SMART grant this request came with, if it came from an app.
    pub fn smart(&self) -> Option<&SmartAccess> {
        match &self.credential {
            Credential::Smart(s) => Some(s),
            _ => None,
        }
    }
}

/// What a route needs. Each marker in [`need`] is one requirement; a handler states it in
/// its signature (`Authorized<need::AuditRead>`), and authentication and authorisation
/// both happen before any other extractor reads the body, so an unauthorised caller
/// learns nothing about the route's input.
pub trait Requirement: Send + Sync + 'static {
    /// The permission, or None for "any signed-in user".
    const PERMISSION: Option<Permission>;
    /// Whether a user with a pending TOTP enrolment may pass.
    const ALLOW_PENDING_MFA: bool;
    /// Whether only an interactive session (`cst_…`) may pass: a personal API token
    /// (`cat_…`) is refused with 403 `session_required`. Identity administration and
    /// the caller's own credentials are session-only (docs/identity.md, "What an API
    /// token may do").
    const SESSION_ONLY: bool = false;
}

/// The requirement markers.
pub mod need {
    use super::{Permission, Requirement};

    macro_rules! permission {
        ($name:ident, $perm:ident) => {
            permission!($name, $perm, false);
        };
        ($name:ident, $perm:ident, $session_only:expr) => {
            #[doc = concat!("Needs `", stringify!($perm), "`.")]
            pub struct $name;
            impl Requirement for $name {
                const PERMISSION: Option<Permission> = Some(Permission::$perm);
                const ALLOW_PENDING_MFA: bool = false;
                const SESSION_ONLY: bool = $session_only;
            }
        };
    }
    permission!(PatientsRead, PatientsRead);
    permission!(PatientsWrite, PatientsWrite);
    permission!(RecordsRead, RecordsRead);
    permission!(RecordsWrite, RecordsWrite);
    permission!(AuditRead, AuditRead);
    permission!(AmendmentsReview, AmendmentsReview);
    // Who may sign in and what anyone may do are changed by a person in a session,
    // never by an API token (which could be a script's, or stolen).
    permission!(UsersManage, UsersManage, true);
    permission!(RolesManage, RolesManage, true);

    /// Any signed-in user, even one who must still enrol TOTP (`auth/me`, `auth/totp/*`,
    /// `auth/password`, `auth/logout`).
    pub struct SignedIn;
    impl Requirement for SignedIn {
        const PERMISSION: Option<Permission> = None;
        const ALLOW_PENDING_MFA: bool = true;
    }

    /// Any signed-in user with no pending TOTP enrolment.
    pub struct Enrolled;
    impl Requirement for Enrolled {
        const PERMISSION: Option<Permission> = None;
        const ALLOW_PENDING_MFA: bool = false;
    }

    /// The caller's own credentials (password, TOTP, new API tokens, ending every
    /// session): an interactive session, even one that must still enrol TOTP.
    pub struct OwnCredentials;
    impl Requirement for OwnCredentials {
        const PERMISSION: Option<Permission> = None;
        const ALLOW_PENDING_MFA: bool = true;
        const SESSION_ONLY: bool = true;
    }

    /// Like [`OwnCredentials`], for a user with no pending TOTP enrolment.
    pub struct OwnCredentialsEnrolled;
    impl Requirement for OwnCredentialsEnrolled {
        const PERMISSION: Option<Permission> = None;
        const ALLOW_PENDING_MFA: bool = false;
        const SESSION_ONLY: bool = true;
    }
}

/// A principal that meets the requirement `R`.
pub struct Authorized<R: Requirement>(pub Principal, std::marker::PhantomData<R>);

impl<R: Requirement> Authorized<R> {
    /// Checks `principal` against `R`.
    pub fn check(principal: Principal) -> Result<Self, ApiError> {
        if R::SESSION_ONLY && principal.session_id().is_none() {
            return Err(ApiError::new(ErrorCode::SessionRequired));
        }
        if principal.mfa_enrollment_pending && !R::ALLOW_PENDING_MFA {
            return Err(ApiError::new(ErrorCode::MfaEnrollmentRequired));
        }
        if let Some(p) = R::PERMISSION {
            principal.require(p)?;
        }
        Ok(Self(principal, std::marker::PhantomData))
    }
}

impl<R: Requirement> std::ops::Deref for Authorized<R> {
    type Target = Principal;
    fn deref(&self) -> &Principal {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(perms: &[Permission], pending: bool) -> Principal {
        Principal {
            user_id: "u".into(),
            username: "u".into(),
            email: None,
            role: "r".into(),
            permissions: perms.iter().copied().collect(),
            credential: Credential::Session("s".into()),
            mfa_enabled: false,
            mfa_enrollment_pending: pending,
            password_expires_at: None,
            patient: None,
        }
    }

    #[test]
    fn permissions_round_trip() {
        for p in Permission::ALL {
            let d = p.description();
            assert!(d.len() > 20 && d.ends_with('.'), "{d}");
            assert_eq!(Permission::parse(p.as_str()), Some(p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        assert_eq!(Permission::parse("admin"), None);
    }

    #[test]
    fn require_denies_by_default_and_while_enrolment_is_pending() {
        let p = principal(&[Permission::AuditRead], false);
        assert!(p.require(Permission::AuditRead).is_ok());
        assert_eq!(
            p.require(Permission::UsersManage).unwrap_err().code(),
            ErrorCode::Forbidden
        );
        let pending = principal(&[Permission::AuditRead], true);
        assert_eq!(
            pending.require(Permission::AuditRead).unwrap_err().code(),
            ErrorCode::MfaEnrollmentRequired
        );
        assert!(!pending.has(Permission::AuditRead));
        assert!(Authorized::<need::SignedIn>::check(pending.clone()).is_ok());
        assert_eq!(
            Authorized::<need::Enrolled>::check(pending)
                .err()
                .unwrap()
                .code(),
            ErrorCode::MfaEnrollmentRequired
        );
        let nurse = principal(&[Permission::PatientsRead], false);
        assert_eq!(
            Authorized::<need::AuditRead>::check(nurse)
                .err()
                .unwrap()
                .code(),
            ErrorCode::Forbidden
        );
    }
}
