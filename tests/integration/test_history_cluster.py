"""History and resume through Redis: every topic message is appended to the topic's
stream by the call that publishes it, its id is the stream id (one order per topic
across nodes), and a client resumes on any node. Subscribers that never disconnect
catch up on what was published while their shard's Redis subscription was down.
Every message answered 200 is accounted for: no gap, no duplicate, in order; and when
history is lost the client is told (`recovered: false`), never left with a silent gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
import urllib.parse

import pytest

from cluster import RedisServer, cluster_opts
from harness import Client, arun, http_request, id_key, open_on_every_shard, shard_of, wait_until

_names = itertools.count()


def topic(label: str = "t") -> str:
    return f"rhistory/{label}/{next(_names)}"


def nodes(gateway, r, n: int = 2, **opts):
    opts.setdefault("allow_anonymous", True)
    return [gateway(**cluster_opts(r, i, **opts)) for i in range(1, n + 1)]


async def resume(c: Client, t: str, offset: str, epoch: str) -> dict:
    return await c.request({"op": "subscribe", "topic": t, "since": {"offset": offset, "epoch": epoch},
                            "ref": "r"}, timeout=10)


def test_a_client_resumes_on_another_node_from_the_topic_stream(redis_server, gateway):
    n1, n2 = nodes(gateway, redis_server)
    rc = redis_server.client()
    t = topic("move")

    async def body():
        async with Client(n1) as c:
            await c.subscribe(t)
            seen = n1.publish(t, 0)
            m = await c.recv()
            assert m["id"] == seen
            epoch = m["epoch"]
        # Published through both nodes while the client was away: one order.
        missed = [(n1 if i % 2 else n2).publish(t, i) for i in range(1, 7)]
        assert [id_key(i) for i in missed] == sorted(id_key(i) for i in missed)
        assert [e[0] for e in rc.xrange(f"ringway:history:{t}")] == [seen, *missed]
        async with Client(n2) as c:
            answer = await resume(c, t, seen, epoch)
            assert answer == {"type": "subscribed", "topic": t, "recovered": True, "epoch": epoch, "ref": "r"}
            got = [await c.recv() for _ in missed]
            assert [g["id"] for g in got] == missed
            assert [g["data"] for g in got] == list(range(1, 7))
            live = n1.publish(t, 7)
            assert (await c.recv())["id"] == live
            await c.silent()

    arun(body())
    assert n2.metric("ringway_resumes_total", recovered="true") == 1


def test_a_resume_the_stream_cannot_serve_says_why_and_still_subscribes(redis_server, gateway):
    (n1,) = nodes(gateway, redis_server, n=1, history_size=3)
    t = topic("why")

    async def body():
        ids = [n1.publish(t, i) for i in range(6)]
        epoch = redis_server.client().get(f"ringway:epoch:{t}")
        cases = [
            (ids[0], epoch, "too_old"),       # ids[1] and ids[2] were trimmed away
            (ids[5], "another", "epoch_changed"),
            ("99999999999999-0", epoch, "unknown_offset"),
        ]
        for offset, ep, why in cases:
            async with Client(n1) as c:
                answer = await resume(c, t, offset, ep)
                assert (answer["recovered"], answer["reason"]) == (False, why), answer
                # The subscription is made: what comes next arrives.
                mid = n1.publish(t, why)
                assert (await c.recv())["id"] == mid
        # Exactly at the edge of what is kept: recovered.
        kept = [e[0] for e in redis_server.client().xrange(f"ringway:history:{t}")]
        async with Client(n1) as c:
            answer = await resume(c, t, kept[0], epoch)
            assert answer["recovered"] is True
            assert [(await c.recv())["id"] for _ in kept[1:]] == kept[1:]

    arun(body())
    assert n1.metric("ringway_resumes_total", recovered="false") == 3


def test_history_lost_with_redis_is_reported_to_resuming_and_connected_clients(redis_server, gateway):
    """Redis restarted without persistence: the stream and its epoch are gone. A client
    that stayed connected is told (`subscribed`, `recovered: false`, no `ref`); one that
    resumes with the old epoch is answered `epoch_changed`."""
    (n1,) = nodes(gateway, redis_server, n=1)
    t = topic("lost")

    async def body():
        async with Client(n1) as stay:
            await stay.subscribe(t)
            first = n1.publish(t, 1)
            m = await stay.recv()
            assert m["id"] == first
            old_epoch = m["epoch"]
            redis_server.restart()
            notice = await stay.recv(timeout=20)
            assert (notice["type"], notice["topic"], notice["recovered"], notice["reason"]) == \
                ("subscribed", t, False, "epoch_changed"), notice
            assert "ref" not in notice
            wait_until(lambda: n1.http("GET", "/readyz").status == 200, 20, what="redis back")
            mid = wait_until(lambda: _try_publish(n1, t, 2), 20, what="a publish after the restart")
            m = await stay.recv(timeout=10)
            assert (m["id"], m["data"]) == (mid, 2)
            assert m["epoch"] != old_epoch
            async with Client(n1) as back:
                answer = await resume(back, t, first, old_epoch)
                assert (answer["recovered"], answer["reason"], answer["epoch"]) == (False, "epoch_changed", m["epoch"])

    arun(body(), timeout=60)


def _try_publish(gw, t: str, data) -> str | None:
    r = http_request(gw.admin_port, "POST", "/v1/publish", json.dumps({"topic": t, "data": data}))
    return r.json()["id"] if r.status == 200 else None


def test_connected_subscribers_catch_up_on_what_was_published_while_redis_was_away(gateway):
    """With an append-only file, Redis restarts with every stream. Publishes through
    node 2 that Redis took while node 1's subscriber connection was still away reach
    node 1's subscriber through the catch-up, in order, once."""
    r = RedisServer(aof=True).start()
    try:
        n1, n2 = nodes(gateway, r)
        t = topic("catchup")
        accepted: list[str] = []
        stop = threading.Event()

        def publish_loop():
            while not stop.is_set():
                mid = _try_publish(n2, t, len(accepted))
                if mid:
                    accepted.append(mid)
                time.sleep(0.005)

        async def body():
            async with Client(n1) as sub:
                await sub.subscribe(t)
                got: list[str] = []
                notices: list[dict] = []

                async def reader():
                    while True:
                        m = await sub.recv(timeout=30)
                        if m["type"] == "message":
                            got.append(m["id"])
                        else:
                            notices.append(m)

                task = asyncio.create_task(reader())
                th = threading.Thread(target=publish_loop)
                th.start()
                try:
                    await asyncio.sleep(0.5)
                    for _ in range(2):
                        await asyncio.to_thread(r.restart_gracefully)
                        await asyncio.sleep(1.5)
                finally:
                    stop.set()
                    await asyncio.to_thread(th.join)
                await asyncio.sleep(1.0)
                last = accepted[-1]
                deadline = time.monotonic() + 15
                while (not got or id_key(got[-1]) < id_key(last)) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                task.cancel()
                assert notices == [], notices
                assert len(got) == len(set(got)), "a message came twice"
                assert [id_key(i) for i in got] == sorted(id_key(i) for i in got), "out of order"
                missing = set(accepted) - set(got)
                assert not missing, f"{len(missing)} of {len(accepted)} accepted messages never arrived"
                assert len(accepted) > 100

        arun(body(), timeout=90)
        assert n1.metric("ringway_redis_reconnects_total") >= 2
    finally:
        r.stop()


