-- Which patients each audit event names (kept in step with
-- migrations/postgres/0010_audit_patients.sql).
-- An event names a patient in its `patient_id` column (a read or a write of one
-- patient) or, when the response carried several, in its context as `patient_ids` (a
-- search page is one event listing the patients returned, not one event per patient).
-- This table indexes both, so that the patient filter and the accounting of
-- disclosures find every event that names a patient. The database fills it in the
-- transaction that inserts the event; `audit verify` checks it against the events
-- (whose hash covers `patient_id` and the context), and it is append-only like them.
CREATE TABLE audit_event_patients (
    patient_id TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    PRIMARY KEY (patient_id, seq)
) WITHOUT ROWID;

INSERT INTO audit_event_patients (patient_id, seq)
SELECT patient_id, seq FROM audit_events WHERE patient_id IS NOT NULL;

-- Replaced by the table above.
DROP INDEX audit_events_patient;

CREATE TRIGGER audit_events_name_patient AFTER INSERT ON audit_events
WHEN NEW.patient_id IS NOT NULL
BEGIN
    INSERT OR IGNORE INTO audit_event_patients (patient_id, seq) VALUES (NEW.patient_id, NEW.seq);
END;

CREATE TRIGGER audit_events_name_patients AFTER INSERT ON audit_events
WHEN NEW.context LIKE '%"patient_ids"%'
BEGIN
    INSERT OR IGNORE INTO audit_event_patients (patient_id, seq)
    SELECT value, NEW.seq FROM json_each(NEW.context, '$.patient_ids');
END;

CREATE TRIGGER audit_event_patients_no_update BEFORE UPDATE ON audit_event_patients
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;

CREATE TRIGGER audit_event_patients_no_delete BEFORE DELETE ON audit_event_patients
WHEN (SELECT purging FROM audit_guard WHERE id = 1) = 0
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;
