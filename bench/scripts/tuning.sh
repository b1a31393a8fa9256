#!/usr/bin/env bash
# Before/after figures for the tuning guide: the same connection burst against ringway
# with a sysctl at the kernel's old default and at the guide's value, RUNS times each
# (default 3), interleaved, each in a fresh network namespace (where these sysctls are
# per namespace).
#
#   cargo build --release --workspace
#   sudo bash bench/scripts/tuning.sh
#
# Settings compared, each at an old default and at tuning/99-ringway.conf's value:
# - net.core.somaxconn 128 vs 65535 and net.ipv4.tcp_max_syn_backlog 128 vs 65535: a
#   burst, `churn --conns 20000 --concurrency 2048` (2,048 connections opening at once,
#   each closed at its welcome), against `ringway serve --shards 2 --backlog 65535`;
# - net.ipv4.ip_local_port_range "32768 60999" (the default) vs "1024 65535": 30,000
#   idle connections from one source address (`idle --conns 30000 --procs 2`) against
#   two gateway processes on the port (one holds at most 20,000 here).
# ONLY_PORTS=1 runs only the last comparison.
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
ALL=()
cleanup() {
  local g
  for g in "${ALL[@]}"; do kill -TERM "$g" 2>/dev/null || true; wait "$g" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT

# run NAME SYSCTL=VALUE… -- BENCH-ARGS…: one measurement in a fresh namespace.
run() {
  local name=$1; shift
  local sysctls=()
  while [ "$1" != "--" ]; do sysctls+=("$1"); shift; done
  shift
  ip netns del "$NS" 2>/dev/null || true
  ip netns add "$NS"
  ip netns exec "$NS" ip link set lo up
  ip netns exec "$NS" sysctl -q -w net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 \
    net.ipv4.ip_local_port_range="1024 65535"
  ip netns exec "$NS" sysctl -q -w "${sysctls[@]}"
  # GATEWAYS processes on one port (SO_REUSEPORT): more connections than one
  # process's file limit (20,000 here) need more than one.
  # Not through a shell function: `$!` must be the gateway itself.
  local pids=() g
  for g in $(seq 0 $((GATEWAYS - 1))); do
    ip netns exec "$NS" "$GW_BIN" serve --listen 127.0.0.1:18380 --admin "127.0.0.1:$((19380 + g))" \
      --shards 2 --backlog 65535 2>>"$OUT/gateway.log" &
    GW=$!; pids+=(--gateway-pid "$GW"); ALL+=("$GW")
  done
  for g in $(seq 0 $((GATEWAYS - 1))); do
    for _ in $(seq 100); do ip netns exec "$NS" curl -fs "http://127.0.0.1:$((19380 + g))/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
  done
  ip netns exec "$NS" "$B" --url ws://127.0.0.1:18380/ws --admin 127.0.0.1:19380 "${pids[@]}" \
    --json "$OUT/$name.json" "$@" >/dev/null || true
  ip netns exec "$NS" nstat -az TcpExtListenOverflows TcpExtListenDrops 2>/dev/null \
    | awk 'NR>1 {print $1, $2}' > "$OUT/$name.nstat"
  for g in "${ALL[@]}"; do kill -TERM "$g" 2>/dev/null || true; wait "$g" 2>/dev/null || true; done
  ALL=(); GW=
  ip netns del "$NS"
}
GATEWAYS=1
ALL=()

BURST=(churn --conns 20000 --concurrency 2048 --source-ips 4)
PORTS=(idle --conns 30000 --procs 2 --hold-secs 2 --open-timeout-secs 60)
for i in $(seq "$RUNS"); do
  if [ "${ONLY_PORTS:-0}" != 1 ]; then
  run "somaxconn128-$i" net.core.somaxconn=128 -- "${BURST[@]}"
  run "somaxconn65535-$i" net.core.somaxconn=65535 -- "${BURST[@]}"
  run "synbacklog128-$i" net.ipv4.tcp_max_syn_backlog=128 -- "${BURST[@]}"
  run "synbacklog65535-$i" net.ipv4.tcp_max_syn_backlog=65535 -- "${BURST[@]}"
  fi
  GATEWAYS=2
  run "portsdefault-$i" net.ipv4.ip_local_port_range="32768 60999" -- "${PORTS[@]}"
  run "portswide-$i" net.ipv4.ip_local_port_range="1024 65535" -- "${PORTS[@]}"
  GATEWAYS=1
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
for name, label in (("somaxconn128", "net.core.somaxconn = 128"),
                    ("somaxconn65535", "net.core.somaxconn = 65535"),
                    ("synbacklog128", "net.ipv4.tcp_max_syn_backlog = 128 (somaxconn 65535)"),
                    ("synbacklog65535", "net.ipv4.tcp_max_syn_backlog = 65535 (somaxconn 65535)")):
    rs = load(name)
    if not rs:
        continue
    print(f"{label}: churn, 20,000 connections, 2,048 opening at once")
    row("upgrades/s", [r["upgrades_per_sec"] for r in rs])
    row("connect→welcome p50 (ms)", [r["connect_to_welcome_us"]["p50"] / 1000 for r in rs], "{:,.1f}")
    row("connect→welcome p99 (ms)", [r["connect_to_welcome_us"]["p99"] / 1000 for r in rs], "{:,.1f}")
    row("connect→welcome max (ms)", [r["connect_to_welcome_us"]["max"] / 1000 for r in rs], "{:,.1f}")
    row("failed", [r["failed"] for r in rs])
    row("accept-queue overflows (TcpExtListenOverflows)", [r["overflows"] for r in rs])
for name, label in (("portsdefault", 'net.ipv4.ip_local_port_range = "32768 60999"'),
                    ("portswide", 'net.ipv4.ip_local_port_range = "1024 65535"')):
    rs = load(name)
    if not rs:
        continue
    print(f"{label}: idle, 30,000 connections from one source address")
    row("opened", [r["open"]["opened"] for r in rs])
    row("failed", [r["open"]["failed"] for r in rs])
PY
