"""Keep-alive and idle timeouts: the gateway pings a silent connection after
`--ping-interval-secs` and closes it with 1001 after `--idle-timeout-secs` of silence;
a client that answers pings (or talks) stays. A write that makes no progress for
`--write-timeout-secs` closes the connection. (The handshake timeout is in
test_handshake.py.) The sweeper ticks once a second: timings are checked to ±1 s."""

import asyncio
import json
import time

import pytest

from harness import Client, arun, encode_frame, wait_until

PING, IDLE = 1, 3


@pytest.fixture(scope="module")
def gw(module_gateway):
    return module_gateway(shards=2, ping_interval_secs=PING, idle_timeout_secs=IDLE)


def test_silent_client_gets_ping_then_close_1001(gw):
    before = gw.metric("ringway_closes_total", reason="idle_timeout")
    r = gw.raw()
    assert r.recv_json()["type"] == "welcome"
    t0 = r.upgraded_at
    ping_at = close_at = None
    close = None
    while close is None:
        f = r.recv_frame(timeout=max(0.01, t0 + 7 - time.monotonic()))
        if f.opcode == 0x9 and ping_at is None:
            ping_at = time.monotonic() - t0
        elif f.opcode == 0x8:
            close, close_at = f, time.monotonic() - t0
    assert ping_at is not None, "no ping before the idle close"
    assert PING - 1 <= ping_at <= PING + 1.5, ping_at
    assert close.close_code == 1001, close
    assert IDLE - 1 <= close_at <= IDLE + 3, close_at
    assert ping_at < close_at
    assert r.at_eof(5), "TCP connection not closed after the close frame"
    r.close()
    wait_until(lambda: gw.metric("ringway_closes_total", reason="idle_timeout") == before + 1, 5,
               what="closes_total{reason=idle_timeout} += 1")


def test_clients_that_answer_pings_or_talk_stay_connected(gw):
    async def body():
        async with Client(gw) as ws_client:  # websockets answers pings by itself
            talker = gw.raw()
            assert talker.recv_json()["type"] == "welcome"
            t0 = time.monotonic()
            n = 0
            while time.monotonic() - t0 < IDLE + 1.5:
                talker.send_json({"op": "subscribe", "topic": f"talk/{n}", "ref": n})
                reply = talker.recv_frame()
                while reply.opcode == 0x9:  # pings may come (1 s clock); it never answers them
                    reply = talker.recv_frame()
                assert reply.opcode == 0x1 and json.loads(reply.payload)["ref"] == n, reply
                n += 1
                await asyncio.sleep(0.5)
            # Both are still open and served.
            await ws_client.subscribe("still-here")
            talker.send_json({"op": "unsubscribe", "topic": "talk/0"})
            reply = talker.recv_frame()
            while reply.opcode == 0x9:
                reply = talker.recv_frame()
            assert reply.json() == {"type": "unsubscribed", "topic": "talk/0"}
            talker.close()

    arun(body())


def test_pong_answers_ping_with_same_payload(gw):
    r = gw.raw()
    assert r.recv_json()["type"] == "welcome"
    for payload in [b"", b"abc", bytes(range(125))]:
        r.send_frame(0x9, payload)
        f = r.recv_frame()
        assert (f.opcode, f.payload) == (0xA, payload), f
    r.close()


def test_unsolicited_pong_is_ignored(gw):
    r = gw.raw()
    assert r.recv_json()["type"] == "welcome"
    r.send(encode_frame(0xA, b"x") + encode_frame(0x1, b'{"op":"subscribe","topic":"p"}'))
    assert r.recv_json() == {"type": "subscribed", "topic": "p"}
    r.close()


def test_stalled_writer_is_closed_after_write_timeout(gateway):
    """Under the drop policy the queue never closes anyone; the write timeout does."""
    gw = gateway(shards=1, outbound_queue_bytes=4096, slow_consumer="drop", write_timeout_secs=1)
    r = gw.raw(rcvbuf=2048)
    assert r.recv_json()["type"] == "welcome"
    r.send_json({"op": "subscribe", "topic": "w"})
    assert r.recv_json() == {"type": "subscribed", "topic": "w"}
    # Publish until its socket buffers are full and the write has stalled for 1 s.
    p = gw.publisher()
    deadline = time.monotonic() + 10
    try:
        for _ in range(400):
            for _ in range(20):
                p.publish("w", "x" * 1024)
            if gw.metric("ringway_closes_total", reason="write_timeout") or time.monotonic() > deadline:
                break
    finally:
        p.close()
    wait_until(lambda: gw.metric("ringway_closes_total", reason="write_timeout") == 1, 4,
               what="closes_total{reason=write_timeout} == 1")
    assert gw.metric("ringway_connections") == 0
    assert gw.metric("ringway_dropped_total") > 0
