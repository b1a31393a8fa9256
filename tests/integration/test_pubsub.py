"""Subscribe, unsubscribe and publish (protocol v1), on both I/O drivers.

One gateway per driver (2 shards, client publishing on) serves the module; every test
uses its own topic names.
"""

import asyncio
import contextlib
import itertools
import json

import pytest

from harness import DRIVERS, Client, Collector, arun, id_key, open_on_every_shard, shard_of, wait_until

_names = itertools.count()


def topic(label: str = "t") -> str:
    return f"pubsub/{label}/{next(_names)}"


@pytest.fixture(scope="module", params=DRIVERS)
def gw(request, module_gateway):
    g = module_gateway(driver=request.param, shards=2, client_publish=True)
    info = [k for k in g.metrics() if k.startswith("ringway_info{")]
    assert f'driver="{request.param}"' in info[0], f"wanted driver {request.param}: {info}"
    return g


@pytest.fixture(scope="module")
def gw_no_publish(module_gateway):
    return module_gateway(shards=2)


# === subscribe / unsubscribe ===


def test_subscribe_is_acknowledged(gw):
    t = topic()

    async def body():
        async with Client(gw) as c:
            assert await c.request({"op": "subscribe", "topic": t}) == {"type": "subscribed", "topic": t}

    arun(body())


@pytest.mark.parametrize("ref", ["r-1", 42, 1.5, -7, {"a": [1, {"b": None}]}, [1, "x"], True, False, "",
                                 "\u00e9\u2028\"\\"])
def test_ref_is_echoed_verbatim(gw, ref):
    t = topic()

    async def body():
        async with Client(gw) as c:
            sub = await c.request({"op": "subscribe", "topic": t, "ref": ref})
            assert sub == {"type": "subscribed", "topic": t, "ref": ref}
            unsub = await c.request({"op": "unsubscribe", "topic": t, "ref": ref})
            assert unsub == {"type": "unsubscribed", "topic": t, "ref": ref}
            pub = await c.request({"op": "publish", "topic": t, "data": 1, "ref": ref})
            assert pub["type"] == "published" and pub["ref"] == ref and pub["topic"] == t, pub

    arun(body())


def test_ref_null_is_echoed(gw):
    """`"ref": <any JSON>` includes null: the reply must carry `"ref": null` too."""
    t = topic()

    async def body():
        async with Client(gw) as c:
            await c.send(json.dumps({"op": "subscribe", "topic": t, "ref": None}))
            raw = await c.recv_raw()
            assert json.loads(raw) == {"type": "subscribed", "topic": t, "ref": None}, raw

    arun(body())


def test_ref_is_echoed_byte_for_byte(gw):
    """The ref's JSON text comes back as sent (spacing, number spelling, key order)."""
    t = topic()

    async def body():
        async with Client(gw) as c:
            ref_text = '{ "z" : 1.50, "a" : [ 1e3 ] }'
            await c.send('{"op":"subscribe","topic":"%s","ref":%s}' % (t, ref_text))
            raw = await c.recv_raw()
            assert ref_text in raw, raw

    arun(body())


@pytest.mark.parametrize("name", ["a", "caf\u00e9/\U0001f680", 'quote"back\\slash', "x" * 256,
                                  "\u00e9" * 128, "with space", "emoji\u200d"])
def test_topic_names_round_trip(gw, name):
    async def body():
        async with Client(gw) as c:
            await c.subscribe(name)
            mid = gw.publish(name, {"k": name})
            assert await c.recv() == {"type": "message", "topic": name, "id": mid, "epoch": gw.epoch, "data": {"k": name}}

    arun(body())


def test_unknown_fields_are_ignored(gw):
    t = topic()

    async def body():
        async with Client(gw) as c:
            reply = await c.request({"op": "subscribe", "topic": t, "x": 1, "extra": {"a": [1]},
                                     "data": "ignored"})
            assert reply == {"type": "subscribed", "topic": t}
            mid = gw.publish(t, "hi")
            assert await c.recv() == {"type": "message", "topic": t, "id": mid, "epoch": gw.epoch, "data": "hi"}

    arun(body())


def test_unsubscribe_stops_delivery(gw):
    t, other = topic("gone"), topic("kept")

    async def body():
        async with Client(gw) as c:
            await c.subscribe(t)
            await c.subscribe(other)
            first = gw.publish(t, 1)
            assert (await c.recv())["id"] == first
            await c.unsubscribe(t)
            gw.publish(t, 2)  # must not arrive
            marker = gw.publish(other, 3)
            assert await c.recv() == {"type": "message", "topic": other, "id": marker, "epoch": gw.epoch, "data": 3}
            await c.silent(0.2)

    arun(body())


def test_unsubscribe_unknown_topic_is_acknowledged(gw):
    t = topic()

    async def body():
        async with Client(gw) as c:
            assert await c.request({"op": "unsubscribe", "topic": t}) == {"type": "unsubscribed", "topic": t}

    arun(body())


