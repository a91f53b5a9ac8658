-- Name, birth-date and SSN searches page through their own index in id order: each
-- blind index gets a (value, id) index over live patients, so a search reads at most a
-- page of entries per index instead of every patient with that name. Replaces the
-- single-column indexes. Kept in step across backends.
DROP INDEX patients_bi_ssn;
DROP INDEX patients_bi_birth_date;
DROP INDEX patients_bi_given_name;
DROP INDEX patients_bi_family_name;
CREATE INDEX patients_live_bi_ssn ON patients (bi_ssn, id) WHERE deleted_at IS NULL;
CREATE INDEX patients_live_bi_birth_date ON patients (bi_birth_date, id) WHERE deleted_at IS NULL;
CREATE INDEX patients_live_bi_given_name ON patients (bi_given_name, id) WHERE deleted_at IS NULL;
CREATE INDEX patients_live_bi_family_name ON patients (bi_family_name, id) WHERE deleted_at IS NULL;
