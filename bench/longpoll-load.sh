#!/usr/bin/env bash
# Holds N idle long polls on one dbx server, then commits one change; prints the server's RSS
# with the polls held and how long until all of them were woken.
# Usage: bench/longpoll-load.sh [N] (default 10000). Builds in release mode.
set -euo pipefail
N=${1:-10000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release --quiet --bin dbx --example longpoll_load
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # each process holds N sockets
W=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$W"' EXIT
DBX=target/release/dbx
"$DBX" admin user add bench --password-stdin --data "$W/data" <<<"bench-password" >/dev/null
RUST_LOG=warn "$DBX" serve --listen 127.0.0.1:0 --data "$W/data" >"$W/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 100); do grep -q "listening on" "$W/serve.log" && break; sleep 0.1; done
URL=$(grep -o 'http://[0-9.:]*' "$W/serve.log" | head -1)
TOKEN=$(curl -sf "$URL/api/v1/login" -H 'content-type: application/json' \
  -d '{"user":"bench","password":"bench-password"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
echo "# $N long polls against $URL; $(nproc) cpus"
target/release/examples/longpoll_load "$URL" "$TOKEN" "$N" "$SERVER"
