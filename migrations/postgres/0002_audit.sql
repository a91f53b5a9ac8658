-- The audit trail (kept in step with migrations/sqlite/0002_audit.sql).
-- Events are append-only: a trigger refuses UPDATE, DELETE and TRUNCATE; the retention
-- purge is the one exception, allowed only inside its own transaction through audit_guard.
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

CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_events'
       AND (SELECT purging FROM audit_guard WHERE id = 1) = 1 THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit records are append-only (% on %)', TG_OP, TG_TABLE_NAME;
END
$$;

CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
