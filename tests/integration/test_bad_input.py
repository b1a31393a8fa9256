"""Bad input from a client: error frames for bad requests (the connection stays usable),
close codes for bad frames (1002, 1003, 1007, 1009) — and never any effect on another
connection. On both I/O drivers.
"""

import itertools
import json
import struct
import time

import pytest

from harness import DRIVERS, Client, arun, encode_frame, wait_until

_names = itertools.count()
MAX_MESSAGE = 1024
MAX_SUBS = 3


def topic(label: str = "t") -> str:
    return f"bad/{label}/{next(_names)}"


@pytest.fixture(scope="module", params=DRIVERS)
def gw(request, module_gateway):
    g = module_gateway(driver=request.param, shards=2, client_publish=True,
                       max_message_bytes=MAX_MESSAGE, max_subscriptions=MAX_SUBS)
    assert f'driver="{request.param}"' in g.metrics_text()
    return g


async def still_usable(c: Client, gw) -> None:
    """A later subscribe works and its messages arrive."""
    t = topic("after")
    await c.subscribe(t)
    mid = gw.publish(t, "ok")
    assert await c.recv() == {"type": "message", "topic": t, "id": mid, "epoch": gw.epoch, "data": "ok"}


def assert_error(reply: dict, code: str, ref=...) -> None:
    want = {"type", "code", "message"} | ({"ref"} if ref is not ... else set())
    assert set(reply) == want, reply
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert isinstance(reply["message"], str) and reply["message"], reply
    if ref is not ...:
        assert reply["ref"] == ref, reply


# === error frames ===

BAD_JSON = ["not json", "{", "", "[1,2]", "5", '"str"', "null", "true",
            '{"op":"subscribe","topic":"a"} trailing', '{"op":"subscribe","topic":"a",}']

# Valid JSON objects whose fields have the wrong type: the request is refused with
# bad_request (and, having been read, its `ref` is echoed).
WRONG_TYPE = ['{"op":"subscribe","topic":5}', '{"op":5,"topic":"a"}', '{"op":"subscribe","topic":["a"]}',
              '{"op":"subscribe","topic":"a","since":7}']


@pytest.mark.parametrize("text", BAD_JSON)
def test_bad_json(gw, text):
    async def body():
        async with Client(gw) as c:
            assert_error(await c.request(text), "bad_json")
            await still_usable(c, gw)


@pytest.mark.parametrize("text", WRONG_TYPE)
def test_wrongly_typed_field_is_bad_request(gw, text):
    async def body():
        async with Client(gw) as c:
            assert_error(await c.request(text), "bad_request")
            await still_usable(c, gw)

    arun(body())


@pytest.mark.parametrize("msg", [{"topic": "a"}, {"op": "dance", "topic": "a"}, {"op": "SUBSCRIBE", "topic": "a"},
                                 {"op": ""}, {}])
def test_unknown_op(gw, msg):
    async def body():
        async with Client(gw) as c:
            assert_error(await c.request(msg), "unknown_op")
            assert_error(await c.request({**msg, "ref": "u"}), "unknown_op", ref="u")
            await still_usable(c, gw)

    arun(body())


@pytest.mark.parametrize("op", ["subscribe", "unsubscribe", "publish"])
def test_missing_topic_is_bad_request(gw, op):
    async def body():
        async with Client(gw) as c:
            assert_error(await c.request({"op": op, "data": 1}), "bad_request")
            assert_error(await c.request({"op": op, "data": 1, "ref": [op]}), "bad_request", ref=[op])
            await still_usable(c, gw)

    arun(body())


BAD_TOPICS = {
    "empty": "",
    "257-bytes": "x" * 257,
    "258-bytes-of-2-byte-chars": "\u00e9" * 129,
    "newline": "a\nb",
    "nul": "a\x00",
    "tab": "\t",
    "del": "a\x7f",
    "c1-control": "a\u0085",
}


@pytest.mark.parametrize("name", list(BAD_TOPICS))
@pytest.mark.parametrize("op", ["subscribe", "unsubscribe", "publish"])
def test_bad_topic(gw, name, op):
    async def body():
        async with Client(gw) as c:
            bad = BAD_TOPICS[name]
            assert_error(await c.request({"op": op, "topic": bad, "data": 1}), "bad_topic")
            assert_error(await c.request({"op": op, "topic": bad, "data": 1, "ref": {"r": 1}}), "bad_topic",
                         ref={"r": 1})
            await still_usable(c, gw)

    arun(body())


