#!/usr/bin/env bash
# The Redis Cluster figures in BENCHMARKS.md: fan-out over many topics across 3 nodes,
# through one redis-server and through a Redis Cluster of 3 masters (no replicas), in
# the same run, alternating. Each scenario runs RUNS times (default 3) against freshly
# started processes, then a table of medians (min–max) from the JSON results.
#
#   cargo build --release --workspace
#   bash bench/scripts/redis-cluster.sh
#   RUNS=5 RATES=1000 bash bench/scripts/redis-cluster.sh
#
# The nodes share one port through SO_REUSEPORT; node i runs on CPU (i mod CPUs) with
# one shard. The publisher posts every message to node 0's admin API, which calls
# `ringway_publish` on the topic's master. Redis CPU is the sum over every redis-server
# of the scenario. Messages not delivered 15 s after the last publish count as lost.
# Results: bench/results/redis-cluster-<timestamp>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
RATES=${RATES:-1000,3000}
OUT=${OUT:-bench/results/redis-cluster-$(date -u +%Y%m%d-%H%M%S)}
GW_BIN=${GW_BIN:-target/release/ringway}
B=${BENCH_BIN:-target/release/ringway-bench}
PORT=${PORT:-18680}
APORT=${APORT:-19680}
REDIS_PORT=${REDIS_PORT:-16490}
CPUS=$(nproc)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # redis-server opens its log after moving to --dir
[ -x "$GW_BIN" ] && [ -x "$B" ] || { echo "build first: cargo build --release --workspace" >&2; exit 2; }
command -v redis-server >/dev/null || { echo "redis-server not found (apt-get install redis-server)" >&2; exit 2; }

PIDS=()
REDIS_PIDS=()
URL=
wait_ping() {
  for _ in $(seq 100); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "redis-server on $1 did not start" >&2; return 1
}
# start_single: one redis-server.
start_single() {
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --logfile "$OUT/redis.log" --daemonize no &
  REDIS_PIDS=($!)
  wait_ping "$REDIS_PORT"
  URL="redis://127.0.0.1:$REDIS_PORT"
}
# start_cluster: three masters (bus ports +100), slots split evenly.
start_cluster() {
  local i p dir
  REDIS_PIDS=()
  for i in 0 1 2; do
    p=$((REDIS_PORT + i)); dir="$OUT/cluster-$p"; rm -rf "$dir"; mkdir -p "$dir"
    redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
      --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" --cluster-port $((p + 100)) \
      --logfile "$OUT/redis-$p.log" --daemonize no &
    REDIS_PIDS+=($!)
  done
  for i in 0 1 2; do wait_ping $((REDIS_PORT + i)); done
  redis-cli --cluster create 127.0.0.1:$REDIS_PORT 127.0.0.1:$((REDIS_PORT + 1)) 127.0.0.1:$((REDIS_PORT + 2)) \
    --cluster-replicas 0 --cluster-yes >/dev/null
  for _ in $(seq 100); do
    redis-cli -p "$REDIS_PORT" cluster info | grep -q cluster_state:ok && break; sleep 0.1
  done
  URL="redis+cluster://127.0.0.1:$REDIS_PORT,127.0.0.1:$((REDIS_PORT + 1))"
}
start_nodes() {
  local n=$1 i
  PIDS=()
  for i in $(seq 0 $((n - 1))); do
    taskset -c $(( i % CPUS )) "$GW_BIN" serve --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$((APORT + i))" \
      --shards 0 --node-id "bench$i" --allow-anonymous --redis "$URL" 2>>"$OUT/gateway.log" &
    PIDS+=($!)
  done
  for i in $(seq 0 $((n - 1))); do
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$((APORT + i))/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
    curl -fs "http://127.0.0.1:$((APORT + i))/readyz" >/dev/null || { echo "node $i not ready" >&2; return 1; }
  done
}
stop_all() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  for p in "${REDIS_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${REDIS_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=(); REDIS_PIDS=()
  sleep 1
}
trap stop_all EXIT
gw_pids() { local p; for p in "${PIDS[@]}"; do echo --gateway-pid "$p"; done; }
redis_ticks() { local p t=0; for p in "${REDIS_PIDS[@]}"; do t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat") )); done; echo "$t"; }
per_master_ticks() { local p; for p in "${REDIS_PIDS[@]}"; do awk '{printf "%d ", $14 + $15}' "/proc/$p/stat"; done; }
run() {
  local name=$1; shift
  local r0 r1 m0
  r0=$(redis_ticks); m0=$(per_master_ticks)
  "$B" --url "ws://127.0.0.1:$PORT/ws" --admin "127.0.0.1:$APORT" $(gw_pids) --json "$OUT/$name.json" "$@"
  r1=$(redis_ticks)
  echo "$(( r1 - r0 ))" > "$OUT/$name.redis-ticks"
  echo "$m0 / $(per_master_ticks)" > "$OUT/$name.redis-per-master"
}

IFS=, read -r -a rates <<< "$RATES"
for i in $(seq "$RUNS"); do
  for rate in "${rates[@]}"; do
    # 3,000 subscribers over 30 topics (100 each), spread over 3 nodes.
    ARGS=(fanout --subs 3000 --topics 30 --rate "$rate" --duration 10 --drain-secs 15 --source-ips 2)
    start_single; start_nodes 3; run "single-$rate-$i" "${ARGS[@]}"; stop_all
    start_cluster; start_nodes 3; run "cluster-$rate-$i" "${ARGS[@]}"; stop_all
  done
done

python3 - "$OUT" "$(getconf CLK_TCK)" "$RATES" <<'PY' | tee "$OUT/summary.txt"
import glob, json, os, statistics, sys
out, hz, rates = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
def row(label, vals, fmt="{:,.0f}"):
    vals = [v for v in vals if v is not None]
    if vals:
        print(f"{label:<56} {fmt.format(statistics.median(vals)):>12}   ({fmt.format(min(vals))} – {fmt.format(max(vals))}, n={len(vals)})")
for rate in rates:
    for mode, label in (("single", "1 redis-server"), ("cluster", "Redis Cluster, 3 masters")):
        files = sorted(glob.glob(os.path.join(out, f"{mode}-{rate}-[0-9]*.json")))
        if not files:
            continue
        rs = []
        for f in files:
            r = json.load(open(f))["results"]
            r["redis_cpu"] = int(open(f[:-5] + ".redis-ticks").read()) / hz
            rs.append(r)
        print(f"{label}: 30 topics x 100 subscribers over 3 nodes, {rate} msg/s offered")
        row("  deliveries/s", [r["deliveries"]["per_sec"] for r in rs])
        row("  messages acknowledged/s", [r["publisher"]["acked_ok"] / r["publisher"]["send_secs"] for r in rs])
        row("  lost + duplicates", [r["deliveries"]["lost"] + r["deliveries"]["duplicates"] for r in rs])
        for p in ("p50", "p99", "max"):
            row(f"  latency {p} (ms)", [r["latency_us"][p] / 1000 for r in rs], "{:,.2f}")
        row("  redis CPU-seconds (all servers, whole run)", [r["redis_cpu"] for r in rs], "{:,.2f}")
        row("  redis CPU-microseconds per message acknowledged",
            [r["redis_cpu"] * 1e6 / max(r["publisher"]["acked_ok"], 1) for r in rs], "{:,.1f}")
PY
