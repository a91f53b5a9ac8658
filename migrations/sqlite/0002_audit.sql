-- The audit trail (kept in step with migrations/postgres/0002_audit.sql).
-- Events are append-only: triggers refuse UPDATE and DELETE; the retention purge is the
-- one exception, allowed only inside its own transaction through audit_guard.
CREATE TABLE audit_events (
    seq           BIGINT PRIMARY KEY NOT NULL,
    id            TEXT NOT NULL UNIQUE,
    at            TEXT NOT NULL,
    actor_id      TEXT,
    actor         TEXT,
    action        TEXT NOT NULL,
    resource_type TEXT,
    resource_id   TEXT,
    patient_id    TEXT,
    method        TEXT,
    path          TEXT,
    status        BIGINT,
    ip            TEXT,
    user_agent    TEXT,
    request_id    TEXT,
    outcome       TEXT NOT NULL,
    break_glass   BIGINT NOT NULL DEFAULT 0,
    reason        TEXT,
    context       TEXT NOT NULL DEFAULT '{}',
    prev_hash     TEXT NOT NULL,
    hash          TEXT NOT NULL
);
CREATE INDEX audit_events_at ON audit_events (at);
CREATE INDEX audit_events_actor ON audit_events (actor_id, seq);
CREATE INDEX audit_events_patient ON audit_events (patient_id, seq);
CREATE INDEX audit_events_action ON audit_events (action, seq);
CREATE INDEX audit_events_request ON audit_events (request_id);

-- The chain head, kept apart from the events and signed (HMAC with a keyring key), so
-- that truncating the table or rewriting the whole chain is detected.
CREATE TABLE audit_head (
    id          BIGINT PRIMARY KEY NOT NULL,
    seq         BIGINT NOT NULL,
    hash        TEXT NOT NULL,
    key_version BIGINT NOT NULL,
    mac         TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash, key_version, mac, updated_at)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000', 0, '', '');

-- Anchors left by retention purges: the chain continues from the last one.
CREATE TABLE audit_checkpoints (
    seq         BIGINT PRIMARY KEY NOT NULL,
    hash        TEXT NOT NULL,
    purged      BIGINT NOT NULL,
    at          TEXT NOT NULL,
    key_version BIGINT NOT NULL,
    mac         TEXT NOT NULL
);

CREATE TABLE audit_guard (
    id      BIGINT PRIMARY KEY NOT NULL,
    purging BIGINT NOT NULL
);
INSERT INTO audit_guard (id, purging) VALUES (1, 0);

CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;

CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
WHEN (SELECT purging FROM audit_guard WHERE id = 1) = 0
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;

CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit checkpoints are append-only');
END;

CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit checkpoints are append-only');
END;
