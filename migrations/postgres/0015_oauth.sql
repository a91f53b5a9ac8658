-- The SMART App Launch authorization server: registered apps, the grants people make
-- to them, and the short-lived codes, tokens and launches of those grants. Every secret
-- (client secret, code, token, launch) is stored as its SHA-256 only; what a grant may
-- do is kept in the grant, and the role of its user is read again on every request.
-- Kept in step across backends.
CREATE TABLE oauth_clients (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL,
    confidential  BIGINT NOT NULL DEFAULT 0,
    secret_hash   TEXT,
    redirect_uris TEXT NOT NULL,
    launch_url    TEXT,
    scopes        TEXT NOT NULL,
    builtin       BIGINT NOT NULL DEFAULT 0,
    created_by    TEXT,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    disabled_at   TEXT
);

CREATE TABLE oauth_grants (
    id            TEXT PRIMARY KEY NOT NULL,
    client_id     TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    patient_id    TEXT,
    scopes        TEXT NOT NULL,
    session_id    TEXT,
    ehr_launch    BIGINT NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL,
    last_used_at  TEXT,
    revoked_at    TEXT
);
CREATE INDEX oauth_grants_user ON oauth_grants (user_id);
CREATE INDEX oauth_grants_client ON oauth_grants (client_id);

CREATE TABLE oauth_codes (
    code_hash      TEXT PRIMARY KEY NOT NULL,
    grant_id       TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    challenge      TEXT NOT NULL,
    expires_at     TEXT NOT NULL,
    used_at        TEXT
);
CREATE INDEX oauth_codes_grant ON oauth_codes (grant_id);

CREATE TABLE oauth_tokens (
    id            TEXT PRIMARY KEY NOT NULL,
    token_hash    TEXT NOT NULL UNIQUE,
    grant_id      TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    kind          TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    expires_at    TEXT NOT NULL,
    last_used_at  TEXT,
    used_at       TEXT,
    revoked_at    TEXT
);
CREATE INDEX oauth_tokens_grant ON oauth_tokens (grant_id);

CREATE TABLE oauth_launches (
    launch_hash   TEXT PRIMARY KEY NOT NULL,
    client_id     TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    patient_id    TEXT NOT NULL,
    expires_at    TEXT NOT NULL,
    used_at       TEXT
);
