-- Views over the catalog and the workers' shared-memory slots, and the privileges of the
-- SQL API. Runs after the functions exist.

CREATE VIEW subscriptions AS
SELECT s.name, s.owner::regrole AS owner, s.brokers, s.topic,
       format('%I.%I', s.target_schema, s.target_table) AS target,
       s.format, s.mode, s.key_columns, s.start_from, s.batch_size, s.batch_timeout_ms,
       s.workers,
       CASE WHEN pg_catalog.pg_has_role(s.owner, 'USAGE') THEN s.options
            ELSE (SELECT coalesce(jsonb_object_agg(k, '********'), '{}') FROM jsonb_object_keys(s.options) AS k)
       END AS options,
       s.enabled, s.created_at
  FROM subscription_catalog s;

CREATE VIEW subscription_status AS
SELECT s.name AS subscription,
       w.worker,
       w.pid,
       CASE WHEN NOT s.enabled THEN 'stopped'
            WHEN current_database() <> current_setting('pg_kafka_bridge.database') THEN 'inactive'
            ELSE coalesce(w.state, 'starting') END AS state,
       s.topic,
       w.partition,
       w.next_offset,
       w.lag,
       w.rows_per_second,
       w.rows_total,
       w.last_error,
       w.last_error_at,
       w.started_at
  FROM subscription_catalog s
  LEFT JOIN worker_status() w ON w.kind = 'subscription' AND w.object_id = s.id
 ORDER BY s.name, w.worker, w.partition;

-- Dead letters and offsets: every role sees those of the subscriptions it owns. The policies
-- read the catalog as the querying role, which may read every column but the options.
GRANT SELECT (id, name, owner, brokers, topic, target_schema, target_table, format, mode,
              key_columns, start_from, batch_size, batch_timeout_ms, workers, enabled, created_at)
    ON subscription_catalog TO PUBLIC;
ALTER TABLE dead_letters ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_reads ON dead_letters
    USING (EXISTS (SELECT 1 FROM subscription_catalog s
                    WHERE s.name = dead_letters.subscription AND pg_catalog.pg_has_role(s.owner, 'USAGE')));
ALTER TABLE offsets ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_reads ON offsets FOR SELECT
    USING (EXISTS (SELECT 1 FROM subscription_catalog s
                    WHERE s.name = offsets.subscription AND pg_catalog.pg_has_role(s.owner, 'USAGE')));

GRANT USAGE ON SCHEMA kafka TO PUBLIC;
GRANT SELECT ON subscriptions, subscription_status TO PUBLIC;
GRANT SELECT ON offsets TO PUBLIC;
GRANT SELECT, DELETE ON dead_letters TO PUBLIC;

REVOKE EXECUTE ON FUNCTION
    create_subscription(text, text, text, regclass, text, text, text[], text, integer, integer, integer, jsonb),
    start_subscription(text),
    stop_subscription(text),
    drop_subscription(text)
  FROM PUBLIC;
