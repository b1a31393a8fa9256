#!/usr/bin/env bash
# The single-node figures in BENCHMARKS.md, each scenario RUNS times (default 3) against
# a freshly started gateway, then a table of medians (min–max) from the JSON results.
#
#   cargo build --release --workspace
#   bash bench/scripts/single-node.sh            # all scenarios
#   ONLY=idle RUNS=5 bash bench/scripts/single-node.sh
#
# Results: bench/results/<timestamp>/*.json, gateway logs beside them, summary.txt.
# Loopback only; every run is bounded by the generator's own deadlines.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
ONLY=${ONLY:-idle,fanout1k10,fanout10k,fanout1k,churn}
OUT=${OUT:-bench/results/$(date -u +%Y%m%d-%H%M%S)}
GW_BIN=${GW_BIN:-target/release/ringway}
B=${BENCH_BIN:-target/release/ringway-bench}
PORT=${PORT:-18480}
APORT=${APORT:-19480}
mkdir -p "$OUT"
[ -x "$GW_BIN" ] && [ -x "$B" ] || { echo "build first: cargo build --release --workspace" >&2; exit 2; }

start_gw() {
  "$GW_BIN" serve --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$APORT" --shards 2 --client-publish true "$@" \
    2>>"$OUT/gateway.log" &
  GW=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$APORT/readyz" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "gateway did not become ready" >&2; return 1
}
stop_gw() { kill -TERM "$GW" 2>/dev/null || true; wait "$GW" 2>/dev/null || true; sleep 1; }
want() { [[ ",$ONLY," == *",$1,"* ]]; }
C() { echo --url "ws://127.0.0.1:$PORT/ws" --admin "127.0.0.1:$APORT" --gateway-pid "$GW"; }

for i in $(seq "$RUNS"); do
  if want idle; then
    start_gw; "$B" idle $(C) --conns 19000 --hold-secs 30 --procs 2 --source-ips 4 --json "$OUT/idle-$i.json"; stop_gw
  fi
  if want fanout1k10; then
    start_gw; "$B" fanout $(C) --subs 1000 --topics 1 --rate 10 --duration 10 --json "$OUT/fanout1k10-$i.json"; stop_gw
  fi
  if want fanout10k; then
    start_gw; "$B" fanout $(C) --subs 10000 --topics 1 --rate 10 --duration 10 --source-ips 2 \
      --json "$OUT/fanout10k-$i.json" --svg "$OUT/fanout10k-$i.svg"; stop_gw
  fi
  if want fanout1k; then
    start_gw; "$B" fanout $(C) --subs 1000 --topics 1 --rate 100 --duration 10 --json "$OUT/fanout1k-$i.json"; stop_gw
  fi
  if want churn; then
    start_gw; "$B" churn $(C) --conns 10000 --concurrency 64 --source-ips 2 --json "$OUT/churn-$i.json"; stop_gw
  fi
done

python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import glob, json, os, statistics, sys
out = sys.argv[1]
def load(name):
    return [json.load(open(f))["results"] for f in sorted(glob.glob(os.path.join(out, name + "-*.json")))]
def row(label, vals, fmt="{:,.0f}"):
    vals = [v for v in vals if v is not None]
    if vals:
        print(f"{label:<58} {fmt.format(statistics.median(vals)):>12}   ({fmt.format(min(vals))} – {fmt.format(max(vals))}, n={len(vals)})")
idle = load("idle")
if idle:
    print("idle: 19,000 connections, 2 generator processes, held 30 s (one ping round)")
    row("  gateway RSS per connection after the hold (B)", [r["gateway"]["rss_bytes_per_conn"] for r in idle])
    row("  gateway RSS per connection right after opening (B)", [r["gateway"]["rss_bytes_per_conn_after_open"] for r in idle])
    row("  kernel slab per connection (B)", [r["kernel"]["slab_delta_bytes_per_conn"] for r in idle])
    row("  generator RSS per connection (B)", [r["generator"]["rss_delta_bytes_per_conn"] for r in idle])
    row("  connects/s", [r["open"]["connects_per_sec"] for r in idle])
    row("  connections lost during the hold", [r["hold"]["closed_by_peer"] for r in idle])
for name, label in (("fanout1k10", "fanout: 1 topic, 1,000 subscribers, 10 msg/s for 10 s"),
                    ("fanout10k", "fanout: 1 topic, 10,000 subscribers, 10 msg/s for 10 s"),
                    ("fanout1k", "fanout: 1 topic, 1,000 subscribers, 100 msg/s for 10 s")):
    rs = load(name)
    if not rs:
        continue
    print(label)
    row("  deliveries/s", [r["deliveries"]["per_sec"] for r in rs])
    row("  deliveries per gateway CPU-second", [r["gateway"]["deliveries_per_cpu_sec_schedstat"] for r in rs])
    row("  lost + duplicates", [r["deliveries"]["lost"] + r["deliveries"]["duplicates"] for r in rs])
    for p in ("p50", "p99", "p999", "max"):
        row(f"  latency {p} (ms)", [r["latency_us"][p] / 1000 for r in rs], "{:,.1f}")
churn = load("churn")
if churn:
    print("churn: 10,000 connections, 64 in flight")
    row("  upgrades/s", [r["upgrades_per_sec"] for r in churn])
    row("  upgrades per gateway CPU-second", [r["gateway"]["upgrades_per_cpu_sec_schedstat"] for r in churn])
    row("  failed", [r["failed"] for r in churn])
PY
