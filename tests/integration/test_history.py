"""History and resume on a single node (no Redis): `subscribe` with `since`, the
`recovered` answer and its reasons, `GET /v1/history`, and a replay racing with live
publishes. Every message the admin API accepted (answered 200) is accounted for: no
gap, no duplicate, in order.
"""

import asyncio
import contextlib
import itertools
import threading
import time
import urllib.parse

import pytest

from harness import DRIVERS, Client, arun, id_key, open_on_every_shard, shard_of

_names = itertools.count()


def topic(label: str = "t") -> str:
    return f"history/{label}/{next(_names)}"


@pytest.fixture(scope="module", params=DRIVERS)
def gw(request, module_gateway):
    return module_gateway(driver=request.param, shards=2, client_publish=True)


async def resume(c: Client, t: str, offset: str, epoch: str) -> dict:
    return await c.request({"op": "subscribe", "topic": t, "since": {"offset": offset, "epoch": epoch}, "ref": "r"})


def test_messages_carry_an_epoch_and_a_resume_replays_what_was_missed_on_every_shard(gw):
    t = topic("missed")

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            first = gw.publish(t, 0)
            async with Client(gw) as c:
                await c.subscribe(t)
                marker = gw.publish(t, 1)
                m = await c.recv()
                assert (m["id"], m["data"]) == (marker, 1)
                epoch = m["epoch"]
                assert isinstance(epoch, str) and epoch
            missed = [gw.publish(t, i) for i in range(2, 7)]
            # Clients on both shards resume from the same place: each gets the answer,
            # then exactly what it missed, in order, then what is new.
            clients = await open_on_every_shard(stack, gw, 2)
            for c in clients:
                reply = await resume(c, t, marker, epoch)
                assert reply == {"type": "subscribed", "topic": t, "recovered": True, "epoch": epoch, "ref": "r"}
                got = [await c.recv() for _ in missed]
                assert [g["id"] for g in got] == missed, shard_of(c)
                assert [g["data"] for g in got] == list(range(2, 7))
                assert all(g["epoch"] == epoch for g in got)
            live = gw.publish(t, 7)
            for c in clients:
                assert (await c.recv())["id"] == live
                await c.silent()
            # A resume from the very first message replays everything after it.
            async with Client(gw) as c:
                assert (await resume(c, t, first, epoch))["recovered"] is True
                assert [(await c.recv())["id"] for _ in range(7)] == [marker, *missed, live]
                await c.silent()
        assert gw.metric("ringway_resumes_total", recovered="true") >= 3
        assert gw.metric("ringway_history_messages") >= 8

    arun(body())


def test_a_resume_with_nothing_missed_gets_only_what_is_new(gw):
    t = topic("nothing")

    async def body():
        last = gw.publish(t, "last")
        async with Client(gw) as c:
            await c.subscribe(t)
            new = gw.publish(t, "new")
            epoch = (await c.recv())["epoch"]
        async with Client(gw) as c:
            assert (await resume(c, t, new, epoch))["recovered"] is True
            await c.silent()
            assert last != new
            newer = gw.publish(t, "newer")
            assert (await c.recv())["id"] == newer

    arun(body())


def test_a_resume_the_history_cannot_serve_says_why_and_still_subscribes(gateway):
    gw = gateway(shards=2, history_size=5)
    t = topic("old")

    async def body():
        ids = [gw.publish(t, i) for i in range(20)]
        async with Client(gw) as c:
            await c.subscribe(t)
            gw.publish(t, "x")
            epoch = (await c.recv())["epoch"]
        async with Client(gw) as c:
            reply = await resume(c, t, ids[0], epoch)
            assert reply == {"type": "subscribed", "topic": t, "recovered": False, "reason": "too_old",
                             "epoch": epoch, "ref": "r"}
            # Nothing is replayed after a refusal; the subscription is live.
            await c.silent()
            live = gw.publish(t, "live")
            assert (await c.recv())["id"] == live
            # An epoch that is not this node's, and an offset never given out.
            assert (await resume(c, topic("e"), ids[-1], "not-this-one"))["reason"] == "epoch_changed"
            assert (await resume(c, topic("u"), "99999999999999-999999", epoch))["reason"] == "unknown_offset"
        # From within the last five, it can: what followed, in order.
        async with Client(gw) as c:
            assert (await resume(c, t, ids[-1], epoch))["recovered"] is True
            assert [(await c.recv())["data"] for _ in range(2)] == ["x", "live"]
            await c.silent()
        assert gw.metric("ringway_resumes_total", recovered="false") == 3

    arun(body())