def test_topic_limit_is_configurable(gateway):
    gw = gateway(max_topic_bytes=8)

    async def body():
        async with Client(gw) as c:
            await c.subscribe("12345678")
            assert_error(await c.request({"op": "subscribe", "topic": "123456789"}), "bad_topic")
        r = gw.http("POST", "/v1/publish", json.dumps({"topic": "123456789", "data": 1}))
        assert r.status == 400 and r.json()["error"] == "bad_topic", r

    arun(body())


def test_too_many_subscriptions(gw):
    async def body():
        async with Client(gw) as c:
            topics = [topic("lim") for _ in range(MAX_SUBS)]
            for t in topics:
                await c.subscribe(t)
            extra = topic("over")
            assert_error(await c.request({"op": "subscribe", "topic": extra}), "too_many_subscriptions")
            assert_error(await c.request({"op": "subscribe", "topic": extra, "ref": 3}), "too_many_subscriptions",
                         ref=3)
            # Re-subscribing to a held topic is not a new subscription.
            await c.subscribe(topics[0])
            # The refused topic delivers nothing; the held ones still do.
            gw.publish(extra, "no")
            mid = gw.publish(topics[1], "yes")
            assert (await c.recv())["id"] == mid
            # Freeing a slot makes room.
            await c.unsubscribe(topics[2])
            await c.subscribe(extra)
            mid = gw.publish(extra, "now")
            assert (await c.recv())["id"] == mid

    arun(body())


def test_error_for_wrongly_typed_field_echoes_ref(gw):
    """The op carried a readable `ref`: its error reply echoes it like every other reply."""
    async def body():
        async with Client(gw) as c:
            reply = await c.request('{"op":"subscribe","topic":5,"ref":"typed"}')
            assert reply.get("type") == "error" and reply.get("ref") == "typed", reply

    arun(body())


def test_error_frames_are_counted(gw):
    async def body():
        async with Client(gw) as c:
            before = gw.metric("ringway_error_frames_total")
            for msg in ["nope", {"op": "x"}, {"op": "subscribe"}]:
                assert (await c.request(msg))["type"] == "error"
            wait_until(lambda: gw.metric("ringway_error_frames_total") >= before + 3, 3, what="error frame count")

    arun(body())


def test_many_errors_in_a_row_keep_the_connection(gw):
    async def body():
        async with Client(gw) as c:
            for i in range(200):
                await c.send({"op": "nope", "ref": i})
            for i in range(200):
                assert_error(await c.recv(), "unknown_op", ref=i)
            await still_usable(c, gw)

    arun(body())


# === close codes ===


def bystander(gw):
    """Subscribes a second, well-behaved client; returns (client, topic)."""
    return Client(gw), topic("bystander")


async def check_bystander(by: Client, t: str, gw) -> None:
    mid = gw.publish(t, "still here")
    assert await by.recv() == {"type": "message", "topic": t, "id": mid, "epoch": gw.epoch, "data": "still here"}


def test_binary_frame_closes_1003(gw):
    async def body():
        by, t = bystander(gw)
        async with by, Client(gw) as bad:
            await by.subscribe(t)
            before = gw.metric("ringway_closes_total", reason="protocol_error")
            await bad.send(b"\x00\x01binary")
            assert await bad.closed_with() == 1003
            await check_bystander(by, t, gw)
            wait_until(lambda: gw.metric("ringway_closes_total", reason="protocol_error") > before, 5,
                       what="protocol_error close count")

    arun(body())


def test_message_over_limit_closes_1009(gw):
    async def body():
        by, t = bystander(gw)
        async with by, Client(gw) as bad:
            await by.subscribe(t)
            await bad.send(json.dumps({"op": "subscribe", "topic": "x", "pad": "x" * MAX_MESSAGE}))
            assert await bad.closed_with() == 1009
            await check_bystander(by, t, gw)

    arun(body())


