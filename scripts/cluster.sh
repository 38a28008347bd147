#!/usr/bin/env bash
# Manages the PostgreSQL 15 cluster that runs the extension for the demo and the tests.
#   cluster.sh start | stop | restart | kill | status
# `kill` stops the server in immediate mode (as a crash would); `start` initialises the
# cluster on first use. It listens on $PGHOST:$PGPORT and trusts local connections.
set -euo pipefail
source "$(dirname "$0")/env.sh"

log="$PGKB_PGDATA.log"

init() {
  [ -f "$PGKB_PGDATA/PG_VERSION" ] && return 0
  mkdir -p "$PGKB_PGDATA"
  chown "$PGKB_OS_USER" "$PGKB_STATE" "$PGKB_PGDATA"
  chmod 700 "$PGKB_PGDATA"
  as_pg_user "$PG_BIN/initdb" -D "$PGKB_PGDATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  cat >>"$PGKB_PGDATA/postgresql.conf" <<CONF
# pg_kafka_bridge
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '/tmp'
shared_preload_libraries = 'pg_kafka_bridge'
wal_level = logical
max_worker_processes = 32
max_replication_slots = 16
max_wal_senders = 16
pg_kafka_bridge.database = 'postgres'
shared_buffers = 512MB
max_wal_size = 4GB
CONF
}

# Debian's PostgreSQL only lets approved libraries be logical decoding output plugins;
# publications decode with the extension's own plugin.
approve_output_plugin() {
  local conf="$PGKB_PGDATA/postgresql.conf"
  local settings
  settings=$(as_pg_user "$PG_BIN/postgres" --describe-config 2>/dev/null)
  grep -q '^output_plugin_libraries' <<<"$settings" || return 0
  grep -q '^output_plugin_libraries' "$conf" && return 0
  echo "output_plugin_libraries = 'pgoutput, test_decoding, pg_kafka_bridge'" >>"$conf"
}

start() {
  init
  approve_output_plugin
  as_pg_user "$PG_BIN/pg_ctl" -D "$PGKB_PGDATA" status >/dev/null 2>&1 && return 0
  # A backtrace setting inherited from a Rust build would add backtraces to users' errors.
  as_pg_user env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE "$PG_BIN/pg_ctl" -D "$PGKB_PGDATA" -l "$log" -w -t 60 start >/dev/null
}

stop() {
  as_pg_user "$PG_BIN/pg_ctl" -D "$PGKB_PGDATA" status >/dev/null 2>&1 || return 0
  as_pg_user "$PG_BIN/pg_ctl" -D "$PGKB_PGDATA" -m "${1:-fast}" -w -t 60 stop >/dev/null
}

case "${1:-}" in
  start) start ;;
  stop) stop fast ;;
  restart) stop fast; start ;;
  kill) stop immediate ;;
  status) as_pg_user "$PG_BIN/pg_ctl" -D "$PGKB_PGDATA" status ;;
  *) echo "usage: $0 start|stop|restart|kill|status" >&2; exit 2 ;;
esac
