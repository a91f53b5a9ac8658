-- The request id a client sent, kept beside the server's own (kept in step with
-- migrations/postgres/0011_audit_client_request_id.sql). `request_id` is always an id
-- the server made; a client's `X-Request-Id` is only what the client said. Events stored
-- before this column existed have it null, and their hashes did not cover it: the chain
-- hashes the field only when it is set, so they verify as before.
ALTER TABLE audit_events ADD COLUMN client_request_id TEXT;
