-- Catalog of pg_kafka_bridge. Created in schema kafka (named in the control file).

-- Subscription definitions. Read through the view kafka.subscriptions, which hides option
-- values (broker credentials) from roles other than the owner.
CREATE TABLE subscription_catalog (
    id               serial PRIMARY KEY,
    name             text NOT NULL UNIQUE,
    owner            oid NOT NULL,
    brokers          text NOT NULL,
    topic            text NOT NULL,
    -- The target is stored by name so that a dropped and recreated table is found again.
    target_schema    name NOT NULL,
    target_table     name NOT NULL,
    format           text NOT NULL CHECK (format IN ('json', 'text', 'bytea', 'change')),
    mode             text NOT NULL CHECK (mode IN ('insert', 'upsert')),
    key_columns      name[],
    start_from       text NOT NULL CHECK (start_from IN ('earliest', 'latest')),
    batch_size       integer NOT NULL CHECK (batch_size > 0),
    batch_timeout_ms integer NOT NULL CHECK (batch_timeout_ms >= 0),
    workers          integer NOT NULL CHECK (workers > 0),
    options          jsonb NOT NULL DEFAULT '{}',
    enabled          boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- Partitions of the topic at the first start; start_from applies to these only.
    initial_partitions integer
);

-- The durable consumer position: the next offset to apply, per partition. Advanced only in
-- the transaction that applies the rows before it. Rows belong to a subscription by id (a
-- subscription dropped and created again under its name is another one); the name is
-- there to read.
CREATE TABLE offsets (
    subscription_id integer NOT NULL REFERENCES subscription_catalog (id) ON DELETE CASCADE,
    subscription text NOT NULL,
    topic        text NOT NULL,
    partition    integer NOT NULL,
    next_offset  bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, topic, partition)
);

-- Messages that could not become rows, with the reason. Kept when the subscription is
-- dropped (then only superusers see them); delete them when dealt with. They belong to a
-- subscription by id, never by its reusable name.
CREATE TABLE dead_letters (
    id           bigserial PRIMARY KEY,
    subscription_id integer NOT NULL,
    subscription text NOT NULL,
    topic        text NOT NULL,
    partition    integer NOT NULL,
    "offset"     bigint NOT NULL,
    key          bytea,
    payload      bytea,
    error        text NOT NULL,
    failed_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_position ON dead_letters (subscription_id, topic, partition, "offset");

-- Publication definitions. Each owns the logical replication slot named in slot_name,
-- created and dropped with it. Read through the view kafka.publications.
CREATE TABLE publication_catalog (
    id            serial PRIMARY KEY,
    name          text NOT NULL UNIQUE,
    owner         oid NOT NULL,
    brokers       text NOT NULL,
    -- Tables by OID, so that renames follow; a dropped table simply stops producing changes.
    tables        oid[] NOT NULL,
    topic         text NOT NULL,
    progress_topic text NOT NULL,
    slot_name     name NOT NULL UNIQUE,
    options       jsonb NOT NULL DEFAULT '{}',
    enabled       boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- What an event Kafka can never take does: 'dead_letter' (recorded in
    -- publication_dead_letters; the publication moves on) or 'stop' (the worker stops
    -- with the error and retries).
    on_event_error text NOT NULL DEFAULT 'dead_letter' CHECK (on_event_error IN ('dead_letter', 'stop')),
    -- Whether the rows a table holds when it is added are published ('initial') or not
    -- ('none'); publications of releases before 0.4 have 'none'.
    snapshot      text NOT NULL CHECK (snapshot IN ('initial', 'none'))
);

-- Snapshots: per table of a publication, its latest run (requested by create_publication,
-- alter_publication or kafka.snapshot), which the worker takes one at a time. Where a
-- running snapshot stands for exactly-once purposes is in the publication's progress
-- records in Kafka; rows here is what it had published at its last chunk.
CREATE TABLE snapshot_catalog (
    publication_id integer NOT NULL REFERENCES publication_catalog (id) ON DELETE CASCADE,
    table_oid      oid NOT NULL,
    run            integer NOT NULL,
    state          text NOT NULL CHECK (state IN ('pending', 'running', 'done')),
    rows           bigint NOT NULL DEFAULT 0,
    requested_at   timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz,
    PRIMARY KEY (publication_id, table_oid)
);

-- Events a publication could never publish (too large, a topic name Kafka refuses), with
-- the reason, kept when the publication is dropped. The position (lsn, seq) names the
-- event: it is recorded once however often the WAL is decoded, and the publication's
-- progress in Kafka moves past it only once it is recorded.
CREATE TABLE publication_dead_letters (
    id             bigserial PRIMARY KEY,
    publication_id integer NOT NULL,
    publication    text NOT NULL,
    lsn            pg_lsn NOT NULL,
    seq            bigint NOT NULL,
    topic          text NOT NULL,
    key            bytea,
    value          bytea,
    error          text NOT NULL,
    failed_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (publication_id, lsn, seq)
);

REVOKE ALL ON subscription_catalog, offsets, dead_letters, publication_catalog, publication_dead_letters,
    snapshot_catalog FROM PUBLIC;
