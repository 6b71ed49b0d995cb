#!/usr/bin/env bash
# Checks systemd/noomnim.service with `systemd-analyze verify`, against the release binary
# (the unit's ExecStart path is mapped to it in a temporary copy).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v systemd-analyze >/dev/null || { echo "verify-systemd: systemd-analyze missing (apt-get install systemd)" >&2; exit 1; }
cargo build --release --quiet
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
binary="$(pwd)/target/release/noomnim"
sed "s|^ExecStart=/usr/local/bin/noomnim|ExecStart=$binary|" systemd/noomnim.service >"$scratch/noomnim.service"
output="$(systemd-analyze verify "$scratch/noomnim.service" 2>&1)" || { echo "$output" >&2; exit 1; }
# verify exits 0 on some warnings; fail on any line about our unit.
if echo "$output" | grep -i "noomnim.service" >&2; then
    exit 1
fi
echo "verify-systemd: systemd/noomnim.service is valid"
