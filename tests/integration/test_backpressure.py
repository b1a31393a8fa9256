"""Slow consumers: a subscriber that stops reading fills its bounded outbound queue.
`--slow-consumer close` (default) closes it (counted as slow_consumer); `drop` keeps it
and drops messages for it (counted in ringway_dropped_total). Either way a subscriber
that reads gets every message."""

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import struct
import time

import pytest

from harness import HOST, Client, Collector, arun, open_on_every_shard

QUEUE = 4096
PAYLOAD = "x" * 1024
# Messages published between two checks that the reading subscriber caught up: their
# frames (~1.1 KiB each) fit in its 4 KiB queue, so only a subscriber that does not
# read can overflow.
BATCH = 3


def stalled_subscriber(gw, topic):
    """A raw client that subscribes and then never reads (tiny receive buffer)."""
    r = gw.raw(rcvbuf=2048)
    assert r.recv_json()["type"] == "welcome"
    r.send_json({"op": "subscribe", "topic": topic})
    assert r.recv_json() == {"type": "subscribed", "topic": topic}
    return r


async def publish_paced(gw, topic, reader: Collector, done, limit=8000, seconds=20.0):
    """Publishes ~1 KiB messages in batches, letting `reader` catch up after each,
    until `done()` or the limits; returns the ids."""
    p = gw.publisher()
    ids = []
    deadline = time.monotonic() + seconds
    try:
        while len(ids) < limit and time.monotonic() < deadline:
            for _ in range(BATCH):
                ids.append(await asyncio.to_thread(p.publish, topic, {"i": len(ids), "pad": PAYLOAD}))
            got = await reader.wait_for(len(ids), 5)
            assert len(got) == len(ids), f"reading subscriber got {len(got)} of {len(ids)} messages"
            if len(ids) % (BATCH * 10) == 0 and await asyncio.to_thread(done):
                break
    finally:
        p.close()
    return ids


def test_stalled_subscriber_is_closed_as_slow_consumer(gateway):
    gw = gateway(shards=1, outbound_queue_bytes=QUEUE)
    t = "slow/close"

    async def body():
        async with Client(gw) as reader:
            await reader.subscribe(t)
            col = Collector(reader)
            stalled = stalled_subscriber(gw, t)
            p = gw.publisher()
            ids: list[str] = []
            try:
                # 1. Fill the stalled client's socket buffers without overflowing its queue:
                #    publish in small reader-paced batches until a write to it stops
                #    completing (frames_out falls behind two frames per message for 0.1 s).
                base = gw.metric("ringway_frames_out_total")
                deadline = time.monotonic() + 20
                while True:
                    assert time.monotonic() < deadline and len(ids) < 8000, "socket never filled up"
                    for _ in range(BATCH):
                        ids.append(await asyncio.to_thread(p.publish, t, {"i": len(ids), "pad": PAYLOAD}))
                    got = await col.wait_for(len(ids), 5)
                    assert len(got) == len(ids), f"reading subscriber got {len(got)} of {len(ids)}"
                    out = gw.metric("ringway_frames_out_total")
                    if out - base < 2 * len(ids):
                        await asyncio.sleep(0.1)
                        if gw.metric("ringway_frames_out_total") == out:
                            break  # its write is stalled
                assert gw.metric("ringway_dropped_total") == 0, "queue overflowed before the socket was full"
                # 2. Overflow its queue while its write is stalled (still paced by the reader).
                for _ in range(4):
                    ids.append(await asyncio.to_thread(p.publish, t, {"i": len(ids), "pad": PAYLOAD}))
                    await col.wait_for(len(ids), 5)
            finally:
                p.close()
            assert gw.metric("ringway_dropped_total") > 0, "queue did not overflow"
            # 3. The policy applies now, not when the write timeout (10 s) fires.
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and gw.metric("ringway_connections") != 1:
                await asyncio.sleep(0.05)
            m = gw.metrics()
            closes = {k: v for k, v in m.items() if k.startswith("ringway_closes_total") and v}
            assert sum(v for k, v in m.items() if k.startswith("ringway_connections{")) == 1, \
                f"stalled subscriber still connected 3 s after its queue overflowed; closes: {closes}"
            assert sum(v for k, v in m.items() if 'reason="slow_consumer"' in k) == 1, closes
            # The reader got every message, and keeps getting them.
            ids.append(gw.publish(t, "after"))
            got = await col.wait_for(len(ids), 5)
            assert [g["id"] for g in got] == ids, "the reading subscriber missed messages"
            col.stop()
            stalled.close()

    arun(body(), timeout=50)


