-- Fewer indexes on the audit trail: every audited request writes one row into each
-- index, and on a small machine that write is most of what the audit costs
-- (docs/performance.md, "Fourth session"). Kept in step across backends.
-- - request_id: no query looks events up by request id.
-- - (actor_id, seq): the actor filter matches `actor_id = ? OR actor = ?`, which
--   neither backend answers from an index on one of the two columns.
-- - (patient_id, seq): only PHI events name a patient; the accounting of disclosures
--   and the patient filter (`patient_id = ?`) read the partial index.
DROP INDEX audit_events_request;
DROP INDEX audit_events_actor;
DROP INDEX audit_events_patient;
CREATE INDEX audit_events_patient ON audit_events (patient_id, seq) WHERE patient_id IS NOT NULL;
