-- Which patients each audit event names (kept in step with
-- migrations/sqlite/0010_audit_patients.sql, which says why).
CREATE TABLE audit_event_patients (
    patient_id TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    PRIMARY KEY (patient_id, seq)
);

INSERT INTO audit_event_patients (patient_id, seq)
SELECT patient_id, seq FROM audit_events WHERE patient_id IS NOT NULL;

DROP INDEX audit_events_patient;

CREATE FUNCTION audit_name_patients() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_event_patients (patient_id, seq)
    SELECT p, NEW.seq FROM (
        SELECT NEW.patient_id AS p WHERE NEW.patient_id IS NOT NULL
        UNION
        SELECT jsonb_array_elements_text(NEW.context::jsonb -> 'patient_ids')
    ) AS named
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER audit_events_name_patients AFTER INSERT ON audit_events
    FOR EACH ROW
    WHEN (NEW.patient_id IS NOT NULL OR NEW.context LIKE '%"patient_ids"%')
    EXECUTE FUNCTION audit_name_patients();

-- The append-only rule now covers the index too; a retention purge removes its rows
-- with the events, inside the purge's own transaction.
CREATE OR REPLACE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME IN ('audit_events', 'audit_event_patients')
       AND (SELECT purging FROM audit_guard WHERE id = 1) = 1 THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit records are append-only (% on %)', TG_OP, TG_TABLE_NAME;
END
$$;

CREATE TRIGGER audit_event_patients_append_only BEFORE UPDATE OR DELETE ON audit_event_patients
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_event_patients_no_truncate BEFORE TRUNCATE ON audit_event_patients
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
