-- Name search by tokens and prefixes (kept in step between the two ladders).
--
-- `patient_terms` holds keyed tags (HMAC, 96 bits, hex) of each live patient's name
-- tokens and of their prefixes of 3 to 16 letters, one row per tag and patient; nothing
-- else. What a database reader learns from it is in docs/phi.md ("What the search
-- indexes reveal"). Rows of a deleted patient are removed with the deletion.
--
-- `patients.terms_version` is the version of the tags a row has (0: none yet; the
-- server builds them at start for rows written before this step). The exact-name blind
-- indexes are superseded by the tags: their values are cleared and their indexes dropped,
-- so they reveal nothing more.
CREATE TABLE patient_terms (
    tag        TEXT NOT NULL,
    patient_id TEXT NOT NULL REFERENCES patients (id),
    PRIMARY KEY (tag, patient_id)
);
CREATE INDEX patient_terms_patient ON patient_terms (patient_id);
ALTER TABLE patients ADD COLUMN terms_version BIGINT NOT NULL DEFAULT 0;
DROP INDEX patients_live_bi_given_name;
DROP INDEX patients_live_bi_family_name;
UPDATE patients SET bi_given_name = NULL, bi_family_name = NULL;
