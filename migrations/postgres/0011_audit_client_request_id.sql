-- The request id a client sent, kept beside the server's own (kept in step with
-- migrations/sqlite/0011_audit_client_request_id.sql, which says why).
ALTER TABLE audit_events ADD COLUMN client_request_id TEXT;