def test_a_resume_bigger_than_the_queue_is_refused_not_cut(gateway):
    """A replay that cannot fit the connection's queue would be cut by the slow-consumer
    policy after `recovered: true`: it is refused up front (`too_large`), under both
    policies, and the subscription still works."""
    for policy in ("drop", "close"):
        gw = gateway(shards=1, outbound_queue_bytes=8192, slow_consumer=policy)
        t = topic("large")

        async def body():
            async with Client(gw) as c:
                await c.subscribe(t)
                first = gw.publish(t, 0)
                epoch = (await c.recv())["epoch"]
            for i in range(10):
                gw.publish(t, "x" * 1000)
            async with Client(gw) as c:
                reply = await resume(c, t, first, epoch)
                assert (reply["recovered"], reply.get("reason")) == (False, "too_large"), reply
                await c.silent()
                live = gw.publish(t, "live")
                assert (await c.recv())["id"] == live
            # The same history in pages of the admin API.
            status, page = history(gw, topic=t, since=first, epoch=epoch, limit=4)
            assert (status, len(page["messages"]), page["more"]) == (200, 4, True)

        arun(body())


def test_a_topic_quiet_longer_than_the_ttl_still_resumes_from_its_last_message(gateway):
    gw = gateway(shards=2, history_ttl_secs=1)
    quiet, busy = topic("quiet"), topic("busy")

    async def body():
        async with Client(gw) as c:
            await c.subscribe(quiet)
            gw.publish(quiet, "last")
            m = await c.recv()
        await asyncio.sleep(2.5)  # the quiet topic's ring empties by age
        gw.publish(busy, 1)
        await asyncio.sleep(2.5)  # and so does another one, later
        assert gw.metric("ringway_history_messages") == 0
        async with Client(gw) as c:
            reply = await resume(c, quiet, m["id"], m["epoch"])
            assert reply["recovered"] is True, reply
            await c.silent()

    arun(body())


def test_a_resume_on_a_topic_already_held_replays_nothing(gw):
    t = topic("held")

    async def body():
        async with Client(gw) as c:
            await c.subscribe(t)
            first = gw.publish(t, 1)
            second = gw.publish(t, 2)
            got = [await c.recv() for _ in range(2)]
            assert [g["id"] for g in got] == [first, second]
            reply = await resume(c, t, first, got[0]["epoch"])
            assert reply == {"type": "subscribed", "topic": t, "ref": "r"}
            await c.silent()

    arun(body())


def test_history_off_answers_history_off(gateway):
    gw = gateway(shards=1, history_size=0)
    t = topic("off")

    async def body():
        async with Client(gw) as c:
            await c.subscribe(t)
            gw.publish(t, 1)
            m = await c.recv()
        async with Client(gw) as c:
            reply = await resume(c, t, m["id"], m["epoch"])
            assert (reply["recovered"], reply["reason"]) == (False, "history_off")
        assert gw.metric("ringway_history_messages") == 0

    arun(body())


def test_a_restarted_node_says_the_epoch_changed(gateway):
    t = topic("restart")
    first = gateway(shards=1)

    async def seen():
        async with Client(first) as c:
            await c.subscribe(t)
            first.publish(t, 1)
            return await c.recv()

    m = arun(seen())
    first.sigterm()
    assert first.wait_exit(10) == 0
    first.stopped = True
    second = gateway(shards=1)

    async def body():
        async with Client(second) as c:
            reply = await resume(c, t, m["id"], m["epoch"])
            assert (reply["recovered"], reply["reason"]) == (False, "epoch_changed")
            assert reply["epoch"] != m["epoch"]

    arun(body())


@pytest.mark.parametrize("since", [
    "1-0",
    {"offset": "1-0"},
    {"offset": "abc", "epoch": "e"},
    {"offset": 5, "epoch": "e"},
])
def test_a_malformed_since_is_a_bad_request_and_the_connection_stays(gw, since):
    async def body():
        async with Client(gw) as c:
            reply = await c.request({"op": "subscribe", "topic": topic("bad"), "since": since, "ref": 9})
            assert (reply["type"], reply["code"], reply["ref"]) == ("error", "bad_request", 9), reply
            await c.subscribe(topic("fine"))

    arun(body())


