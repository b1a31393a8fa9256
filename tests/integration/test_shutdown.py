"""Closing: the client-initiated close handshake, and the graceful drain on SIGTERM
(every client gets 1001, the process exits 0 within the drain timeout, /readyz stops
saying ready)."""

import asyncio
import contextlib
import struct
import time

from harness import Client, arun, encode_frame, http_request, open_on_every_shard, upgrade_request, wait_until


def readyz_not_ready(gw) -> bool:
    try:
        return http_request(gw.admin_port, "GET", "/readyz", timeout=1).status == 503
    except OSError:
        return True  # no longer served


# === client-initiated close ===


def test_client_close_1000_gets_1000_back_and_clean_close(gateway):
    gw = gateway()
    before = gw.metric("ringway_closes_total", reason="client")
    r = gw.raw()
    assert r.recv_json()["type"] == "welcome"
    r.send_frame(0x8, struct.pack("!H", 1000) + b"bye")
    f = r.recv_close()
    assert f.close_code == 1000, f
    assert r.at_eof(3), "gateway did not close TCP after the close handshake"
    r.close()
    wait_until(lambda: gw.metric("ringway_closes_total", reason="client") == before + 1, 3)
    assert gw.metric("ringway_connections") == 0


def test_websockets_client_close_is_clean(gateway):
    gw = gateway()

    async def body():
        c = Client(gw)
        await c.__aenter__()
        await c.ws.close(1000, "done")
        rcvd = c.ws.protocol.close_rcvd
        assert rcvd is not None and rcvd.code == 1000, rcvd
        assert c.ws.protocol.close_sent.code == 1000

    arun(body())
    wait_until(lambda: gw.metric("ringway_connections") == 0, 3)
    assert gw.metric("ringway_closes_total", reason="client") == 1
    assert gw.metric("ringway_closes_total", reason="protocol_error") == 0


def test_close_with_application_code_is_echoed(gateway):
    gw = gateway()
    r = gw.raw()
    r.recv_json()
    r.send_frame(0x8, struct.pack("!H", 4001))
    assert r.recv_close().close_code == 4001
    assert r.at_eof(3)


def test_close_without_code_gets_close_back(gateway):
    gw = gateway()
    r = gw.raw()
    r.recv_json()
    r.send_frame(0x8, b"")
    f = r.recv_close()
    assert f.payload == b"" or f.close_code == 1000, f
    assert r.at_eof(3)


def test_frames_after_close_are_ignored(gateway):
    gw = gateway(client_publish=True)

    async def body():
        async with Client(gw) as sub:
            await sub.subscribe("after-close")
            r = gw.raw()
            r.recv_json()
            r.send(encode_frame(0x8, struct.pack("!H", 1000))
                   + encode_frame(0x1, b'{"op":"publish","topic":"after-close","data":"late"}'))
            assert r.recv_close().close_code == 1000
            assert r.at_eof(3)
            marker = gw.publish("after-close", "marker")
            assert (await sub.recv())["id"] == marker, "a frame sent after the close frame was handled"

    arun(body())


def test_dropped_tcp_connection_is_cleaned_up(gateway):
    gw = gateway()
    for _ in range(4):
        r = gw.raw()
        r.recv_json()
        r.send_json({"op": "subscribe", "topic": "gone"})
        r.recv_json()
        r.close()
    wait_until(lambda: gw.metric("ringway_connections") == 0 and gw.metric("ringway_subscriptions") == 0, 3,
               what="connections and subscriptions back to 0")


# === SIGTERM ===


def test_sigterm_closes_every_client_with_1001_and_exits_0(gateway):
    gw = gateway(shards=2, drain_timeout_secs=5, drain_spread_secs=1)

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            clients = await open_on_every_shard(stack, gw, 8)
            for c in clients:
                await c.subscribe("drain")
            t0 = time.monotonic()
            gw.sigterm()
            codes = await asyncio.gather(*(c.closed_with(6) for c in clients))
            assert codes == [1001] * len(clients), codes
            rc = await asyncio.to_thread(gw.wait_exit, 6)
            assert rc == 0, f"exit status {rc}\n{gw.stderr()}"
            assert time.monotonic() - t0 < 5 + 1
            gw.stopped = True
            assert readyz_not_ready(gw)

    arun(body())


