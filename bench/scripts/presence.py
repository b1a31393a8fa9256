#!/usr/bin/env python3
"""What identified connections cost Redis at rest: `--nodes` gateways (2 shards each)
on one fresh redis-server hold `--conns` connections, each of its own user (HS256
token), spread over the nodes; nothing is sent. After the connections are open and
registered (`--settle` s), Redis's own counters are read, then again `--secs` s later:

- commands per minute, in all and per connection (INFO stats
  `total_commands_processed`; a function call counts the commands it runs too);
- Redis CPU-milliseconds per minute (INFO cpu, user + sys);
- the calls per minute of each command (INFO commandstats).

    cargo build --release -p ringway
    python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt
    .venv/bin/python bench/scripts/presence.py     # --conns, --nodes, --secs, --runs, --bin

Run it with `ulimit -n` above the connection count (the script holds every client
socket). Results: bench/results/presence-<timestamp>/ (runs.jsonl, summary.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import jwt
import redis
import websockets

from redisbench import REPO, gateways, redis_server

SECRET = "presence-bench-secret-0123456789"


def counters(r: redis.Redis) -> dict:
    stats, cpu, cmds = r.info("stats"), r.info("cpu"), r.info("commandstats")
    return {
        "commands": stats["total_commands_processed"],
        "cpu_ms": (cpu["used_cpu_user"] + cpu["used_cpu_sys"]) * 1000,
        "calls": {k.removeprefix("cmdstat_"): v["calls"] for k, v in cmds.items()},
    }


async def hold(ports: list[int], conns: int, secs: float, on_open) -> None:
    """Opens `conns` identified connections round robin over `ports`, calls `on_open`
    (in a thread) once all are open, and keeps them for `secs` after it returns."""
    sockets = []
    sem = asyncio.Semaphore(64)

    async def one(i: int):
        tok = jwt.encode({"sub": f"user{i}", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
        async with sem:
            ws = await websockets.connect(f"ws://127.0.0.1:{ports[i % len(ports)]}/ws",
                                          additional_headers={"Authorization": f"Bearer {tok}"},
                                          ping_interval=None, open_timeout=30, max_queue=None)
            await ws.recv()  # welcome
            sockets.append(ws)

    await asyncio.gather(*(one(i) for i in range(conns)))
    await asyncio.to_thread(on_open)
    await asyncio.sleep(secs)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


def run_once(args) -> dict:
    with redis_server() as (rport, rc), \
            gateways(args.bin, rport, args.nodes, 2, [], SECRET) as addrs:
        result = {}

        def measure():
            time.sleep(args.settle)
            before = counters(rc)
            time.sleep(args.secs)
            after = counters(rc)
            per_min = 60 / args.secs
            result.update({
                "conns": args.conns, "nodes": args.nodes, "secs": args.secs,
                "commands_per_min": (after["commands"] - before["commands"]) * per_min,
                "redis_cpu_ms_per_min": (after["cpu_ms"] - before["cpu_ms"]) * per_min,
                "calls_per_min": {k: (v - before["calls"].get(k, 0)) * per_min
                                  for k, v in after["calls"].items() if v != before["calls"].get(k, 0)},
            })
            result["commands_per_conn_per_min"] = result["commands_per_min"] / args.conns

        asyncio.run(hold([port for port, _ in addrs], args.conns, 0, measure))
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default=str(REPO / "target/release/ringway"))
    p.add_argument("--conns", type=int, default=4000)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--secs", type=float, default=60)
    p.add_argument("--settle", type=float, default=5)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    out = REPO / "bench/results" / time.strftime("presence-%Y%m%dT%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for i in range(args.runs):
        r = run_once(args)
        runs.append(r)
        print(json.dumps(r), flush=True)
        with open(out / "runs.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    summary = (
        f"# Presence at rest: {args.conns} identified connections on {args.nodes} nodes, "
        f"{args.secs:.0f} s, {args.runs} runs (medians)\n\n"
        f"| figure | median |\n|---|---|\n"
        f"| Redis commands per minute | {med('commands_per_min'):.0f} |\n"
        f"| Redis commands per connection per minute | {med('commands_per_conn_per_min'):.3f} |\n"
        f"| Redis CPU-ms per minute | {med('redis_cpu_ms_per_min'):.0f} |\n\n"
        f"Calls per minute, last run: {json.dumps(runs[-1]['calls_per_min'])}\n"
    )
    (out / "summary.md").write_text(summary)
    print(summary)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
