-- Identity and access (kept in step between migrations/sqlite and migrations/postgres).
-- Ids are UUID text, times fixed-width RFC 3339 UTC text, flags BIGINT 0/1.

CREATE TABLE roles (
    name       TEXT PRIMARY KEY NOT NULL,
    builtin    BIGINT NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);

CREATE TABLE role_permissions (
    role       TEXT NOT NULL REFERENCES roles (name) ON DELETE CASCADE,
    permission TEXT NOT NULL,
    PRIMARY KEY (role, permission)
);

INSERT INTO roles (name, builtin, created_at) VALUES
    ('admin', 1, ''), ('doctor', 1, ''), ('nurse', 1, ''), ('auditor', 1, '');

INSERT INTO role_permissions (role, permission) VALUES
    ('admin', 'patients:read'), ('admin', 'patients:write'), ('admin', 'records:read'),
    ('admin', 'records:write'), ('admin', 'phi:ssn'), ('admin', 'audit:read'),
    ('admin', 'users:manage'), ('admin', 'roles:manage'), ('admin', 'breakglass'),
    ('doctor', 'patients:read'), ('doctor', 'patients:write'), ('doctor', 'records:read'),
    ('doctor', 'records:write'), ('doctor', 'phi:ssn'),
    ('nurse', 'patients:read'), ('nurse', 'records:read'),
    ('auditor', 'audit:read');

CREATE TABLE users (
    id                  TEXT PRIMARY KEY NOT NULL,
    username            TEXT NOT NULL UNIQUE,
    email               TEXT,
    role                TEXT NOT NULL REFERENCES roles (name),
    active              BIGINT NOT NULL DEFAULT 1,
    password_hash       TEXT NOT NULL,
    password_changed_at TEXT NOT NULL,
    totp_secret         TEXT,
    totp_enabled        BIGINT NOT NULL DEFAULT 0,
    totp_last_step      BIGINT,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);
CREATE INDEX users_role ON users (role);

CREATE TABLE password_history (
    id            TEXT PRIMARY KEY NOT NULL,
    user_id       TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL
);
CREATE INDEX password_history_user ON password_history (user_id, created_at);

CREATE TABLE recovery_codes (
    user_id   TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash TEXT NOT NULL,
    used_at   TEXT,
    PRIMARY KEY (user_id, code_hash)
);

CREATE TABLE sessions (
    id                  TEXT PRIMARY KEY NOT NULL,
    user_id             TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash          TEXT NOT NULL UNIQUE,
    created_at          TEXT NOT NULL,
    last_used_at        TEXT NOT NULL,
    absolute_expires_at TEXT NOT NULL,
    revoked_at          TEXT,
    ip                  TEXT,
    user_agent          TEXT
);
CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY NOT NULL,
    user_id      TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    token_hash   TEXT NOT NULL UNIQUE,
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    last_used_at TEXT,
    revoked_at   TEXT
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

CREATE TABLE login_attempts (
    id         TEXT PRIMARY KEY NOT NULL,
    at         TEXT NOT NULL,
    username   TEXT NOT NULL,
    user_id    TEXT,
    ip         TEXT,
    user_agent TEXT,
    success    BIGINT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX login_attempts_user ON login_attempts (user_id, at);

-- Failure counters: `user:<normalised username>` (consecutive failures, existing user
-- or not) and `ip:<address>` (failures across usernames within a window).
CREATE TABLE lockouts (
    key          TEXT PRIMARY KEY NOT NULL,
    failures     BIGINT NOT NULL,
    window_start TEXT NOT NULL,
    locked_until TEXT
);
