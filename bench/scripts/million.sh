#!/usr/bin/env bash
# One host, CONNS concurrent WebSocket connections (default 1,000,000): ringway as many
# gateway processes on one port (SO_REUSEPORT), joined through a private redis-server,
# and the load generator as many processes, all inside a network namespace of their own
# with the tuning/ sysctls. Every connection subscribes to one topic and is held for
# HOLD seconds (pings answered); then one broadcast goes to all of them. With USERS=1,
# every connection is instead an identified user of its own (a signed token for
# user-<g>, registered in Redis's presence) and one direct message goes to user-0.
# Redis's CPU, memory and commands are sampled every 5 s throughout (redis.csv), and
# the summary gives them for connecting and for the idle hold.
#
#   cargo build --release --workspace
#   sudo bash bench/scripts/million.sh                  # CONNS=200000 for a smaller run
#   sudo USERS=1 bash bench/scripts/million.sh          # a million identified users
#
# Why several processes: the hard file limit here is 20,000 per process and cannot be
# raised (DESIGN.md), so each gateway process holds PER_NODE connections (default
# 16,000) and each generator process as many; a production host sets LimitNOFILE and
# runs one process. Source addresses 127.0.0.2… keep ≤ 8,000 connections per address.
# Needs root (ip netns, sysctls) and about 11 GB of memory for a million.
# Results: bench/results/million-<timestamp>/ (million.json, summary, logs).
set -euo pipefail
cd "$(dirname "$0")/../.."
CONNS=${CONNS:-1000000}
PER_NODE=${PER_NODE:-16000}
HOLD=${HOLD:-60}
USERS=${USERS:-0}
if [ "$USERS" = 1 ]; then
  export RINGWAY_JWT_SECRET=${RINGWAY_JWT_SECRET:-million-secret-0123456789abcdef012}