def test_drop_policy_keeps_stalled_subscriber(gateway):
    gw = gateway(shards=2, outbound_queue_bytes=QUEUE, slow_consumer="drop")
    t = "slow/drop"

    async def body():
        async with Client(gw) as reader:
            await reader.subscribe(t)
            col = Collector(reader)
            stalled = stalled_subscriber(gw, t)
            ids = await publish_paced(gw, t, col, lambda: gw.metric("ringway_dropped_total") > 10)
            m = gw.metrics()
            dropped = sum(v for k, v in m.items() if k.startswith("ringway_dropped_total"))
            assert dropped > 10, f"only {dropped} dropped after {len(ids)} messages"
            assert sum(v for k, v in m.items() if k.startswith("ringway_connections{")) == 2, \
                "the stalled subscriber was disconnected"
            assert sum(v for k, v in m.items() if k.startswith("ringway_closes_total")) == 0, m
            got = await col.wait_for(len(ids), 5)
            assert [g["id"] for g in got] == ids, "the reading subscriber missed messages"
            col.stop()
            stalled.close()

    arun(body(), timeout=50)


def pipelined_publish(port: int, topic: str, n: int) -> list[str]:
    """`n` publishes written back to back on one keep-alive connection; returns the ids."""
    body = json.dumps({"topic": topic, "data": {"pad": PAYLOAD}}).encode()
    req = b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(req * n)
        data = b""
        deadline = time.monotonic() + 10
        while data.count(b"HTTP/1.1 ") < n and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    bodies = [part.split(b"\r\n\r\n", 1)[1][:200] for part in data.split(b"HTTP/1.1 200 OK")[1:]]
    ids = [json.loads(b[: b.index(b"}") + 1])["id"] for b in bodies]
    assert len(ids) == n, f"{len(ids)} of {n} publishes answered 200"
    return ids


def sequential_publish(port: int, topic: str, n: int) -> list[str]:
    """`n` publishes on one keep-alive connection, each waiting for its answer."""
    body = json.dumps({"topic": topic, "data": {"pad": PAYLOAD}}).encode()
    req = b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    ids = []
    with socket.create_connection((HOST, port), timeout=10) as s:
        buf = b""
        for _ in range(n):
            s.sendall(req)
            while True:
                head, sep, rest = buf.partition(b"\r\n\r\n")
                if sep:
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(rest) >= length:
                        assert head.startswith(b"HTTP/1.1 200"), head
                        ids.append(json.loads(rest[:length])["id"])
                        buf = rest[length:]
                        break
                chunk = s.recv(65536)
                assert chunk, "admin API closed the connection"
                buf += chunk
    return ids


@pytest.mark.parametrize("shape", ["burst_within_queue", "long_stream"])
def test_reading_subscriber_is_not_a_slow_consumer(gateway, shape):
    """A subscriber that keeps reading is never cut off: a pipelined burst that fits in
    its queue (200 x ~1 KiB < 256 KiB) reaches it in full, and so does a long stream
    (2000 x ~1 KiB, 8x the queue) published one request at a time. (A pipelined burst
    far larger than the queue outruns any reader slower than the publisher: that reader
    is, by definition, a slow consumer.)"""
    gw = gateway(shards=2)
    t = f"slow/{shape}"
    publish = pipelined_publish if shape == "burst_within_queue" else sequential_publish
    count = 200 if shape == "burst_within_queue" else 2000

    async def body():
        async with Client(gw) as a, Client(gw) as b:
            await a.subscribe(t)
            await b.subscribe(t)
            cols = [Collector(a), Collector(b)]
            ids = await asyncio.to_thread(publish, gw.admin_port, t, count)
            for col in cols:
                got = await col.wait_for(len(ids), 10)
                closes = {k: v for k, v in gw.metrics().items() if k.startswith("ringway_closes_total") and v}
                assert [g["id"] for g in got] == ids, \
                    f"reading subscriber got {len(got)} of {len(ids)} messages; closes: {closes}"
                col.stop()

    arun(body(), timeout=45)


