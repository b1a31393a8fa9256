"""Acknowledged direct messages on a single node (no Redis): a direct message is kept
for its user until a connection of the user acknowledges it (`{"op":"ack","id":…}`,
cumulative), and every new connection of the user is given what waits, in order, with
the same ids, right after its welcome. Nothing a send was answered 200 for is lost
across reconnects; duplicates carry the same id.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading

from cluster import SECRET, auth_headers, token
from harness import Client, arun, id_key

_users = itertools.count()


def user() -> str:
    return f"u{next(_users)}"


def ack_gateway(gateway, **opts):
    return gateway(env={"RINGWAY_JWT_SECRET": SECRET}, allow_anonymous=True, **opts)


def send(gw, who: str, data) -> dict:
    res = gw.http("POST", "/v1/send", json.dumps({"user": who, "data": data}),
                  {"Content-Type": "application/json"})
    assert res.status == 200, (res.status, res.body)
    return res.json()


def as_user(gw, who: str) -> Client:
    return Client(gw, additional_headers=auth_headers(token(who)))


def test_what_was_sent_while_away_is_given_at_connect_until_acknowledged(gateway):
    gw = ack_gateway(gateway)
    alice = user()

    async def body():
        sent = [send(gw, alice, {"n": i}) for i in range(3)]
        assert all(s["online"] == 0 and s["stored"] is True and s["connections"] == 0 for s in sent)
        ids = [s["id"] for s in sent]
        async with as_user(gw, alice) as c:
            got = [await c.recv() for _ in ids]
            assert got == [{"type": "message", "user": alice, "id": i, "data": {"n": n}}
                           for n, i in enumerate(ids)]
            await c.silent()
            # Acknowledge the first two (cumulative), with a ref to see the answer.
            assert await c.request({"op": "ack", "id": ids[1], "ref": 1}) == \
                {"type": "acked", "id": ids[1], "removed": 2, "ref": 1}
        async with as_user(gw, alice) as c:
            assert (await c.recv())["id"] == ids[2]
            await c.silent()
            await c.send({"op": "ack", "id": ids[2]})
            await asyncio.sleep(0.1)
        async with as_user(gw, alice) as c:
            await c.silent()
        assert gw.metric("ringway_direct_acked_total") == 3
        assert gw.metric("ringway_direct_given_again_total") == 4

    arun(body())


def test_a_live_message_not_acknowledged_comes_again_on_every_connection_of_the_user(gateway):
    gw = ack_gateway(gateway, shards=2)
    bob = user()

    async def body():
        async with as_user(gw, bob) as a, as_user(gw, bob) as b:
            s = send(gw, bob, "hi")
            assert (s["online"], s["connections"], s["stored"]) == (1, 2, True)
            assert (await a.recv())["id"] == s["id"]
            assert (await b.recv())["id"] == s["id"]
        # Nobody acknowledged: the next connection gets it again, same id.
        async with as_user(gw, bob) as c:
            assert (await c.recv())["id"] == s["id"]
            # And a message sent now goes to it once, after what was given again.
            t = send(gw, bob, "again")
            assert (await c.recv())["id"] == t["id"]
            await c.silent()

    arun(body())


def test_a_full_user_inbox_drops_the_oldest_and_counts_it(gateway):
    gw = ack_gateway(gateway, direct_inbox_size=3)
    carol = user()

    async def body():
        ids = [send(gw, carol, i)["id"] for i in range(5)]
        async with as_user(gw, carol) as c:
            assert [(await c.recv())["id"] for _ in range(3)] == ids[2:]
            await c.silent()
        assert gw.metric("ringway_direct_unacked_dropped_total") == 2

    arun(body())


def test_storing_off_says_so_and_gives_nothing_again(gateway):
    gw = ack_gateway(gateway, direct_inbox_size=0)
    dave = user()

    async def body():
        assert send(gw, dave, 1)["stored"] is False
        async with as_user(gw, dave) as c:
            await c.silent()

    arun(body())


def test_bad_acks_get_an_error_and_the_connection_stays(gateway):
    gw = ack_gateway(gateway)

    async def body():
        async with Client(gw) as anon:
            reply = await anon.request({"op": "ack", "id": "1-1", "ref": "a"})
            assert (reply["type"], reply["code"], reply["ref"]) == ("error", "bad_request", "a")
        async with as_user(gw, user()) as c:
            for bad in [{"op": "ack"}, {"op": "ack", "id": 5}, {"op": "ack", "id": "x-1"}]:
                reply = await c.request({**bad, "ref": 2})
                assert (reply["type"], reply["code"]) == ("error", "bad_request"), reply
            # An ack of nothing is fine.
            assert await c.request({"op": "ack", "id": "1-1", "ref": 3}) == \
                {"type": "acked", "id": "1-1", "removed": 0, "ref": 3}

    arun(body())


def test_reconnects_racing_with_sends_lose_nothing(gateway):
    """A sender runs flat out while the user reconnects again and again, acknowledging
    what it got before each disconnect. Every id the API answered 200 for arrives;
    within one connection, in order and once."""
    gw = ack_gateway(gateway, shards=2, direct_inbox_size=10000)
    erin = user()
    sent: list[str] = []
    stop = threading.Event()

    def sender():
        for i in range(100000):
            if stop.is_set():
                break
            sent.append(send(gw, erin, i)["id"])

    async def body():
        seen: set[str] = set()
        for r in range(8):
            async with as_user(gw, erin) as c:
                got = []
                for _ in range(25):
                    got.append((await c.recv())["id"])
                assert len(set(got)) == len(got), "a message twice on one connection"
                assert [id_key(i) for i in got] == sorted(id_key(i) for i in got)
                seen.update(got)
                await c.request({"op": "ack", "id": got[-1], "ref": r})
        stop.set()
        await asyncio.sleep(0.3)
        # What was sent after the last ack is given to the next connection.
        async with as_user(gw, erin) as c:
            last_acked = max(seen, key=id_key)
            rest = [s for s in sent if id_key(s) > id_key(last_acked)]
            got = [(await c.recv())["id"] for _ in rest]
            assert got == rest
            seen.update(got)
        assert set(sent) <= seen, f"{len(set(sent) - seen)} messages lost"

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        arun(body(), timeout=60)
    finally:
        stop.set()
        thread.join(10)
