-- Sensitivity labels, patients' restrictions (as FHIR Consent resources) and amendment
-- requests (kept in step between the two ladders).
--
-- A record's labels (v3-ActCode sensitivity codes such as PSY or HIV) are sealed like
-- its other fields: the category of a record is itself sensitive. FHIR resources carry
-- theirs in meta.security, inside their sealed body.
ALTER TABLE records ADD COLUMN labels TEXT;

-- A patient's restriction of a sensitive category, stored as the FHIR Consent that
-- records it, sealed with the patient's data key (the category stays unreadable
-- outside the server, and is shredded with the patient). Revoking one sets status
-- inactive and keeps the row.
CREATE TABLE consents (
    id         TEXT PRIMARY KEY NOT NULL,
    patient_id TEXT NOT NULL,
    status     TEXT NOT NULL,
    body       TEXT NOT NULL,
    version    BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX consents_patient ON consents (patient_id, status);

-- A patient's request to amend their record (HIPAA §164.526). What is asked, why, the
-- reviewer's reason or note, the previous value and the patient's statement of
-- disagreement are sealed in `body` with the patient's data key; the rest says where
-- the request stands. `due_at` is 60 days after the request; `overdue_raised_at` marks
-- the security event raised once it passed undecided.
CREATE TABLE amendments (
    id                TEXT PRIMARY KEY NOT NULL,
    patient_id        TEXT NOT NULL,
    requested_by      TEXT NOT NULL,
    target            TEXT NOT NULL,
    target_id         TEXT,
    field             TEXT,
    body              TEXT NOT NULL,
    status            TEXT NOT NULL,
    due_at            TEXT NOT NULL,
    decided_at        TEXT,
    decided_by        TEXT,
    overdue_raised_at TEXT,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);
CREATE INDEX amendments_patient ON amendments (patient_id, created_at);
CREATE INDEX amendments_status ON amendments (status, due_at);

-- Who reviews amendment requests: the admin role (which holds every permission);
-- give it to other roles as the clinic decides.
INSERT INTO role_permissions (role, permission) VALUES ('admin', 'amendments:review');