def test_resumes_on_alternating_nodes_racing_with_live_publishes_lose_and_repeat_nothing(redis_server, gateway):
    n1, n2 = nodes(gateway, redis_server)
    t = topic("race")
    accepted: list[str] = []
    stop = threading.Event()

    def publish_loop():
        pub = n1.publisher()
        try:
            while not stop.is_set():
                accepted.append(pub.publish(t, len(accepted)))
        finally:
            pub.close()

    async def client_life(rounds: int) -> list[str]:
        got: list[str] = []
        epoch = None
        async with Client(n1) as c:
            await c.subscribe(t)
            m = await c.recv(timeout=10)
            got.append(m["id"])
            epoch = m["epoch"]
        for i in range(rounds):
            async with Client(n2 if i % 2 == 0 else n1) as c:
                answer = await resume(c, t, got[-1], epoch)
                assert answer["recovered"] is True, answer
                for _ in range(20):
                    m = await c.recv(timeout=10)
                    got.append(m["id"])
        return got

    async def body():
        th = threading.Thread(target=publish_loop)
        th.start()
        try:
            await asyncio.sleep(0.2)
            lives = await asyncio.gather(*(client_life(8) for _ in range(4)))
        finally:
            stop.set()
            await asyncio.to_thread(th.join)
        order = {mid: i for i, mid in enumerate(accepted)}
        for got in lives:
            dups = [g for g in got if got.count(g) > 1]
            assert len(got) == len(set(got)), ("a message came twice", dups[:4], [i for i, g in enumerate(got) if g == dups[0]], [order.get(d) for d in dups[:2]])
            idx = [order[g] for g in got]
            # Every accepted message from the first one seen to the last, in order.
            assert idx == list(range(idx[0], idx[0] + len(idx))), "a gap or a reordering"

    arun(body(), timeout=90)


