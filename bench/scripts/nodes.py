#!/usr/bin/env python3
"""What Redis does per message as the cluster grows: for each node count in `--nodes`
(ringway processes with one shard each, on one fresh redis-server), a service publishes
`--msgs` topic messages straight to Redis (`PUBLISH ringway:topic:<T>`) while
subscribers sit on `--interested` of the nodes, then sends `--msgs` direct messages to
one connected user (`FCALL ringway_send`, no inbox). Redis's own counters give, per
message:

- topic: output bytes (INFO stats `total_net_output_bytes`) and Redis CPU-µs; these
  should grow with the nodes that hold a subscriber, not with the nodes there are;
- direct: commands run (INFO commandstats, a function's own commands included); this
  should stay the same whatever the number of nodes.

Every subscriber must receive every topic message, and the user every direct message
(checked). With `--shards-per-node 2 --nodes 1 --interested 1`, it shows how many
copies of a topic message a 2-shard node gets (one per shard that holds a subscriber).

    cargo build --release -p ringway
    python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt
    .venv/bin/python bench/scripts/nodes.py --nodes 2,4,8,16 --interested 2
    .venv/bin/python bench/scripts/nodes.py --nodes 8 --interested 1,2,4,8

Results: bench/results/nodes-<timestamp>/ (runs.jsonl, summary.md).
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

from redisbench import REPO, admin_get, gateways, redis_server, wait_for

SECRET = "nodes-bench-secret-0123456789abcd"
TOPIC = "bench/nodes"


def subscriptions(admin: int) -> dict[str, int]:
    """Subscriptions per shard, from /metrics."""
    out = {}
    for line in admin_get(admin, "/metrics").splitlines():
        if line.startswith("ringway_subscriptions{"):
            shard = line.split('shard="')[1].split('"')[0]
            out[shard] = int(float(line.rsplit(" ", 1)[1]))
    return out


def stats(r: redis.Redis) -> dict:
    s, cpu, cmds = r.info("stats"), r.info("cpu"), r.info("commandstats")
    return {
        "out_bytes": s["total_net_output_bytes"],
        "cpu_us": (cpu["used_cpu_user"] + cpu["used_cpu_sys"]) * 1e6,
        "commands": sum(v["calls"] for k, v in cmds.items() if k != "cmdstat_info"),
    }


async def scenario(args, nodes: int, interested: int) -> dict:
    with redis_server() as (rport, rc), \
            gateways(args.bin, rport, nodes, args.shards_per_node, ["--allow-anonymous", "--history-size", "0"],
                     SECRET) as addrs:
        return await measure(args, rc, addrs, interested)


async def measure(args, rc: redis.Redis, addrs: list[tuple[int, int]], interested: int) -> dict:
    socks = []
    try:
        ports = [port for port, _ in addrs]
        admins = [admin for _, admin in addrs]
        # Subscribers: on the first `interested` nodes, enough connections that every
        # shard of those nodes holds one.
        for n in range(interested):
            while len(subscriptions(admins[n])) < args.shards_per_node or \
                    min(subscriptions(admins[n]).values()) == 0:
                ws = await websockets.connect(f"ws://127.0.0.1:{ports[n]}/ws", ping_interval=None, max_queue=None)
                await ws.recv()
                await ws.send(json.dumps({"op": "subscribe", "topic": TOPIC, "ref": 1}))
                while json.loads(await ws.recv()).get("type") != "subscribed":
                    pass
                socks.append(ws)
                if len(socks) > 64 * args.shards_per_node:
                    raise SystemExit("connections do not reach every shard")
        tok = jwt.encode({"sub": "target", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
        user = await websockets.connect(f"ws://127.0.0.1:{ports[-1]}/ws", ping_interval=None, max_queue=None,
                                        additional_headers={"Authorization": f"Bearer {tok}"})
        await user.recv()
        wait_for(lambda: rc.exists("ringway:user:target"), 5, "the user's presence")
        time.sleep(1)

        async def drain(ws, want: int) -> int:
            got = 0
            try:
                while got < want:
                    json.loads(await asyncio.wait_for(ws.recv(), 10))
                    got += 1
            except asyncio.TimeoutError:
                pass
            return got

        # Topic messages.
        before = stats(rc)
        pipe = rc.pipeline(transaction=False)
        for i in range(args.msgs):
            pipe.publish(f"ringway:topic:{TOPIC}", json.dumps({"id": f"{i}-0", "data": i}))
        receivers = sum(pipe.execute())
        counts = await asyncio.gather(*(drain(ws, args.msgs) for ws in socks))
        after = stats(rc)
        topic = {
            "redis_receivers_per_msg": receivers / args.msgs,
            "out_bytes_per_msg": (after["out_bytes"] - before["out_bytes"]) / args.msgs,
            "redis_cpu_us_per_msg": (after["cpu_us"] - before["cpu_us"]) / args.msgs,
            "lost": sum(args.msgs - c for c in counts),
            "subscribers": len(socks),
        }
        # Direct sends.
        time.sleep(1)
        before = stats(rc)
        pipe = rc.pipeline(transaction=False)
        for i in range(args.msgs):
            pipe.fcall("ringway_send", 1, "ringway:user:target", "", json.dumps(i))
        results = pipe.execute()
        got = await drain(user, args.msgs)
        after = stats(rc)
        # The heartbeats of every node ran meanwhile: count them out (9 commands per
        # node per second) by measuring a quiet second the same way.
        quiet0 = stats(rc)
        time.sleep(1)
        quiet1 = stats(rc)
        direct = {
            "commands_per_send": (after["commands"] - before["commands"]) / args.msgs,
            "background_commands_per_s": quiet1["commands"] - quiet0["commands"],
            "online": results[0][0],
            "lost": args.msgs - got,
        }
        await user.close()
        return {"nodes": len(addrs), "interested": interested, "shards_per_node": args.shards_per_node,
                "msgs": args.msgs, "topic": topic, "direct": direct}
    finally:
        for ws in socks:
            await ws.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default=str(REPO / "target/release/ringway"))
    p.add_argument("--nodes", default="2,4,8,16", help="node counts, comma-separated")
    p.add_argument("--interested", default="2", help="nodes holding subscribers, comma-separated")
    p.add_argument("--shards-per-node", type=int, default=1)
    p.add_argument("--msgs", type=int, default=5000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    out = REPO / "bench/results" / time.strftime("nodes-%Y%m%dT%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(x) for x in args.nodes.split(",")]:
        for k in [int(x) for x in args.interested.split(",")]:
            if k > n:
                continue
            runs = []
            for _ in range(args.runs):
                r = asyncio.run(scenario(args, n, k))
                print(json.dumps(r), flush=True)
                with open(out / "runs.jsonl", "a") as f:
                    f.write(json.dumps(r) + "\n")
                runs.append(r)
            med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
            rows.append(
                f"| {n} | {k} | {med(lambda r: r['topic']['redis_receivers_per_msg']):.0f} "
                f"| {med(lambda r: r['topic']['out_bytes_per_msg']):.0f} "
                f"| {med(lambda r: r['topic']['redis_cpu_us_per_msg']):.1f} "
                f"| {sum(r['topic']['lost'] for r in runs)} "
                f"| {med(lambda r: r['direct']['commands_per_send']):.2f} "
                f"| {sum(r['direct']['lost'] for r in runs)} |")
    summary = (
        f"# Redis work per message by node count ({args.shards_per_node} shard(s) per node, "
        f"{args.msgs} messages, {args.runs} runs, medians)\n\n"
        "| nodes | nodes with subscribers | Redis copies per topic message | Redis output bytes per topic message "
        "| Redis CPU-µs per topic message | topic messages lost | Redis commands per direct send | direct lost |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    (out / "summary.md").write_text(summary)
    print(summary)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
