#!/usr/bin/env bash
# Runs the SQL regression suite in pg_test/ (pg_regress: sql/NAME.sql against
# expected/NAME.out) on the running cluster, in a fresh database of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
out="$PGKB_STATE/regress"
mkdir -p "$out"
psql -q -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS pgkb_regress" -c "CREATE DATABASE pgkb_regress"
tests=$(cd pg_test/sql && ls *.sql | sed 's/\.sql$//')
pg_regress="$("$PG_CONFIG" --pkglibdir)/pgxs/src/test/regress/pg_regress"
if ! "$pg_regress" --use-existing --dbname=pgkb_regress --inputdir=pg_test --outputdir="$out" \
    --bindir="$PG_BIN" --host="$PGHOST" --port="$PGPORT" --user="$PGUSER" $tests; then
  cat "$out/regression.diffs" >&2
  exit 1
fi