def test_duplicate_subscribe_delivers_once(gw):
    t = topic()

    async def body():
        async with Client(gw) as c:
            await c.subscribe(t)
            await c.subscribe(t)
            a = gw.publish(t, "a")
            b = gw.publish(t, "b")
            assert [(await c.recv())["id"], (await c.recv())["id"]] == [a, b]
            await c.silent(0.2)

    arun(body())


def test_other_topics_are_not_delivered(gw):
    mine, theirs = topic("mine"), topic("theirs")

    async def body():
        async with Client(gw) as c:
            await c.subscribe(mine)
            gw.publish(theirs, 1)
            gw.publish(mine[:-1], 1)  # a prefix is another topic
            marker = gw.publish(mine, 2)
            assert (await c.recv())["id"] == marker

    arun(body())


# === publish ===


def test_client_publish_with_ref_is_acknowledged_and_delivered(gw):
    t = topic()

    async def body():
        async with Client(gw) as pub, Client(gw) as sub:
            await sub.subscribe(t)
            reply = await pub.request({"op": "publish", "topic": t, "data": {"n": 1}, "ref": 9})
            assert set(reply) == {"type", "topic", "id", "ref"}, reply
            assert (reply["type"], reply["topic"], reply["ref"]) == ("published", t, 9)
            id_key(reply["id"])
            assert await sub.recv() == {"type": "message", "topic": t, "id": reply["id"], "epoch": gw.epoch, "data": {"n": 1}}

    arun(body())


def test_client_publish_without_ref_gets_no_reply(gw):
    t, probe = topic(), topic("probe")

    async def body():
        async with Client(gw) as pub, Client(gw) as sub:
            await sub.subscribe(t)
            await pub.send({"op": "publish", "topic": t, "data": "x"})
            msg = await sub.recv()
            assert (msg["type"], msg["topic"], msg["data"]) == ("message", t, "x")
            # The next frame the publisher sees is the answer to its next request.
            assert await pub.request({"op": "subscribe", "topic": probe}) == {"type": "subscribed", "topic": probe}

    arun(body())


def test_publisher_subscribed_to_its_topic_gets_its_own_message(gw):
    t = topic()

    async def body():
        async with Client(gw) as c:
            await c.subscribe(t)
            await c.send({"op": "publish", "topic": t, "data": [1], "ref": "p"})
            got = [await c.recv(), await c.recv()]
            kinds = sorted(m["type"] for m in got)
            assert kinds == ["message", "published"], got
            ids = {m["id"] for m in got}
            assert len(ids) == 1, got
            await c.silent(0.2)

    arun(body())


def test_publish_without_data_delivers_null(gw):
    t = topic()

    async def body():
        async with Client(gw) as pub, Client(gw) as sub:
            await sub.subscribe(t)
            await pub.send({"op": "publish", "topic": t})
            msg = await sub.recv()
            assert "data" in msg and msg["data"] is None, msg

    arun(body())


def test_publish_forbidden_unless_enabled(gw_no_publish):
    gw = gw_no_publish
    t = topic()

    async def body():
        async with Client(gw) as pub, Client(gw) as sub:
            await sub.subscribe(t)
            err = await pub.request({"op": "publish", "topic": t, "data": 1, "ref": "r"})
            assert err["type"] == "error" and err["code"] == "publish_forbidden", err
            assert err["ref"] == "r" and isinstance(err["message"], str) and err["message"], err
            err = await pub.request({"op": "publish", "topic": t, "data": 1})
            assert err["code"] == "publish_forbidden" and "ref" not in err, err
            marker = gw.publish(t, "http still works")
            assert (await sub.recv())["id"] == marker

    arun(body())


DATA = [
    {"nested": {"a": [1, 2, {"b": None}], "s": "x"}},
    [1, "two", 3.25, None, True, False, [], {}],
    "unicode \u00e9 \u2028 \U0001f680 \"quoted\" \\ back\nslash",
    0,
    -1.5e-7,
    12345678901234567890123456789,
    True,
    False,
    None,
    "",
    "x" * 20000,
]


@pytest.mark.parametrize("data", DATA, ids=[f"d{i}" for i in range(len(DATA))])
def test_data_passes_through_verbatim(gw, data):
    t = topic()

    async def body():
        async with Client(gw) as pub, Client(gw) as sub:
            await sub.subscribe(t)
            http_id = gw.publish(t, data)
            assert await sub.recv() == {"type": "message", "topic": t, "id": http_id, "epoch": gw.epoch, "data": data}
            reply = await pub.request({"op": "publish", "topic": t, "data": data, "ref": 1})
            assert await sub.recv() == {"type": "message", "topic": t, "id": reply["id"], "epoch": gw.epoch, "data": data}

    arun(body())


def test_data_text_is_forwarded_byte_for_byte(gw):
    t = topic()

    async def body():
        async with Client(gw) as pub, Client(gw) as sub:
            await sub.subscribe(t)
            data_text = '{ "b" : 1.0 , "a" : [ 1E2 , "\\u00e9" ] }'
            await pub.send('{"op":"publish","topic":"%s","data":%s}' % (t, data_text))
            raw = await sub.recv_raw()
            assert raw.endswith('"data":%s}' % data_text), raw

    arun(body())


