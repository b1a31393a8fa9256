"""TLS (`wss://`): with `tls_cert` and `tls_key` the client listener speaks TLS only.
Clients on `websockets` over `ssl` (Python's OpenSSL) subscribe, receive and publish;
a plain `ws://` request gets a plain 400 that names `wss://`; a broken handshake costs
nobody else anything; SIGHUP serves a renewed certificate to new connections while
open ones carry on; a stalled TLS subscriber is a slow consumer like any other."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import ssl
import time

import pytest
import trustme
from websockets.exceptions import InvalidStatus

from harness import HOST, Client, Collector, run_cli, wait_until

PAD = "x" * 4000


@pytest.fixture
def pki(tmp_path):
    """A throwaway CA, a certificate for 127.0.0.1 in PEM files, and a client context
    that trusts the CA (and checks the name)."""
    ca = trustme.CA()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued = ca.issue_cert(HOST, "localhost")
    issued.cert_chain_pems[0].write_to_path(str(cert))
    for extra in issued.cert_chain_pems[1:]:
        extra.write_to_path(str(cert), append=True)
    issued.private_key_pem.write_to_path(str(key))
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    return ca, cert, key, ctx


def tls_gateway(gateway, pki, **opts):
    _, cert, key, _ = pki
    return gateway(tls_cert=str(cert), tls_key=str(key), **opts)


def peer_fingerprint(client: Client) -> str:
    der = client.ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


def test_wss_clients_subscribe_receive_and_publish(gateway, pki):
    gw = tls_gateway(gateway, pki, shards=2, client_publish=True)
    ctx = pki[3]

    async def body():
        async with Client(gw, ssl=ctx) as a, Client(gw, ssl=ctx) as b:
            assert a.welcome["type"] == "welcome" and a.ws.transport.get_extra_info("ssl_object").version()
            await a.subscribe("t")
            await b.subscribe("t")
            # From the admin API, and from a client through TLS.
            gw.publish("t", {"n": 1})
            await b.send({"op": "publish", "topic": "t", "data": {"n": 2}})
            for c in (a, b):
                got = [await c.recv(), await c.recv()]
                assert [m["data"]["n"] for m in got if m["type"] == "message"] == [1, 2], got

    asyncio.run(body())
    assert gw.metric("ringway_handshake_failures_total") == 0


def unread_subscriber(gw, ctx, topic: str):
    """A raw TLS client with a 4 KiB receive buffer, subscribed to `topic`, that reads
    nothing more until the test says so."""
    r = gw.raw(rcvbuf=4096, ssl=ctx)
    assert r.recv_json()["type"] == "welcome"
    r.send_json({"op": "subscribe", "topic": topic})
    assert r.recv_json() == {"type": "subscribed", "topic": topic}
    return r


def test_a_burst_through_tls_arrives_complete_and_in_order(gateway, pki):
    # 2,000 messages of 4 KB to a reading client and to one that reads nothing until the
    # burst is over: far more than one TLS record, the session's buffer limit and a
    # socket buffer, so the writes that catch up cross all three.
    gw = tls_gateway(gateway, pki, shards=2, outbound_queue_bytes=16 * 1024 * 1024)
    ctx = pki[3]

    async def body():
        late = unread_subscriber(gw, ctx, "burst")
        async with Client(gw, ssl=ctx) as a:
            await a.subscribe("burst")
            col = Collector(a)
            p = gw.publisher()
            try:
                ids = [await asyncio.to_thread(p.publish, "burst", {"i": i, "pad": PAD}) for i in range(2000)]
            finally:
                p.close()
            got = await col.wait_for(len(ids), 20)
            assert [m["id"] for m in got] == ids, f"got {len(got)} of {len(ids)}"
            assert [m["data"]["i"] for m in got] == list(range(2000))
            col.stop()
        late_ids = [late.recv_json(timeout=10)["id"] for _ in ids]
        assert late_ids == ids
        assert gw.metric("ringway_dropped_total") == 0

    asyncio.run(body())


def test_plain_ws_to_the_tls_port_gets_400_naming_wss(gateway, pki):
    gw = tls_gateway(gateway, pki)
    reply = gw.raw_http(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 "), reply
    assert b"wss://" in reply, reply
    wait_until(lambda: gw.metric("ringway_handshake_failures_total", reason="plain_http_on_tls") == 1, 5,
               what="the refusal counted")


def test_a_broken_tls_handshake_is_refused_and_others_carry_on(gateway, pki):
    gw = tls_gateway(gateway, pki)
    ctx = pki[3]

    async def body():
        async with Client(gw, ssl=ctx) as ok:
            await ok.subscribe("t")
            # A TLS record header announcing a handshake, then garbage.
            reply = await asyncio.to_thread(
                gw.raw_http, b"\x16\x03\x01\x00\x20" + b"\xff" * 32, 3)
            assert b"HTTP" not in reply, reply
            # A client that trusts another CA gives up during the handshake.
            other = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            trustme.CA().configure_trust(other)
            with pytest.raises(ssl.SSLCertVerificationError):
                async with Client(gw, ssl=other):
                    pass
            gw.publish("t", "still here")
            assert (await ok.recv())["data"] == "still here"

    asyncio.run(body())
    wait_until(lambda: gw.metric("ringway_handshake_failures_total", reason="tls_handshake") == 2, 5,
               what="both failed handshakes counted")


def test_sighup_serves_a_renewed_certificate_and_keeps_open_connections(gateway, pki):
    ca, cert, key, ctx = pki
    gw = tls_gateway(gateway, pki)

    async def body():
        async with Client(gw, ssl=ctx) as old:
            await old.subscribe("t")
            first = peer_fingerprint(old)
            renewed = ca.issue_cert(HOST)
            renewed.cert_chain_pems[0].write_to_path(str(cert))
            renewed.private_key_pem.write_to_path(str(key))
            gw.proc.send_signal(signal.SIGHUP)

            async def fingerprint_now():
                async with Client(gw, ssl=ctx) as c:
                    return peer_fingerprint(c)

            deadline = time.monotonic() + 5
            while (now := await fingerprint_now()) == first:
                assert time.monotonic() < deadline, "the renewed certificate was not served within 5 s"
                await asyncio.sleep(0.05)
            renewed_der = ssl.PEM_cert_to_DER_cert(renewed.cert_chain_pems[0].bytes().decode())
            assert now == hashlib.sha256(renewed_der).hexdigest()
            # The connection from before the reload still works.
            gw.publish("t", "after reload")
            assert (await old.recv())["data"] == "after reload"
            # A file that is not a certificate leaves the renewed one in force.
            cert.write_text("not a certificate\n")
            gw.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "certificate not reloaded" in gw.stderr(), 5, what="the refused reload logged")
            assert await fingerprint_now() == now

    asyncio.run(body())


def test_a_stalled_tls_subscriber_is_closed_as_slow_consumer(gateway, pki):
    gw = tls_gateway(gateway, pki, shards=1, outbound_queue_bytes=64 * 1024)
    ctx = pki[3]

    async def body():
        stalled = unread_subscriber(gw, ctx, "s")
        async with Client(gw, ssl=ctx) as reader:
            await reader.subscribe("s")
            col = Collector(reader)
            p = gw.publisher()
            ids: list[str] = []
            try:
                # Until the stalled client's socket, its session's records and its queue
                # are full (bounded: 40 MB at most).
                while gw.metric("ringway_closes_total", reason="slow_consumer") == 0:
                    assert len(ids) < 10_000, "the stalled subscriber was never closed"
                    for _ in range(100):
                        ids.append(await asyncio.to_thread(p.publish, "s", {"pad": PAD}))
                    got = await col.wait_for(len(ids), 10)
                    assert len(got) == len(ids), f"the reader got {len(got)} of {len(ids)}"
            finally:
                p.close()
            got = await col.wait_for(len(ids), 10)
            assert [m["id"] for m in got] == ids
            col.stop()
        stalled.sock.close()

    asyncio.run(body())


def test_behind_haproxy_the_proxy_header_comes_before_tls(gateway, haproxy, pki):
    # TLS passed through a TCP balancer that prepends the PROXY header: each client
    # keeps its own address, and a refusal (429) reaches it through TLS.
    gw = tls_gateway(gateway, pki, proxy_protocol="v2", proxy_trusted="127.0.0.1/32",
                     max_connections_per_ip=1)
    lb = haproxy([f"{HOST}:{gw.port}"], "send-proxy-v2")
    ctx = pki[3]

    async def body():
        async with Client(lb, ssl=ctx, local_addr=("127.0.0.5", 0)) as first:
            with pytest.raises(InvalidStatus) as refused:
                async with Client(lb, ssl=ctx, local_addr=("127.0.0.5", 0)):
                    pass
            assert refused.value.response.status_code == 429
            async with Client(lb, ssl=ctx, local_addr=("127.0.0.6", 0)) as second:
                await first.subscribe("t")
                await second.subscribe("t")
                gw.publish("t", "both")
                assert (await first.recv())["data"] == "both"
                assert (await second.recv())["data"] == "both"

    asyncio.run(body())


def test_tls_configuration_errors_exit_64(tmp_path, pki):
    _, cert, key, _ = pki
    alone = run_cli("serve", "--tls-cert", str(cert), "--listen", f"{HOST}:0", "--admin", f"{HOST}:0")
    assert alone.returncode == 64 and "tls_key" in alone.stderr, alone.stderr
    missing = run_cli("serve", "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(key),
                      "--listen", f"{HOST}:0", "--admin", f"{HOST}:0")
    assert missing.returncode == 64 and "tls_cert" in missing.stderr, missing.stderr
    swapped = run_cli("serve", "--tls-cert", str(key), "--tls-key", str(cert),
                      "--listen", f"{HOST}:0", "--admin", f"{HOST}:0")
    assert swapped.returncode == 64 and "tls_cert" in swapped.stderr, swapped.stderr
