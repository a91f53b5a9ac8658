-- Security events raised by the rules over the audit stream (failed sign-ins per
-- account or address, lockouts, break-glass, unusual patient reads, a broken audit
-- chain). Kept in step across backends. No PHI: subjects are user ids, usernames or
-- addresses; details are counts and thresholds.
CREATE TABLE security_events (
    id       TEXT PRIMARY KEY NOT NULL,
    at       TEXT NOT NULL,
    rule     TEXT NOT NULL,
    severity TEXT NOT NULL,
    subject  TEXT NOT NULL,
    detail   TEXT NOT NULL
);
CREATE INDEX security_events_at ON security_events (at);
