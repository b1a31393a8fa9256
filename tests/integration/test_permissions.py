"""Topic permissions: `[[namespace]]` sections matched by topic prefix, and the grants a
token carries (`topics`, `publish`, `subscribe`). A refused subscribe or publish is an
error frame (`forbidden`) on a connection that stays open and keeps its subscriptions;
other clients are not disturbed."""

from __future__ import annotations

import signal

import jwt
import pytest

from cluster import SECRET, auth_headers, token
from harness import Client, arun, raw_http, status_of, upgrade_request, wait_until

NAMESPACES = """
client_publish = false

[[namespace]]
prefix = "chat:"
anonymous = false
client_publish = true

[[namespace]]
prefix = "vip:"
users = false
"""


def permissions_gateway(gateway, tmp_path, text: str = NAMESPACES, **opts):
    path = tmp_path / "ringway.toml"
    path.write_text(text)
    gw = gateway(config=str(path), allow_anonymous=True, env={"RINGWAY_JWT_SECRET": SECRET}, **opts)
    return gw, path


def as_user(gw, user: str, **claims) -> Client:
    return Client(gw, additional_headers=auth_headers(token(user, **claims)))


async def refused(c: Client, msg: dict) -> dict:
    reply = await c.request({**msg, "ref": "r"})
    assert reply["type"] == "error", reply
    assert reply["ref"] == "r", reply
    return reply


def test_namespaces_decide_without_a_grant(gateway, tmp_path):
    gw, _ = permissions_gateway(gateway, tmp_path)

    async def body():
        async with Client(gw) as anon, as_user(gw, "alice") as alice:
            # Outside every namespace the default lets anyone subscribe.
            await anon.subscribe("news")
            # `chat:` is closed to anonymous clients, open to identified ones.
            assert (await refused(anon, {"op": "subscribe", "topic": "chat:1"}))["code"] == "forbidden"
            await alice.subscribe("chat:1")
            # `vip:` is grant-only.
            assert (await refused(alice, {"op": "subscribe", "topic": "vip:1"}))["code"] == "forbidden"
            # Publishing: on in `chat:` for anyone, off elsewhere (as before namespaces).
            assert (await refused(alice, {"op": "publish", "topic": "news", "data": 1}))["code"] == "publish_forbidden"
            await anon.send({"op": "publish", "topic": "chat:1", "data": "from anon"})
            assert (await alice.recv())["data"] == "from anon"
            # Both connections carry on: the refused client still gets its topics.
            gw.publish("news", 2)
            assert (await anon.recv())["data"] == 2
            gw.publish("chat:1", 3)
            assert (await alice.recv())["data"] == 3
            await anon.silent()

    arun(body())


def test_token_grants_open_topics_and_publishing(gateway, tmp_path):
    gw, _ = permissions_gateway(gateway, tmp_path)

    async def body():
        grants = {"topics": ["vip:1", "vip:team*"], "publish": ["news"]}
        async with as_user(gw, "bob", **grants) as bob, Client(gw) as reader:
            await bob.subscribe("vip:1")
            await bob.subscribe("vip:team-a")
            assert (await refused(bob, {"op": "subscribe", "topic": "vip:2"}))["code"] == "forbidden"
            assert (await refused(bob, {"op": "subscribe", "topic": "vip:tea"}))["code"] == "forbidden"
            # `publish` grants what client_publish = false refuses.
            await reader.subscribe("news")
            reply = await bob.request({"op": "publish", "topic": "news", "data": "granted", "ref": 1})
            assert reply["type"] == "published", reply
            assert (await reader.recv())["data"] == "granted"
            assert (await refused(bob, {"op": "publish", "topic": "vip:1", "data": 1}))["code"] == "forbidden"
            gw.publish("vip:team-a", 4)
            assert (await bob.recv())["data"] == 4

    arun(body())


def test_server_side_subscriptions_are_joined_at_connect(gateway, tmp_path):
    gw, _ = permissions_gateway(gateway, tmp_path)

    async def body():
        # `subscribe` joins even a grant-only topic: the token is the grant.
        async with as_user(gw, "carol", subscribe=["room:1", "vip:lobby"]) as carol:
            assert await carol.recv() == {"type": "subscribed", "topic": "room:1"}
            assert await carol.recv() == {"type": "subscribed", "topic": "vip:lobby"}
            gw.publish("vip:lobby", "hello")
            msg = await carol.recv()
            assert (msg["topic"], msg["data"]) == ("vip:lobby", "hello")
            await carol.silent()

    arun(body())


@pytest.mark.parametrize("claims", [
    {"topics": "chat:1"},
    {"topics": ["a*b"]},
    {"publish": ["**"]},
    {"subscribe": ["feed:*"]},
    {"subscribe": [""]},
])
def test_a_token_with_a_malformed_grant_is_refused(gateway, tmp_path, claims):
    gw, _ = permissions_gateway(gateway, tmp_path)
    req, _ = upgrade_request("/ws")
    tok = jwt.encode({"sub": "x", "exp": 2**31, **claims}, SECRET, algorithm="HS256")
    resp = raw_http(gw.port, req[:-2] + f"Authorization: Bearer {tok}\r\n\r\n".encode())
    assert status_of(resp) == 401, resp
    assert b"claims" in resp


def test_sighup_takes_new_namespaces(gateway, tmp_path):
    gw, path = permissions_gateway(gateway, tmp_path, shards=1)

    async def vip(expect: str) -> bool:
        async with as_user(gw, "alice") as alice:
            reply = await alice.request({"op": "subscribe", "topic": "vip:1"})
            return reply["type"] == expect

    assert arun(vip("error"))
    path.write_text(NAMESPACES.replace("users = false", "users = true"))
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in gw.stderr(), 5, what="the reload log line")
    assert "namespace" in gw.stderr()
    wait_until(lambda: arun(vip("subscribed")), 10, interval=0.2, what="the new namespace on the shard")
