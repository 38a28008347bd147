#!/usr/bin/env bash
# Builds the extension (release) and installs it into the system PostgreSQL 15.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null
