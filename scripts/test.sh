#!/usr/bin/env bash
# Runs the whole test suite on this machine, as root: installs what is missing, checks the
# code statically, then for each supported PostgreSQL version (15, Debian's; 16 and 18,
# from PyPI) runs the unit and SQL API tests inside PostgreSQL (cargo pgrx test), installs
# the extension, starts a cluster and the broker, and runs the SQL regression suite and the
# end-to-end tests against them. On 15 every end-to-end test runs; on 16 and 18 those of
# both directions (see PGKB_E2E_OTHER_VERSIONS), the crash tests and the round trip
# included. On 15 the upgrade from release 0.1.0 is tested too (scripts/upgrade-test.sh).
# Set PGKB_SOAK=1 for the long variants of the crash tests, PGKB_PG_MAJORS to choose
# versions ("15 16 18" by default).
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests get clusters and a broker of their own, created afresh on each run, so that
# nothing left by the demo or by an earlier run takes worker slots or broker time.
export PGPORT="${PGKB_TEST_PGPORT:-5498}"
export PGKB_BROKER_DIR=/var/lib/pg_kafka_bridge/test-broker
export PGKB_LOCAL_BROKER=127.0.0.1:19094
export KAFKA_BROKERS="${KAFKA_BROKERS:-$PGKB_LOCAL_BROKER}"
source scripts/env.sh
majors="${PGKB_PG_MAJORS:-15 16 18}"
# End-to-end tests that run on the versions after the first: both directions, the crash
# tests, the round trip and the attacks. (Broker failures and memory limits do not depend
# on the PostgreSQL version.)
other_versions_e2e="${PGKB_E2E_OTHER_VERSIONS:-change_in_place publication_basics publication_crash publication_never_stalls round_trip security snapshot subscription_bad_input subscription_basics subscription_crash subscription_upsert}"

bash scripts/setup.sh

echo "== static checks (formatting, clippy with warnings as errors, unsafe justified)"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
bash scripts/check-unsafe.sh

results=$(mktemp)
summary=$(mktemp)
first=1
for major in $majors; do
  export PG_MAJOR=$major PG_CONFIG PG_BIN
  PG_CONFIG=$(pg_config_of "$major")
  PG_BIN=$(dirname "$PG_CONFIG")
  export PGKB_PGDATA="${PGKB_TEST_PGDATA:-/var/lib/pg_kafka_bridge/test-cluster}-$major"
  # The test runs replace the installed library in place: stop every cluster that preloads it.
  for other in 15 16 18; do
    demo_cluster="$PGKB_STATE/cluster-$other"
    [ "$other" = 15 ] && demo_cluster="$PGKB_STATE/cluster"
    for cluster in "${PGKB_TEST_PGDATA:-/var/lib/pg_kafka_bridge/test-cluster}-$other" "$demo_cluster"; do
      PG_BIN=$(dirname "$(pg_config_of "$other")") PGKB_PGDATA="$cluster" bash scripts/cluster.sh stop
    done
  done
  for cluster in "$PGKB_STATE/test-cluster" "$PGKB_STATE/test-cluster-upgrade"; do
    PG_BIN=/usr/lib/postgresql/15/bin PGKB_PGDATA="$cluster" bash scripts/cluster.sh stop
  done
  version_results=$(mktemp)

  echo "== PostgreSQL $major: unit and SQL API tests (cargo pgrx test pg$major)"
  mkdir -p "$PGKB_STATE/pgrx-test-$major"
  chown "$PGKB_OS_USER" "$PGKB_STATE/pgrx-test-$major"
  cargo pgrx test "pg$major" --runas "$PGKB_OS_USER" --pgdata "$PGKB_STATE/pgrx-test-$major" 2>&1 | tee -a "$version_results"

  echo "== PostgreSQL $major: end-to-end tests (real cluster, real broker)"
  bash scripts/install.sh
  bash scripts/broker.sh stop
  rm -rf "$PGKB_BROKER_DIR"
  bash scripts/broker.sh start
  rm -rf "$PGKB_PGDATA"
  bash scripts/cluster.sh start
  echo "== PostgreSQL $major: SQL regression suite (pg_test/)"
  bash scripts/regress.sh
  if [ -n "$first" ]; then
    cargo test -p pg_kafka_bridge_e2e --profile e2e --tests --no-fail-fast -- --test-threads=1 2>&1 | tee -a "$version_results"
  else
    for test in $other_versions_e2e; do
      cargo test -p pg_kafka_bridge_e2e --profile e2e --test "$test" -- --test-threads=1 2>&1 | tee -a "$version_results"
    done
  fi
  bash scripts/cluster.sh stop
  if [ "$major" = 15 ]; then
    echo "== PostgreSQL 15: upgrade from release 0.1.0 (ALTER EXTENSION pg_kafka_bridge UPDATE)"
    bash scripts/upgrade-test.sh 2>&1 | tee -a "$version_results"
  fi
  awk -v major="$major" '/^test result:/ { passed += $4; failed += $6 }
    END { printf "PostgreSQL %s: %d passed, %d failed (and the regression suite)\n", major, passed, failed }' \
    "$version_results" >>"$summary"
  cat "$version_results" >>"$results"
  rm -f "$version_results"
  first=
done
cat "$summary"
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "all suites: %d passed, %d failed\n", passed, failed }' "$results"
rm -f "$results" "$summary"
