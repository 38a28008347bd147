#!/usr/bin/env bash
# Runs the whole test suite on this machine, as root: installs what is missing, runs the
# SQL API tests inside PostgreSQL (cargo pgrx test), installs the extension into the system
# PostgreSQL 15, starts a cluster and the broker, and runs the end-to-end tests against them.
# Set PGKB_SOAK=1 for the long variants of the crash tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

bash scripts/setup.sh

echo "== unit and SQL API tests (cargo pgrx test)"
# The test run replaces the installed library: stop the cluster that preloads it first.
bash scripts/cluster.sh stop
mkdir -p "$PGKB_STATE/pgrx-test"
chown "$PGKB_OS_USER" "$PGKB_STATE/pgrx-test"
cargo pgrx test pg15 --runas "$PGKB_OS_USER" --pgdata "$PGKB_STATE/pgrx-test"

echo "== end-to-end tests (real cluster, real broker)"
bash scripts/install.sh
bash scripts/broker.sh start
bash scripts/cluster.sh start
echo "== SQL regression suite (pg_test/)"
bash scripts/regress.sh
cargo test -p pg_kafka_bridge_e2e --profile e2e -- --test-threads=1
