#!/usr/bin/env bash
# Benchmarks, each against its baseline measured in the same run:
#   bench.sh [subscription] [MESSAGES]   a subscription vs COPY FROM STDIN, plus worker memory
#   bench.sh publication [CHANGES]       a publication vs pg_recvlogical on the same WAL
#   bench.sh transaction [ROWS]          a publication publishing one transaction of ROWS rows
#   bench.sh snapshot [ROWS]             a publication's snapshot of ROWS rows vs streaming them
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
what=subscription
case "${1:-}" in
  subscription|publication|transaction|snapshot) what=$1; shift ;;
esac
bash scripts/setup.sh
bash scripts/install.sh
bash scripts/cluster.sh restart   # picks up a newly installed library
update_extension
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
elif [ "$what" = transaction ]; then
  cargo run --quiet --profile e2e -p pg_kafka_bridge_e2e --bin pgkb-bench-publication -- --one-transaction "${1:-1000000}"
else
  cargo run --quiet --profile e2e -p pg_kafka_bridge_e2e --bin pgkb-bench -- "${1:-1000000}"
fi