def test_drain_waits_for_unresponsive_clients_at_most_the_drain_timeout(gateway):
    gw = gateway(shards=2, drain_timeout_secs=2, drain_spread_secs=1, close_timeout_ms=10_000)
    r = gw.raw()  # never answers the close
    r.recv_json()
    t0 = time.monotonic()
    gw.sigterm()
    # While draining: not ready, and no new client is served. A socket a shard
    # accepted before it saw the drain is upgraded and at once told to reconnect
    # elsewhere (1001), like every other client; after that, the listener is closed.
    wait_until(lambda: readyz_not_ready(gw), 2, what="/readyz to stop answering 200")
    assert gw.proc.poll() is None, "exited before the drain timeout although a client never closed"
    try:
        resp = gw.raw_http(upgrade_request()[0], timeout=1)
        if resp.startswith(b"HTTP/1.1 101"):
            assert b"\x88\x16\x03\xe9server shutting down" in resp, resp
    except OSError:
        pass  # the listener is closed: refused, as it should be
    rc = gw.wait_exit(6)
    elapsed = time.monotonic() - t0
    assert rc == 0, f"exit status {rc}\n{gw.stderr()}"
    assert elapsed < 2 + 2, elapsed
    gw.stopped = True
    assert r.recv_close(3).close_code == 1001


def test_sigterm_with_idle_gateway_exits_0_quickly(gateway):
    gw = gateway(shards=2)
    t0 = time.monotonic()
    gw.sigterm()
    assert gw.wait_exit(5) == 0
    assert time.monotonic() - t0 < 2
    gw.stopped = True
    assert "panicked" not in gw.stderr()


def test_publish_during_drain_does_not_crash(gateway):
    gw = gateway(shards=2, drain_timeout_secs=2, drain_spread_secs=1, close_timeout_ms=10_000)
    r = gw.raw()
    r.recv_json()
    r.send_json({"op": "subscribe", "topic": "late"})
    r.recv_json()
    gw.sigterm()
    for i in range(50):
        try:
            resp = http_request(gw.admin_port, "POST", "/v1/publish", '{"topic":"late","data":1}', timeout=1)
            assert resp.status in (200, 503), resp
        except OSError:
            break
    assert gw.wait_exit(6) == 0
    gw.stopped = True
    assert "panicked" not in gw.stderr()


def test_drain_spreads_closes_over_the_window(gateway):
    """The 1001 closes are spread out instead of all arriving together (a shard closes at
    least 10 per 20 ms tick, so 600 take at least 1.2 s), and every connection still gets
    one before the process exits 0."""
    gw = gateway(shards=1, drain_timeout_secs=8, drain_spread_secs=3)
    raws = [gw.raw() for _ in range(600)]
    for r in raws:
        assert r.recv_json()["type"] == "welcome"
    t0 = time.monotonic()
    gw.sigterm()
    gw.stopped = True

    def close_time(r):
        f = r.recv_close(10)
        assert int.from_bytes(f.payload[:2], "big") == 1001
        r.send_frame(0x8, f.payload[:2])  # complete the close handshake
        return time.monotonic() - t0

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=32) as pool:
        times = sorted(pool.map(close_time, raws))
    assert len(times) == 600
    # All at once would put every close within the first ticks (as before spreading:
    # 0.15 s for 600).
    assert times[0] < 1.0, times[:5]
    assert times[-1] > 0.8, f"closes not spread: last at {times[-1]:.2f} s"
    assert gw.wait_exit(10) == 0
    for r in raws:
        r.close()
