#!/usr/bin/env bash
# One host, CONNS concurrent WebSocket connections (default 1,000,000): ringway as many
# gateway processes on one port (SO_REUSEPORT), joined through a private redis-server,
# and the load generator as many processes, all inside a network namespace of their own
# with the tuning/ sysctls. Every connection subscribes to one topic and is held for
# HOLD seconds (pings answered); then one broadcast goes to all of them.
#
#   cargo build --release --workspace
#   sudo bash bench/scripts/million.sh                  # CONNS=200000 for a smaller run
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
mkdir -p "$OUT"
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
echo "conns=$CONNS nodes=$NODES generator-procs=$PROCS source-ips=$IPS hold=${HOLD}s ns=$NS" | tee "$OUT/summary.txt"

ip netns exec "$NS" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --logfile "$PWD/$OUT/redis.log" --maxclients 10000 &
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

in_ns "$B" fanout --url "ws://127.0.0.1:$PORT/ws" --admin "127.0.0.1:$APORT" "${gw_pids[@]}" \
  --subs "$CONNS" --topics 1 --rate 1 --duration 1 --hold-secs "$HOLD" \
  --procs "$PROCS" --source-ips "$IPS" --open-concurrency 1024 --open-timeout-secs 900 \
  --drain-secs 120 --max-run-secs 1800 --json "$OUT/million.json" --svg "$OUT/broadcast.svg" \
  | tee "$OUT/bench.txt"

python3 - "$OUT/million.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
doc = json.load(open(sys.argv[1]))
r = doc["results"]
o, m, d, lat = r["open"], r["memory_before_publish"], r["deliveries"], r["latency_us"]
print(f"connections opened / failed        {o['opened']:,} / {o['failed']:,}")
print(f"time to connect and subscribe all  {o['secs']:.1f} s ({o['connects_per_sec']:,.0f}/s)")
print(f"gateway RSS per connection         {m['gateway_rss_bytes_per_conn']:,.0f} B (all gateway processes)")
print(f"kernel slab per connection         {m['kernel_slab_bytes_per_conn']:,.0f} B (both ends, loopback)")
print(f"broadcast: expected / received     {d['expected']:,} / {d['received']:,} (lost {d['lost']:,}, duplicates {d['duplicates']:,})")
print(f"broadcast reached the last client  {lat['max'] / 1000:,.0f} ms after it was published")
print(f"broadcast latency p50 / p99        {lat['p50'] / 1000:,.0f} / {lat['p99'] / 1000:,.0f} ms")
PY
