#!/usr/bin/env bash
# The whole product in one command, on a fresh Debian 12 machine, as root: installs what is
# missing, builds and installs the extension into the system PostgreSQL 15, starts a cluster
# that preloads it and the local Kafka-protocol broker, produces sample JSON orders, creates
# a subscription, and shows the rows and offsets arriving. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing prerequisites"
bash scripts/setup.sh
say "building and installing the extension"
bash scripts/install.sh
cargo build --quiet --profile e2e -p pg_kafka_bridge_e2e --bin pgkb-kafka
tool=target/e2e/pgkb-kafka
say "starting the broker ($KAFKA_BROKERS) and PostgreSQL ($PGHOST:$PGPORT)"
bash scripts/broker.sh start
bash scripts/cluster.sh restart   # picks up a newly installed library
update_extension

topic="demo_orders_$(date +%s)"
messages="${DEMO_MESSAGES:-20000}"
say "producing $messages JSON orders to topic $topic (3 partitions)"
"$tool" create-topic "$topic" 3
"$tool" produce-orders "$topic" "$messages"

say "creating subscription 'demo' into table public.demo_orders"
psql -v ON_ERROR_STOP=1 -q <<SQL
SET client_min_messages = warning;
\o /dev/null
CREATE EXTENSION IF NOT EXISTS pg_kafka_bridge;
SELECT kafka.drop_subscription(name) FROM kafka.subscriptions WHERE name = 'demo';
DROP TABLE IF EXISTS public.demo_orders;
CREATE TABLE public.demo_orders (
    id          bigint PRIMARY KEY,
    customer    text,
    amount      numeric(12,2),
    created_at  timestamptz,
    payload     jsonb,
    _kafka_partition int,
    _kafka_offset    bigint
);
SELECT kafka.create_subscription(
    name    => 'demo',
    brokers => '$KAFKA_BROKERS',
    topic   => '$topic',
    target  => 'public.demo_orders'::regclass);
\o
\echo 'subscription demo created'
SQL

say "rows arriving"
for _ in $(seq 1 60); do
  rows=$(psql -Atq -c "SELECT count(*) FROM public.demo_orders")
  echo "  $rows rows"
  [ "$rows" -ge "$messages" ] && break
  sleep 1
done
psql -q <<'SQL'
\echo
\echo 'SELECT * FROM public.demo_orders ORDER BY id LIMIT 3;'
SELECT * FROM public.demo_orders ORDER BY id LIMIT 3;
\echo 'TABLE kafka.offsets;  -- advanced in the same transactions as the rows'
SELECT * FROM kafka.offsets WHERE subscription = 'demo' ORDER BY partition;
\echo 'TABLE kafka.subscription_status;'
SELECT subscription, worker, pid, state, partition, next_offset, lag, last_error FROM kafka.subscription_status WHERE subscription = 'demo';
SQL
[ "$rows" -ge "$messages" ] || { echo "the demo did not receive every message" >&2; exit 1; }
