-- Identity: users, their ids, contacts (one per workspace and E.164 phone), events.
-- Every table leads its primary key with workspace_id (the distribution column).

-- A person as identity knows them, before and after a phone is known.
CREATE TABLE users (
    workspace_id uuid NOT NULL,
    user_key     uuid NOT NULL,
    -- The current contact (the newest phone), NULL while no phone is known.
    contact_id   uuid,
    phone        text,
    -- Event time (epoch microseconds) of the newest event that asserted the current phone.
    phone_time   bigint,
    -- Merged traits and, per key, the event time (epoch microseconds) that set them.
    traits       jsonb NOT NULL DEFAULT '{}',
    trait_times  jsonb NOT NULL DEFAULT '{}',
    -- True once a user_id is tied to this user (an anonymous id of another identified user
    -- is then not merged into it).
    identified   boolean NOT NULL DEFAULT false,
    -- Set when this user was joined into another; its ids and events moved there.
    merged_into  uuid,
    create_time  timestamptz NOT NULL DEFAULT now(),
    update_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, user_key)
);

-- anonymous ids and user ids, each tied to one user.
CREATE TABLE identities (
    workspace_id uuid NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('anonymous', 'user')),
    external_id  text NOT NULL,
    user_key     uuid NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, kind, external_id)
);
CREATE INDEX identities_by_user ON identities (workspace_id, user_key);

CREATE TABLE contacts (
    workspace_id    uuid NOT NULL,
    id              uuid NOT NULL,
    phone           text NOT NULL,
    properties      jsonb NOT NULL DEFAULT '{}',
    -- Per key, the event time (epoch microseconds) of the value or removal that won.
    property_times  jsonb NOT NULL DEFAULT '{}',
    -- IANA zone of the phone number (phonenumbers' first zone); '' when unknown.
    phone_time_zone text NOT NULL DEFAULT '',
    create_time     timestamptz NOT NULL DEFAULT now(),
    update_time     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, id),
    CONSTRAINT contacts_one_per_phone UNIQUE (workspace_id, phone)
);
CREATE INDEX contacts_by_create_time ON contacts (workspace_id, create_time, id);
CREATE INDEX contacts_by_update_time ON contacts (workspace_id, update_time, id);
CREATE INDEX contacts_properties ON contacts USING gin (properties jsonb_path_ops);

-- Which users' events belong to a contact (a user with two phones has two contacts).
CREATE TABLE contact_users (
    workspace_id uuid NOT NULL,
    contact_id   uuid NOT NULL,
    user_key     uuid NOT NULL,
    PRIMARY KEY (workspace_id, contact_id, user_key)
);
CREATE INDEX contact_users_by_user ON contact_users (workspace_id, user_key);

CREATE SEQUENCE event_seq;

CREATE TABLE events (
    workspace_id        uuid NOT NULL,
    message_id          text NOT NULL,
    -- Stream position: the writing transaction's id, then a sequence within it.
    xid                 xid8 NOT NULL DEFAULT pg_current_xact_id(),
    seq                 bigint NOT NULL DEFAULT nextval('event_seq'),
    user_key            uuid,
    -- The contact the event belongs to now (re-pointed when the user's first phone arrives).
    contact_id          uuid,
    -- The contact it had when its transaction committed; what the stream delivers, never changed.
    recorded_contact_id uuid,
    type                smallint NOT NULL,
    name                text NOT NULL DEFAULT '',
    event_time          timestamptz NOT NULL,
    -- The normalized parley.common.v1.Event as received.
    payload             bytea NOT NULL,
    PRIMARY KEY (workspace_id, message_id)
);
CREATE INDEX events_stream ON events (xid, seq);
CREATE INDEX events_stream_by_workspace ON events (workspace_id, xid, seq);
CREATE INDEX events_by_contact ON events (workspace_id, contact_id, event_time DESC, seq DESC)
    WHERE contact_id IS NOT NULL;
CREATE INDEX events_by_user ON events (workspace_id, user_key, event_time DESC, seq DESC);
