#!/usr/bin/env bash
# Side by side in one session: the same scenarios against ringway, the conventional
# tokio baseline (bench/baseline) and uWebSockets (bench/uws, when built). Each run
# starts every server afresh, one at a time, in the same order; RUNS runs (default 3).
# The summary gives each server's median (min–max) and ringway's ratio to each other
# server, taken run by run (same run, same host state) and then the median.
#
#   cargo build --release --workspace
#   bash bench/uws/build.sh                 # optional: uWebSockets
#   bash bench/scripts/compare.sh           # ONLY=, RUNS=, SERVERS= to narrow
#
# Scenarios (ONLY=…): idle (19,000 idle connections), idlesub (10,000, each subscribed),
# fanout1k10 and fanout10k (1,000 / 10,000 subscribers × 10 msg/s), fanout10k100
# (10,000 × 100 msg/s: 1M deliveries/s offered, above this host's capacity; what is not
# delivered within 15 s counts as lost), sat10k and sat1k (publishes as fast as the
# server acknowledges them, 256 in flight), closed10k and closed1k (closed loop: message n
# is published once message n-8 reached every subscriber), churn (10,000 upgrades, 64 in
# flight), resume10k (ringway only: 10,000 subscribers reconnect at once with `since`, each
# 100 messages behind, then 10 msg/s live), direct10k (ringway builds only: direct sends to
# 10,000 users as fast as acknowledged).
#
# SERVERS= may also name `before` (RINGWAY_BEFORE_BIN: another ringway build),
# `nohistory` (ringway with --history-size 0) and `nostore` (--direct-inbox-size 0) for
# a same-run comparison.
#
# Every server gets two threads on this 2-CPU host: ringway --shards 2, the baseline
# --threads 2, uws-server 2 threads (one uWS App per thread, SO_REUSEPORT).
# Results: bench/results/compare-<timestamp>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
ONLY=${ONLY:-idle,idlesub,fanout1k10,fanout10k,fanout10k100,sat10k,sat1k,churn}
SERVERS=${SERVERS:-ringway,baseline,uws}
OUT=${OUT:-bench/results/compare-$(date -u +%Y%m%d-%H%M%S)}
B=${BENCH_BIN:-target/release/ringway-bench}
PORT=${PORT:-18680}
APORT=${APORT:-19680}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
[ -x "$B" ] || { echo "build first: cargo build --release --workspace" >&2; exit 2; }
if [[ ",$SERVERS," == *",uws,"* && ! -x bench/uws/uws-server ]]; then
  echo "bench/uws/uws-server not built (bash bench/uws/build.sh): skipping uws" >&2
  SERVERS=${SERVERS//uws/}
fi

SRV=
start() {
  case $1 in
    ringway) target/release/ringway serve --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$APORT" \
               --shards "$THREADS" 2>>"$OUT/ringway.log" & ;;
    baseline) target/release/ringway-baseline --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$APORT" \
               --threads "$THREADS" 2>>"$OUT/baseline.log" & ;;
    uws) bench/uws/uws-server "$PORT" "$APORT" "$THREADS" 2>>"$OUT/uws.log" & ;;
    # ringway keeping no unacknowledged direct messages, for the cost of that store:
    nostore) target/release/ringway serve --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$APORT" \
               --shards "$THREADS" --direct-inbox-size 0 2>>"$OUT/nostore.log" & ;;
    # ringway with history off, for the cost of history in the same run:
    nohistory) target/release/ringway serve --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$APORT" \
               --shards "$THREADS" --history-size 0 2>>"$OUT/nohistory.log" & ;;
    # Another ringway build (an earlier commit) for a before/after in the same run:
    # SERVERS=ringway,before,uws RINGWAY_BEFORE_BIN=/path/to/that/ringway
    before) "${RINGWAY_BEFORE_BIN:?set RINGWAY_BEFORE_BIN}" serve --listen "127.0.0.1:$PORT" \
               --admin "127.0.0.1:$APORT" --shards "$THREADS" 2>>"$OUT/before.log" & ;;
  esac
  SRV=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$APORT/readyz" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "$1 did not become ready" >&2; return 1
}
stop() { kill -TERM "$SRV" 2>/dev/null || true; wait "$SRV" 2>/dev/null || true; sleep 1; }
trap stop EXIT
want() { [[ ",$ONLY," == *",$1,"* ]]; }
C() { echo --url "ws://127.0.0.1:$PORT/ws" --admin "127.0.0.1:$APORT" --gateway-pid "$SRV"; }

