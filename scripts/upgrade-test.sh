#!/usr/bin/env bash
# The upgrade test, on PostgreSQL 15 (the only version release 0.1.0 ran on): installs the
# library and SQL of release 0.1.0, built from this repository's history (once per machine,
# kept under $PGKB_STATE/upgrade), creates a subscription and a publication with it on a
# fresh cluster and lets them move data; then installs the current build, restarts the
# cluster and checks that nothing runs until ALTER EXTENSION pg_kafka_bridge UPDATE, after
# which both continue from their positions (tests/e2e/tests/upgrade.rs). Run as root by
# scripts/test.sh with the broker started; leaves the current build installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PG_MAJOR=15
export PGPORT="${PGKB_UPGRADE_PGPORT:-5497}"
source scripts/env.sh
export PGKB_PGDATA="$PGKB_STATE/test-cluster-upgrade"
PG_CONFIG=$(pg_config_of 15)
PG_BIN=$(dirname "$PG_CONFIG")
export PG_CONFIG PG_BIN

from_version=0.1.0
from_commit=9b8663d04afefe47bf25ead32e7a89dcff94ddd5
package="$PGKB_STATE/upgrade/$from_version-pg15"

if [ ! -f "$package/.complete" ]; then
  # A shallow clone lacks the release: fetch the history from where it was cloned.
  git cat-file -e "$from_commit^{commit}" 2>/dev/null || git fetch -q --unshallow 2>/dev/null || true
  if ! git cat-file -e "$from_commit^{commit}" 2>/dev/null; then
    echo "release $from_version (commit $from_commit) is not in this clone's history; the upgrade test needs it" >&2
    exit 1
  fi
  echo "== building release $from_version for the upgrade test (once per machine)"
  source_dir="$PGKB_STATE/upgrade/src-$from_version"
  rm -rf "$source_dir" "$package"
  mkdir -p "$source_dir"
  git archive "$from_commit" | tar -x -C "$source_dir"
  (cd "$source_dir" && CARGO_TARGET_DIR="$PGKB_STATE/upgrade/target" \
    cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$package" >/dev/null)
  touch "$package/.complete"
  # Only the package is needed again.
  rm -rf "$source_dir" "$PGKB_STATE/upgrade/target"
fi

install_release() {
  install -m 755 "$package/usr/lib/postgresql/15/lib/pg_kafka_bridge.so" "$("$PG_CONFIG" --pkglibdir)/"
  install -m 644 "$package"/usr/share/postgresql/15/extension/* "$("$PG_CONFIG" --sharedir)/extension/"
}

run_phase() {
  cargo test -p pg_kafka_bridge_e2e --profile e2e --test upgrade -- --exact --test-threads=1 "$1"
}

bash scripts/cluster.sh stop
rm -rf "$PGKB_PGDATA" "$PGKB_PGDATA.log"
echo "== upgrade test: release $from_version installed"
install_release
bash scripts/cluster.sh start
run_phase data_moves_with_the_previous_release
bash scripts/cluster.sh stop
echo "== upgrade test: current build installed"
bash scripts/install.sh
bash scripts/cluster.sh start
run_phase update_keeps_positions_and_matches_a_fresh_install
bash scripts/cluster.sh stop
