-- pg_kafka_bridge 0.2.0 to 0.3.0: run by ALTER EXTENSION pg_kafka_bridge UPDATE.
--
-- Publications get dead letters for events Kafka can never take, and the choice to stop
-- instead (on_event_error); existing publications record dead letters from now on.
-- Subscriptions and publications can be changed in place (alter_subscription,
-- alter_publication), and a stopped subscription moved to another position (seek).
\echo Use "ALTER EXTENSION pg_kafka_bridge UPDATE TO '0.3.0'" to load this file. \quit

ALTER TABLE kafka.publication_catalog
    ADD COLUMN on_event_error text NOT NULL DEFAULT 'dead_letter' CHECK (on_event_error IN ('dead_letter', 'stop'));
GRANT SELECT (on_event_error) ON kafka.publication_catalog TO PUBLIC;

CREATE TABLE kafka.publication_dead_letters (
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
REVOKE ALL ON kafka.publication_dead_letters FROM PUBLIC;
ALTER TABLE kafka.publication_dead_letters ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_reads ON kafka.publication_dead_letters
    USING (EXISTS (SELECT 1 FROM kafka.publication_catalog p
                    WHERE p.id = publication_dead_letters.publication_id AND pg_catalog.pg_has_role(p.owner, 'USAGE')));
GRANT SELECT, DELETE ON kafka.publication_dead_letters TO PUBLIC;

DROP FUNCTION kafka.create_publication(text, text, oid[], text, jsonb, text);
CREATE FUNCTION kafka.create_publication(
    "name" text,
    "brokers" text,
    "tables" oid[],
    "topic" text DEFAULT '{schema}.{table}',
    "options" jsonb DEFAULT '{}',
    "progress_topic" text DEFAULT NULL,
    "on_event_error" text DEFAULT 'dead_letter'
) RETURNS void
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'create_publication_wrapper';
CREATE FUNCTION kafka.alter_publication(
    "name" text,
    "brokers" text DEFAULT NULL,
    "options" jsonb DEFAULT NULL,
    "add_tables" oid[] DEFAULT NULL,
    "drop_tables" oid[] DEFAULT NULL
) RETURNS void
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'alter_publication_wrapper';
CREATE FUNCTION kafka.alter_subscription(
    "name" text,
    "brokers" text DEFAULT NULL,
    "options" jsonb DEFAULT NULL,
    "target" regclass DEFAULT NULL,
    "batch_size" integer DEFAULT NULL,
    "batch_timeout_ms" integer DEFAULT NULL,
    "workers" integer DEFAULT NULL
) RETURNS void
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'alter_subscription_wrapper';
CREATE FUNCTION kafka.seek(
    "subscription" text,
    "position" text,
    "partition" integer DEFAULT NULL
) RETURNS void
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'seek_wrapper';
REVOKE EXECUTE ON FUNCTION
    kafka.create_publication(text, text, oid[], text, jsonb, text, text),
    kafka.alter_publication(text, text, jsonb, oid[], oid[]),
    kafka.alter_subscription(text, text, jsonb, regclass, integer, integer, integer),
    kafka.seek(text, text, integer)
  FROM PUBLIC;

CREATE OR REPLACE VIEW kafka.publications AS
SELECT p.name, p.owner::regrole AS owner, p.brokers, p.tables::regclass[] AS tables, p.topic,
       p.progress_topic, p.slot_name,
       kafka.options_as_seen(p.owner, p.options) AS options,
       p.enabled, p.created_at, p.on_event_error
  FROM kafka.publication_catalog p;

CREATE OR REPLACE VIEW kafka.publication_status AS
SELECT p.name AS publication,
       w.pid,
       kafka.state_as_seen(p.enabled, CASE WHEN r.slot_name IS NULL THEN 'error' ELSE w.state END) AS state,
       p.slot_name AS slot,
       r.confirmed_flush_lsn AS confirmed_lsn,
       '0/0'::pg_lsn + w.published_lsn AS published_lsn,
       w.published_seq,
       w.published_commit_time,
       pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), r.restart_lsn)::bigint AS retained_wal_bytes,
       pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), r.confirmed_flush_lsn)::bigint AS lag_bytes,
       w.events_per_second,
       w.events_total,
       CASE WHEN NOT pg_catalog.pg_has_role(p.owner, 'USAGE') THEN NULL
            WHEN r.slot_name IS NULL THEN pg_catalog.format('replication slot "%s" does not exist', p.slot_name)
            WHEN d.invalidation_reason = 'wal_removed'
                THEN pg_catalog.format('replication slot "%s" was invalidated: the WAL it needed was removed', p.slot_name)
            WHEN d.invalidation_reason = 'idle_timeout'
                THEN pg_catalog.format('replication slot "%s" was invalidated: inactive for longer than idle_replication_slot_timeout', p.slot_name)
            WHEN d.invalidation_reason IS NOT NULL
                THEN pg_catalog.format('replication slot "%s" was invalidated (%s)', p.slot_name, d.invalidation_reason)
            ELSE w.last_error END AS last_error,
       w.last_error_at,
       w.started_at,
       d.failover AS slot_failover,
       d.inactive_since AS slot_inactive_since,
       d.invalidation_reason AS slot_invalidation_reason,
       d.expires_at AS slot_expires_at,
       CASE WHEN pg_catalog.pg_has_role(p.owner, 'USAGE')
            THEN (SELECT pg_catalog.count(*) FROM kafka.publication_dead_letters l WHERE l.publication_id = p.id)
       END AS dead_letters
  FROM kafka.publication_catalog p
  LEFT JOIN pg_catalog.pg_replication_slots r ON r.slot_name = p.slot_name
  LEFT JOIN kafka.replication_slot_details() d ON d.slot_name = p.slot_name
  LEFT JOIN kafka.publication_worker_status() w ON w.object_id = p.id
 ORDER BY p.name;
