#!/usr/bin/env bash
# The cluster figures in BENCHMARKS.md: fan-out and direct sends through Redis across
# several nodes, each beside the same load on one node with the in-process broker (the
# baseline of the same run). Each scenario runs RUNS times (default 3) against freshly
# started processes (a private redis-server on REDIS_PORT, no persistence), then a table
# of medians (min–max) from the JSON results.
#
#   cargo build --release --workspace
#   bash bench/scripts/cluster.sh                  # all scenarios
#   ONLY=direct3,direct1 RUNS=5 bash bench/scripts/cluster.sh
#   RINGWAY_PRESENCE_TTL_SECS=3600 ONLY=direct3 bash bench/scripts/cluster.sh
#                                 # RINGWAY_* variables reach every node
#
# The nodes share one port through SO_REUSEPORT, so the kernel spreads the generator's
# connections over them. Node i runs on CPU (i mod CPUs) (`taskset`; a node pins its
# shards inside its affinity mask), with one shard per CPU it is given; the one-node
# baseline gets every CPU. Gateway CPU counts every node process; Redis's CPU is
# reported apart. Results: bench/results/cluster-<timestamp>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
ONLY=${ONLY:-fanout1k-redis2,fanout1k-local,fanout10k-redis2,fanout10k-local,fanout10k-redis1,fanout10kx100-redis1,direct3,direct1,pub-history,pub-nohistory,resume10k-redis2,direct3-noinbox,pubsat-history,pubsat-nohistory}
OUT=${OUT:-bench/results/cluster-$(date -u +%Y%m%d-%H%M%S)}
GW_BIN=${GW_BIN:-target/release/ringway}
B=${BENCH_BIN:-target/release/ringway-bench}
PORT=${PORT:-18580}
APORT=${APORT:-19580}
REDIS_PORT=${REDIS_PORT:-16390}
CPUS=$(nproc)
export RINGWAY_JWT_SECRET=${RINGWAY_JWT_SECRET:-bench-secret-0123456789abcdef0123}
mkdir -p "$OUT"
[ -x "$GW_BIN" ] && [ -x "$B" ] || { echo "build first: cargo build --release --workspace" >&2; exit 2; }
command -v redis-server >/dev/null || { echo "redis-server not found (apt-get install redis-server)" >&2; exit 2; }

