"""Acknowledged direct messages through Redis: a direct message is kept in the user's
inbox stream until a connection of the user acknowledges it, and every new connection
of the user, on any node, gets what waits, in order and with the same ids: also after
the node it was on is killed. Real nodes, a real redis-server, the `websockets` client.
"""

from __future__ import annotations

import asyncio
import json
import threading

from cluster import SECRET, auth_headers, cluster_opts, token
from harness import Client, arun, http_request, id_key, wait_until


def nodes(gateway, r, n: int = 2, **opts):
    return [gateway(**cluster_opts(r, i, **opts), env={"RINGWAY_JWT_SECRET": SECRET})
            for i in range(1, n + 1)]


def as_user(user: str) -> dict:
    return {"additional_headers": auth_headers(token(user))}


def send(gw, user: str, data) -> dict:
    r = gw.http("POST", "/v1/send", json.dumps({"user": user, "data": data}),
                {"Content-Type": "application/json"})
    assert r.status == 200, (r.status, r.body)
    return r.json()


def online(r, user: str) -> bool:
    return bool(r.client().zrange(f"ringway:user:{user}", 0, -1))


def test_unacknowledged_messages_follow_the_user_to_any_node_until_acknowledged(redis_server, gateway):
    n1, n2 = nodes(gateway, redis_server)
    sent = [send(n1, "ann", {"n": i}) for i in range(3)]
    assert all(s["stored"] and s["online"] == 0 for s in sent), sent
    ids = [s["id"] for s in sent]
    assert [e[0] for e in redis_server.client().xrange("ringway:inbox:ann")] == ids

    async def body():
        async with Client(n2, **as_user("ann")) as c:
            got = [await c.recv() for _ in ids]
            assert [(g["user"], g["id"], g["data"]) for g in got] == \
                [("ann", i, {"n": n}) for n, i in enumerate(ids)]
            assert await c.request({"op": "ack", "id": ids[1], "ref": "a"}) == \
                {"type": "acked", "id": ids[1], "removed": 2, "ref": "a"}
        async with Client(n1, **as_user("ann")) as c:
            assert (await c.recv())["id"] == ids[2]
            await c.silent()
            # Sent while connected: live, and kept until acknowledged too.
            wait_until(lambda: online(redis_server, "ann"), 5, what="ann's presence")
            live = send(n2, "ann", "live")
            assert (live["online"], live["connections"], live["stored"]) == (1, 1, True)
            assert (await c.recv())["id"] == live["id"]
            await c.send({"op": "ack", "id": live["id"]})
            await c.silent()
        async with Client(n2, **as_user("ann")) as c:
            await c.silent()

    arun(body())
    assert n2.metric("ringway_direct_given_again_total") >= 3


def test_unacknowledged_messages_come_again_after_the_node_is_killed(redis_server, gateway):
    n1, n2 = nodes(gateway, redis_server)

    async def body():
        async with Client(n1, **as_user("bob")) as c:
            wait_until(lambda: online(redis_server, "bob"), 5, what="bob's presence")
            ids = [send(n2, "bob", i)["id"] for i in range(3)]
            assert [(await c.recv())["id"] for _ in ids] == ids
            n1._kill()
            n1.stopped = True
        # Nobody removed its presence entry, but its heartbeat stops: within 5 s a send
        # says bob has no live connection (and keeps the message).
        rc = redis_server.client()
        wait_until(lambda: rc.exists("ringway:node:node1") == 0, 8, what="node1's heartbeat to expire")
        away = send(n2, "bob", "away")
        assert (away["online"], away["connections"], away["stored"]) == (0, 0, True), away
        ids.append(away["id"])
        async with Client(n2, **as_user("bob")) as c:
            again = [await c.recv() for _ in ids]
            assert [(g["id"], g["data"]) for g in again] == list(zip(ids, [0, 1, 2, "away"]))
            after = send(n2, "bob", "after")
            assert (await c.recv())["id"] == after["id"]

    arun(body())


