-- The SMART on FHIR app. Both tables hold only server-side state of a launch; tokens
-- and PKCE verifiers are sealed with the keyring (AES-256-GCM, bound to the row), and
-- rows are deleted at use (launches), at sign-out or when the session ends (contexts).
-- Kept in step across backends.
CREATE TABLE smart_launches (
    state_hash     TEXT PRIMARY KEY NOT NULL,
    binding_hash   TEXT NOT NULL,
    session_id     TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    iss            TEXT NOT NULL,
    token_endpoint TEXT NOT NULL,
    verifier       TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    expires_at     TEXT NOT NULL
);
CREATE INDEX smart_launches_session ON smart_launches (session_id);

CREATE TABLE smart_contexts (
    id                TEXT PRIMARY KEY NOT NULL,
    cookie_hash       TEXT NOT NULL UNIQUE,
    session_id        TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    iss               TEXT NOT NULL,
    token_endpoint    TEXT NOT NULL,
    patient           TEXT NOT NULL,
    scope             TEXT NOT NULL,
    access_token      TEXT NOT NULL,
    refresh_token     TEXT,
    access_expires_at TEXT NOT NULL,
    created_at        TEXT NOT NULL
);
CREATE INDEX smart_contexts_session ON smart_contexts (session_id);
CREATE INDEX smart_contexts_user ON smart_contexts (user_id);
