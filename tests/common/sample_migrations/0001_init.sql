CREATE TABLE things (workspace_id uuid NOT NULL, id bigint NOT NULL, PRIMARY KEY (workspace_id, id));
