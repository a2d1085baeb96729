#!/usr/bin/env bash
# dbx against rsync (daemon), restic (rest server) and rclone (sftp) on the same dataset, on
# loopback, in one run: initial upload, no-op re-run, 1-byte insert at offset 1000 of the big
# file, restore of everything into an empty folder. Prints a markdown table with dbx/peer ratios.
#
# Usage: bench/peers.sh [BIG_MIB] [N_SMALL] [WORKDIR]   (defaults: 512 20000 /tmp/dbx-peers)
# Installs the peers from Debian's packages when missing (needs root). Uses the dataset
# generator and the peers' runner from ../shared/bench (set SHARED_BENCH to elsewhere).
set -euo pipefail
BIG=${1:-512}; N=${2:-20000}; W=${3:-/tmp/dbx-peers}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SB=${SHARED_BENCH:-$ROOT/../shared/bench}
[ -f "$SB/mkdata.py" ] && [ -f "$SB/peers.sh" ] || { echo "no $SB/{mkdata.py,peers.sh}" >&2; exit 2; }
missing=()
for t in rsync restic rclone; do command -v "$t" >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
(cd "$ROOT" && cargo build --release --quiet --bin dbx)
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
python3 "$SB/mkdata.py" "$W/data" "$BIG" "$N"
echo "# dataset: $(find "$W/data" -type f | wc -l) files, $(du -sb "$W/data" | cut -f1) bytes; $(nproc) cpus"
DATASET="$W/data" "$ROOT/bench/roundtrip.sh" "$BIG" "$N" "$W/dbx" | tee "$W/dbx.out"
bash "$SB/peers.sh" "$W/data" "$W/peers" rsync restic rclone_sftp | tee "$W/peers.out"
python3 - "$W/dbx.out" "$W/peers.out" <<'PY'
import sys
t = {}
for f in sys.argv[1:]:
    for line in open(f):
        p = line.split()
        if len(p) == 3 and not line.startswith("#"):
            t[(p[0], p[1])] = float(p[2])
names = {"initial_push": "initial_all", "noop_push": "noop", "edit_insert1": "edit_insert1",
         "restore_all": "restore_all"}
print("\n| scenario | dbx | rsync | restic | rclone (sftp) | dbx/rsync | dbx/restic |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for d, p in names.items():
    dbx = t.get(("dbx", d))
    row = [t.get((tool, p)) for tool in ("rsync", "restic", "rclone_sftp")]
    ratio = lambda x: f"{dbx / x:.2f}" if dbx and x else "-"
    fmt = lambda x: f"{x:.2f} s" if x else "-"
    print(f"| {p} | {fmt(dbx)} | {' | '.join(fmt(x) for x in row)} | {ratio(row[0])} | {ratio(row[1])} |")
PY
grep -h "peak_rss\|bytes_sent\|data_added\|literal" "$W/dbx.out" "$W/peers.out" | grep -i "edit_insert1" | sed 's/^/# /'
