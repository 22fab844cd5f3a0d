-- Messaging: outbound and inbound SMS, conversations, consent, agents and call tasks,
-- webhook receipts and the outbox of outcome events. Every table is keyed by workspace first.

CREATE TABLE policies (
    workspace_id uuid PRIMARY KEY,
    require_opt_in boolean NOT NULL,
    help_text text NOT NULL,
    send_window_start text NOT NULL,
    send_window_end text NOT NULL,
    rate_limit_per_second double precision NOT NULL,
    daily_cap integer NOT NULL,
    update_time timestamptz NOT NULL DEFAULT now()
);

-- One row per phone and channel; the newest consent_time wins.
CREATE TABLE consents (
    workspace_id uuid NOT NULL,
    phone text NOT NULL,
    channel text NOT NULL CHECK (channel IN ('sms', 'voice')),
    subscribed boolean NOT NULL,
    consent_time timestamptz NOT NULL,
    source text NOT NULL,
    consent_text text NOT NULL DEFAULT '',
    ip text NOT NULL DEFAULT '',
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, phone, channel)
);

-- One conversation per contact phone.
CREATE TABLE conversations (
    workspace_id uuid NOT NULL,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    phone text NOT NULL,
    contact_id text NOT NULL DEFAULT '',
    agent_id text NOT NULL DEFAULT '',
    started_by_contact boolean NOT NULL,
    opt_out_flagged boolean NOT NULL DEFAULT false,
    opt_out_flag_text text NOT NULL DEFAULT '',
    last_message_time timestamptz NOT NULL DEFAULT now(),
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, id),
    UNIQUE (workspace_id, phone)
);
CREATE INDEX conversations_recent ON conversations (workspace_id, last_message_time DESC, id);

CREATE TABLE messages (
    workspace_id uuid NOT NULL,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    conversation_id uuid,
    contact_id text NOT NULL DEFAULT '',
    phone text NOT NULL,
    direction text NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    body text NOT NULL,
    -- scheduled | queued | sent | delivered | undelivered | failed | blocked | received
    status text NOT NULL,
    segments integer NOT NULL,
    encoding text NOT NULL,
    provider_message_id text,
    error_code text NOT NULL DEFAULT '',
    error_message text NOT NULL DEFAULT '',
    due_time timestamptz,
    lease_until timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    request_id text,
    campaign_id text NOT NULL DEFAULT '',
    transactional boolean NOT NULL DEFAULT false,
    is_reply boolean NOT NULL DEFAULT false,
    time_zone text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, id),
    UNIQUE (workspace_id, request_id)
);
-- The dispatcher's work list: only messages waiting for the provider.
CREATE INDEX messages_due ON messages (due_time) WHERE status IN ('queued', 'scheduled');
CREATE INDEX messages_provider_id ON messages (provider_message_id) WHERE provider_message_id IS NOT NULL;
CREATE INDEX messages_phone_time ON messages (workspace_id, phone, create_time DESC);
CREATE INDEX messages_conversation ON messages (workspace_id, conversation_id, create_time DESC);
CREATE INDEX messages_recent ON messages (workspace_id, create_time DESC, id);

-- Hand-offs per workspace: a token bucket shared by every dispatcher replica.
CREATE TABLE rate_buckets (
    workspace_id uuid PRIMARY KEY,
    tokens double precision NOT NULL,
    refill_time timestamptz NOT NULL
);

-- Webhook deliveries already applied (idempotency token, or message sid + status).
CREATE TABLE webhook_receipts (
    workspace_id uuid NOT NULL,
    key text NOT NULL,
    receive_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, key)
);

CREATE TABLE agents (
    workspace_id uuid NOT NULL,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    name text NOT NULL,
    queues text[] NOT NULL DEFAULT '{}',
    request_id text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, id),
    UNIQUE (workspace_id, request_id)
);

CREATE TABLE call_tasks (
    workspace_id uuid NOT NULL,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    contact_id text NOT NULL DEFAULT '',
    phone text NOT NULL,
    queue text NOT NULL,
    priority integer NOT NULL DEFAULT 0,
    notes text NOT NULL DEFAULT '',
    -- open | claimed | completed | cancelled
    status text NOT NULL DEFAULT 'open',
    agent_id text NOT NULL DEFAULT '',
    disposition text NOT NULL DEFAULT '',
    disposition_notes text NOT NULL DEFAULT '',
    request_id text NOT NULL,
    campaign_id text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, id),
    UNIQUE (workspace_id, request_id)
);
CREATE INDEX call_tasks_open ON call_tasks (workspace_id, queue, priority DESC, create_time) WHERE status = 'open';

-- Outcome events waiting to be sent into ingest; deleted once ingest has them.
CREATE TABLE outbox (
    workspace_id uuid NOT NULL,
    message_id text NOT NULL,
    name text NOT NULL,
    phone text NOT NULL,
    contact_id text NOT NULL DEFAULT '',
    properties jsonb NOT NULL,
    event_time timestamptz NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_time timestamptz NOT NULL DEFAULT now(),
    last_error text NOT NULL DEFAULT '',
    PRIMARY KEY (workspace_id, message_id)
);
CREATE INDEX outbox_due ON outbox (next_attempt_time);

-- Resume points of streams this service consumes (not per workspace: one stream spans all).
CREATE TABLE stream_cursors (
    name text PRIMARY KEY,
    cursor text NOT NULL,
    update_time timestamptz NOT NULL DEFAULT now()
);

-- Statuses callbacks named before the dispatcher recorded the provider's id (a fast
-- provider can call back before the hand-off's own write commits); applied once it does.
CREATE TABLE early_statuses (
    workspace_id uuid NOT NULL,
    provider_message_id text NOT NULL,
    status text NOT NULL,
    error_code text NOT NULL DEFAULT '',
    receive_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, provider_message_id, status)
);

-- Forward-only status moves: a message never goes back (see services/messaging/status.py).
CREATE FUNCTION status_rank(s text) RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE s WHEN 'scheduled' THEN 0 WHEN 'queued' THEN 0 WHEN 'sent' THEN 1 ELSE 2 END
$$;
