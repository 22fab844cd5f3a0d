-- Ingest keeps no tables of its own: identity stores events and dedupes them by message_id.
-- The schema exists so every service has one, and later versions have a place to migrate.
SELECT 1;
