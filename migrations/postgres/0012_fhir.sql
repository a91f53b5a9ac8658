-- FHIR: clinical resources (Condition, Observation, MedicationRequest, Procedure) as
-- documents sealed with their patient's data key, every version kept, and the versions
-- of patients (kept in step between the two ladders).
--
-- `body` is the resource's JSON sealed (`f1.…`) under the data key of `patient_id`,
-- bound to `fhir|<type>|<id>/_history/<version>`: a ciphertext copied to another
-- resource, type or version does not open. Nothing about the content is in the clear:
-- no code, no date, no value. Searches open the patient's resources of one type (the
-- compartment index) and filter them in memory: a database reader learns how many
-- resources of each type a patient has and when they were written, nothing more.
CREATE TABLE fhir_resources (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    patient_id    TEXT NOT NULL REFERENCES patients (id),
    version       BIGINT NOT NULL,
    body          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    deleted_at    TEXT,
    PRIMARY KEY (resource_type, id)
);
CREATE INDEX fhir_resources_compartment ON fhir_resources (patient_id, resource_type) WHERE deleted_at IS NULL;

-- Every version, the current one included; `body` is NULL for a deletion.
CREATE TABLE fhir_versions (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    version       BIGINT NOT NULL,
    patient_id    TEXT NOT NULL REFERENCES patients (id),
    body          TEXT,
    at            TEXT NOT NULL,
    PRIMARY KEY (resource_type, id, version)
);

-- Each version of a patient's fields, sealed under the patient's data key (bound to
-- `patient_versions|fields|<id>/<version>`), for FHIR vread; NULL for a deletion.
CREATE TABLE patient_versions (
    patient_id TEXT NOT NULL REFERENCES patients (id),
    version    BIGINT NOT NULL,
    fields     TEXT,
    at         TEXT NOT NULL,
    PRIMARY KEY (patient_id, version)
);
