#!/usr/bin/env bash
# Runs the whole test suite on this machine, as root: installs what is missing, runs the
# SQL API tests inside PostgreSQL (cargo pgrx test), installs the extension into the system
# PostgreSQL 15, starts a cluster and the broker, and runs the end-to-end tests against them.
# Set PGKB_SOAK=1 for the long variants of the crash tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests get a cluster and a broker of their own, created afresh on each run, so that
# nothing left by the demo or by an earlier run takes worker slots or broker time.
export PGKB_PGDATA="${PGKB_TEST_PGDATA:-/var/lib/pg_kafka_bridge/test-cluster}"
export PGPORT="${PGKB_TEST_PGPORT:-5498}"
export PGKB_BROKER_DIR=/var/lib/pg_kafka_bridge/test-broker
export PGKB_LOCAL_BROKER=127.0.0.1:19094
export KAFKA_BROKERS="${KAFKA_BROKERS:-$PGKB_LOCAL_BROKER}"
source scripts/env.sh

bash scripts/setup.sh

echo "== static checks (formatting, clippy with warnings as errors, unsafe justified)"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
bash scripts/check-unsafe.sh

echo "== unit and SQL API tests (cargo pgrx test)"
# The test run replaces the installed library in place: stop every cluster that preloads it.
bash scripts/cluster.sh stop
PGKB_PGDATA="$PGKB_STATE/cluster" bash scripts/cluster.sh stop
mkdir -p "$PGKB_STATE/pgrx-test"
chown "$PGKB_OS_USER" "$PGKB_STATE/pgrx-test"
results=$(mktemp)
cargo pgrx test pg15 --runas "$PGKB_OS_USER" --pgdata "$PGKB_STATE/pgrx-test" 2>&1 | tee -a "$results"

echo "== end-to-end tests (real cluster, real broker)"
bash scripts/install.sh
bash scripts/broker.sh stop
rm -rf "$PGKB_BROKER_DIR"
bash scripts/broker.sh start
bash scripts/cluster.sh stop
rm -rf "$PGKB_PGDATA"
bash scripts/cluster.sh start
echo "== SQL regression suite (pg_test/)"
bash scripts/regress.sh
cargo test -p pg_kafka_bridge_e2e --profile e2e --tests --no-fail-fast -- --test-threads=1 2>&1 | tee -a "$results"
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "all suites: %d passed, %d failed\n", passed, failed }' "$results"
rm -f "$results"