def test_the_admin_api_reads_history_from_the_stream(redis_server, gateway):
    n1, n2 = nodes(gateway, redis_server, history_size=5)
    t = topic("api ?&=é")
    ids = [n1.publish(t, {"n": i}) for i in range(7)]
    epoch = redis_server.client().get(f"ringway:epoch:{t}")

    def history(**query) -> tuple[int, dict]:
        r = n2.http("GET", "/v1/history?" + urllib.parse.urlencode(query))
        return r.status, r.json()

    status, page = history(topic=t)
    assert (status, page["topic"], page["epoch"], page["more"]) == (200, t, epoch, False)
    assert [m["id"] for m in page["messages"]] == ids[2:]
    assert page["messages"][0] == {"type": "message", "topic": t, "id": ids[2], "epoch": epoch, "data": {"n": 2}}
    status, page = history(topic=t, since=ids[3], epoch=epoch, limit=2)
    assert (status, [m["id"] for m in page["messages"]], page["more"]) == (200, ids[4:6], True)
    status, body = history(topic=t, since=ids[0], epoch=epoch)
    assert (status, body["error"]) == (410, "too_old")
    status, body = history(topic=t, since=ids[4], epoch="gone")
    assert (status, body["error"]) == (410, "epoch_changed")
    status, body = history(topic=t, since="99999999999999-0", epoch=epoch)
    assert (status, body["error"]) == (409, "unknown_offset")
    assert history(topic=topic("never"))[1]["messages"] == []
    # The command line reads it too.
    out = n2.cli("history", "--admin", n2.admin_addr, "--topic", t, "--limit", "1")
    assert out.returncode == 0, out.stderr
    assert ids[2] in out.stdout


@pytest.mark.parametrize("size", [0])
def test_history_off_publishes_without_a_stream(redis_server, gateway, size):
    (n1,) = nodes(gateway, redis_server, n=1, history_size=size)
    t = topic("off")

    async def body():
        async with Client(n1) as c:
            await c.subscribe(t)
            mid = n1.publish(t, 1)
            m = await c.recv()
            assert m["id"] == mid and "epoch" not in m
            answer = await resume(c, "other-" + t, mid, "x")
            assert (answer["recovered"], answer["reason"]) == (False, "history_off")

    arun(body())
    assert redis_server.client().exists(f"ringway:history:{t}") == 0


def test_a_full_topic_quiet_past_its_ttl_still_publishes_and_trims(redis_server, gateway):
    """The trimming of a full stream whose oldest entries have aged runs in the publish
    call: it must not fail the publish (the message would be kept but never sent)."""
    (n1,) = nodes(gateway, redis_server, n=1, history_size=3, history_ttl_secs=1)
    t = topic("aged")
    rc = redis_server.client()

    async def body():
        async with Client(n1) as c:
            await c.subscribe(t)
            ids = [n1.publish(t, i) for i in range(5)]
            assert [(await c.recv())["id"] for _ in ids] == ids
            await asyncio.sleep(1.3)
            mid = n1.publish(t, "after")
            assert (await c.recv())["id"] == mid
        info = rc.xinfo_stream(f"ringway:history:{t}")
        assert info["length"] == 1 and info["max-deleted-entry-id"] == ids[-1]
        # A resume from before the quiet spell is told its messages aged out.
        async with Client(n1) as c:
            answer = await resume(c, t, ids[2], m_epoch(rc, t))
            assert (answer["recovered"], answer["reason"]) == (False, "too_old")

    arun(body())


def m_epoch(rc, t: str) -> str:
    return rc.get(f"ringway:epoch:{t}")


