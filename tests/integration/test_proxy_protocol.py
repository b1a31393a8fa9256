"""The PROXY protocol: behind HAProxy with `send-proxy-v2`, the gateway takes each
client's address from the header (the per-address limit counts it, not the
balancer's); the header is honoured only from `proxy_trusted`, and a connection
without a valid one is refused."""

from __future__ import annotations

import socket

import pytest
from websockets.exceptions import InvalidStatus

from harness import HOST, Client, arun, read_until_eof, status_of, upgrade_request


def test_behind_haproxy_send_proxy_v2_each_client_has_its_own_address(gateway, haproxy):
    gw = gateway(proxy_protocol="v2", proxy_trusted="127.0.0.1/32", max_connections_per_ip=1)
    lb = haproxy([f"{HOST}:{gw.port}"], "send-proxy-v2")

    async def body():
        async with Client(lb, local_addr=("127.0.0.5", 0)) as first:
            # A second connection from the same client address is over the cap...
            with pytest.raises(InvalidStatus) as refused:
                async with Client(lb, local_addr=("127.0.0.5", 0)):
                    pass
            assert refused.value.response.status_code == 429
            # ...but another client, through the same balancer, is not: without the
            # header both would be the balancer's 127.0.0.1.
            async with Client(lb, local_addr=("127.0.0.6", 0)) as second:
                await first.subscribe("t")
                await second.subscribe("t")
                gw.publish("t", "both")
                assert (await first.recv())["data"] == "both"
                assert (await second.recv())["data"] == "both"

    arun(body())
    assert gw.metric("ringway_handshake_failures_total", reason="max_connections_per_ip") == 1


def upgrade_with(port: int, prefix: bytes, source: str = "127.0.0.1") -> bytes:
    """Status line and headers of an upgrade sent after `prefix` from `source`."""
    req, _ = upgrade_request("/ws")
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(5)
        s.connect((HOST, port))
        s.sendall(prefix + req)
        return read_until_eof(s, 1)


def test_v1_headers_by_hand(gateway):
    gw = gateway(proxy_protocol="v1", proxy_trusted="127.0.0.0/8", max_connections_per_ip=1)
    line = b"PROXY TCP4 203.0.113.9 127.0.0.1 5000 80\r\n"
    with socket.socket() as held:
        # One connection from 203.0.113.9, kept open.
        req, _ = upgrade_request("/ws")
        held.connect((HOST, gw.port))
        held.sendall(line + req)
        assert held.recv(12) == b"HTTP/1.1 101"
        assert status_of(upgrade_with(gw.port, line)) == 429
        other = line.replace(b"203.0.113.9", b"203.0.113.10")
        assert status_of(upgrade_with(gw.port, other)) == 101


@pytest.mark.parametrize("prefix,source,status,reason", [
    (b"", "127.0.0.1", 400, b"PROXY protocol header"),
    (b"PROXY TCP4 203.0.113.9 127.0.0.1 5000 80\r\n", "127.0.0.1", 400, b"PROXY protocol header"),
    (b"PROXY TCP4 203.0.113.9\r\n", "127.0.0.1", 400, b"PROXY protocol header"),
    (b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c" + bytes([203, 0, 113, 9, 127, 0, 0, 1, 0, 80, 0, 80]),
     "127.0.0.2", 403, b"trusted load balancer"),
])
def test_a_connection_without_a_valid_header_from_a_trusted_balancer_is_refused(
        gateway, prefix, source, status, reason):
    gw = gateway(proxy_protocol="v2", proxy_trusted="127.0.0.1/32")
    resp = upgrade_with(gw.port, prefix, source)
    assert status_of(resp) == status, resp
    assert reason in resp, resp
    # A valid header from the trusted balancer gets through.
    v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c" + bytes([203, 0, 113, 9, 127, 0, 0, 1, 0, 80, 0, 80])
    assert status_of(upgrade_with(gw.port, v2)) == 101
