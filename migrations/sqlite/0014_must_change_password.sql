-- "Must change password at next sign-in": set when an administrator typed the password
-- (the admin pages do so by default; the API on request), cleared by any change the
-- user makes. While it is set, sign-in answers 403 password_expired (kept in step
-- between the two ladders).
ALTER TABLE users ADD COLUMN must_change_password BIGINT NOT NULL DEFAULT 0;
