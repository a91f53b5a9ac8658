-- Patient accounts (kept in step between the two ladders).
--
-- A patient account is an ordinary user with the built-in `patient` role (which holds
-- no permission, ever) and a link to exactly one patient record. The link is set when
-- the patient accepts an invitation made from their record, and never changes; one
-- record has at most one account. No foreign key: a crypto-shredded patient keeps the
-- link's id, and the account then reaches nothing.
ALTER TABLE users ADD COLUMN patient_id TEXT;
CREATE UNIQUE INDEX users_patient ON users (patient_id);

-- A patient invitation carries the patient it links to.
ALTER TABLE account_tokens ADD COLUMN patient_id TEXT;

INSERT INTO roles (name, builtin, created_at) VALUES ('patient', 1, '');
