#!/usr/bin/env bash
# Installs everything pg_kafka_bridge needs to build, run and test on Debian 12, as root.
# Idempotent: each step checks whether its work is already done and skips it.
set -euo pipefail
source "$(dirname "$0")/env.sh"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

DEB_PACKAGES=(build-essential postgresql-15 postgresql-server-dev-15 postgresql-client-15
  postgresql-15-wal2json libclang-dev clang pkg-config cmake libssl-dev libsasl2-dev zlib1g-dev
  sudo kcat python3-venv procps)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The static checks of the test command need the toolchain's clippy and rustfmt.
for component in clippy rustfmt; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    log "installing the Rust component $component"
    rustup component add "$component"
  fi
done

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  log "installing cargo-pgrx $PGRX_VERSION (takes several minutes)"
  cargo install cargo-pgrx --version "=$PGRX_VERSION" --locked --quiet
fi

if ! grep -qs "pg15 = \"$PG_CONFIG\"" "$HOME/.pgrx/config.toml"; then
  log "cargo pgrx init --pg15 $PG_CONFIG"
  cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi

if ! id "$PGKB_OS_USER" >/dev/null 2>&1; then
  log "creating system user $PGKB_OS_USER"
  useradd --system --create-home --shell /bin/bash "$PGKB_OS_USER"
fi

if ! noida_bin >/dev/null; then
  log "installing the noida-db Kafka-protocol broker into $NOIDA_VENV"
  python3 -m venv "$NOIDA_VENV"
  "$NOIDA_VENV/bin/pip" install --quiet "noida-db==$NOIDA_VERSION"
  noida_bin >/dev/null || { echo "noida-db binary not found under $NOIDA_VENV" >&2; exit 1; }
fi
mkdir -p "$PGKB_STATE"
chown "$PGKB_OS_USER" "$PGKB_STATE"
log "set-up complete"