def test_message_larger_than_the_queue_limit_does_not_disconnect_subscribers(gateway):
    """The admin API accepts bodies up to 1 MiB, above the default 256 KiB outbound queue.
    Such a message must either be refused up front or delivered; accepting it and then
    closing every (idle, reading) subscriber as a "slow consumer" is neither."""
    gw = gateway(shards=2)

    async def body():
        async with Client(gw, max_size=None) as sub:
            await sub.subscribe("big")
            data = "z" * 300_000
            r = gw.http("POST", "/v1/publish", json.dumps({"topic": "big", "data": data}))
            if r.status == 200:
                got = await sub.recv(5)
                assert got == {"type": "message", "topic": "big", "id": r.json()["id"], "epoch": gw.epoch, "data": data}
            else:
                assert r.status in (400, 413), r
                marker = gw.publish("big", "small")
                assert (await sub.recv())["id"] == marker
        assert gw.metric("ringway_closes_total", reason="slow_consumer") == 0

    arun(body())


def test_ping_flood_without_reading_is_a_slow_consumer(gateway):
    """Pongs count against the queue: a client that floods pings (125-byte payloads)
    and never reads is closed instead of growing its queue without bound, and another
    client is unaffected. Which close comes first depends on timing: the queue
    overflowing (slow consumer), or, when a write to the full socket is already
    pending, the connection's reads pausing behind it until the write timeout."""
    gw = gateway(shards=1, outbound_queue_bytes=QUEUE, write_timeout_secs=2)

    def closed() -> float:
        return (gw.metric("ringway_closes_total", reason="slow_consumer")
                + gw.metric("ringway_closes_total", reason="write_timeout"))

    async def body():
        async with Client(gw) as other:
            r = gw.raw(rcvbuf=2048)
            assert r.recv_json()["type"] == "welcome"
            r.sock.setblocking(False)
            sent = 0
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and closed() < 1:
                try:
                    for _ in range(200):
                        r.send_frame(0x9, b"p" * 125)
                        sent += 1
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    await asyncio.sleep(0.01)
            assert closed() == 1, f"not closed after {sent} pings"
            await other.subscribe("still/here")
            gw.publish("still/here", 1)
            assert (await other.recv())["data"] == 1
            r.close()

    arun(body(), timeout=40)


def pipelined_publish_answers(port: int, topic: str, n: int) -> list[tuple[int, dict, bytes]]:
    """`n` publishes written back to back on one keep-alive connection; returns each
    answer as (status, JSON body, raw head), in order."""
    reqs = b"".join(
        b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)
        for b in (json.dumps({"topic": topic, "data": {"n": i}}).encode() for i in range(n)))
    answers = []
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(reqs)
        buf = b""
        deadline = time.monotonic() + 20
        while len(answers) < n and time.monotonic() < deadline:
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if sep:
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(rest) >= length:
                    answers.append((int(head.split()[1]), json.loads(rest[:length]), head))
                    buf = rest[length:]
                    continue
            chunk = s.recv(65536)
            assert chunk, "admin API closed the connection"
            buf += chunk
    assert len(answers) == n, f"{len(answers)} of {n} publishes answered"
    return answers


def burst_into_one_message_inboxes(gw, topic: str, check) -> None:
    """Subscribes 16+ clients spread over both shards, pipelines 2,000 publishes into
    the admin API, hands the answers to `check` (which returns the ids every subscriber
    must get), then checks that each subscriber got exactly those, in order."""

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            clients = await open_on_every_shard(stack, gw, 16)
            for c in clients:
                await c.subscribe(topic)
            cols = [Collector(c) for c in clients]
            answers = await asyncio.to_thread(pipelined_publish_answers, gw.admin_port, topic, 2000)
            ids = check(answers)
            for col in cols:
                await col.wait_for(len(ids), 15)
                await asyncio.sleep(0.2)  # anything beyond those would arrive now
                assert [g["id"] for g in col.messages] == ids, \
                    f"a subscriber got {len(col.messages)} messages; {len(ids)} were expected"
                col.stop()

    arun(body(), timeout=60)


def test_an_overloaded_publish_reaches_no_one_and_says_retry(gateway):
    """With one-message inboxes and no waiting for room, a pipelined burst overruns the
    shards: each publish is taken by every shard or by none. A 503 carries Retry-After
    and reached no subscriber on any shard; every 200 reached every subscriber, once and
    in order."""
    gw = gateway(shards=2, inbox_capacity=1, publish_wait_ms=0)

    def check(answers):
        refused = [a for a in answers if a[0] != 200]
        assert refused, "no publish was refused: the burst did not overrun a one-message inbox"
        for status, body, head in refused:
            assert status == 503 and body["error"] == "overloaded", (status, body)
            assert b"\r\nretry-after: 1" in head.lower(), head
        assert gw.metric("ringway_inbox_full_total") >= len(refused)
        return [a[1]["id"] for a in answers if a[0] == 200]

    burst_into_one_message_inboxes(gw, "overload", check)


