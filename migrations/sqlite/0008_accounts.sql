-- Account lifecycle by email. Kept in step across backends.
-- Single-use links: only the SHA-256 of the token is stored; `purpose` binds a token to
-- what it may do (invite, verify_email, reset_password).
CREATE TABLE account_tokens (
    id          TEXT PRIMARY KEY NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    purpose     TEXT NOT NULL,
    user_id     TEXT,
    email       TEXT,
    role        TEXT,
    created_by  TEXT,
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    used_at     TEXT,
    revoked_at  TEXT
);
CREATE INDEX account_tokens_purpose ON account_tokens (purpose, created_at);
CREATE INDEX account_tokens_user ON account_tokens (user_id);

-- Which address of a user was verified, and when. A user's email counts as verified only
-- while it equals `email` here: changing it needs a new verification.
CREATE TABLE email_verifications (
    user_id     TEXT PRIMARY KEY NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    email       TEXT NOT NULL,
    verified_at TEXT NOT NULL
);

-- Mails to send. The body (it holds a single-use link) is sealed with the keyring. A row
-- is claimed before its one SMTP conversation; a claim whose outcome is unknown (the
-- process stopped mid-send) is never sent again: at most once per row.
CREATE TABLE mail_outbox (
    id              TEXT PRIMARY KEY NOT NULL,
    recipient       TEXT NOT NULL,
    subject         TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    claimed_at      TEXT,
    sent_at         TEXT,
    failed_at       TEXT,
    last_error      TEXT
);
CREATE INDEX mail_outbox_due ON mail_outbox (next_attempt_at) WHERE sent_at IS NULL AND failed_at IS NULL AND claimed_at IS NULL;

-- A role with no permission, for self-registered accounts until an administrator gives
-- them a real one.
INSERT INTO roles (name, builtin, created_at) VALUES ('registered', 1, '');
