-- pg_kafka_bridge 0.1.0 to 0.2.0: run by ALTER EXTENSION pg_kafka_bridge UPDATE.
--
-- Stored positions, dead letters, subscriptions, publications and their replication slots
-- are kept as they are: a publication keeps the slot 0.1.0 named pg_kafka_bridge_<name>
-- (new publications get pg_kafka_bridge_<database oid>_<name>), and with it its position.
-- The new library runs no worker in a database whose extension is still at 0.1.0.
--
-- Each step also accepts the objects of the development builds between release 0.1.0 and
-- 0.2.0, which were labelled 0.1.0 and already had some of these changes.
\echo Use "ALTER EXTENSION pg_kafka_bridge UPDATE TO '0.2.0'" to load this file. \quit

-- Offsets belong to a subscription by id, no longer by its reusable name.
ALTER TABLE kafka.offsets ADD COLUMN IF NOT EXISTS subscription_id integer;
UPDATE kafka.offsets o SET subscription_id = s.id
  FROM kafka.subscription_catalog s WHERE s.name = o.subscription AND o.subscription_id IS NULL;
-- Dropped in a statement of their own, so that the new constraints get the names a fresh
-- install gives them.
ALTER TABLE kafka.offsets
    DROP CONSTRAINT IF EXISTS offsets_subscription_fkey,
    DROP CONSTRAINT IF EXISTS offsets_subscription_id_fkey,
    DROP CONSTRAINT IF EXISTS offsets_pkey;
ALTER TABLE kafka.offsets
    ALTER COLUMN subscription_id SET NOT NULL,
    ADD PRIMARY KEY (subscription_id, topic, partition),
    ADD FOREIGN KEY (subscription_id) REFERENCES kafka.subscription_catalog (id) ON DELETE CASCADE;

-- Dead letters too. Those of subscriptions dropped before the update get id 0, which no
-- subscription has: only superusers see them, as 0.2.0 does for a dropped subscription's.
ALTER TABLE kafka.dead_letters ADD COLUMN IF NOT EXISTS subscription_id integer;
UPDATE kafka.dead_letters d SET subscription_id = coalesce(
    (SELECT s.id FROM kafka.subscription_catalog s WHERE s.name = d.subscription), 0)
 WHERE d.subscription_id IS NULL;
ALTER TABLE kafka.dead_letters ALTER COLUMN subscription_id SET NOT NULL;
DROP INDEX IF EXISTS kafka.dead_letters_position;
CREATE INDEX dead_letters_position ON kafka.dead_letters (subscription_id, topic, partition, "offset");

DROP POLICY IF EXISTS owner_reads ON kafka.dead_letters;
CREATE POLICY owner_reads ON kafka.dead_letters
    USING (EXISTS (SELECT 1 FROM kafka.subscription_catalog s
                    WHERE s.id = dead_letters.subscription_id AND pg_catalog.pg_has_role(s.owner, 'USAGE')));
DROP POLICY IF EXISTS owner_reads ON kafka.offsets;
CREATE POLICY owner_reads ON kafka.offsets FOR SELECT
    USING (EXISTS (SELECT 1 FROM kafka.subscription_catalog s
                    WHERE s.id = offsets.subscription_id AND pg_catalog.pg_has_role(s.owner, 'USAGE')));

-- Every function runs with a pinned search_path.
ALTER FUNCTION kafka.create_publication(text, text, oid[], text, jsonb, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION kafka.create_subscription(text, text, text, regclass, text, text, text[], text, integer, integer, integer, jsonb)
    SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION kafka.drop_publication(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION kafka.drop_subscription(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION kafka.publication_worker_status() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION kafka.subscription_worker_status() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION kafka.send(text, text, text, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION kafka.send(text, text, bytea, bytea) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION kafka.start_publication(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION kafka.start_subscription(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION kafka.stop_publication(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION kafka.stop_subscription(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION kafka.options_as_seen(oid, jsonb) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION kafka.state_as_seen(boolean, text) SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION kafka.replication_slot_details() RETURNS TABLE (
    slot_name text,
    failover boolean,
    inactive_since timestamp with time zone,
    invalidation_reason text,
    expires_at timestamp with time zone
)
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'replication_slot_details_wrapper';

-- Errors can carry broker and table details: for the owner's roles only.
CREATE OR REPLACE VIEW kafka.subscription_status AS
SELECT s.name AS subscription,
       w.worker,
       w.pid,
       kafka.state_as_seen(s.enabled, w.state) AS state,
       s.topic,
       w.partition,
       w.next_offset,
       w.lag,
       w.rows_per_second,
       w.rows_total,
       CASE WHEN pg_catalog.pg_has_role(s.owner, 'USAGE') THEN w.last_error END AS last_error,
       w.last_error_at,
       w.started_at
  FROM kafka.subscription_catalog s
  LEFT JOIN kafka.subscription_worker_status() w ON w.object_id = s.id
 ORDER BY s.name, w.worker, w.partition;

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
       d.expires_at AS slot_expires_at
  FROM kafka.publication_catalog p
  LEFT JOIN pg_catalog.pg_replication_slots r ON r.slot_name = p.slot_name
  LEFT JOIN kafka.replication_slot_details() d ON d.slot_name = p.slot_name
  LEFT JOIN kafka.publication_worker_status() w ON w.object_id = p.id
 ORDER BY p.name;