def test_a_publisher_waits_for_room_instead_of_being_refused(gateway):
    """With one-message inboxes and the default wait for room, the same burst is slowed
    down instead of refused: every publish is answered 200 and reaches every subscriber
    on both shards, in order."""
    gw = gateway(shards=2, inbox_capacity=1)

    def check(answers):
        assert [a[0] for a in answers] == [200] * len(answers), {a[0] for a in answers}
        assert gw.metric("ringway_publish_waits_total") > 0, "no publish waited: the inboxes were never full"
        assert gw.metric("ringway_inbox_full_total") == 0
        return [a[1]["id"] for a in answers]

    burst_into_one_message_inboxes(gw, "wait", check)


def split_frames(buf: bytes) -> tuple[list[bytes], bytes]:
    """The payloads of the whole server frames at the start of `buf`, and the rest."""
    out = []
    while len(buf) >= 2:
        n, at = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, at = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, at = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < at + n:
            break
        out.append(buf[at:at + n])
        buf = buf[at + n:]
    return out, buf


def test_when_most_subscribers_lag_publishers_are_held_back_and_nobody_is_closed(gateway):
    """Ten subscribers that read, but slower than messages are published: every one of
    them is behind at once, so the host (not a client) is what is slow. The shard holds
    its inbox back while they catch up, so the publisher waits instead of the
    subscribers overflowing their queues (1 MiB) and being closed."""
    gw = gateway(shards=1, inbox_capacity=16, outbound_queue_bytes=1 << 20)
    t = "slow/everyone"
    # 9 MiB for each subscriber: more than the kernel buffers of its socket and its
    # queue hold. The inbox holds 16 messages, so one tick owes a subscriber 128 KiB at
    # most: an eighth of its queue.
    total = 1200
    pad = "x" * 8192

    readers = [gw.raw(rcvbuf=2048) for _ in range(10)]
    for r in readers:
        assert r.recv_json()["type"] == "welcome"
        r.send_json({"op": "subscribe", "topic": t})
        assert r.recv_json() == {"type": "subscribed", "topic": t}

    def read_all():
        # One thread reads every subscriber in turn, at most 8 KiB each per round and a
        # round every 2 ms or more: each reads under 4 MB/s, slower than the publisher,
        # and all at the same pace.
        got = [[] for _ in readers]
        bufs = [r.buf for r in readers]
        open_ = [True for _ in readers]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
                o and len(g) < total for o, g in zip(open_, got)):
            for i, r in enumerate(readers):
                if not open_[i] or len(got[i]) >= total:
                    continue
                try:
                    chunk = r.sock.recv(8192, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    open_[i] = False
                    continue
                payloads, bufs[i] = split_frames(bufs[i] + chunk)
                got[i] += [json.loads(p)["id"] for p in payloads]
            time.sleep(0.002)
        return got

    refused = []

    def publish_all():
        # A 503 means nothing was delivered: the publisher waits and sends it again.
        p = gw.publisher()
        ids = []
        try:
            while len(ids) < total:
                try:
                    ids.append(p.publish(t, {"i": len(ids), "pad": pad}))
                except AssertionError as e:
                    assert e.args[0][0] == 503, e
                    refused.append(len(ids))
                    time.sleep(0.05)
            return ids
        finally:
            p.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        try:
            publisher = pool.submit(publish_all)
            reading = pool.submit(read_all)
            ids = publisher.result(timeout=60)
            got = reading.result(timeout=60)
        finally:
            for r in readers:
                r.close()
    m = gw.metrics()
    closes = {k: v for k, v in m.items()
              if k.startswith("ringway_closes_total") and v and 'reason="client"' not in k}
    waits = gw.metric("ringway_congestion_waits_total")
    assert not closes, f"subscribers were closed: {closes} (inbox held back {waits} times)"
    for i, g in enumerate(got):
        assert g == ids, f"subscriber {i} got {len(g)} of {len(ids)} messages, or out of order"
    assert gw.metric("ringway_dropped_total") == 0
    assert waits > 0, "the inbox was never held back"
