-- Workspaces (tenants) and their API keys. Keys are stored as SHA-256 digests only:
-- they are 256-bit random secrets, so a fast hash is enough and lookup stays one index probe.
CREATE TABLE workspaces (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name            text NOT NULL UNIQUE,
    default_region  text NOT NULL DEFAULT 'US',
    settings        jsonb NOT NULL DEFAULT '{}'::jsonb,
    create_time     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    workspace_id    uuid NOT NULL REFERENCES workspaces (id),
    id              text NOT NULL,
    key_hash        bytea NOT NULL,
    label           text NOT NULL DEFAULT '',
    create_time     timestamptz NOT NULL DEFAULT now(),
    revoke_time     timestamptz,
    PRIMARY KEY (workspace_id, id)
);
CREATE UNIQUE INDEX api_keys_hash ON api_keys (key_hash);
CREATE UNIQUE INDEX api_keys_id ON api_keys (id);

-- The service-to-service token, generated once per database.
CREATE TABLE internal_secret (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    token           text NOT NULL,
    create_time     timestamptz NOT NULL DEFAULT now()
);