def test_message_at_limit_is_accepted(gw):
    async def body():
        async with Client(gw) as c:
            t = topic("fit")
            head = json.dumps({"op": "subscribe", "topic": t, "pad": ""})
            msg = head[:-2] + "x" * (MAX_MESSAGE - len(head)) + '"}'
            assert len(msg.encode()) == MAX_MESSAGE
            assert await c.request(msg) == {"type": "subscribed", "topic": t}

    arun(body())


def raw_bad(gw, frames: bytes, code: int | tuple) -> None:
    """Sends `frames` on a raw connection; expects a close with `code` then TCP close;
    a bystander subscriber is unaffected."""
    async def body():
        by, t = bystander(gw)
        async with by:
            await by.subscribe(t)
            r = gw.raw()
            welcome = r.recv_json()
            assert welcome["type"] == "welcome"
            before = gw.metric("ringway_closes_total", reason="protocol_error")
            r.send(frames)
            close = r.recv_close()
            codes = code if isinstance(code, tuple) else (code,)
            assert close.close_code in codes, (close, close.payload)
            reason = close.payload[2:]
            reason.decode("utf-8")  # the reason is valid UTF-8
            assert r.at_eof(5), "gateway did not close the TCP connection after its close frame"
            r.close()
            await check_bystander(by, t, gw)
            wait_until(lambda: gw.metric("ringway_closes_total", reason="protocol_error") > before, 5,
                       what="protocol_error close count")

    arun(body())


def test_invalid_utf8_text_closes_1007(gw):
    raw_bad(gw, encode_frame(0x1, b'{"op":"subscribe","topic":"\xff\xfe"}'), 1007)


def test_invalid_utf8_across_fragments_closes_1007(gw):
    frames = encode_frame(0x1, b'{"op":"sub', fin=False) + encode_frame(0x0, b"\xc0\xaf", fin=False) \
        + encode_frame(0x0, b'"}', fin=True)
    raw_bad(gw, frames, 1007)


def test_truncated_utf8_at_message_end_closes_1007(gw):
    raw_bad(gw, encode_frame(0x1, b'"\xe2\x82', fin=False) + encode_frame(0x0, b"", fin=True), 1007)


def test_unmasked_frame_closes_1002(gw):
    raw_bad(gw, encode_frame(0x1, b'{"op":"subscribe","topic":"a"}', masked=False), 1002)


def test_fragments_over_limit_close_1009(gw):
    half = b"x" * (MAX_MESSAGE // 2 + 1)
    raw_bad(gw, encode_frame(0x1, half, fin=False) + encode_frame(0x0, half, fin=True), 1009)


def test_a_continuation_length_that_would_wrap_the_message_size_closes_1009(gw):
    # Found by the `frames` fuzz target: a fragment, then a continuation declaring
    # 2^64 - 2 bytes, wrapped the message's running size and brought the shard down.
    head = bytes([0x80, 0x80 | 127]) + struct.pack("!Q", (1 << 64) - 2) + b"\x01\x02\x03\x04"
    raw_bad(gw, encode_frame(0x1, b'{"op":', fin=False) + head + b"\0" * 8, 1009)


def test_huge_declared_length_closes_1009(gw):
    head = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 1 << 40) + b"\x01\x02\x03\x04"
    raw_bad(gw, head + b"abc", 1009)


PROTOCOL_ERRORS = {
    "reserved-opcode": encode_frame(0x3, b"x"),
    "reserved-control-opcode": encode_frame(0xB, b"x"),
    "rsv1-without-extension": encode_frame(0x1, b"{}", rsv=4),
    "continuation-without-start": encode_frame(0x0, b"x"),
    "text-inside-fragmented-text": encode_frame(0x1, b"a", fin=False) + encode_frame(0x1, b"b"),
    "ping-over-125-bytes": encode_frame(0x9, b"p" * 126),
    "fragmented-ping": encode_frame(0x9, b"p", fin=False),
    "close-with-1-byte-payload": encode_frame(0x8, b"\x03"),
    "close-with-code-1005": encode_frame(0x8, struct.pack("!H", 1005)),
    "close-with-code-999": encode_frame(0x8, struct.pack("!H", 999)),
}


@pytest.mark.parametrize("case", list(PROTOCOL_ERRORS))
def test_framing_violation_closes_1002(gw, case):
    raw_bad(gw, PROTOCOL_ERRORS[case], 1002)


def test_close_reason_with_invalid_utf8_closes_1007(gw):
    raw_bad(gw, encode_frame(0x8, struct.pack("!H", 1000) + b"\xff"), 1007)