def test_reconnects_racing_with_a_flat_out_sender_lose_nothing(redis_server, gateway):
    """A user reconnects again and again, alternating nodes and acknowledging what it
    handled, while a service sends to it as fast as it can. Every send answered 200 is
    handled once by the client's rule (drop ids at or below the last handled), and no
    new id ever arrives out of order."""
    n1, n2 = nodes(gateway, redis_server, direct_inbox_size=10000)
    accepted: list[str] = []
    stop = threading.Event()

    def sender():
        while not stop.is_set():
            r = http_request(n1.admin_port, "POST", "/v1/send",
                             json.dumps({"user": "cat", "data": len(accepted)}))
            assert r.status == 200, r.body
            accepted.append(r.json()["id"])

    async def body():
        handled: list[str] = []
        th = threading.Thread(target=sender)
        th.start()
        try:
            for round_ in range(10):
                async with Client(n1 if round_ % 2 else n2, **as_user("cat")) as c:
                    # 30 new ones a connection. The ack is not waited for, so the next
                    # connection may be given some of these again (at least once).
                    target = len(handled) + 30
                    while len(handled) < target:
                        m = await c.recv(timeout=10)
                        if handled and id_key(m["id"]) <= id_key(handled[-1]):
                            continue  # given again: already handled
                        handled.append(m["id"])
                    await c.send({"op": "ack", "id": handled[-1]})
        finally:
            stop.set()
            await asyncio.to_thread(th.join)
        # Everything sent, from the first, up to the last handled id was handled once,
        # in order: the first connection found it all in the inbox.
        assert len(handled) == 300
        assert handled == accepted[:len(handled)], "a message was skipped or reordered"

    arun(body(), timeout=90)


def test_an_ack_from_an_anonymous_connection_is_a_bad_request_and_stored_follows_the_setting(
        redis_server, gateway):
    (n1,) = nodes(gateway, redis_server, n=1, allow_anonymous=True, direct_inbox_size=0)

    async def body():
        async with Client(n1) as anon:
            err = await anon.request({"op": "ack", "id": "1-0", "ref": 1})
            assert (err["type"], err["code"], err["ref"]) == ("error", "bad_request", 1)
        async with Client(n1, **as_user("dan")) as c:
            wait_until(lambda: online(redis_server, "dan"), 5, what="dan's presence")
            s = send(n1, "dan", 1)
            assert not s["stored"] and s["online"] == 1
            assert (await c.recv())["id"] == s["id"]
        assert redis_server.client().exists("ringway:inbox:dan") == 0

    arun(body())


def test_a_connected_user_gets_what_was_sent_while_its_shard_lost_redis(redis_server, gateway):
    """Redis drops the pub/sub connections while a service sends to a connected user:
    the user's shard reads the inbox again when it is back, so every send answered 200
    reaches the user (at least once; new ids in order), within the inbox's bound."""
    n1, n2 = nodes(gateway, redis_server, direct_inbox_size=10000)
    rc = redis_server.client()
    accepted: list[str] = []
    stop = threading.Event()

    def sender():
        while not stop.is_set():
            r = http_request(n2.admin_port, "POST", "/v1/send",
                             json.dumps({"user": "eve", "data": len(accepted)}))
            assert r.status == 200, r.body
            accepted.append(r.json()["id"])

    async def body():
        async with Client(n1, **as_user("eve")) as c:
            wait_until(lambda: online(redis_server, "eve"), 5, what="eve's presence")
            handled: list[str] = []
            th = threading.Thread(target=sender)
            th.start()
            try:
                for _ in range(3):
                    await asyncio.sleep(0.3)
                    assert rc.client_kill_filter(_type="pubsub") >= 2
            finally:
                stop.set()
                await asyncio.to_thread(th.join)
            while not handled or handled[-1] != accepted[-1]:
                m = await c.recv(timeout=10)
                if handled and id_key(m["id"]) <= id_key(handled[-1]):
                    continue
                handled.append(m["id"])
            assert handled == accepted, "a send was skipped or came out of order"

    arun(body(), timeout=60)