def steady_publisher(gw, t: str, accepted: list[str], stop: threading.Event):
    """A thread body: publishes to `t` through `gw`'s admin API every 2 ms (data = the
    count so far) until `stop`, appending each accepted id to `accepted`."""

    def run():
        pub = gw.publisher()
        try:
            while not stop.is_set():
                accepted.append(pub.publish(t, len(accepted)))
                time.sleep(0.002)
        finally:
            pub.close()

    return run


def test_a_dropped_subscriber_connection_catches_up_from_the_stream(redis_server, gateway):
    """Redis drops node 1's pub/sub connections (CLIENT KILL TYPE pubsub) while node 2
    publishes: node 1's subscriber, still connected, gets every message once and in
    order, the ones published during the gap from the stream."""
    n1, n2 = nodes(gateway, redis_server)
    t = topic("dropped")
    rc = redis_server.client()
    accepted: list[str] = []
    stop = threading.Event()
    publish_loop = steady_publisher(n2, t, accepted, stop)

    async def body():
        async with Client(n1) as sub:
            await sub.subscribe(t)
            got: list[str] = []
            th = threading.Thread(target=publish_loop)
            th.start()
            try:
                for _ in range(3):
                    await asyncio.sleep(0.4)
                    killed = rc.client_kill_filter(_type="pubsub")
                    assert killed >= 2
                    while len(got) < len(accepted) - 50:
                        got.append((await sub.recv(timeout=10))["id"])
            finally:
                stop.set()
                await asyncio.to_thread(th.join)
            while len(got) < len(accepted):
                m = await sub.recv(timeout=10)
                got.append(m["id"])
            await sub.silent()
            assert got == accepted, "a message was lost, repeated or reordered"

    arun(body(), timeout=60)
    assert n1.metric("ringway_caught_up_total") > 0, "nothing came through the catch-up"


def test_when_only_the_topics_owner_shard_loses_redis_its_sibling_catches_up(redis_server, gateway):
    """A 2-shard node takes each topic from Redis once, on the shard that owns it, which
    hands it to the other. Redis drops only the owner's subscriber connection while
    node 2 publishes: the sibling's own connection stays up, so only the owner's word
    (`Lost`) tells it that it missed messages. Subscribers on both shards get every
    message once and in order, those of the gap from the stream."""
    n1, n2 = nodes(gateway, redis_server)
    t = topic("owner")
    rc = redis_server.client()
    accepted: list[str] = []
    stop = threading.Event()
    publish_loop = steady_publisher(n2, t, accepted, stop)

    def kill_owner() -> int:
        # Node 1's owner holds the topic and its direct channel; the other
        # subscriber connections (node 1's sibling, node 2's shards) only theirs.
        owners = [c["id"] for c in rc.client_list(_type="pubsub") if int(c["sub"]) >= 2]
        assert len(owners) == 1, rc.client_list(_type="pubsub")
        return rc.client_kill_filter(_id=owners[0])

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            subs = await open_on_every_shard(stack, n1, 2)
            for s in subs:
                await s.subscribe(t)
            got: dict[int, list[str]] = {i: [] for i in range(len(subs))}
            th = threading.Thread(target=publish_loop)
            th.start()
            try:
                for _ in range(3):
                    await asyncio.sleep(0.4)
                    assert kill_owner() == 1
                    for i, s in enumerate(subs):
                        while len(got[i]) < len(accepted) - 50:
                            got[i].append((await s.recv(timeout=10))["id"])
                    wait_until(lambda: n1.metric("ringway_redis_subscriber_up") == 2, 10, what="the owner back")
            finally:
                stop.set()
                await asyncio.to_thread(th.join)
            for i, s in enumerate(subs):
                while len(got[i]) < len(accepted):
                    got[i].append((await s.recv(timeout=10))["id"])
                await s.silent()
                assert got[i] == accepted, f"shard {shard_of(s)}: a message was lost, repeated or reordered"

    arun(body(), timeout=60)
    # Both shards caught up: the owner after its reconnect, the sibling after `Lost`.
    assert all(n1.metric("ringway_caught_up_total", shard=s) > 0 for s in ("0", "1"))
    assert n1.metric("ringway_redis_reconnects_total") == 3, "only the owner's subscriber connection was dropped"