def test_ids_increase(gw):
    """Admin API and client publishes, alternated: the subscriber gets every message in
    the order published, ids increasing (a client's publish never overtakes an admin
    publish already answered, on the client's own shard or another)."""
    t = topic()

    async def body():
        async with Client(gw) as pub, Client(gw) as sub:
            await sub.subscribe(t)
            sent = []
            for i in range(60):
                sent.append(gw.publish(t, i))
                sent.append((await pub.request({"op": "publish", "topic": t, "data": i, "ref": i}))["id"])
            got = [(await sub.recv())["id"] for _ in sent]
            assert got == sent
            keys = [id_key(i) for i in got]
            assert keys == sorted(keys) and len(set(keys)) == len(keys), got

    arun(body())


# === fan-out across shards ===


async def spread_subscribers(stack, gw, t, want=16):
    """At least `want` subscribers of `t`, with some on each of the 2 shards."""
    clients = await open_on_every_shard(stack, gw, want)
    for c in clients:
        await c.subscribe(t)
    return clients


@pytest.mark.parametrize("source", ["http", "client"])
def test_one_publish_reaches_every_subscriber_on_every_shard_once(gw, source):
    t = topic("fanout")

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            subs = await spread_subscribers(stack, gw, t)
            if source == "http":
                mid = gw.publish(t, {"hello": "all"})
            else:
                pub = await stack.enter_async_context(Client(gw))
                mid = (await pub.request({"op": "publish", "topic": t, "data": {"hello": "all"}, "ref": 0}))["id"]
            for s in subs:
                assert await s.recv() == {"type": "message", "topic": t, "id": mid, "epoch": gw.epoch, "data": {"hello": "all"}}
            # Exactly once: the next frame every subscriber sees is the next message.
            marker = gw.publish(t, "marker")
            for s in subs:
                assert (await s.recv())["id"] == marker

    arun(body())


def test_publishers_on_both_shards_reach_subscribers_on_both(gw):
    t = topic("mesh")

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            subs = await spread_subscribers(stack, gw, t)
            by_shard = {}
            for c in subs:
                by_shard.setdefault(shard_of(c), c)
            for shard, c in sorted(by_shard.items()):
                await c.send({"op": "publish", "topic": t, "data": shard})
            for s in subs:
                got = sorted([(await s.recv())["data"], (await s.recv())["data"]])
                assert got == ["0", "1"], got

    arun(body())


def test_many_messages_in_order_to_many_subscribers(gw):
    t = topic("stream")

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            subs = await spread_subscribers(stack, gw, t, want=8)
            collectors = [Collector(s) for s in subs]
            p = gw.publisher()
            try:
                sent = [await asyncio.to_thread(p.publish, t, {"i": i, "pad": "x" * 200}) for i in range(200)]
            finally:
                p.close()
            for col in collectors:
                got = await col.wait_for(len(sent), 10)
                assert [m["id"] for m in got] == sent
            for col in collectors:
                col.stop()

    arun(body(), timeout=40)


def test_closed_connections_leave_no_subscriptions(gateway):
    gw = gateway(shards=2)
    t = topic()

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            await spread_subscribers(stack, gw, t, want=6)
            m = gw.metrics()
            assert sum(v for k, v in m.items() if k.startswith("ringway_subscriptions{")) >= 6
        wait_until(lambda: gw.metric("ringway_subscriptions") == 0 and gw.metric("ringway_topics") == 0
                   and gw.metric("ringway_connections") == 0, 5, what="subscriptions to be freed")

    arun(body())


@pytest.fixture(scope="module", params=DRIVERS)
def gw_big(request, module_gateway):
    return module_gateway(driver=request.param, shards=2, client_publish=True, max_message_bytes=1 << 20,
                          outbound_queue_bytes=4 << 20)


def test_large_messages_across_many_reads(gw_big):
    """A 700 KB message arrives in many reads (frame cut across reads) and fans out."""
    gw = gw_big
    t = topic("large")

    async def body():
        async with Client(gw, max_size=None) as pub, Client(gw, max_size=None) as sub:
            await sub.subscribe(t)
            data = {"blob": "ab" * 350_000, "n": list(range(1000))}
            reply = await pub.request({"op": "publish", "topic": t, "data": data, "ref": "big"})
            assert reply["type"] == "published", reply
            assert await sub.recv(10) == {"type": "message", "topic": t, "id": reply["id"], "epoch": gw.epoch, "data": data}
            # And the connection reads normally afterwards.
            await pub.subscribe(topic("after-large"))

    arun(body())


def test_two_hundred_subscribers(gw):
    t = topic("crowd")

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            subs = await asyncio.gather(*(stack.enter_async_context(Client(gw)) for _ in range(200)))
            await asyncio.gather(*(s.subscribe(t) for s in subs))
            mid = gw.publish(t, "crowd")
            got = await asyncio.gather(*(s.recv(10) for s in subs))
            assert all(m == {"type": "message", "topic": t, "id": mid, "epoch": gw.epoch, "data": "crowd"} for m in got)
            assert {shard_of(s) for s in subs} == {"0", "1"}

    arun(body(), timeout=40)