def test_resumes_racing_with_live_publishes_lose_and_repeat_nothing(gateway):
    """A publisher runs flat out through the admin API while clients on both shards
    disconnect and resume again and again. Each client's messages, across all its
    connections, are exactly the accepted ids from its first one on: in order, with no
    gap and no duplicate."""
    gw = gateway(shards=2, history_size=10000)
    t = topic("race")
    accepted: list[str] = []
    stop = threading.Event()

    def publish():
        pub = gw.publisher()
        try:
            for i in range(100000):
                if stop.is_set():
                    break
                accepted.append(pub.publish(t, i))
        finally:
            pub.close()

    async def client_life(rounds: int) -> list[str]:
        got: list[str] = []
        offset = epoch = None
        for r in range(rounds):
            async with Client(gw) as c:
                if offset is None:
                    await c.subscribe(t)
                else:
                    reply = await resume(c, t, offset, epoch)
                    assert reply["recovered"] is True, reply
                for _ in range(20 + 7 * r):
                    m = await c.recv()
                    got.append(m["id"])
                    offset, epoch = m["id"], m["epoch"]
        return got

    async def body():
        return await asyncio.gather(*(client_life(6) for _ in range(8)))

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        time.sleep(0.05)
        lives = arun(body(), timeout=60)
    finally:
        stop.set()
        publisher.join(10)
    assert len(accepted) > 0
    position = {m: i for i, m in enumerate(accepted)}
    for got in lives:
        assert len(set(got)) == len(got), "a message arrived twice"
        start = position[got[0]]
        assert got == accepted[start:start + len(got)], "a gap or a reordering"
        assert [id_key(i) for i in got] == sorted(id_key(i) for i in got)
    assert gw.metric("ringway_resumes_total", recovered="true") == 8 * 5


def history(gw, **query) -> tuple[int, dict]:
    r = gw.http("GET", "/v1/history?" + urllib.parse.urlencode(query))
    return r.status, r.json()


def test_the_admin_api_reads_history(gateway):
    gw = gateway(shards=2, history_size=5)
    t = topic("api ?&=é")

    async def probe() -> dict:
        async with Client(gw) as c:
            await c.subscribe(t)
            gw.publish(t, "probe")
            return await c.recv()

    probed = arun(probe())
    epoch = probed["epoch"]
    ids = [gw.publish(t, {"n": i}) for i in range(6)]
    status, page = history(gw, topic=t)
    assert status == 200
    assert (page["topic"], page["epoch"], page["more"]) == (t, epoch, False)
    # Five kept: the probe and the first publish have left.
    assert [m["id"] for m in page["messages"]] == ids[1:]
    assert page["messages"][0] == {"type": "message", "topic": t, "id": ids[1], "epoch": epoch, "data": {"n": 1}}
    status, page = history(gw, topic=t, since=ids[2], epoch=epoch, limit=2)
    assert (status, [m["id"] for m in page["messages"]], page["more"]) == (200, ids[3:5], True)
    status, page = history(gw, topic=t, since=ids[5], epoch=epoch)
    assert (status, page["messages"], page["more"]) == (200, [], False)
    status, page = history(gw, topic=topic("never"))
    assert (status, page["messages"]) == (200, [])
    # What cannot be given whole is refused, never cut silently: after the probe,
    # ids[0] has left.
    assert history(gw, topic=t, since=ids[0], epoch=epoch)[0] == 200
    status, body = history(gw, topic=t, since=probed["id"], epoch=epoch)
    assert (status, body["error"]) == (410, "too_old")
    status, body = history(gw, topic=t, since=ids[4], epoch="gone")
    assert (status, body["error"]) == (410, "epoch_changed")
    status, body = history(gw, topic=t, since="99999999999999-1", epoch=epoch)
    assert (status, body["error"]) == (409, "unknown_offset")
    for bad in [{}, {"topic": t, "since": ids[1]}, {"topic": t, "limit": 0}, {"topic": t, "limit": 1001},
                {"topic": t, "since": "x", "epoch": epoch}, {"topic": t, "what": 1}, {"topic": ""}]:
        assert history(gw, **bad)[0] == 400, bad
    assert gw.http("POST", "/v1/history?topic=x", b"").status == 405
