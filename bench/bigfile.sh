#!/usr/bin/env bash
# Peak memory (and time) of client and server pushing, then pulling, one big incompressible
# file: the "flat in the file size" check of issue 5.
#
# Usage: bench/bigfile.sh [GIB] [WORKDIR]   (defaults: 10 /tmp/dbx-bigfile; needs ~3×GIB free;
# WORKDIR is deleted at the end unless KEEP=1)
# Needs a release build (cargo build --release) and openssl (the data generator). Prints, per
# direction: seconds, MB/s, the client's peak RSS (/usr/bin/time) and the server's (VmHWM; the
# server is restarted between push and pull so each direction gets its own peak).
set -euo pipefail
GIB=${1:-10}; W=${2:-/tmp/dbx-bigfile}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DBX=${DBX:-$ROOT/target/release/dbx}
[ -x "$DBX" ] || { echo "build first: cargo build --release" >&2; exit 2; }
rm -rf "$W"; mkdir -p "$W/src" "$W/dst"
export HOME=$W/home XDG_CONFIG_HOME=$W/home/config DBX_KEYRING=file
SIZE=$((GIB << 30))
# openssl is stopped by `head` (SIGPIPE): that pipeline's status is not a failure.
set +o pipefail
openssl enc -aes-128-ctr -nosalt -pass pass:dbx-bench -pbkdf2 </dev/zero 2>/dev/null \
  | head -c "$SIZE" >"$W/src/big.bin"
set -o pipefail
[ "$(stat -c %s "$W/src/big.bin")" = "$SIZE" ] || { echo "could not write $SIZE bytes" >&2; exit 1; }
"$DBX" admin user add bench --password-stdin --data "$W/data" <<<"bench-password" >/dev/null
SERVER=
start_server() {
  "$DBX" serve --listen "127.0.0.1:${PORT:-0}" --data "$W/data" >"$W/serve.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 100); do grep -q "listening on" "$W/serve.log" && break; sleep 0.1; done
  URL=$(grep -o 'http://[0-9.:]*' "$W/serve.log" | head -1); PORT=${URL##*:}
}
stop_server() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; }
trap '[ -n "$SERVER" ] && kill $SERVER 2>/dev/null || true' EXIT
start_server
"$DBX" login "$URL" --user bench --password-stdin <<<"bench-password" >/dev/null
"$DBX" init "$W/src" >/dev/null
"$DBX" init "$W/dst" >/dev/null
run() {  # run NAME DIR ARGS...
  local name=$1 dir=$2; shift 2
  sync
  local s=$EPOCHREALTIME
  /usr/bin/time -f "%M" -o "$W/$name.rss" "$DBX" -C "$dir" "$@" >/dev/null
  local e=$EPOCHREALTIME
  local hwm; hwm=$(awk '/VmHWM/ {print $2}' "/proc/$SERVER/status")
  awk -v n="$name" -v s="$s" -v e="$e" -v b="$SIZE" -v c="$(cat "$W/$name.rss")" -v h="$hwm" \
    'BEGIN{printf "%s %.1f s, %.0f MB/s, client peak %.0f MiB, server peak %.0f MiB\n", n, e-s, b/(e-s)/1e6, c/1024, h/1024}'
}
echo "# one file of $GIB GiB; $(nproc) cpus"
run push "$W/src" push
stop_server; start_server
run pull "$W/dst" pull
cmp "$W/src/big.bin" "$W/dst/big.bin" && echo "# pulled file identical"
stop_server
[ -n "${KEEP:-}" ] || rm -rf "$W"
