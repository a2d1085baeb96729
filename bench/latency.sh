#!/usr/bin/env bash
# Two `dbx watch` processes on two folders against one server; 100 small-file writes on A, one
# at a time; prints p50/p95/p99 of the time until each file appears, complete, on B.
# Usage: bench/latency.sh [COUNT] (default 100). Builds in release mode.
set -euo pipefail
COUNT=${1:-100}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release --quiet --bin dbx
W=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$W"' EXIT
DBX=$ROOT/target/release/dbx
export HOME=$W/home XDG_CONFIG_HOME=$W/home/config DBX_KEYRING=file
"$DBX" admin user add bench --password-stdin --data "$W/data" <<<"bench-password" >/dev/null
RUST_LOG=warn "$DBX" serve --listen 127.0.0.1:0 --data "$W/data" >"$W/serve.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$W/serve.log" && break; sleep 0.1; done
URL=$(grep -o 'http://[0-9.:]*' "$W/serve.log" | head -1)
"$DBX" login "$URL" --user bench --password-stdin <<<"bench-password" >/dev/null
"$DBX" init "$W/a" >/dev/null
"$DBX" init "$W/b" >/dev/null
"$DBX" --json -C "$W/a" watch >"$W/a.log" 2>&1 & PIDS+=($!)
"$DBX" --json -C "$W/b" watch >"$W/b.log" 2>&1 & PIDS+=($!)
for f in a b; do for _ in $(seq 200); do grep -q '"watching"' "$W/$f.log" && break; sleep 0.05; done; done
echo "# $COUNT writes on A, waiting for each on B; $(nproc) cpus"
python3 - "$W/a" "$W/b" "$COUNT" <<'PY'
import os, sys, time
a, b, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
lat = []
for i in range(n):
    data = (f"write {i} " * (1 + i % 50)).encode()
    name = f"f{i:04d}.txt"
    t0 = time.monotonic()
    with open(os.path.join(a, name), "wb") as f:
        f.write(data)
    dst = os.path.join(b, name)
    deadline = t0 + 30
    while True:
        try:
            with open(dst, "rb") as f:
                if f.read() == data:
                    break
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{name} did not reach B within 30 s")
        time.sleep(0.002)
    lat.append(time.monotonic() - t0)
lat.sort()
pct = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] * 1000
print(f"latency_ms p50={pct(0.50):.0f} p95={pct(0.95):.0f} p99={pct(0.99):.0f} max={lat[-1]*1000:.0f}")
PY
