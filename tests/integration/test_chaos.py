"""Chaos: 3 nodes behind HAProxy and one Redis, a publisher at a fixed rate, and
subscribers that resume with `since` after every reconnect. A node is killed with
SIGKILL, Redis restarts, another node drains. Every publish answered 200 is accounted
for at every subscriber.

- With Redis's append-only file on: 0 lost, 0 duplicated, order kept.
- With it off, Redis comes back empty: every subscriber is told (`recovered: false`,
  `epoch_changed`), and a subscriber that misses anything was told; never a silent gap.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from cluster import HAProxy, RedisServer, cluster_opts
from harness import HOST, arun, http_request, id_key

TOPIC = "chaos/feed"
SUBSCRIBERS = 12
RATE = 50  # publishes per second


class Publisher(threading.Thread):
    """Publishes at a fixed rate through the admin API of whichever node answers,
    recording the ids of the publishes answered 200, in the order they were accepted."""

    def __init__(self, nodes):
        super().__init__(daemon=True)
        self.nodes = nodes
        self.accepted: list[str] = []
        self.accepted_at: list[float] = []
        self.refused = 0
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self.halt.is_set():
            gw = self.nodes[n % len(self.nodes)]
            n += 1
            try:
                r = http_request(gw.admin_port, "POST", "/v1/publish",
                                 json.dumps({"topic": TOPIC, "data": n}), timeout=3)
                if r.status == 200:
                    self.accepted.append(r.json()["id"])
                    self.accepted_at.append(time.monotonic())
                else:
                    self.refused += 1
            except OSError:
                self.refused += 1
            next_at += 1 / RATE
            time.sleep(max(0.0, next_at - time.monotonic()))


class Subscriber:
    """A client of the `websockets` library through HAProxy that subscribes, and after
    every reconnect resumes from the last message it got. A resume answered
    `unavailable` (Redis could not be asked) is asked again."""

    def __init__(self, port: int):
        self.port = port
        self.got: list[str] = []
        self.dups: list[str] = []
        self.gaps: list[str] = []
        self.early: list[str] = []
        self.reconnects = 0
        self.position: tuple[str, str] | None = None
        self.halt = asyncio.Event()

    async def run(self) -> None:
        while not self.halt.is_set():
            try:
                async with ws_connect(f"ws://{HOST}:{self.port}/ws", open_timeout=3,
                                      ping_interval=None, max_queue=None) as ws:
                    await self._serve(ws)
            except (OSError, ConnectionClosed, asyncio.TimeoutError):
                pass
            if not self.halt.is_set():
                self.reconnects += 1
                await asyncio.sleep(0.1)

    async def _subscribe(self, ws) -> None:
        msg = {"op": "subscribe", "topic": TOPIC, "ref": "s"}
        if self.position:
            msg["since"] = {"offset": self.position[0], "epoch": self.position[1]}
        await ws.send(json.dumps(msg))

    async def _serve(self, ws) -> None:
        await self._subscribe(ws)
        answered = False
        while not self.halt.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.5)
            except asyncio.TimeoutError:
                continue
            m = json.loads(raw)
            kind = m.get("type")
            if kind == "subscribed":
                if m.get("recovered") is False:
                    if m.get("reason") == "unavailable" and m.get("ref") == "s":
                        # Ask again from the same place; what came meanwhile comes again.
                        await ws.send(json.dumps({"op": "unsubscribe", "topic": TOPIC}))
                        answered = False
                        continue
                    self.gaps.append(m["reason"])
                answered = True
            elif kind == "unsubscribed":
                await self._subscribe(ws)
            elif kind == "message" and not answered:
                # Nothing of a topic may come before its `subscribed` answer.
                self.early.append(m["id"])
            elif kind == "message":
                if self.position and m["id"] == self.position[0] or m["id"] in self._recent():
                    self.dups.append(m["id"])
                    continue
                self.got.append(m["id"])
                if "epoch" in m:
                    self.position = (m["id"], m["epoch"])

    def _recent(self) -> set[str]:
        return set(self.got[-500:])


def run_chaos(gateway, haproxy, aof: bool) -> tuple[Publisher, list[Subscriber], float]:
    r = RedisServer(aof=aof).start()
    try:
        nodes = [gateway(**cluster_opts(r, i, allow_anonymous=True, drain_spread_secs=1,
                                        drain_timeout_secs=5)) for i in (1, 2, 3)]
        lb = haproxy([f"{HOST}:{gw.port}" for gw in nodes])
        pub = Publisher(nodes)
        subs = [Subscriber(lb.port) for _ in range(SUBSCRIBERS)]
        restarted: list[float] = []

        async def body():
            tasks = [asyncio.create_task(s.run()) for s in subs]
            await asyncio.sleep(1.0)
            pub.start()
            await asyncio.sleep(1.5)
            # A node dies without a word: its clients reconnect to the others.
            nodes[0]._kill()
            nodes[0].stopped = True
            pub.nodes = nodes[1:]
            await asyncio.sleep(2.5)
            # Redis restarts (with the append-only file, everything comes back).
            await asyncio.to_thread(r.restart_gracefully if aof else r.restart)
            restarted.append(time.monotonic())
            await asyncio.sleep(3.0)
            # A node drains: its clients are closed with 1001 and come back elsewhere.
            nodes[1].sigterm()
            nodes[1].stopped = True
            pub.nodes = nodes[2:]
            await asyncio.sleep(3.0)
            pub.halt.set()
            await asyncio.to_thread(pub.join)
            last = pub.accepted[-1]
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(
                    not s.got or id_key(s.got[-1]) < id_key(last) for s in subs):
                await asyncio.sleep(0.2)
            for s in subs:
                s.halt.set()
            await asyncio.gather(*tasks)

        arun(body(), timeout=90)
        return pub, subs, restarted[0]
    finally:
        r.stop()


@pytest.mark.parametrize("aof", [True, False], ids=["aof-on", "aof-off"])
def test_every_accepted_publish_reaches_every_subscriber_through_kills_restarts_and_drains(
        gateway, haproxy, aof):
    pub, subs, restarted = run_chaos(gateway, haproxy, aof)
    accepted = pub.accepted
    assert len(accepted) > 300, f"only {len(accepted)} publishes were accepted"
    assert sum(s.reconnects for s in subs) >= SUBSCRIBERS // 3, "nobody moved: was a node really killed?"
    for i, s in enumerate(subs):
        assert not s.dups, f"subscriber {i} got {len(s.dups)} duplicates"
        assert not s.early, f"subscriber {i} got {len(s.early)} messages before its subscribed answer"
        assert [id_key(g) for g in s.got] == sorted(id_key(g) for g in s.got), f"subscriber {i}: out of order"
        missing = [a for a in accepted if a not in set(s.got)]
        if aof:
            assert not s.gaps, f"subscriber {i} was told of a gap with persistence on: {s.gaps}"
            assert not missing, f"subscriber {i} lost {len(missing)} of {len(accepted)} accepted publishes"
        else:
            # Redis lost every stream: each subscriber learns it. What it misses can only
            # be what Redis lost (accepted before Redis was back); everything of the new
            # history reaches it.
            assert "epoch_changed" in s.gaps, f"subscriber {i} was never told history was lost"
            at = dict(zip(pub.accepted, pub.accepted_at))
            late = [m for m in missing if at[m] > restarted]
            assert not late, f"subscriber {i} lost {len(late)} publishes accepted after Redis restarted"
