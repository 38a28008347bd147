# Shared settings of the project's scripts; sourced, never run. Every value can be overridden
# from the environment.
export PGRX_VERSION=0.18.1
export PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
export PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
# PostgreSQL refuses to run as root: clusters run as this unprivileged system user.
export PGKB_OS_USER="${PGKB_OS_USER:-pgkb}"
# Where the clusters, the broker's data and the logs live.
export PGKB_STATE="${PGKB_STATE:-/var/lib/pg_kafka_bridge}"
export PGKB_PGDATA="${PGKB_PGDATA:-$PGKB_STATE/cluster}"
export PGHOST="${PGHOST:-127.0.0.1}"
export PGPORT="${PGPORT:-5499}"
export PGUSER="${PGUSER:-postgres}"
export PGDATABASE="${PGDATABASE:-postgres}"
export NOIDA_VERSION=0.2.3
export NOIDA_VENV="${NOIDA_VENV:-/opt/pg_kafka_bridge/noida-venv}"
# The one place the broker address comes from. Point it at a real Kafka cluster to run the
# demo and the tests there; the local broker is started only for the default address.
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:19092}"
export PGKB_LOCAL_BROKER="${PGKB_LOCAL_BROKER:-127.0.0.1:19092}"
export PGKB_BROKER_DIR="${PGKB_BROKER_DIR:-$PGKB_STATE/broker}"
export PATH="$HOME/.cargo/bin:$PATH"

noida_bin() {
  local bin
  for bin in "$NOIDA_VENV"/lib/python3*/site-packages/noida_db/noida-db; do
    [ -x "$bin" ] && { echo "$bin"; return 0; }
  done
  return 1
}

as_pg_user() { runuser -u "$PGKB_OS_USER" -- "$@"; }
