//! Role rules: names, known permissions, the admin role's guarantees, and that someone
//! can always manage users.

use super::delegation::Grantor;
use super::service::IdentityError;
use super::store;
use crate::access::Permission;
use crate::store::Db;

/// The role that must keep `users:manage` and `roles:manage`.
pub const ADMIN_ROLE: &str = "admin";
/// The role of patient accounts: built in, never given a permission, never given to
/// an account without a patient record.
pub const PATIENT_ROLE: &str = "patient";

/// Role names: 1–32 of `a-z 0-9 _ -`.
pub fn check_name(name: &str) -> Result<(), IdentityError> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Invalid(
            "name",
            "must be 1 to 32 of a-z, 0-9, _ and -",
        ))
    }
}

/// Parses permission names; every unknown one is reported.
pub fn parse_permissions(names: &[String]) -> Result<Vec<Permission>, Vec<String>> {
    let mut unknown = Vec::new();
    let mut out = Vec::new();
    for n in names {
        match Permission::parse(n) {
            Some(p) if !out.contains(&p) => out.push(p),
            Some(_) => {}
            None => unknown.push(n.clone()),
        }
    }
    if unknown.is_empty() {
        Ok(out)
    } else {
        Err(unknown)
    }
}

/// The names of `permissions`.
fn names(permissions: &[Permission]) -> Vec<String> {
    permissions.iter().map(|p| p.as_str().to_owned()).collect()
}

/// Creates a role; `by` must hold every permission it gets.
pub async fn create(
    db: &Db,
    by: Grantor<'_>,
    name: &str,
    permissions: &[Permission],
    now: &str,
) -> Result<(), IdentityError> {
    check_name(name)?;
    by.covers(&names(permissions), &format!("the role {name}"))?;
    let names: Vec<&str> = permissions.iter().map(|p| p.as_str()).collect();
    if store::insert_role(db, name, &names, now).await? {
        Ok(())
    } else {
        Err(IdentityError::Conflict("a role with this name exists"))
    }
}

/// Replaces a role's permissions. `by` may not edit their own role, and must hold every
/// permission the role holds now and every one it gets (nobody widens a role beyond
/// what they hold, nor strips one that holds more than they do).
pub async fn update(
    db: &Db,
    by: Grantor<'_>,
    name: &str,
    permissions: &[Permission],
) -> Result<(), IdentityError> {
    let Some(current) = store::role(db, name).await? else {
        return Err(IdentityError::NotFound);
    };
    by.not_own_role(name)?;
    by.covers(&current.permissions, &format!("the role {name}"))?;
    by.covers(&names(permissions), "the new permission list")?;
    if name == PATIENT_ROLE && !permissions.is_empty() {
        return Err(IdentityError::Conflict(
            "the patient role holds no permission: patients reach only their own record",
        ));
    }
    let has = |p: Permission| permissions.contains(&p);
    if name == ADMIN_ROLE && !(has(Permission::UsersManage) && has(Permission::RolesManage)) {
        return Err(IdentityError::Conflict(
            "the admin role keeps users:manage and roles:manage",
        ));
    }
    let manage = Permission::UsersManage.as_str();
    if !has(Permission::UsersManage)
        && store::role_has(db, name, manage).await?
        && store::active_holders_outside(db, manage, name).await? == 0
        && store::users_with_role(db, name).await? > 0
    {
        return Err(IdentityError::Conflict(
            "no other active user could manage users; give users:manage to someone else first",
        ));
    }
    let names: Vec<&str> = permissions.iter().map(|p| p.as_str()).collect();
    store::set_role_permissions(db, name, &names).await?;
    Ok(())
}

/// Deletes a role nobody holds; `by` must hold every permission of it.
pub async fn delete(db: &Db, by: Grantor<'_>, name: &str) -> Result<(), IdentityError> {
    let Some(role) = store::role(db, name).await? else {
        return Err(IdentityError::NotFound);
    };
    by.not_own_role(name)?;
    by.covers(&role.permissions, &format!("the role {name}"))?;
    if role.builtin {
        return Err(IdentityError::Conflict("built-in roles cannot be deleted"));
    }
    if store::users_with_role(db, name).await? > 0 {
        return Err(IdentityError::Conflict(
            "users hold this role; give them another role first",
        ));
    }
    store::delete_role(db, name).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_permissions() {
        assert!(check_name("night-shift_2").is_ok());
        for bad in ["", "Admin", "a b", "x".repeat(33).as_str(), "<b>"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let ok = parse_permissions(&["audit:read".into(), "audit:read".into()]).unwrap();
        assert_eq!(ok, [Permission::AuditRead]);
        let bad =
            parse_permissions(&["audit:read".into(), "root".into(), "sudo".into()]).unwrap_err();
        assert_eq!(bad, ["root", "sudo"]);
    }
}
