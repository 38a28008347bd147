#!/usr/bin/env bash
# Starts or stops the local Kafka-protocol broker (noida-db) that the demo and the tests use.
#   broker.sh start | stop | restart | reset | status
# reset kills the broker without saving, removes its data and starts it empty (benchmarks).
# With KAFKA_BROKERS pointing elsewhere (a real Kafka cluster), it does nothing.
set -euo pipefail
source "$(dirname "$0")/env.sh"

dir="$PGKB_BROKER_DIR"
pidfile="$dir/pid"
port="${PGKB_LOCAL_BROKER##*:}"

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
# The broker of this folder, also when its pid file is gone (its folder was removed under it).
broker_pid() { pgrep -f -- "--data-dir $dir/data" | head -1; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

start() {
  if running; then return 0; fi
  mkdir -p "$dir/data"
  local bin
  bin=$(noida_bin) || { echo "noida-db is not installed: run scripts/setup.sh" >&2; exit 1; }
  nohup "$bin" start --data-dir "$dir/data" --only kafka --kafka-port "$port" --host 127.0.0.1 \
    >>"$dir/broker.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 1 150); do
    running || { echo "the broker exited (is port $port taken?); see $dir/broker.log" >&2; tail -20 "$dir/broker.log" >&2; exit 1; }
    listening && return 0
    sleep 0.2
  done
  echo "the broker did not start listening on port $port; see $dir/broker.log" >&2
  exit 1
}

stop() {
  local pid
  if running; then
    pid=$(cat "$pidfile")
  else
    rm -f "$pidfile"
    pid=$(broker_pid) || return 0
  fi
  # SIGINT is the broker's graceful stop: it saves its data first, as one file, which takes
  # a while once tests have written a few hundred MB; killed sooner, it loses data.
  kill -INT "$pid"
  for _ in $(seq 1 1800); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

reset() {
  local pid
  pid=$(broker_pid) || true
  if [ -n "$pid" ]; then
    kill -KILL "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  fi
  rm -rf "$dir"
  start
}

if [ "$KAFKA_BROKERS" != "$PGKB_LOCAL_BROKER" ]; then
  exit 0
fi
case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  reset) reset ;;
  status) running && echo "running (pid $(cat "$pidfile"))" || { echo stopped; exit 3; } ;;
  *) echo "usage: $0 start|stop|restart|reset|status" >&2; exit 2 ;;
esac
