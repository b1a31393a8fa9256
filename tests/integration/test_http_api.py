"""The admin HTTP API: /healthz, /readyz, /metrics, POST /v1/publish, errors."""

import http.client
import itertools
import json
import socket

import pytest

from harness import HOST, Client, arun, id_key, parse_metrics, read_until_eof, shard_of, status_of, wait_until

_names = itertools.count()


def topic() -> str:
    return f"http/{next(_names)}"


@pytest.fixture(scope="module")
def gw(module_gateway):
    return module_gateway(shards=2, node_id="admin-test")


def test_healthz(gw):
    r = gw.http("GET", "/healthz")
    assert r.status == 200, r


def test_readyz_when_running(gw):
    r = gw.http("GET", "/readyz")
    assert r.status == 200, r
    assert gw.metric("ringway_ready") == 1


def test_metrics_exposition(gw):
    r = gw.http("GET", "/metrics")
    assert r.status == 200
    assert r.headers["content-type"].split(";")[0].strip() in ("text/plain", "application/openmetrics-text")
    m = parse_metrics(r.body.decode())
    for shard in ("0", "1"):
        for name in ["ringway_connections", "ringway_accepted_total", "ringway_topics", "ringway_subscriptions",
                     "ringway_deliveries_total", "ringway_dropped_total", "ringway_frames_in_total",
                     "ringway_frames_out_total", "ringway_bytes_in_total", "ringway_bytes_out_total",
                     "ringway_error_frames_total", "ringway_handshake_timeouts_total"]:
            assert f'{name}{{shard="{shard}"}}' in m, name
        for reason in ["malformed", "bad_method", "http_version", "missing_host", "not_upgrade",
                       "connection_header", "ws_version", "bad_key", "not_found", "headers_too_large"]:
            assert f'ringway_handshake_failures_total{{shard="{shard}",reason="{reason}"}}' in m, reason
        for reason in ["client", "protocol_error", "slow_consumer", "idle_timeout", "write_timeout", "shutdown",
                       "io_error"]:
            assert f'ringway_closes_total{{shard="{shard}",reason="{reason}"}}' in m, reason
    assert 'ringway_connections{shard="2"}' not in m
    assert "ringway_published_total" in m and "ringway_ready" in m
    info = [k for k in m if k.startswith("ringway_info{")]
    assert len(info) == 1 and 'node="admin-test"' in info[0], info


def test_metrics_follow_connections(gw):
    wait_until(lambda: gw.metric("ringway_connections") == 0, 5, what="earlier tests' connections to close")

    async def body():
        before = 0
        async with Client(gw) as a, Client(gw) as b:
            shards = [shard_of(a), shard_of(b)]
            m = gw.metrics()
            assert sum(v for k, v in m.items() if k.startswith("ringway_connections{")) == before + 2
            for s in set(shards):
                assert m[f'ringway_connections{{shard="{s}"}}'] >= shards.count(s)
            t = topic()
            await a.subscribe(t)
            await b.subscribe(t)
            assert gw.metric("ringway_subscriptions") >= 2
            published = gw.metric("ringway_published_total")
            deliveries = gw.metric("ringway_deliveries_total")
            gw.publish(t, 1)
            await a.recv()
            await b.recv()
            assert gw.metric("ringway_published_total") == published + 1
            assert gw.metric("ringway_deliveries_total") == deliveries + 2

    arun(body())


def test_publish_returns_id_and_delivers(gw):
    async def body():
        async with Client(gw) as c:
            t = topic()
            await c.subscribe(t)
            r = gw.http("POST", "/v1/publish", json.dumps({"topic": t, "data": {"x": [1, 2]}}),
                        {"Content-Type": "application/json"})
            assert r.status == 200, r
            assert r.headers["content-type"].startswith("application/json")
            body_ = r.json()
            assert set(body_) == {"id"}, body_
            id_key(body_["id"])
            assert await c.recv() == {"type": "message", "topic": t, "id": body_["id"], "epoch": gw.epoch, "data": {"x": [1, 2]}}

    arun(body())