PIDS=()
start_redis() {
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --logfile "$OUT/redis.log" --daemonize no &
  REDIS=$!
  for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "redis-server did not start" >&2; return 1
}
# start_nodes N [redis]: N nodes on one port; admin ports APORT, APORT+1, …
start_nodes() {
  local n=$1 redis=${2:-} i cpus
  PIDS=()
  for i in $(seq 0 $((n - 1))); do
    if (( n == 1 )); then cpus=0-$((CPUS - 1)); else cpus=$(( i % CPUS )); fi
    taskset -c "$cpus" "$GW_BIN" serve --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$((APORT + i))" --shards 0 \
      --node-id "bench$i" --allow-anonymous ${redis:+--redis "redis://127.0.0.1:$REDIS_PORT"} \
      2>>"$OUT/gateway.log" &
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
  if [ -n "${REDIS:-}" ]; then kill -TERM "$REDIS" 2>/dev/null || true; wait "$REDIS" 2>/dev/null || true; REDIS=; fi
  sleep 1
}
trap stop_all EXIT
want() { [[ ",$ONLY," == *",$1,"* ]]; }
gw_pids() { local p; for p in "${PIDS[@]}"; do echo --gateway-pid "$p"; done; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# History reads (FCALL_RO ringway_history) Redis has served so far, the whole run's.
reads() { redis-cli -p "$REDIS_PORT" INFO commandstats | awk -F'[=:,]' '/^cmdstat_fcall_ro:/ {print $3; f=1} END {if (!f) print 0}'; }
# run NAME BENCH-ARGS…: the generator against the nodes, Redis's CPU ticks around it.
run() {
  local name=$1; shift
  local r0=0 r1=0
  [ -n "${REDIS:-}" ] && r0=$(cpu_ticks "$REDIS") && reads0=$(reads)
  "$B" --url "ws://127.0.0.1:$PORT/ws" --admin "127.0.0.1:$APORT" $(gw_pids) \
    ${REDIS:+--redis "127.0.0.1:$REDIS_PORT"} --json "$OUT/$name.json" "$@"
  [ -n "${REDIS:-}" ] && r1=$(cpu_ticks "$REDIS") && echo "$(( $(reads) - reads0 ))" > "$OUT/$name.redis-reads"
  echo "$(( r1 - r0 ))" > "$OUT/$name.redis-ticks"
}

FANOUT1K=(fanout --subs 1000 --topics 1 --rate 10 --duration 10)
FANOUT=(fanout --subs 10000 --topics 1 --rate 10 --duration 10 --source-ips 2)
DIRECT=(direct --subs 10000 --topics 10000 --rate 1000 --duration 10 --source-ips 2)
# One node with a shard per CPU through Redis: Redis sends each message once to the
# node, whose topic-owner shard hands it to the others. At 100 msg/s (1M deliveries/s
# offered) the load is above what a 2-core host delivers; what is late counts as lost.
FANOUT100=(fanout --subs 10000 --topics 1 --rate 100 --duration 10 --drain-secs 15 --source-ips 2)
# The cost of history in Redis: the same publish rate with topic streams on and off.
PUB=(fanout --subs 100 --topics 1 --rate 2000 --duration 10)
# The same at saturation: publishes as fast as acknowledged (256 in flight).
PUBSAT=(fanout --subs 100 --topics 1 --rate 0 --duration 10 --drain-secs 15)
# A resume storm through Redis: 10,000 subscribers over 2 nodes reconnect at once, each
# 100 messages behind, then 10 msg/s live.
RESUME=(fanout --subs 10000 --topics 1 --behind 100 --rate 10 --duration 5 --source-ips 2)
for i in $(seq "$RUNS"); do
  if want fanout1k-redis2; then
    start_redis; start_nodes 2 redis; run "fanout1k-redis2-$i" "${FANOUT1K[@]}"; stop_all
  fi
  if want fanout1k-local; then
    start_nodes 1; run "fanout1k-local-$i" "${FANOUT1K[@]}"; stop_all
  fi
  if want fanout10k-redis2; then
    start_redis; start_nodes 2 redis; run "fanout10k-redis2-$i" "${FANOUT[@]}" --svg "$OUT/fanout10k-redis2-$i.svg"; stop_all
  fi
  if want fanout10k-local; then
    start_nodes 1; run "fanout10k-local-$i" "${FANOUT[@]}"; stop_all
  fi
  if want fanout10k-redis1; then
    start_redis; start_nodes 1 redis; run "fanout10k-redis1-$i" "${FANOUT[@]}"; stop_all
  fi
  if want fanout10kx100-redis1; then
    start_redis; start_nodes 1 redis; run "fanout10kx100-redis1-$i" "${FANOUT100[@]}"; stop_all
  fi
  if want direct3; then
    start_redis; start_nodes 3 redis; run "direct3-$i" "${DIRECT[@]}" --svg "$OUT/direct3-$i.svg"; stop_all
  fi
  if want direct3-noinbox; then
    start_redis; export RINGWAY_DIRECT_INBOX_SIZE=0; start_nodes 3 redis; unset RINGWAY_DIRECT_INBOX_SIZE
    run "direct3-noinbox-$i" "${DIRECT[@]}"; stop_all
  fi
  if want direct1; then
    start_nodes 1; run "direct1-$i" "${DIRECT[@]}"; stop_all
  fi
  if want pub-history; then
    start_redis; start_nodes 2 redis; run "pub-history-$i" "${PUB[@]}"; stop_all
  fi
  if want pub-nohistory; then
    start_redis; export RINGWAY_HISTORY_SIZE=0; start_nodes 2 redis; unset RINGWAY_HISTORY_SIZE
    run "pub-nohistory-$i" "${PUB[@]}"; stop_all
  fi
  if want pubsat-history; then
    start_redis; start_nodes 2 redis; run "pubsat-history-$i" "${PUBSAT[@]}"; stop_all
  fi
  if want pubsat-nohistory; then
    start_redis; export RINGWAY_HISTORY_SIZE=0; start_nodes 2 redis; unset RINGWAY_HISTORY_SIZE
    run "pubsat-nohistory-$i" "${PUBSAT[@]}"; stop_all
  fi
  if want resume10k-redis2; then
    start_redis; start_nodes 2 redis; run "resume10k-redis2-$i" "${RESUME[@]}"; stop_all
  fi
done

python3 - "$OUT" "$(getconf CLK_TCK)" <<'PY' | tee "$OUT/summary.txt"
import glob, json, os, statistics, sys
out, hz = sys.argv[1], int(sys.argv[2])
def load(name):
    rows = []
    for f in sorted(glob.glob(os.path.join(out, name + "-[0-9]*.json"))):
        r = json.load(open(f))["results"]
        ticks = f[:-5] + ".redis-ticks"
        r["redis_cpu_secs"] = int(open(ticks).read()) / hz if os.path.exists(ticks) else None
        rows.append(r)
    return rows
def row(label, vals, fmt="{:,.0f}"):
    vals = [v for v in vals if v is not None]
    if vals:
        print(f"{label:<58} {fmt.format(statistics.median(vals)):>12}   ({fmt.format(min(vals))} – {fmt.format(max(vals))}, n={len(vals)})")
for name, label in (("fanout1k-redis2", "fanout through Redis: 1 topic, 1,000 subscribers over 2 nodes, 10 msg/s"),
                    ("fanout1k-local", "baseline, one node, in-process broker: the same load"),
                    ("fanout10k-redis2", "fanout through Redis: 1 topic, 10,000 subscribers over 2 nodes, 10 msg/s"),
                    ("fanout10k-local", "baseline, one node, in-process broker: the same load"),
                    ("fanout10k-redis1", "fanout through Redis: 1 topic, 10,000 subscribers on 1 node of 2 shards, 10 msg/s"),
                    ("fanout10kx100-redis1", "the same at 100 msg/s (1M deliveries/s offered, above capacity; not delivered 15 s after the last publish = lost)"),
                    ("direct3", "direct through Redis: 10,000 users over 3 nodes, 1,000 msg/s"),
                    ("direct3-noinbox", "the same with inboxes off (direct_inbox_size 0)"),
                    ("direct1", "baseline, one node, in-process directory: the same load"),
                    ("pub-history", "publish through Redis, history on: 2,000 msg/s to 100 subscribers over 2 nodes"),
                    ("pub-nohistory", "the same with history off (history_size 0)"),
                    ("pubsat-history", "publish through Redis at saturation, history on: 100 subscribers over 2 nodes"),
                    ("pubsat-nohistory", "the same with history off (history_size 0)"),
                    ("resume10k-redis2", "resume storm through Redis: 10,000 subscribers over 2 nodes, 100 behind")):
    rs = load(name)
    if not rs:
        continue
    print(label)
    row("  deliveries/s", [r["deliveries"]["per_sec"] for r in rs])
    row("  messages acknowledged/s", [r["publisher"]["acked_ok"] / r["publisher"]["send_secs"] for r in rs])
    row("  deliveries per gateway CPU-second (all nodes)", [r["gateway"]["deliveries_per_cpu_sec_schedstat"] for r in rs])
    row("  lost + duplicates", [r["deliveries"]["lost"] + r["deliveries"]["duplicates"] for r in rs])
    row("  time to recover every resuming subscriber (s)",
        [(r.get("resume") or {}).get("recover_secs") for r in rs], "{:,.3f}")
    for p in ("p50", "p99", "p999", "max"):
        row(f"  latency {p} (ms)", [r["latency_us"][p] / 1000 for r in rs], "{:,.2f}")
    calls = [r.get("redis_calls") for r in rs if r.get("redis_calls")]
    if calls:
        acked = [r["publisher"]["acked_ok"] for r in rs if r.get("redis_calls")]
        row("  redis commands per message (all, functions' included)",
            [sum(c.values()) / a for c, a in zip(calls, acked)], "{:,.2f}")
        for cmd in sorted({k for c in calls for k in c}):
            row(f"    {cmd} per message", [c.get(cmd, 0) / a for c, a in zip(calls, acked)], "{:,.2f}")
        if name.startswith("resume"):
            reads = [int(open(f[:-5] + ".redis-reads").read()) for f in
                     sorted(glob.glob(os.path.join(out, name + "-[0-9]*.json")))
                     if os.path.exists(f[:-5] + ".redis-reads")]
            row("  history reads (FCALL_RO) per resuming subscriber, whole run",
                [n / 10000 for n in reads], "{:,.4f}")
        row("  redis-server CPU-seconds (whole run)", [r["redis_cpu_secs"] for r in rs], "{:,.2f}")
        row("  redis-server CPU-microseconds per message acknowledged",
            [r["redis_cpu_secs"] * 1e6 / r["publisher"]["acked_ok"] for r in rs if r["redis_cpu_secs"] is not None], "{:,.1f}")
PY
