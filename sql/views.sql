-- Views over the catalog and the workers' shared-memory slots, and the privileges of the
-- SQL API. Runs after the functions exist.

-- Librdkafka options as the querying role may see them: values (broker credentials) only
-- for the owner's roles and superusers, names for everyone.
CREATE FUNCTION options_as_seen(owner oid, options jsonb) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN pg_catalog.pg_has_role(owner, 'USAGE') THEN options
                ELSE (SELECT coalesce(pg_catalog.jsonb_object_agg(k, '********'), '{}')
                        FROM pg_catalog.jsonb_object_keys(options) AS k)
           END
$$;

-- The state a status view shows for a subscription or publication and its worker's state.
CREATE FUNCTION state_as_seen(enabled boolean, worker_state text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN NOT enabled THEN 'stopped'
                WHEN pg_catalog.current_database() <> pg_catalog.current_setting('pg_kafka_bridge.database')
                    THEN 'inactive'
                ELSE coalesce(worker_state, 'starting') END
$$;

CREATE VIEW subscriptions AS
SELECT s.name, s.owner::regrole AS owner, s.brokers, s.topic,
       format('%I.%I', s.target_schema, s.target_table) AS target,
       s.format, s.mode, s.key_columns, s.start_from, s.batch_size, s.batch_timeout_ms,
       s.workers,
       options_as_seen(s.owner, s.options) AS options,
       s.enabled, s.created_at
  FROM subscription_catalog s;

CREATE VIEW subscription_status AS
SELECT s.name AS subscription,
       w.worker,
       w.pid,
       state_as_seen(s.enabled, w.state) AS state,
       s.topic,
       w.partition,
       w.next_offset,
       w.lag,
       w.rows_per_second,
       w.rows_total,
       -- Errors can carry broker and table details: for the owner's roles only.
       CASE WHEN pg_catalog.pg_has_role(s.owner, 'USAGE') THEN w.last_error END AS last_error,
       w.last_error_at,
       w.started_at
  FROM subscription_catalog s
  LEFT JOIN subscription_worker_status() w ON w.object_id = s.id
 ORDER BY s.name, w.worker, w.partition;

CREATE VIEW publications AS
SELECT p.name, p.owner::regrole AS owner, p.brokers, p.tables::regclass[] AS tables, p.topic,
       p.progress_topic, p.slot_name,
       options_as_seen(p.owner, p.options) AS options,
       p.enabled, p.created_at, p.on_event_error, p.snapshot
  FROM publication_catalog p;

-- Each table's latest snapshot run: pending, running or done, the rows it published and
-- its average rate.
CREATE VIEW publication_snapshots AS
SELECT p.name AS publication,
       s.table_oid::regclass AS "table",
       s.run,
       s.state,
       s.rows,
       CASE WHEN s.started_at IS NOT NULL THEN
           pg_catalog.round(s.rows / GREATEST(
               extract(epoch FROM coalesce(s.finished_at, pg_catalog.now()) OPERATOR(pg_catalog.-) s.started_at),
               0.001))::bigint
       END AS rows_per_second,
       s.requested_at,
       s.started_at,
       s.finished_at
  FROM snapshot_catalog s
  JOIN publication_catalog p ON p.id = s.publication_id
 ORDER BY p.name, s.requested_at, s.table_oid;

-- Positions are LSNs; published_lsn/published_seq is the position of the last event
-- committed to Kafka. retained_wal_bytes is what the slot keeps from being recycled;
-- lag_bytes is the WAL written since the last position confirmed to the slot. The slot_*
-- columns are what the server version knows of the slot (NULL where it does not): whether
-- it is a failover slot and since when it is inactive (PostgreSQL 17 and later), why it was
-- invalidated, and when an inactive slot will be invalidated for idleness (18's
-- idle_replication_slot_timeout). dead_letters counts the events recorded in
-- publication_dead_letters.
CREATE VIEW publication_status AS
SELECT p.name AS publication,
       w.pid,
       state_as_seen(p.enabled, CASE WHEN r.slot_name IS NULL THEN 'error' ELSE w.state END) AS state,
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
            WHEN r.slot_name IS NULL THEN format('replication slot "%s" does not exist', p.slot_name)
            WHEN d.invalidation_reason = 'wal_removed'
                THEN format('replication slot "%s" was invalidated: the WAL it needed was removed', p.slot_name)
            WHEN d.invalidation_reason = 'idle_timeout'
                THEN format('replication slot "%s" was invalidated: inactive for longer than idle_replication_slot_timeout', p.slot_name)
            WHEN d.invalidation_reason IS NOT NULL
                THEN format('replication slot "%s" was invalidated (%s)', p.slot_name, d.invalidation_reason)
            ELSE w.last_error END AS last_error,
       w.last_error_at,
       w.started_at,
       d.failover AS slot_failover,
       d.inactive_since AS slot_inactive_since,
       d.invalidation_reason AS slot_invalidation_reason,
       d.expires_at AS slot_expires_at,
       CASE WHEN pg_catalog.pg_has_role(p.owner, 'USAGE')
            THEN (SELECT pg_catalog.count(*) FROM publication_dead_letters l WHERE l.publication_id = p.id)
       END AS dead_letters
  FROM publication_catalog p
  LEFT JOIN pg_catalog.pg_replication_slots r ON r.slot_name = p.slot_name
  LEFT JOIN replication_slot_details() d ON d.slot_name = p.slot_name
  LEFT JOIN publication_worker_status() w ON w.object_id = p.id
 ORDER BY p.name;

-- Dead letters and offsets: every role sees those of the subscriptions it owns. The policies
-- read the catalog as the querying role, which may read every column but the options.
GRANT SELECT (id, name, owner, brokers, topic, target_schema, target_table, format, mode,
              key_columns, start_from, batch_size, batch_timeout_ms, workers, enabled, created_at)
    ON subscription_catalog TO PUBLIC;
ALTER TABLE dead_letters ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_reads ON dead_letters
    USING (EXISTS (SELECT 1 FROM subscription_catalog s
                    WHERE s.id = dead_letters.subscription_id AND pg_catalog.pg_has_role(s.owner, 'USAGE')));
ALTER TABLE offsets ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_reads ON offsets FOR SELECT
    USING (EXISTS (SELECT 1 FROM subscription_catalog s
                    WHERE s.id = offsets.subscription_id AND pg_catalog.pg_has_role(s.owner, 'USAGE')));

GRANT SELECT (id, name, owner, brokers, tables, topic, progress_topic, slot_name, enabled, created_at,
              on_event_error, snapshot)
    ON publication_catalog TO PUBLIC;
ALTER TABLE publication_dead_letters ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_reads ON publication_dead_letters
    USING (EXISTS (SELECT 1 FROM publication_catalog p
                    WHERE p.id = publication_dead_letters.publication_id AND pg_catalog.pg_has_role(p.owner, 'USAGE')));

GRANT USAGE ON SCHEMA kafka TO PUBLIC;
GRANT SELECT ON subscriptions, subscription_status, publications, publication_status, publication_snapshots
    TO PUBLIC;
GRANT SELECT ON offsets TO PUBLIC;
GRANT SELECT, DELETE ON dead_letters, publication_dead_letters TO PUBLIC;

REVOKE EXECUTE ON FUNCTION
    create_subscription(text, text, text, regclass, text, text, text[], text, integer, integer, integer, jsonb),
    start_subscription(text),
    stop_subscription(text),
    drop_subscription(text),
    alter_subscription(text, text, jsonb, regclass, integer, integer, integer),
    seek(text, text, integer),
    create_publication(text, text, oid[], text, jsonb, text, text, text),
    snapshot(text, oid[]),
    alter_publication(text, text, jsonb, oid[], oid[]),
    start_publication(text),
    stop_publication(text),
    drop_publication(text),
    send(text, text, text, text),
    send(text, text, bytea, bytea)
  FROM PUBLIC;
