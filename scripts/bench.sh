#!/usr/bin/env bash
# Benchmark: a subscription ingesting JSON orders against COPY FROM STDIN of the same rows,
# measured in one run, plus the worker's peak memory. Usage: bench.sh [MESSAGES]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh
bash scripts/install.sh
bash scripts/broker.sh start
bash scripts/cluster.sh start
cargo run --quiet --profile e2e -p pg_kafka_bridge_e2e --bin pgkb-bench -- "${1:-1000000}"
