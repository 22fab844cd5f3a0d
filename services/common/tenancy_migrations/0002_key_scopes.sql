-- What a key may do. 'full': every API of its workspace. 'write': only send events (ingest's event
-- RPCs and the HTTP API) — the key a website or app embeds, where anyone can read it.
ALTER TABLE api_keys ADD COLUMN scope text NOT NULL DEFAULT 'full' CHECK (scope IN ('full', 'write'));
