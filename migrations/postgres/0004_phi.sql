-- Patients and medical records (kept in step between the two ladders).
-- Every field about a patient is sealed with the patient's data key (`f1.…`); the data
-- key is stored only wrapped by a keyring version (`v<n>.…`). `bi_*` are blind indexes
-- (HMAC) for exact search. Deleting is soft (`deleted_at`); destroying the data key
-- (`shredded_at`) makes the row unreadable for good.
CREATE TABLE patients (
    id                TEXT PRIMARY KEY NOT NULL,
    data_key          TEXT,
    kek_version       BIGINT NOT NULL,
    mrn               TEXT NOT NULL,
    given_name        TEXT NOT NULL,
    family_name       TEXT NOT NULL,
    birth_date        TEXT NOT NULL,
    sex               TEXT,
    ssn               TEXT,
    email             TEXT,
    phone             TEXT,
    address           TEXT,
    bi_mrn            TEXT NOT NULL UNIQUE,
    bi_ssn            TEXT,
    bi_birth_date     TEXT,
    bi_given_name     TEXT,
    bi_family_name    TEXT,
    version           BIGINT NOT NULL,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    deleted_at        TEXT,
    shredded_at       TEXT
);
CREATE INDEX patients_bi_ssn ON patients (bi_ssn);
CREATE INDEX patients_bi_birth_date ON patients (bi_birth_date);
CREATE INDEX patients_bi_given_name ON patients (bi_given_name);
CREATE INDEX patients_bi_family_name ON patients (bi_family_name);
CREATE INDEX patients_kek_version ON patients (kek_version);

CREATE TABLE records (
    id          TEXT PRIMARY KEY NOT NULL,
    patient_id  TEXT NOT NULL REFERENCES patients (id),
    diagnosis   TEXT NOT NULL,
    treatment   TEXT,
    notes       TEXT,
    recorded_at TEXT NOT NULL,
    version     BIGINT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    deleted_at  TEXT
);
CREATE INDEX records_patient ON records (patient_id, recorded_at);
