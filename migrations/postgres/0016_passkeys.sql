-- Passkeys (WebAuthn credentials), several per user, and the ceremonies in progress.
-- Kept in step across backends.
--
-- A passkey row holds the credential as the WebAuthn library serialises it (public
-- key, signature counter, backup flags): no secret, the private key never leaves the
-- authenticator. Its credential id is unique across every account. `user_handle` is
-- the random WebAuthn user handle of the account (the same on every passkey of a user;
-- never the user id).
CREATE TABLE passkeys (
    id            TEXT PRIMARY KEY NOT NULL,
    user_id       TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    credential_id TEXT NOT NULL UNIQUE,
    user_handle   TEXT NOT NULL,
    name          TEXT NOT NULL,
    credential    TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    last_used_at  TEXT
);
CREATE INDEX passkeys_user ON passkeys (user_id);
CREATE INDEX passkeys_handle ON passkeys (user_handle);

-- A ceremony between its challenge and its answer: the library's state, found by the
-- SHA-256 of a random id, taken once (DELETE … RETURNING) and valid until expires_at.
-- `purpose` is register, second_factor or sign_in; a registration is bound to the
-- session that started it, a second factor to its user.
CREATE TABLE passkey_ceremonies (
    id_hash    TEXT PRIMARY KEY NOT NULL,
    purpose    TEXT NOT NULL,
    user_id    TEXT,
    session_id TEXT,
    state      TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX passkey_ceremonies_expiry ON passkey_ceremonies (expires_at);

-- How each session was signed in: password, password+totp, password+recovery_code,
-- password+passkey or passkey (older sessions: NULL, read as password).
ALTER TABLE sessions ADD COLUMN method TEXT;
