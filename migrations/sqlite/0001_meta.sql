-- Facts about this installation (its id, when it was created). Kept in step with
-- migrations/postgres/0001_meta.sql: same tables, same columns.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
