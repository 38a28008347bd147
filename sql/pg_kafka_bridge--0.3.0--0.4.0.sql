-- pg_kafka_bridge 0.3.0 to 0.4.0: run by ALTER EXTENSION pg_kafka_bridge UPDATE.
--
-- Publications get snapshots: the rows a table holds are published as events with op "r"
-- (create_publication's snapshot mode, kafka.snapshot, and the tables alter_publication
-- adds), with their status in kafka.publication_snapshots. Existing publications keep
-- publishing changes only (snapshot mode 'none') until kafka.snapshot is called.
\echo Use "ALTER EXTENSION pg_kafka_bridge UPDATE TO '0.4.0'" to load this file. \quit

ALTER TABLE kafka.publication_catalog
    ADD COLUMN snapshot text NOT NULL DEFAULT 'none' CHECK (snapshot IN ('initial', 'none'));
ALTER TABLE kafka.publication_catalog ALTER COLUMN snapshot DROP DEFAULT;
GRANT SELECT (snapshot) ON kafka.publication_catalog TO PUBLIC;

CREATE TABLE kafka.snapshot_catalog (
    publication_id integer NOT NULL REFERENCES kafka.publication_catalog (id) ON DELETE CASCADE,
    table_oid      oid NOT NULL,
    run            integer NOT NULL,
    state          text NOT NULL CHECK (state IN ('pending', 'running', 'done')),
    rows           bigint NOT NULL DEFAULT 0,
    requested_at   timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz,
    PRIMARY KEY (publication_id, table_oid)
);
REVOKE ALL ON kafka.snapshot_catalog FROM PUBLIC;

DROP FUNCTION kafka.create_publication(text, text, oid[], text, jsonb, text, text);
CREATE FUNCTION kafka.create_publication(
    "name" text,
    "brokers" text,
    "tables" oid[],
    "topic" text DEFAULT '{schema}.{table}',
    "options" jsonb DEFAULT '{}',
    "progress_topic" text DEFAULT NULL,
    "on_event_error" text DEFAULT 'dead_letter',
    "snapshot" text DEFAULT 'initial'
) RETURNS void
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'create_publication_wrapper';
CREATE FUNCTION kafka.snapshot(
    "publication" text,
    "tables" oid[] DEFAULT NULL
) RETURNS void
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'request_snapshot_wrapper';
REVOKE EXECUTE ON FUNCTION
    kafka.create_publication(text, text, oid[], text, jsonb, text, text, text),
    kafka.snapshot(text, oid[])
  FROM PUBLIC;

CREATE OR REPLACE VIEW kafka.publications AS
SELECT p.name, p.owner::regrole AS owner, p.brokers, p.tables::regclass[] AS tables, p.topic,
       p.progress_topic, p.slot_name,
       kafka.options_as_seen(p.owner, p.options) AS options,
       p.enabled, p.created_at, p.on_event_error, p.snapshot
  FROM kafka.publication_catalog p;

-- Each table's latest snapshot run: pending, running or done, the rows it published and
-- its average rate.
CREATE VIEW kafka.publication_snapshots AS
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
  FROM kafka.snapshot_catalog s
  JOIN kafka.publication_catalog p ON p.id = s.publication_id
 ORDER BY p.name, s.requested_at, s.table_oid;
GRANT SELECT ON kafka.publication_snapshots TO PUBLIC;
