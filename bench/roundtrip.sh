#!/usr/bin/env bash
# Times dbx on loopback with the shared dataset generator: initial push, no-op push, a 1-byte
# insert at offset 1000 of the big file, and a pull of everything into an empty folder.
#
# Usage: bench/roundtrip.sh [BIG_MIB] [N_SMALL] [WORKDIR]   (defaults: 512 20000 /tmp/dbx-bench)
# Needs a release build (cargo build --release) and python3. Prints "scenario seconds" lines and
# '#' lines with the --json figures (bytes sent/received), peak RSS of the client and the CPU
# seconds client and server spent (steadier than wall time on a busy machine).
# DATASET=DIR uses a copy of an existing dataset instead of generating one.
set -euo pipefail
BIG=${1:-512}; N=${2:-20000}; W=${3:-/tmp/dbx-bench}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DBX=${DBX:-$ROOT/target/release/dbx}
MKDATA=${MKDATA:-$ROOT/../shared/bench/mkdata.py}
[ -x "$DBX" ] || { echo "build first: cargo build --release" >&2; exit 2; }
[ -f "$MKDATA" ] || { echo "no dataset generator at $MKDATA (set MKDATA)" >&2; exit 2; }

if [ -e "$W" ]; then
  # This machine's ext4 runs without a journal: for up to 5 minutes after many inodes are
  # freed, creating files is slow (the allocator skips inodes freed in the last 60 s, or 300 s
  # while their inode table block is dirty: `recently_deleted` in fs/ext4/ialloc.c), which would
  # skew the runs (a restore spent 37% of its client CPU there). DELETE_WAIT=0 skips the wait.
  rm -rf "$W"; sync
  echo "# waiting ${DELETE_WAIT:-300} s after deleting the previous run (ext4 inode reuse delay)" >&2
  sleep "${DELETE_WAIT:-300}"
fi
mkdir -p "$W"
export HOME=$W/home XDG_CONFIG_HOME=$W/home/config DBX_KEYRING=file
# The copy keeps the dataset's mtimes (`cp -a`), as the peers' runs read the dataset itself: a
# file modified in the 2 s before a push is not sent as it is read (its stat could not show a
# change made during the read), which a fresh copy's new mtimes would impose on dbx alone.
if [ -n "${DATASET:-}" ]; then cp -a "$DATASET" "$W/src"; else python3 "$MKDATA" "$W/src" "$BIG" "$N"; fi
"$DBX" admin user add bench --password-stdin --data "$W/data" <<<"bench-password" >/dev/null
"$DBX" serve --listen 127.0.0.1:0 --data "$W/data" >"$W/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening on" "$W/serve.log" && break; sleep 0.1; done
URL=$(grep -o 'http://[0-9.:]*' "$W/serve.log" | head -1)
"$DBX" login "$URL" --user bench --password-stdin <<<"bench-password" >/dev/null
"$DBX" init "$W/src" >/dev/null
"$DBX" init "$W/restore" >/dev/null
echo "# dataset: $(find "$W/src" -type f -not -path '*/.dbx/*' | wc -l) files, $(du -sb --exclude=.dbx "$W/src" | cut -f1) bytes; $(nproc) cpus"

server_cpu() {  # the server's user + system CPU so far, in clock ticks (1/100 s)
  awk '{print $14 + $15}' "/proc/$SERVER/stat"
}
run() {  # run NAME DIR ARGS...
  local name=$1 dir=$2; shift 2
  local s e
  sync
  local c0; c0=$(server_cpu)
  s=$EPOCHREALTIME
  /usr/bin/time -f "%M %U %S" -o "$W/$name.rss" "$DBX" -C "$dir" --json "$@" >"$W/$name.json"
  e=$EPOCHREALTIME
  awk -v n="$name" -v s="$s" -v e="$e" 'BEGIN{printf "dbx %s %.3f\n", n, e-s}'
  python3 - "$W/$name.json" "$name" "$(cat "$W/$name.rss")" "$c0" "$(server_cpu)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ["files_uploaded", "files_downloaded", "blocks_uploaded", "block_bytes_sent",
        "bytes_deduplicated", "block_bytes_received"]
rss, user, system = sys.argv[3].split()
print("# %s %s peak_rss_kib=%s client_cpu_s=%.2f server_cpu_s=%.2f" % (
    sys.argv[2], " ".join("%s=%s" % (k, r[k]) for k in keys), rss,
    float(user) + float(system), (int(sys.argv[5]) - int(sys.argv[4])) / 100))
PY
}
run initial_push "$W/src" push
run noop_push "$W/src" push
python3 - "$W/src/big/blob.bin" <<'P'
import sys; p = sys.argv[1]; d = open(p, 'rb').read(); open(p, 'wb').write(d[:1000] + b'X' + d[1000:])
P
run edit_insert1 "$W/src" push
run restore_all "$W/restore" pull
if diff -rq --exclude=.dbx "$W/src" "$W/restore" >/dev/null; then echo "# restore verify=ok"; else echo "# restore verify=MISMATCH"; fi
echo "# server stored: $(du -sb "$W/data/blocks" | cut -f1) bytes of blocks"
