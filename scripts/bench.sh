#!/usr/bin/env bash
# Benchmarks, each against its baseline measured in the same run:
#   bench.sh [subscription] [MESSAGES]   a subscription vs COPY FROM STDIN, plus worker memory
#   bench.sh publication [CHANGES]       a publication vs pg_recvlogical on the same WAL
#   bench.sh transaction [ROWS]          a publication publishing one transaction of ROWS rows
#   bench.sh snapshot [ROWS]             a publication's snapshot of ROWS rows vs streaming them
#   bench.sh latency                     produce-to-commit and commit-to-Kafka latency at fixed rates
#   bench.sh sizes                       subscriptions and publications at 100 B, 1 KB, 10 KB per message
#   bench.sh many [MESSAGES]             8 subscriptions at once vs COPY, 4 publications at once
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
what=subscription
case "${1:-}" in
  subscription|publication|transaction|snapshot|latency|sizes|many) what=$1; shift ;;
esac
bash scripts/setup.sh
bash scripts/install.sh
bash scripts/cluster.sh start
# The latency benchmark reads commit times of the rows written (pg_xact_commit_timestamp);
# the others run without that bookkeeping. Set before the restart that picks up a newly
# installed library.
commit_timestamps=off
[ "$what" = latency ] && commit_timestamps=on
psql -q -c "ALTER SYSTEM SET track_commit_timestamp = $commit_timestamps"
bash scripts/cluster.sh restart
update_extension
# What an interrupted benchmark left behind would compete with this one: a publication
# decodes all WAL, whatever it publishes.
psql -q -At -c "SELECT kafka.drop_publication(name) FROM kafka.publications WHERE name LIKE 'bench%'" \
  -c "SELECT kafka.drop_subscription(name) FROM kafka.subscriptions WHERE name LIKE 'bench%'" >/dev/null
# A broker of its own, empty: the local broker rewrites its whole store after every change,
# and a store full of test data would compete with the measured work for the CPU.
export PGKB_LOCAL_BROKER=127.0.0.1:19093 KAFKA_BROKERS=127.0.0.1:19093 PGKB_BROKER_DIR="$PGKB_STATE/bench-broker"
bash scripts/broker.sh stop
rm -rf "$PGKB_BROKER_DIR"
bash scripts/broker.sh start
trap 'bash scripts/broker.sh stop' EXIT
if [ "$what" = publication ]; then
  cargo run --quiet --profile e2e -p pg_kafka_bridge_e2e --bin pgkb-bench-publication -- "${1:-1000000}"
elif [ "$what" = snapshot ]; then
  # The snapshot phase publishes to an empty broker of its own (see the benchmark).
  second=(env PGKB_LOCAL_BROKER=127.0.0.1:19095 KAFKA_BROKERS=127.0.0.1:19095 PGKB_BROKER_DIR="$PGKB_STATE/bench-broker-2")
  "${second[@]}" bash scripts/broker.sh stop
  rm -rf "$PGKB_STATE/bench-broker-2"
  "${second[@]}" bash scripts/broker.sh start
  trap 'bash scripts/broker.sh stop; "${second[@]}" bash scripts/broker.sh stop' EXIT
  PGKB_SECOND_BROKERS=127.0.0.1:19095 cargo run --quiet --profile e2e -p pg_kafka_bridge_e2e \
    --bin pgkb-bench-publication -- --snapshot "${1:-1000000}"
elif [ "$what" = latency ]; then
  cargo run --quiet --profile e2e -p pg_kafka_bridge_e2e --bin pgkb-bench-latency
elif [ "$what" = sizes ]; then
  cargo run --quiet --profile e2e -p pg_kafka_bridge_e2e --bin pgkb-bench -- --sizes
  cargo run --quiet --profile e2e -p pg_kafka_bridge_e2e --bin pgkb-bench-publication -- --sizes
elif [ "$what" = many ]; then
  cargo run --quiet --profile e2e -p pg_kafka_bridge_e2e --bin pgkb-bench -- --many "${1:-1000000}"
  bash scripts/broker.sh reset
  cargo run --quiet --profile e2e -p pg_kafka_bridge_e2e --bin pgkb-bench-publication -- --many "${1:-1000000}"
elif [ "$what" = transaction ]; then
  cargo run --quiet --profile e2e -p pg_kafka_bridge_e2e --bin pgkb-bench-publication -- --one-transaction "${1:-1000000}"
else
  cargo run --quiet --profile e2e -p pg_kafka_bridge_e2e --bin pgkb-bench -- "${1:-1000000}"
fi