fi
NODES=$(( (CONNS + PER_NODE - 1) / PER_NODE ))
PROCS=${PROCS:-$NODES}
IPS=$(( (CONNS + 7999) / 8000 ))
PORT=${PORT:-18980}
APORT=${APORT:-21000}
REDIS_PORT=${REDIS_PORT:-16391}
NS=${NS:-ringway-million}
OUT=${OUT:-bench/results/million-$(date -u +%Y%m%d-%H%M%S)}
GW_BIN=${GW_BIN:-target/release/ringway}
B=${BENCH_BIN:-target/release/ringway-bench}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
[ -x "$GW_BIN" ] && [ -x "$B" ] || { echo "build first: cargo build --release --workspace" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root (ip netns, sysctls)" >&2; exit 2; }

in_ns() { ip netns exec "$NS" "$@"; }
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT

# The namespace and its sysctls (tuning/99-ringway.conf; these are per namespace).
ip netns del "$NS" 2>/dev/null || true
ip netns add "$NS"
in_ns ip link set lo up
in_ns sysctl -q -w net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 \
  net.ipv4.ip_local_port_range="1024 65535" net.ipv4.tcp_migrate_req=1
# fs.file-max is system-wide: both ends' sockets count.
need=$(( CONNS * 2 + 100000 ))
[ "$(cat /proc/sys/fs/file-max)" -ge "$need" ] || sysctl -q -w fs.file-max="$need"
echo "conns=$CONNS nodes=$NODES generator-procs=$PROCS source-ips=$IPS hold=${HOLD}s users=$USERS ns=$NS" | tee "$OUT/summary.txt"

# Redis would have a host of its own; here it shares 2 cores with about 130 busy
# processes, and at their priority it gets too little CPU to answer within ringway's
# 10 s reply timeout while a million connections register (links break, reconnect and
# register everything again). REDIS_NICE (default -10) gives it the CPU it asks for.
ip netns exec "$NS" nice -n "${REDIS_NICE:--10}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --logfile "$OUT/redis.log" --maxclients 10000 &
PIDS+=($!)
for _ in $(seq 100); do in_ns redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

GW=()
for i in $(seq 0 $((NODES - 1))); do
  # Not through `in_ns`: a shell function in the background is a subshell, and `$!`
  # would name it instead of the gateway.
  ip netns exec "$NS" env RINGWAY_LOG=warn "$GW_BIN" serve --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$((APORT + i))" \
    --shards 1 --pin-shards false --node-id "m$i" --redis "redis://127.0.0.1:$REDIS_PORT" \
    2>>"$OUT/gateways.log" &
  PIDS+=($!); GW+=($!)
done
for i in $(seq 0 $((NODES - 1))); do
  for _ in $(seq 200); do in_ns curl -fs "http://127.0.0.1:$((APORT + i))/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
  in_ns curl -fs "http://127.0.0.1:$((APORT + i))/readyz" >/dev/null || { echo "node $i not ready" >&2; exit 1; }
done
# `ip netns exec` execs the command (after `env`, which execs too), so each pid is the
# gateway's own; ringway-bench reads their /proc entries for RSS and CPU.
gw_pids=()
for p in "${GW[@]}"; do gw_pids+=(--gateway-pid "$p"); done

# Redis every 5 s: unix time, CPU seconds (user + sys), used memory, commands, keys.
( while :; do
    info=$(in_ns redis-cli -p "$REDIS_PORT" INFO 2>/dev/null) || break
    keys=$(in_ns redis-cli -p "$REDIS_PORT" DBSIZE 2>/dev/null) || break
    echo "$info" | awk -v now="$(date +%s.%N)" -v keys="$keys" -F: '
      /^used_cpu_user:/ {u=$2} /^used_cpu_sys:/ {s=$2} /^used_memory:/ {m=$2}
      /^total_commands_processed:/ {c=$2}
      END {printf "%s,%.3f,%d,%d,%d\n", now, u + s, m, c, keys}'
    sleep 5
  done ) > "$OUT/redis.csv" 2>/dev/null &
SAMPLER=$!
START=$(date +%s.%N)

if [ "$USERS" = 1 ]; then
  SCENARIO=(direct --topics "$CONNS" --jwt-secret "$RINGWAY_JWT_SECRET")
else
  SCENARIO=(fanout --topics 1)
fi
in_ns "$B" "${SCENARIO[@]}" --url "ws://127.0.0.1:$PORT/ws" --admin "127.0.0.1:$APORT" "${gw_pids[@]}" \
  --subs "$CONNS" --rate 1 --duration 1 --hold-secs "$HOLD" \
  --procs "$PROCS" --source-ips "$IPS" --open-concurrency 1024 --open-timeout-secs 900 \
  --drain-secs 120 --max-run-secs 1800 --json "$OUT/million.json" --svg "$OUT/broadcast.svg" \
  | tee "$OUT/bench.txt"

kill "$SAMPLER" 2>/dev/null || true

python3 - "$OUT/million.json" "$OUT/redis.csv" "$START" "$HOLD" "$NODES" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
doc = json.load(open(sys.argv[1]))
rows = [[float(x) for x in line.split(",")] for line in open(sys.argv[2]) if line.count(",") == 4]
start, hold, nodes = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
r = doc["results"]
o, m, d, lat = r["open"], r["memory_before_publish"], r["deliveries"], r["latency_us"]
print(f"connections opened / failed        {o['opened']:,} / {o['failed']:,}")
print(f"time to connect and subscribe all  {o['secs']:.1f} s ({o['connects_per_sec']:,.0f}/s)")
print(f"gateway RSS per connection         {m['gateway_rss_bytes_per_conn']:,.0f} B (all gateway processes)")
print(f"kernel slab per connection         {m['kernel_slab_bytes_per_conn']:,.0f} B (both ends, loopback)")
print(f"broadcast: expected / received     {d['expected']:,} / {d['received']:,} (lost {d['lost']:,}, duplicates {d['duplicates']:,})")
print(f"broadcast reached the last client  {lat['max'] / 1000:,.0f} ms after it was published")
print(f"broadcast latency p50 / p99        {lat['p50'] / 1000:,.0f} / {lat['p99'] / 1000:,.0f} ms")
# Connecting: from the start to the end of the opens. Holding: from 10 s after the
# opens ended to 5 s before the hold ends, every connection idle.
opened_at = start + o["secs"]
def at(t):
    # The last sample at or before t.
    before = [r for r in rows if r[0] <= t]
    return before[-1] if before else (rows[0] if rows else None)
def span(t0, t1):
    a, b = at(t0), at(t1)
    if not a or not b or b[0] - a[0] < 5:
        return None
    return a, b
s = span(start, opened_at + 5)
if s:
    a, b = s
    print(f"redis while connecting              {b[1] - a[1]:,.2f} CPU-s, {b[3] - a[3]:,.0f} commands ({(b[3] - a[3]) / max(o['opened'], 1):,.3f} per connection)")
s = span(opened_at + 10, opened_at + hold - 5)
if s:
    a, b = s
    mins = (b[0] - a[0]) / 60
    cmds = (b[3] - a[3]) / mins
    print(f"redis while holding (idle)          {(b[1] - a[1]) / mins:,.3f} CPU-s per minute, {cmds:,.0f} commands per minute "
          f"({cmds / nodes:,.0f} per gateway process, {cmds / max(o['opened'], 1):,.5f} per connection), over {b[0] - a[0]:,.0f} s")
    print(f"redis memory / keys while holding   {b[2] / 2**20:,.0f} MiB / {int(b[4]):,}")
PY
