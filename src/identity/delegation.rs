//! Delegation: nobody hands out more than they hold.
//!
//! Every change to who may do what names its [`Grantor`]. A signed-in user may create,
//! assign, widen or delete only roles whose every permission they hold themselves, may
//! act on an account (role, email, activation, password, unlock, sessions) only when
//! that account's role holds nothing they lack, and never edits the permissions of
//! their own role. The operator at the command line (who holds the server's
//! configuration and database anyway) is not limited.

use super::service::IdentityError;
use super::store;
use crate::access::{Permission, Principal};
use crate::store::Db;

/// Who makes a change to accounts or roles.
#[derive(Clone, Copy)]
pub enum Grantor<'a> {
    /// The command line, the dev bootstrap, and the server's own flows (an invitation
    /// accepted, an account self-registered), whose roles were checked when they were
    /// set up.
    Operator,
    /// A signed-in user, through the API or the pages.
    User(&'a Principal),
}

impl<'a> Grantor<'a> {
    pub fn user(p: &'a Principal) -> Self {
        Grantor::User(p)
    }

    /// The permissions in `perms` the grantor does not hold (permission names this
    /// build does not know count as not held).
    pub fn missing<'p>(&self, perms: &'p [String]) -> Vec<&'p str> {
        match self {
            Grantor::Operator => Vec::new(),
            Grantor::User(p) => perms
                .iter()
                .filter(|name| !Permission::parse(name).is_some_and(|perm| p.has(perm)))
                .map(String::as_str)
                .collect(),
        }
    }

    /// Refuses unless the grantor holds every one of `perms`; `what` says what the
    /// permissions belong to ("the role nurse", "this user's role").
    pub fn covers(&self, perms: &[String], what: &str) -> Result<(), IdentityError> {
        let missing = self.missing(perms);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(IdentityError::Forbidden(format!(
                "You can only hand out or manage permissions you hold yourself; {what} holds {} that you do not.",
                missing.join(", ")
            )))
        }
    }

    /// Refuses unless the grantor holds every permission of `role`.
    pub async fn covers_role(&self, db: &Db, role: &str) -> Result<(), IdentityError> {
        if matches!(self, Grantor::Operator) {
            return Ok(());
        }
        let perms = store::role_permissions(db, role).await?;
        self.covers(&perms, &format!("the role {role}"))
    }

    /// Refuses when the grantor's own role is `role` (nobody widens or narrows the role
    /// they act with).
    pub fn not_own_role(&self, role: &str) -> Result<(), IdentityError> {
        match self {
            Grantor::User(p) if p.role == role => Err(IdentityError::Forbidden(
                "You cannot change your own role's permissions; ask another administrator.".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses unless the grantor may manage an account holding `role`.
    pub async fn may_manage(&self, db: &Db, role: &str) -> Result<(), IdentityError> {
        if matches!(self, Grantor::Operator) {
            return Ok(());
        }
        let perms = store::role_permissions(db, role).await?;
        self.covers(&perms, "this user's role")
    }

    /// The username recorded as the grantor (invitations), if a user.
    pub fn username(&self) -> Option<&str> {
        match self {
            Grantor::Operator => None,
            Grantor::User(p) => Some(&p.username),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Credential;

    fn principal(perms: &[Permission]) -> Principal {
        Principal {
            user_id: "u".into(),
            username: "u".into(),
            email: None,
            role: "mgr".into(),
            permissions: perms.iter().copied().collect(),
            credential: Credential::Session("s".into()),
            mfa_enabled: true,
            mfa_enrollment_pending: false,
            password_expires_at: None,
            patient: None,
        }
    }

    #[test]
    fn a_user_covers_only_what_they_hold() {
        let p = principal(&[Permission::UsersManage, Permission::PatientsRead]);
        let g = Grantor::user(&p);
        assert!(g.covers(&["patients:read".into()], "x").is_ok());
        let err = g
            .covers(&["patients:read".into(), "phi:ssn".into()], "the role x")
            .unwrap_err();
        assert!(
            matches!(&err, IdentityError::Forbidden(d) if d.contains("phi:ssn") && !d.contains("patients:read"))
        );
        // A name this build does not know is never covered.
        assert_eq!(g.missing(&["root".into()]), ["root"]);
        assert!(g.not_own_role("mgr").is_err());
        assert!(g.not_own_role("nurse").is_ok());
        assert!(Grantor::Operator.covers(&["phi:ssn".into()], "x").is_ok());
        assert!(Grantor::Operator.not_own_role("admin").is_ok());
    }

    #[test]
    fn a_pending_enrolment_holds_nothing() {
        let mut p = principal(&[Permission::UsersManage]);
        p.mfa_enrollment_pending = true;
        assert_eq!(
            Grantor::user(&p).missing(&["users:manage".into()]),
            ["users:manage"]
        );
    }
}