def test_valid_fragmented_message_with_interleaved_ping(gw):
    r = gw.raw()
    assert r.recv_json()["type"] == "welcome"
    t = topic("frag")
    text = json.dumps({"op": "subscribe", "topic": t}).encode()
    r.send(encode_frame(0x1, text[:5], fin=False) + encode_frame(0x9, b"mid")
           + encode_frame(0x0, text[5:12], fin=False) + encode_frame(0x0, text[12:], fin=True))
    pong = r.recv_frame()
    assert (pong.opcode, pong.payload) == (0xA, b"mid"), pong
    assert r.recv_json() == {"type": "subscribed", "topic": t}
    r.close()


def test_request_split_across_tcp_writes(gw):
    """A frame that arrives a byte at a time is still one message."""
    r = gw.raw()
    assert r.recv_json()["type"] == "welcome"
    t = topic("trickle")
    frame = encode_frame(0x1, json.dumps({"op": "subscribe", "topic": t}).encode())
    for i in range(len(frame)):
        r.send(frame[i:i + 1])
        time.sleep(0.002)
    assert r.recv_json() == {"type": "subscribed", "topic": t}
    r.close()


def test_abrupt_disconnect_mid_frame_does_not_affect_others(gw):
    async def body():
        by, t = bystander(gw)
        async with by:
            await by.subscribe(t)
            for _ in range(5):
                r = gw.raw()
                r.recv_json()
                r.send(encode_frame(0x1, b"x" * 500)[:100])  # half a frame, then gone
                r.close()
            await check_bystander(by, t, gw)

    arun(body())


# === limits at their defaults, and input that is large or deep ===


@pytest.fixture(scope="module")
def gw_defaults(module_gateway):
    return module_gateway(shards=2)


def test_default_message_limit_is_64_kib(gw_defaults):
    gw = gw_defaults

    async def body():
        async with Client(gw) as c:
            head = json.dumps({"op": "subscribe", "topic": "big", "pad": ""})
            fits = head[:-2] + "x" * (65536 - len(head)) + '"}'
            assert await c.request(fits) == {"type": "subscribed", "topic": "big"}
            await c.send(fits[:-2] + 'x"}')  # 65537 bytes
            assert await c.closed_with() == 1009

    arun(body())


def test_deeply_nested_json_does_not_crash(gw_defaults):
    """Nesting far deeper than any parser's recursion: an error frame or the normal reply,
    and the gateway and connection carry on."""
    gw = gw_defaults
    depth = 20000

    async def body():
        async with Client(gw) as c:
            await c.send('{"op":"publish","topic":"deep","data":' + "[" * depth + "]" * depth + "}")
            raw = await c.recv_raw()
            assert raw.startswith('{"type":"error","code":"bad_json"') or raw.startswith('{"type":"published"') \
                or raw.startswith('{"type":"error","code":"publish_forbidden"'), raw[:200]
            await c.send('{"op":"subscribe","topic":"deep","ref":' + '{"a":' * 10000 + "1" + "}" * 10000 + "}")
            raw = await c.recv_raw()
            assert raw.startswith('{"type":"error","code":"bad_json"') or raw.startswith('{"type":"subscribed"'), \
                raw[:200]
            await still_usable(c, gw)
        r = gw.http("POST", "/v1/publish", '{"topic":"deep","data":' + "[" * depth + "]" * depth + "}")
        assert r.status in (200, 400), r

    arun(body())


def test_admin_publish_with_invalid_utf8_is_400(gw_defaults):
    r = gw_defaults.http("POST", "/v1/publish", b'{"topic":"t","data":"\xff\xfe"}')
    assert r.status == 400 and r.json()["error"] == "bad_json", r


def test_many_requests_in_one_write(gw_defaults):
    """2000 frames in one TCP write: every one is answered, in order."""
    r = gw_defaults.raw()
    assert r.recv_json()["type"] == "welcome"
    n = 2000
    r.send(b"".join(encode_frame(0x1, json.dumps({"op": "unsubscribe", "topic": "p", "ref": i}).encode())
                    for i in range(n)))
    for i in range(n):
        assert r.recv_json() == {"type": "unsubscribed", "topic": "p", "ref": i}
    r.close()
