#!/usr/bin/env bash
# Before/after figures for the tuning guide: the same connection burst against ringway
# with a sysctl at the kernel's old default and at the guide's value, RUNS times each
# (default 3), interleaved, each in a fresh network namespace (where these sysctls are
# per namespace).
#
#   cargo build --release --workspace
#   sudo bash bench/scripts/tuning.sh
#
# The burst: `churn --conns 20000 --concurrency 2048` (2,048 connections opening at
# once, each closed at its welcome) against `ringway serve --shards 2 --backlog 65535`.
# Settings compared: net.core.somaxconn 128 (the default before Linux 5.4, still found on
# older hosts) vs 65535 (tuning/99-ringway.conf); it caps each shard's accept queue.
# Results: bench/results/tuning-<timestamp>/ and summary.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
OUT=${OUT:-bench/results/tuning-$(date -u +%Y%m%d-%H%M%S)}
GW_BIN=${GW_BIN:-target/release/ringway}
B=${BENCH_BIN:-target/release/ringway-bench}
NS=${NS:-ringway-tuning}
mkdir -p "$OUT"
[ -x "$GW_BIN" ] && [ -x "$B" ] || { echo "build first: cargo build --release --workspace" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root (ip netns, sysctls)" >&2; exit 2; }
GW=
cleanup() {
  [ -n "$GW" ] && { kill -TERM "$GW" 2>/dev/null || true; wait "$GW" 2>/dev/null || true; }
  ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT

for i in $(seq "$RUNS"); do
  for somaxconn in 128 65535; do
    ip netns del "$NS" 2>/dev/null || true
    ip netns add "$NS"
    ip netns exec "$NS" ip link set lo up
    ip netns exec "$NS" sysctl -q -w net.core.somaxconn="$somaxconn" \
      net.ipv4.tcp_max_syn_backlog=65535 net.ipv4.ip_local_port_range="1024 65535"
    # Not through a shell function: `$!` must be the gateway itself.
    ip netns exec "$NS" "$GW_BIN" serve --listen 127.0.0.1:18380 --admin 127.0.0.1:19380 \
      --shards 2 --backlog 65535 2>>"$OUT/gateway.log" &
    GW=$!
    for _ in $(seq 100); do ip netns exec "$NS" curl -fs http://127.0.0.1:19380/readyz >/dev/null 2>&1 && break; sleep 0.05; done
    ip netns exec "$NS" "$B" churn --url ws://127.0.0.1:18380/ws --admin 127.0.0.1:19380 --gateway-pid "$GW" \
      --conns 20000 --concurrency 2048 --source-ips 4 --json "$OUT/somaxconn$somaxconn-$i.json" >/dev/null
    ip netns exec "$NS" nstat -az TcpExtListenOverflows TcpExtListenDrops 2>/dev/null \
      | awk 'NR>1 {print $1, $2}' > "$OUT/somaxconn$somaxconn-$i.nstat"
    kill -TERM "$GW"; wait "$GW" 2>/dev/null || true; GW=
    ip netns del "$NS"
  done
done

python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import glob, json, os, statistics, sys
out = sys.argv[1]
def load(name):
    rows = []
    for f in sorted(glob.glob(os.path.join(out, name + "-*.json"))):
        r = json.load(open(f))["results"]
        nstat = f[:-5] + ".nstat"
        counters = dict(l.split() for l in open(nstat)) if os.path.exists(nstat) else {}
        r["overflows"] = int(counters.get("TcpExtListenOverflows", 0))
        rows.append(r)
    return rows
def row(label, vals, fmt="{:,.0f}"):
    vals = [v for v in vals if v is not None]
    if vals:
        print(f"  {label:<40} {fmt.format(statistics.median(vals)):>10}   ({fmt.format(min(vals))} – {fmt.format(max(vals))}, n={len(vals)})")
for s in (128, 65535):
    rs = load(f"somaxconn{s}")
    print(f"net.core.somaxconn = {s}: churn, 20,000 connections, 2,048 opening at once")
    row("upgrades/s", [r["upgrades_per_sec"] for r in rs])
    row("connect→welcome p50 (ms)", [r["connect_to_welcome_us"]["p50"] / 1000 for r in rs], "{:,.1f}")
    row("connect→welcome p99 (ms)", [r["connect_to_welcome_us"]["p99"] / 1000 for r in rs], "{:,.1f}")
    row("connect→welcome max (ms)", [r["connect_to_welcome_us"]["max"] / 1000 for r in rs], "{:,.1f}")
    row("failed", [r["failed"] for r in rs])
    row("accept-queue overflows (TcpExtListenOverflows)", [r["overflows"] for r in rs])
PY
