"""Helpers for tests that break Redis while nodes publish (Sentinel and Cluster
failovers, slots moved): a publisher thread that records what the gateways accepted,
a `/readyz` poller, subscribers that record what arrived, and the check that every
accepted message arrived once and in order.

    received = await Received.subscribed([c1, c2], "t")
    with Publishing([n1, n2], "t") as pub, Polling(n1) as ready:
        ...break something...
    await received.until_caught_up(pub.ids())
    received.check(pub, since=killed)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from harness import Client, http_request, id_key


def publish(gw, topic: str, data) -> str | None:
    """Publishes through `gw`'s admin API: the message id, or None if refused."""
    r = http_request(gw.admin_port, "POST", "/v1/publish", json.dumps({"topic": topic, "data": data}))
    return r.json()["id"] if r.status == 200 else None


class _Loop:
    """A thread running `step` every `every` seconds until the `with` block ends."""

    every = 0.05

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()
            time.sleep(self.every)

    def step(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Publishing(_Loop):
    """A thread publishing 0, 1, 2… to `topic` through each node in turn, every 5 ms,
    recording each accepted id with when it was accepted."""

    every = 0.005

    def __init__(self, nodes: list, topic: str):
        super().__init__()
        self.nodes, self.topic = nodes, topic
        self.accepted: list[tuple[str, float]] = []
        self._i = 0

    def step(self) -> None:
        mid = publish(self.nodes[self._i % len(self.nodes)], self.topic, self._i)
        if mid:
            self.accepted.append((mid, time.monotonic()))
        self._i += 1

    def ids(self) -> list[str]:
        return [mid for mid, _ in self.accepted]


class Polling(_Loop):
    """A thread asking `gw`'s `/readyz` every 50 ms, recording (when, status)."""

    def __init__(self, gw):
        super().__init__()
        self.gw = gw
        self.seen: list[tuple[float, int]] = []

    def step(self) -> None:
        self.seen.append((time.monotonic(), self.gw.http("GET", "/readyz").status))

    def went(self, status: int, after: float) -> bool:
        """Answered `status` since `after`."""
        return any(s == status and at > after for at, s in self.seen)

    def is_now(self, status: int, after: float) -> bool:
        """The last answer, given since `after`, is `status`."""
        return bool(self.seen) and self.seen[-1][1] == status and self.seen[-1][0] > after


class Received:
    """Subscribed clients' messages as they arrive (id, when), and anything else."""

    @classmethod
    async def subscribed(cls, clients: list[Client], topic: str) -> "Received":
        """Subscribes every client to `topic`, then records what they get."""
        for c in clients:
            await c.subscribe(topic)
        return cls(clients)

    def __init__(self, clients: list[Client]):
        self.got: dict[int, list[tuple[str, float]]] = {k: [] for k in range(len(clients))}
        self.notices: list[dict] = []
        self._tasks = [asyncio.create_task(self._read(c, k)) for k, c in enumerate(clients)]

    async def _read(self, c: Client, k: int) -> None:
        while True:
            m = await c.recv(timeout=60)
            if m["type"] == "message":
                self.got[k].append((m["id"], time.monotonic()))
            else:
                self.notices.append(m)

    async def until_caught_up(self, ids: list[str], timeout: float = 15) -> None:
        """Waits until every client has the last of `ids` (or `timeout`), then stops."""
        deadline = time.monotonic() + timeout
        while any(not g or id_key(g[-1][0]) < id_key(ids[-1]) for g in self.got.values()) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for task in self._tasks:
            task.cancel()

    def check(self, pub: Publishing, since: float, resumed_within: float = 10) -> None:
        """No notice; every client got every accepted message once and in order; and
        delivery resumed within `resumed_within` s of `since` (something was accepted
        after it)."""
        ids = pub.ids()
        assert self.notices == [], self.notices
        after = {mid for mid, at in pub.accepted if at > since}
        assert after, "nothing was accepted after the outage began"
        for k, g in self.got.items():
            seen = [mid for mid, _ in g]
            assert len(seen) == len(set(seen)), f"subscriber {k}: a message came twice"
            assert [id_key(i) for i in seen] == sorted(id_key(i) for i in seen), f"subscriber {k}: out of order"
            missing = set(ids) - set(seen)
            assert not missing, f"subscriber {k}: {len(missing)} of {len(ids)} accepted messages never arrived"
            resumed = min(at for mid, at in g if mid in after) - since
            assert resumed <= resumed_within, f"subscriber {k}: delivery resumed {resumed:.1f} s after"
