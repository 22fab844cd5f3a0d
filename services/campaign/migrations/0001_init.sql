-- Campaign definitions, frozen versions, enrollments with durable timers, step history,
-- and the identity event-stream cursor. Keyed by workspace_id first (Citus-compatible),
-- except the stream cursor, which spans every workspace.

CREATE TABLE campaigns (
    workspace_id  uuid        NOT NULL,
    id            uuid        NOT NULL,
    name          text        NOT NULL,
    description   text        NOT NULL DEFAULT '',
    state         text        NOT NULL DEFAULT 'draft',   -- draft | live | paused | archived
    draft         jsonb       NOT NULL DEFAULT '{}',
    live_version  int         NOT NULL DEFAULT 0,
    request_id    text,
    create_time   timestamptz NOT NULL DEFAULT now(),
    update_time   timestamptz NOT NULL DEFAULT now(),
    publish_time  timestamptz,
    PRIMARY KEY (workspace_id, id),
    UNIQUE (workspace_id, name),
    UNIQUE (workspace_id, request_id)
);

CREATE TABLE campaign_versions (
    workspace_id  uuid        NOT NULL,
    campaign_id   uuid        NOT NULL,
    version       int         NOT NULL,
    definition    jsonb       NOT NULL,
    publish_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, campaign_id, version)
);

CREATE TABLE enrollments (
    workspace_id      uuid        NOT NULL,
    id                uuid        NOT NULL,
    campaign_id       uuid        NOT NULL,
    version           int         NOT NULL,
    contact_id        text        NOT NULL,
    state             text        NOT NULL DEFAULT 'active',  -- active | completed | exited
    step_id           text        NOT NULL DEFAULT '',
    visit             int         NOT NULL DEFAULT 0,
    -- What the pending step waits for: 'enter' (run it now), 'timer' (a wait), 'deferred'
    -- (a send held for the window), 'event' (wait_for_event), 'event_arrived', 'retry'.
    phase             text        NOT NULL DEFAULT 'enter',
    due_at            timestamptz,
    paused            boolean     NOT NULL DEFAULT false,
    wait_event        text,
    wait_key          text,
    wait_value        jsonb,
    visits            jsonb       NOT NULL DEFAULT '{}',     -- step id -> visits so far
    cohorts           jsonb       NOT NULL DEFAULT '{}',     -- split step id -> cohort
    trigger_event     jsonb       NOT NULL DEFAULT '{}',     -- name, properties, message_id, timestamp
    phone             text        NOT NULL DEFAULT '',
    time_zone         text        NOT NULL DEFAULT '',
    attempts          int         NOT NULL DEFAULT 0,
    enroll_time       timestamptz NOT NULL,
    end_time          timestamptz,
    exit_reason       text        NOT NULL DEFAULT '',
    conversion_time   timestamptz,
    PRIMARY KEY (workspace_id, id)
);

-- At most one active enrollment per contact per campaign, whatever the re-entry policy.
CREATE UNIQUE INDEX enrollments_one_active
    ON enrollments (workspace_id, campaign_id, contact_id) WHERE state = 'active';
-- The timer queue: claimed oldest-due first with FOR UPDATE SKIP LOCKED.
CREATE INDEX enrollments_due ON enrollments (due_at) WHERE state = 'active' AND NOT paused AND due_at IS NOT NULL;
CREATE INDEX enrollments_contact ON enrollments (workspace_id, contact_id, enroll_time DESC);
CREATE INDEX enrollments_campaign ON enrollments (workspace_id, campaign_id, enroll_time DESC);

CREATE TABLE step_history (
    workspace_id   uuid        NOT NULL,
    enrollment_id  uuid        NOT NULL,
    step_id        text        NOT NULL,
    visit          int         NOT NULL,
    campaign_id    uuid        NOT NULL,
    version        int         NOT NULL,
    kind           text        NOT NULL,
    enter_time     timestamptz NOT NULL,
    end_time       timestamptz,
    outcome        text        NOT NULL DEFAULT 'waiting',
    detail         text        NOT NULL DEFAULT '',
    message_id     text        NOT NULL DEFAULT '',
    task_id        text        NOT NULL DEFAULT '',
    delivery       text        NOT NULL DEFAULT '',   -- delivered | failed, from outcome events
    task_completed boolean     NOT NULL DEFAULT false,
    -- Insertion order: steps run in one instant keep the order they ran in.
    seq            bigint      GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (workspace_id, enrollment_id, step_id, visit)
);
CREATE INDEX step_history_campaign ON step_history (workspace_id, campaign_id, version, step_id);
CREATE INDEX step_history_message ON step_history (workspace_id, message_id) WHERE message_id <> '';
CREATE INDEX step_history_task ON step_history (workspace_id, task_id) WHERE task_id <> '';

CREATE TABLE stream_cursors (
    consumer     text        PRIMARY KEY,
    cursor       text        NOT NULL DEFAULT '',
    update_time  timestamptz NOT NULL DEFAULT now()
);
