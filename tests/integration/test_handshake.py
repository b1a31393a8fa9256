"""The HTTP/1.1 upgrade: refusals with the right status (and metrics label), the
handshake timeout, the accepted variants, and the /echo endpoint."""

import asyncio
import base64
import os
import select
import socket
import time

import pytest

from harness import HOST, Client, accept_for, arun, encode_frame, raw_http, read_until_eof, status_of, wait_until

MAX_HEADER = 1024
KEY = base64.b64encode(os.urandom(16)).decode()


def request(method="GET", path="/ws", version="HTTP/1.1", host=True, upgrade="websocket", connection="Upgrade",
            ws_version="13", key=KEY, extra=()) -> bytes:
    lines = [f"{method} {path} {version}"]
    if host:
        lines.append(f"Host: {HOST}")
    if upgrade is not None:
        lines.append(f"Upgrade: {upgrade}")
    if connection is not None:
        lines.append(f"Connection: {connection}")
    if ws_version is not None:
        lines.append(f"Sec-WebSocket-Version: {ws_version}")
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture(scope="module")
def gw(module_gateway):
    return module_gateway(shards=2, max_header_bytes=MAX_HEADER)


REFUSALS = {
    "post": (request(method="POST"), 405, "bad_method"),
    "put": (request(method="PUT"), 405, "bad_method"),
    "http-1.0": (request(version="HTTP/1.0"), 400, "http_version"),
    "missing-host": (request(host=False), 400, "missing_host"),
    "missing-upgrade": (request(upgrade=None), 426, "not_upgrade"),
    "upgrade-h2c": (request(upgrade="h2c"), 426, "not_upgrade"),
    "connection-keep-alive": (request(connection="keep-alive"), 400, "connection_header"),
    "missing-connection": (request(connection=None), 400, "connection_header"),
    "ws-version-8": (request(ws_version="8"), 426, "ws_version"),
    "ws-version-missing": (request(ws_version=None), 426, "ws_version"),
    "key-missing": (request(key=None), 400, "bad_key"),
    "key-short": (request(key="short"), 400, "bad_key"),
    "key-not-base64": (request(key="!!!!!!!!!!!!!!!!!!!!!!=="), 400, "bad_key"),
    "key-17-bytes": (request(key=base64.b64encode(b"x" * 17).decode()), 400, "bad_key"),
    "path-other": (request(path="/other"), 404, "not_found"),
    "path-root": (request(path="/"), 404, "not_found"),
    "path-ws-prefix": (request(path="/wsx"), 404, "not_found"),
    "echo-disabled": (request(path="/echo"), 404, "not_found"),
    "garbage": (b"\x00\x01\x02garbage\r\n\r\n", 400, "malformed"),
    "too-many-headers": (request(extra=[f"X-H{i}: v" for i in range(40)]), 431, "headers_too_large"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_status_and_metric(gw, case):
    req, status, reason = REFUSALS[case]
    before = gw.metric("ringway_handshake_failures_total", reason=reason)
    resp = gw.raw_http(req)
    assert status_of(resp) == status, resp
    head, _, body = resp.partition(b"\r\n\r\n")
    assert body.strip(), "the refusal says why in its body"
    wait_until(lambda: gw.metric("ringway_handshake_failures_total", reason=reason) == before + 1, 3,
               what=f"handshake_failures{{reason={reason}}} += 1")


def test_refusal_headers(gw):
    resp = gw.raw_http(request(method="POST"))
    assert b"\r\nallow: get\r\n" in resp.lower(), resp
    resp = gw.raw_http(request(upgrade=None))
    assert b"\r\nupgrade: websocket\r\n" in resp.lower(), resp
    resp = gw.raw_http(request(ws_version="8"))
    assert b"\r\nsec-websocket-version: 13\r\n" in resp.lower(), resp


def test_headers_over_limit_are_431(gw):
    before = gw.metric("ringway_handshake_failures_total", reason="headers_too_large")
    req = request(extra=["X-Pad: " + "p" * (MAX_HEADER + 500)])
    resp = gw.raw_http(req)
    assert status_of(resp) == 431, resp
    wait_until(lambda: gw.metric("ringway_handshake_failures_total", reason="headers_too_large") == before + 1, 3)


def test_headers_over_limit_arriving_slowly_are_431(gw):
    """A request head that keeps growing past the limit without ever ending."""
    with socket.create_connection((HOST, gw.port), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        sent = 30
        for i in range(MAX_HEADER // 50 + 2):
            if select.select([s], [], [], 0.005)[0]:
                break  # the gateway answered: stop sending
            line = f"X-Slow-{i:03}: {'v' * 36}\r\n".encode()
            s.sendall(line)
            sent += len(line)
        assert sent > MAX_HEADER
        resp = read_until_eof(s, 5)
    assert status_of(resp) == 431, resp


def test_request_within_limit_upgrades(gw):
    pad = "p" * (MAX_HEADER - len(request(extra=["X-Pad: "])))
    req = request(extra=["X-Pad: " + pad])
    assert len(req) == MAX_HEADER
    resp = gw.raw_http(req, timeout=0.5)
    assert status_of(resp) == 101, resp


@pytest.mark.parametrize("variant", [
    request(path="/ws?token=abc&x=1"),
    request(upgrade="WebSocket", connection="keep-alive, upgrade"),
    request(connection="Upgrade, keep-alive", ws_version=" 13 "),
    request(extra=["Origin: http://example.com", "Sec-WebSocket-Protocol: chat", "Cookie: a=b"]),
    request().replace(b"Host:", b"host:").replace(b"Upgrade:", b"UPGRADE:").replace(b"Sec-WebSocket-Key", b"sec-websocket-key"),
])
def test_accepted_variants(gw, variant):
    with socket.create_connection((HOST, gw.port), timeout=5) as s:
        s.sendall(variant)
        data = b""
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            data += s.recv(4096)
        head = data.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 101 "), data
        assert f"Sec-WebSocket-Accept: {accept_for(KEY)}".encode() in head, head
        # No subprotocol was offered back (none is supported).
        assert b"sec-websocket-protocol" not in head.lower()


def test_request_split_across_many_writes_upgrades(gw):
    with socket.create_connection((HOST, gw.port), timeout=5) as s:
        req = request()
        for i in range(0, len(req), 7):
            s.sendall(req[i:i + 7])
            time.sleep(0.001)
        data = b""
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            data += s.recv(4096)
        assert data.startswith(b"HTTP/1.1 101 "), data


def test_frame_sent_with_the_request_is_read(gw):
    """Bytes after the request head (a client that does not wait for the 101) are frames."""
    r = gw.raw(after_request=encode_frame(0x1, b'{"op":"subscribe","topic":"early","ref":1}'))
    assert r.recv_json()["type"] == "welcome"
    assert r.recv_json() == {"type": "subscribed", "topic": "early", "ref": 1}
    r.close()


def test_refusal_closes_the_connection(gw):
    with socket.create_connection((HOST, gw.port), timeout=5) as s:
        s.sendall(request(method="POST"))
        resp = read_until_eof(s, 5)
        assert status_of(resp) == 405
        s.settimeout(1)
        assert s.recv(1) == b""


def test_refusals_do_not_affect_open_connections(gw):
    async def body():
        async with Client(gw) as c:
            await c.subscribe("hs-bystander")
            for case in REFUSALS.values():
                raw_http(gw.port, case[0])
            mid = gw.publish("hs-bystander", 1)
            assert (await c.recv())["id"] == mid

    arun(body())


def test_websockets_library_connects(gw):
    async def body():
        async with Client(gw) as c:
            assert c.welcome["type"] == "welcome"

    arun(body())


# === handshake timeout ===


def test_silent_socket_is_closed_after_handshake_timeout(gateway):
    gw = gateway(handshake_timeout_ms=400)
    before = gw.metric("ringway_handshake_timeouts_total")
    socks = []
    try:
        t0 = time.monotonic()
        for partial in [b"", b"GET /ws HTTP/1.1\r\nHost: x\r\n"]:
            s = socket.create_connection((HOST, gw.port), timeout=5)
            s.sendall(partial)
            socks.append(s)
        for s in socks:
            s.settimeout(max(0.01, t0 + 4 - time.monotonic()))
            try:
                got = s.recv(100)
            except ConnectionResetError:
                got = b""
            assert got == b"", got
        elapsed = time.monotonic() - t0
        assert 0.3 <= elapsed < 4, elapsed
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: gw.metric("ringway_handshake_timeouts_total") == before + 2, 3,
               what="handshake_timeouts_total += 2")


def test_completed_handshake_is_not_timed_out(gateway):
    gw = gateway(handshake_timeout_ms=300)

    async def body():
        async with Client(gw) as c:
            await asyncio.sleep(0.8)
            await c.subscribe("still-open")

    arun(body())
    assert gw.metric("ringway_handshake_timeouts_total") == 0


# === /echo ===


def test_echo_endpoint_echoes_text_and_binary(gateway):
    gw = gateway(echo=True)

    async def body():
        async with Client(gw, path="/echo", expect_welcome=False) as c:
            for msg in ["hello", "", "\u00e9\U0001f680", "x" * 50000]:
                await c.send(msg)
                assert await c.recv_raw() == msg
            for msg in [b"\x00\x01\xff", b"", os.urandom(40000)]:
                await c.send(msg)
                assert await c.recv_raw() == msg
        # /ws keeps speaking protocol v1 next to it.
        async with Client(gw) as c:
            assert c.welcome["type"] == "welcome"

    arun(body())


def test_echo_disabled_by_default_is_404(gateway):
    gw = gateway()
    assert status_of(gw.raw_http(request(path="/echo"))) == 404


def test_allowed_origins_forbid_other_browsers_and_let_non_browsers_in(gateway):
    """With `allowed_origins`, a browser upgrade from another origin gets 403 (counted
    under reason="origin"); the listed origin upgrades, and so does a client that sends
    no Origin (not a browser)."""
    from websockets.exceptions import InvalidStatus

    gw = gateway(allowed_origins="https://app.example.com,https://other.example.com")

    async def body():
        async with Client(gw, origin="https://other.example.com") as c:
            assert c.welcome["type"] == "welcome"
        async with Client(gw) as c:  # the websockets client sends no Origin by default
            assert c.welcome["type"] == "welcome"
        with pytest.raises(InvalidStatus) as refused:
            async with Client(gw, origin="https://evil.example"):
                pass
        assert refused.value.response.status_code == 403

    arun(body())
    assert gw.metric("ringway_handshake_failures_total", reason="origin") == 1


def test_max_connections_answers_503_with_retry_after_and_frees_room_on_close(gateway):
    """At `max_connections` (node-wide, over both shards) an upgrade gets 503 with
    Retry-After before its token is looked at; a closed connection frees its room."""
    from websockets.exceptions import InvalidStatus

    gw = gateway(max_connections=3)

    async def body():
        clients = [await Client(gw).__aenter__() for _ in range(3)]
        try:
            with pytest.raises(InvalidStatus) as refused:
                async with Client(gw):
                    pass
            assert refused.value.response.status_code == 503
            assert refused.value.response.headers["Retry-After"] == "1"
            # The ones in are unaffected.
            assert (await clients[0].request({"op": "subscribe", "topic": "t"}))["type"] == "subscribed"
        finally:
            await clients.pop().__aexit__(None, None, None)
        # Room again once the server has seen the close.
        async def fourth():
            try:
                async with Client(gw) as c:
                    return c.welcome["type"] == "welcome"
            except InvalidStatus:
                return False
        deadline = time.monotonic() + 5
        while not await fourth():
            assert time.monotonic() < deadline, "the closed connection's room never came back"
            await asyncio.sleep(0.05)
        for c in clients:
            await c.__aexit__(None, None, None)

    arun(body())
    assert gw.metric("ringway_handshake_failures_total", reason="max_connections") >= 1
