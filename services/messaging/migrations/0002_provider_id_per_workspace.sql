-- Status callbacks find their message by (workspace, provider id). With the id alone indexed,
-- a young table without statistics had the planner AND this index with messages_recent
-- (workspace_id, ...) and read every message of the workspace per callback; one index over
-- both columns is the only sensible plan, statistics or not.
CREATE INDEX messages_provider ON messages (workspace_id, provider_message_id) WHERE provider_message_id IS NOT NULL;
DROP INDEX messages_provider_id;
