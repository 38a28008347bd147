#!/usr/bin/env bash
# Benchmark: a subscription ingesting JSON orders against COPY FROM STDIN of the same rows,
# measured in one run, plus the worker's peak memory. Usage: bench.sh [MESSAGES]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh
bash scripts/install.sh
bash scripts/cluster.sh restart   # picks up a newly installed library
# A broker of its own, empty: the local broker rewrites its whole store after every change,
# and a store full of test data would compete with the measured work for the CPU.
export PGKB_LOCAL_BROKER=127.0.0.1:19093 KAFKA_BROKERS=127.0.0.1:19093 PGKB_BROKER_DIR="$PGKB_STATE/bench-broker"
bash scripts/broker.sh stop
rm -rf "$PGKB_BROKER_DIR"
bash scripts/broker.sh start
trap 'bash scripts/broker.sh stop' EXIT
cargo run --quiet --profile e2e -p pg_kafka_bridge_e2e --bin pgkb-bench -- "${1:-1000000}"