# SUMMARY_ONLY=1 OUT=bench/results/compare-… prints the summary of earlier runs again.
[ "${SUMMARY_ONLY:-0}" = 1 ] && RUNS=0
for i in $(seq "$RUNS"); do
  for s in ${SERVERS//,/ }; do
    if want idle; then
      start "$s"; "$B" idle $(C) --conns 19000 --hold-secs 30 --procs 2 --source-ips 4 --json "$OUT/idle-$s-$i.json"; stop
    fi
    if want fanout1k10; then
      start "$s"; "$B" fanout $(C) --subs 1000 --topics 1 --rate 10 --duration 10 --json "$OUT/fanout1k10-$s-$i.json"; stop
    fi
    if want fanout10k; then
      start "$s"; "$B" fanout $(C) --subs 10000 --topics 1 --rate 10 --duration 10 --source-ips 2 \
        --json "$OUT/fanout10k-$s-$i.json"; stop
    fi
    if want idlesub; then
      # Idle, but each connection subscribed (one topic): memory per subscribed connection.
      start "$s"; "$B" fanout $(C) --subs 10000 --topics 1 --hold-secs 30 --rate 1 --duration 1 \
        --source-ips 2 --json "$OUT/idlesub-$s-$i.json"; stop
    fi
    if want fanout10k100; then
      # 1M deliveries/s offered, above what this host can do: what is not delivered within
      # 15 s of the last publish counts as lost.
      start "$s"; "$B" fanout $(C) --subs 10000 --topics 1 --rate 100 --duration 20 --drain-secs 15 \
        --source-ips 2 --json "$OUT/fanout10k100-$s-$i.json"; stop
    fi
    for n in 10k 1k; do
      if want "closed$n"; then
        # Closed loop: message n is published once message n-8 reached every subscriber.
        start "$s"; "$B" fanout $(C) --subs "$n" --topics 1 --rate 0 --window 8 --duration 10 \
          --drain-secs 15 --source-ips 2 --json "$OUT/closed$n-$s-$i.json"; stop
      fi
      if want "sat$n"; then
        # Saturation: publishes as fast as the server acknowledges them (256 in flight).
        start "$s"; "$B" fanout $(C) --subs "$n" --topics 1 --rate 0 --duration 10 --drain-secs 15 \
          --source-ips 2 --json "$OUT/sat$n-$s-$i.json"; stop
      fi
    done
    if want churn; then
      start "$s"; "$B" churn $(C) --conns 10000 --concurrency 64 --source-ips 2 --json "$OUT/churn-$s-$i.json"; stop
    fi
    # Direct sends need ringway's tokens and /v1/send: ringway builds only.
    if want direct10k && [[ ",ringway,before,nostore,nohistory," == *",$s,"* ]]; then
      JWT=${RINGWAY_JWT_SECRET:-compare-secret-0123456789abcdef}
      RINGWAY_JWT_SECRET=$JWT start "$s"
      RINGWAY_JWT_SECRET=$JWT "$B" direct $(C) --subs 10000 --topics 10000 --rate 0 --duration 10 --source-ips 2 \
        --json "$OUT/direct10k-$s-$i.json"; stop
    fi
    # Resume needs ringway's history: the other servers have none to compare.
    if want resume10k && [ "$s" = ringway ]; then
      start "$s"; "$B" fanout $(C) --subs 10000 --topics 1 --behind 100 --rate 10 --duration 5 --source-ips 2 \
        --json "$OUT/resume10k-$s-$i.json"; stop
    fi
  done
done

python3 - "$OUT" "$SERVERS" <<'PY' | tee "$OUT/summary.txt"
import glob, json, os, re, statistics, sys
out, servers = sys.argv[1], [s for s in sys.argv[2].split(",") if s]
def runs(scenario, server):
    rows = {}
    for f in glob.glob(os.path.join(out, f"{scenario}-{server}-*.json")):
        rows[int(re.search(r"-(\d+)\.json$", f).group(1))] = json.load(open(f))["results"]
    return rows
def fmt(v, f):
    return f.format(v) if v is not None else "n/a"
def figure(label, scenario, get, f="{:,.0f}", higher_is_better=True):
    data = {s: runs(scenario, s) for s in servers}
    if not any(data.values()):
        return
    cells = []
    for s in servers:
        vals = [get(r) for r in data[s].values() if get(r) is not None]
        if vals:
            cells.append(f"{s} {fmt(statistics.median(vals), f)} ({fmt(min(vals), f)}–{fmt(max(vals), f)})")
    ratios = []
    for s in servers[1:]:
        rs = [get(data["ringway"][i]) / get(data[s][i]) for i in data.get("ringway", {})
              if i in data[s] and get(data["ringway"][i]) and get(data[s][i])]
        if rs:
            ratios.append(f"ringway/{s} {statistics.median(rs):.2f}")
    print(f"  {label}: " + "; ".join(cells) + ("   [" + ", ".join(ratios) + "]" if ratios else ""))
print("idle: 19,000 connections held 30 s")
figure("server RSS per connection (B)", "idle", lambda r: r["gateway"]["rss_bytes_per_conn"])
figure("connections lost during the hold", "idle", lambda r: r["hold"]["closed_by_peer"])
print("idlesub: 10,000 connections, each subscribed, held 30 s")
figure("server RSS per subscribed connection (B)", "idlesub",
       lambda r: r["memory_before_publish"]["gateway_rss_bytes_per_conn"])
for sc, label in (("fanout1k10", "fanout: 1 topic, 1,000 subscribers, 10 msg/s for 10 s"),
                  ("fanout10k", "fanout: 1 topic, 10,000 subscribers, 10 msg/s for 10 s"),
                  ("fanout10k100", "fanout: 1 topic, 10,000 subscribers, 100 msg/s for 20 s (1M/s offered)"),
                  ("sat10k", "saturation: 1 topic, 10,000 subscribers, 256 publishes in flight for 10 s"),
                  ("sat1k", "saturation: 1 topic, 1,000 subscribers, 256 publishes in flight for 10 s"),
                  ("closed10k", "closed loop: 1 topic, 10,000 subscribers, next message once n-8 reached everyone, 10 s"),
                  ("closed1k", "closed loop: 1 topic, 1,000 subscribers, next message once n-8 reached everyone, 10 s")):
    print(label)
    figure("publishes acknowledged", sc, lambda r: r["publisher"]["acked_ok"])
    figure("deliveries/s", sc, lambda r: r["deliveries"]["per_sec"])
    figure("deliveries per server CPU-second", sc, lambda r: r["gateway"]["deliveries_per_cpu_sec_schedstat"])
    figure("not delivered within the drain (% of expected)", sc,
           lambda r: 100.0 * r["deliveries"]["lost"] / r["deliveries"]["expected"] if r["deliveries"]["expected"] else None,
           "{:,.1f}", higher_is_better=False)
    figure("lost + duplicates", sc, lambda r: r["deliveries"]["lost"] + r["deliveries"]["duplicates"])
    figure("subscribers closed by the server", sc, lambda r: r["deliveries"]["subscribers_closed_by_peer"])
    figure("latency p50 (ms)", sc, lambda r: r["latency_us"]["p50"] / 1000, "{:,.1f}")
    figure("latency p99 (ms)", sc, lambda r: r["latency_us"]["p99"] / 1000, "{:,.1f}")
    figure("latency p99.9 (ms)", sc, lambda r: r["latency_us"]["p999"] / 1000, "{:,.1f}")
print("resume storm: 10,000 subscribers reconnect at once, each 100 messages behind, then 10 msg/s for 5 s")
figure("time to recover everyone (s)", "resume10k", lambda r: (r.get("resume") or {}).get("recover_secs"), "{:,.3f}")
figure("lost + duplicates", "resume10k", lambda r: r["deliveries"]["lost"] + r["deliveries"]["duplicates"])
figure("live message latency p50 (ms)", "resume10k", lambda r: r["latency_us"]["p50"] / 1000, "{:,.1f}")
figure("live message latency p99 (ms)", "resume10k", lambda r: r["latency_us"]["p99"] / 1000, "{:,.1f}")
print("direct: 10,000 users with one connection each, sends as fast as acknowledged (256 in flight) for 10 s")
figure("sends acknowledged", "direct10k", lambda r: r["publisher"]["acked_ok"])
figure("deliveries/s", "direct10k", lambda r: r["deliveries"]["per_sec"])
figure("deliveries per server CPU-second", "direct10k", lambda r: r["gateway"]["deliveries_per_cpu_sec_schedstat"])
figure("lost + duplicates", "direct10k", lambda r: r["deliveries"]["lost"] + r["deliveries"]["duplicates"])
figure("latency p99 (ms)", "direct10k", lambda r: r["latency_us"]["p99"] / 1000, "{:,.1f}")
print("churn: 10,000 connections, 64 in flight")
figure("upgrades/s", "churn", lambda r: r["upgrades_per_sec"])
figure("upgrades per server CPU-second", "churn", lambda r: r["gateway"]["upgrades_per_cpu_sec_schedstat"])
figure("failed", "churn", lambda r: r["failed"])
PY