def test_publish_without_data_delivers_null(gw):
    async def body():
        async with Client(gw) as c:
            t = topic()
            await c.subscribe(t)
            r = gw.http("POST", "/v1/publish", json.dumps({"topic": t}))
            assert r.status == 200, r
            assert await c.recv() == {"type": "message", "topic": t, "id": r.json()["id"], "epoch": gw.epoch, "data": None}

    arun(body())


def test_publish_to_topic_without_subscribers(gw):
    assert gw.http("POST", "/v1/publish", json.dumps({"topic": topic(), "data": 1})).status == 200


@pytest.mark.parametrize("body", ["not json", "", "[1]", '{"data":1}', '{"topic":5,"data":1}', '{"topic":"a","data":}'])
def test_publish_bad_json_is_400(gw, body):
    r = gw.http("POST", "/v1/publish", body)
    assert r.status == 400, r
    err = r.json()
    assert err["error"] == "bad_json" and isinstance(err.get("message"), str), err


@pytest.mark.parametrize("t", ["", "x" * 257, "a\nb", "a\x00"])
def test_publish_bad_topic_is_400(gw, t):
    r = gw.http("POST", "/v1/publish", json.dumps({"topic": t, "data": 1}))
    assert r.status == 400, r
    assert r.json()["error"] == "bad_topic", r.body


def test_unknown_path_is_404(gw):
    for path in ["/", "/nope", "/v1/publishx", "/v2/publish", "/ws"]:
        r = gw.http("GET", path)
        assert r.status == 404, (path, r)


@pytest.mark.parametrize("method,path", [("GET", "/v1/publish"), ("PUT", "/v1/publish"), ("DELETE", "/v1/publish"),
                                         ("POST", "/healthz"), ("POST", "/readyz"), ("POST", "/metrics"),
                                         ("PUT", "/metrics")])
def test_wrong_method_is_405(gw, method, path):
    r = gw.http(method, path, "{}" if method != "GET" else None)
    assert r.status == 405, (method, path, r)


def test_keep_alive_serves_several_requests(gw):
    conn = http.client.HTTPConnection(HOST, gw.admin_port, timeout=5)
    try:
        for _ in range(5):
            conn.request("GET", "/healthz")
            r = conn.getresponse()
            r.read()
            assert r.status == 200
        conn.request("POST", "/v1/publish", body=json.dumps({"topic": topic(), "data": 1}))
        r = conn.getresponse()
        assert r.status == 200 and "id" in json.loads(r.read())
    finally:
        conn.close()


def test_body_over_limit_is_413(gw):
    with socket.create_connection((HOST, gw.admin_port), timeout=5) as s:
        s.sendall(b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
        resp = read_until_eof(s, 5)
    assert status_of(resp) == 413, resp[:200]


def test_malformed_request_is_400(gw):
    with socket.create_connection((HOST, gw.admin_port), timeout=5) as s:
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        resp = read_until_eof(s, 5)
    assert status_of(resp) == 400, resp[:200]


def test_admin_still_answers_after_bad_requests(gw):
    for _ in range(3):
        with socket.create_connection((HOST, gw.admin_port), timeout=5) as s:
            s.sendall(b"GARBAGE\r\n\r\n")
            read_until_eof(s, 2)
    assert gw.http("GET", "/healthz").status == 200


def test_chunked_publish_is_handled_or_refused_explicitly(gw):
    """HTTP/1.1 clients may send a body with Transfer-Encoding: chunked (http.client,
    requests and Go do for streamed bodies). The API must read it, or refuse it as such
    (411/501) — not parse an empty body and call the client's JSON bad."""
    async def body():
        async with Client(gw) as c:
            t = topic()
            await c.subscribe(t)
            payload = json.dumps({"topic": t, "data": "chunked"}).encode()
            req = (b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                   + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
            with socket.create_connection((HOST, gw.admin_port), timeout=5) as s:
                s.sendall(req)
                resp = read_until_eof(s, 5)
            status = status_of(resp)
            assert status in (200, 411, 501), resp
            if status == 200:
                assert (await c.recv())["data"] == "chunked"

    arun(body())
