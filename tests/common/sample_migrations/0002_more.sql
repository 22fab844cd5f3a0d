ALTER TABLE things ADD COLUMN name text NOT NULL DEFAULT '';
CREATE INDEX things_name ON things (workspace_id, name);
