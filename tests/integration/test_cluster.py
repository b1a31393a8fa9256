"""Several gateway nodes joined by a real redis-server: a topic reaches subscribers on
every node, a direct message goes to the one shard that holds its user (and follows the
user to another node), presence expires when a node dies, and delivery resumes after
Redis restarts, without restarting ringway."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import threading
import time
from pathlib import Path

import redis

from cluster import SECRET, auth_headers, cluster_opts, token
from harness import (Client, Collector, arun, encode_frame, http_request, open_on_every_shard, run_cli, shard_of,
                     wait_until)


def start_cluster(gateway, r, n: int = 3, **opts):
    """`n` nodes on Redis `r`, HS256 tokens (anonymous clients allowed unless told)."""
    opts.setdefault("allow_anonymous", True)
    return [gateway(**cluster_opts(r, i, **opts), env={"RINGWAY_JWT_SECRET": SECRET})
            for i in range(1, n + 1)]


def as_user(user: str) -> dict:
    return {"additional_headers": auth_headers(token(user))}


def presence(r, user: str) -> list[str]:
    return r.client().zrange(f"ringway:user:{user}", 0, -1)


def wait_presence(r, user: str, node: str | None = None) -> list[str]:
    """Waits until `user` is registered (on `node`, if given)."""
    return wait_until(lambda: [m for m in presence(r, user) if node is None or m.startswith(node + "/")],
                      5, what=f"presence of {user}")


def send(gw, body: dict) -> dict:
    res = gw.http("POST", "/v1/send", json.dumps(body), {"Content-Type": "application/json"})
    assert res.status == 200, (res.status, res.body)
    return res.json()


def direct_received(gw, **labels) -> float:
    return gw.metric("ringway_direct_received_total", **labels)


def paused_until(gw, pred, timeout: float, what: str) -> None:
    """Stops node `gw` (SIGSTOP) until `pred` holds, then lets it run again."""
    gw.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(pred, timeout, interval=0.1, what=what)
    finally:
        gw.proc.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def watched(r, *words: str):
    """Every command Redis `r` runs while the block runs (MONITOR) that names one of
    `words`, in the order Redis ran them, as (time, client address, command)."""
    seen: list[tuple[float, str, str]] = []
    stop = threading.Event()
    watching = threading.Event()

    def watch():
        try:
            with r.client().monitor() as m:
                watching.set()
                while not stop.is_set():  # heartbeats come every second
                    c = m.next_command()
                    if any(w in c["command"] for w in words):
                        seen.append((c["time"], f"{c['client_address']}:{c['client_port']}", c["command"]))
        except redis.RedisError:
            pass  # Redis stopped with the test

    threading.Thread(target=watch, daemon=True).start()
    assert watching.wait(5), "MONITOR did not start"
    try:
        yield seen
    finally:
        stop.set()


def registrations(r):
    """Every `presence_set` call Redis `r` runs while the block runs, as (time, client,
    command)."""
    return watched(r, "presence_set")


def test_a_topic_published_on_one_node_reaches_subscribers_on_the_others(redis_server, gateway):
    n1, n2, n3 = start_cluster(gateway, redis_server, client_publish=True)
    rc = redis_server.client()

    async def body():
        async with Client(n1) as a, Client(n2) as b, Client(n3) as c:
            await a.subscribe("news")
            await b.subscribe("news")
            # Through the admin API of node 3.
            mid = n3.publish("news", {"n": 1})
            # Kept in the topic's stream: the id is the stream's, the epoch the topic's.
            epoch = rc.get("ringway:epoch:news")
            assert [e[0] for e in rc.xrange("ringway:history:news")] == [mid]
            for sub in (a, b):
                assert await sub.recv() == {"type": "message", "topic": "news", "id": mid,
                                            "epoch": epoch, "data": {"n": 1}}
            # A client of node 3 publishes.
            await c.send({"op": "publish", "topic": "news", "data": "hi", "ref": "r1"})
            ack = await c.recv()
            assert ack["type"] == "published" and ack["ref"] == "r1", ack
            for sub in (a, b):
                m = await sub.recv()
                assert (m["id"], m["data"]) == (ack["id"], "hi")
            # A service publishes with one Redis command; Redis sends it to the two
            # shards that have subscribers, not to every shard.
            assert rc.publish("ringway:topic:news", json.dumps({"id": "5-5", "data": [1, 2]})) == 2
            for sub in (a, b):
                assert await sub.recv() == {"type": "message", "topic": "news", "id": "5-5", "data": [1, 2]}
            # ... or through the function, which adds an id.
            fid, receivers = rc.fcall("ringway_publish", 1, "ringway:topic:news", "", json.dumps({"k": True}))
            assert receivers == 2
            for sub in (a, b):
                m = await sub.recv()
                assert (m["id"], m["data"]) == (fid, {"k": True})
            await c.silent()

    arun(body())


def test_a_message_published_right_after_subscribed_is_never_missed(redis_server, gateway):
    n1, n2 = start_cluster(gateway, redis_server, n=2)

    async def body():
        async with Client(n1) as a:
            for i in range(30):
                await a.subscribe(f"t{i}")
                n2.publish(f"t{i}", i)
                m = await a.recv()
                assert (m["topic"], m["data"]) == (f"t{i}", i)

    arun(body())


def test_a_shard_holds_one_redis_subscription_per_topic_while_it_has_subscribers(redis_server, gateway):
    (n1,) = start_cluster(gateway, redis_server, n=1, shards=1)

    async def body():
        async with Client(n1) as a, Client(n1) as b:
            await a.subscribe("x")
            assert redis_server.numsub("ringway:topic:x") == 1
            await b.subscribe("x")
            assert redis_server.numsub("ringway:topic:x") == 1
            await a.unsubscribe("x")
            await b.subscribe("y")
            assert redis_server.numsub("ringway:topic:x") == 1
            await b.unsubscribe("x")
            wait_until(lambda: redis_server.numsub("ringway:topic:x") == 0, 5, what="UNSUBSCRIBE x")
            assert redis_server.numsub("ringway:topic:y") == 1
        # b closed: its last topic is released too.
        wait_until(lambda: redis_server.numsub("ringway:topic:y") == 0, 5, what="UNSUBSCRIBE y")

    arun(body())


def publish_burst(r, topic: str, n: int, start: int = 0) -> list[str]:
    """Publishes `n` messages (data = their number) into `topic`'s history through
    Redis, pipelined; returns their ids."""
    pipe = r.client().pipeline(transaction=False)
    for i in range(start, start + n):
        pipe.fcall("ringway_publish", 3, f"ringway:topic:{topic}", f"ringway:history:{topic}",
                   f"ringway:epoch:{topic}", "", json.dumps(i), 10_000, 300_000)
    return [reply[0] for reply in pipe.execute()]


async def collect_all(clients, n: int, timeout: float = 20) -> list[list]:
    """What each client receives of `n` messages (their data), in order."""
    collectors = [Collector(c) for c in clients]
    try:
        for col in collectors:
            await col.wait_for(n, timeout)
        return [[m.get("data") for m in col.messages] for col in collectors]
    finally:
        for col in collectors:
            col.stop()


def test_a_node_takes_one_copy_of_a_topic_from_redis_whatever_its_shards(redis_server, gateway):
    n1, n2 = start_cluster(gateway, redis_server, n=2)

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            clients = await open_on_every_shard(stack, n1, 4)
            for c in clients:
                await c.subscribe("hot")
            # Both shards of node 1 have subscribers; Redis holds one subscription.
            assert redis_server.numsub("ringway:topic:hot") == 1
            b = await stack.enter_async_context(Client(n2))
            await b.subscribe("hot")
            assert redis_server.numsub("ringway:topic:hot") == 2
            # One copy per node: a service's PUBLISH reaches 2 receivers, not 3.
            assert redis_server.client().publish("ringway:topic:hot", json.dumps({"id": "1-1", "data": -1})) == 2
            got = await collect_all(clients + [b], 1)
            assert got == [[-1]] * (len(clients) + 1), got
            # Every subscriber on every shard gets every message once, in order.
            publish_burst(redis_server, "hot", 300)
            got = await collect_all(clients + [b], 300)
            assert all(g == list(range(300)) for g in got), [g[:5] + ["…", len(g)] for g in got]
            assert n1.metric("ringway_relayed_total") >= 300
            # The owner shard's own subscribers leave; the sibling's still get it all
            # through the one subscription.
            owner = next(s for s in ("0", "1") if n1.metric("ringway_relayed_total", shard=s) > 0)
            for c in clients:
                if shard_of(c) == owner:
                    await c.unsubscribe("hot")
            rest = [c for c in clients if shard_of(c) != owner]
            assert redis_server.numsub("ringway:topic:hot") == 2
            publish_burst(redis_server, "hot", 50, start=300)
            got = await collect_all(rest, 50)
            assert all(g == list(range(300, 350)) for g in got), got
            for c in rest:
                await c.unsubscribe("hot")
            wait_until(lambda: redis_server.numsub("ringway:topic:hot") == 1, 5, what="node 1's UNSUBSCRIBE")

    arun(body())


def test_a_shard_that_falls_behind_its_topics_owner_catches_up_from_the_stream(redis_server, gateway):
    # Room for one relayed message: a burst from Redis cannot all be handed to the
    # sibling shard, which is told so and reads what it missed from the topic's stream.
    (n1,) = start_cluster(gateway, redis_server, n=1, relay_buffer_bytes=1, history_size=20_000)

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            clients = await open_on_every_shard(stack, n1, 4)
            for c in clients:
                await c.subscribe("flood")
            publish_burst(redis_server, "flood", 5000)
            got = await collect_all(clients, 5000, timeout=30)
            assert all(g == list(range(5000)) for g in got), [(len(g), g[:3]) for g in got]
            assert n1.metric("ringway_relays_lost_total") > 0, "the sibling's inbox never overflowed"
            assert n1.metric("ringway_caught_up_total") > 0
            # Live again afterwards.
            publish_burst(redis_server, "flood", 1, start=5000)
            got = await collect_all(clients, 1)
            assert got == [[5000]] * len(clients), got

    arun(body())


def test_a_burst_of_subscribes_is_batched_into_one_redis_command(redis_server, gateway):
    (n1,) = start_cluster(gateway, redis_server, n=1, shards=1)
    raw = n1.raw()
    raw.recv_json()  # welcome
    before = redis_server.calls("subscribe")
    topics = [f"burst{i}" for i in range(200)]
    raw.send(b"".join(encode_frame(0x1, json.dumps({"op": "subscribe", "topic": t}).encode())
                      for t in topics))
    acks = [raw.recv_json() for _ in topics]
    assert [a["topic"] for a in acks] == topics and {a["type"] for a in acks} == {"subscribed"}
    # 200 client subscribes, one read: one SUBSCRIBE (two if the kernel split the burst).
    assert redis_server.calls("subscribe") - before <= 2
    numsub = dict(redis_server.client().pubsub_numsub(*[f"ringway:topic:{t}" for t in topics]))
    assert set(numsub.values()) == {1}


def test_a_direct_message_reaches_only_the_shard_that_holds_the_user(redis_server, gateway):
    n1, n2, n3 = start_cluster(gateway, redis_server)
    rc = redis_server.client()

    async def body():
        async with Client(n2, **as_user("alice")) as alice, Client(n1, **as_user("bob")) as bob:
            shard = shard_of(alice)
            other = "1" if shard == "0" else "0"
            wait_presence(redis_server, "alice", "node2")
            sent = send(n1, {"user": "alice", "data": {"x": 1}})
            assert (sent["online"], sent["shards"]) == (1, 1)
            assert await alice.recv() == {"type": "message", "user": "alice", "id": sent["id"], "data": {"x": 1}}
            await bob.silent()
            assert direct_received(n2, shard=shard) == 1
            assert direct_received(n2, shard=other) == 0
            assert direct_received(n1) == 0 and direct_received(n3) == 0
            # The command line, through node 3.
            out = run_cli("send", "--admin", n3.admin_addr, "--user", "alice", '{"y":2}')
            assert out.returncode == 0, out.stderr
            m = await alice.recv()
            assert m["data"] == {"y": 2} and out.stdout.startswith(m["id"] + " online=1 shards=1")
            # A service in any language: one Redis call, lookup and publish.
            online, shards, fid, stored, conns = rc.fcall("ringway_send", 1, "ringway:user:alice", "", json.dumps("hey"))
            assert (online, shards, stored, conns) == (1, 1, 0, 1)
            assert await alice.recv() == {"type": "message", "user": "alice", "id": fid, "data": "hey"}
            # Nobody by that name: nothing is published anywhere.
            assert send(n1, {"user": "nobody", "data": 1})["shards"] == 0
            await alice.silent()
            assert direct_received(n2, shard=shard) == 3
            assert direct_received(n2, shard=other) + direct_received(n1) + direct_received(n3) == 0

    arun(body())


def test_one_send_to_many_users_is_one_redis_call(redis_server, gateway):
    nodes = start_cluster(gateway, redis_server)
    users = [f"u{i}" for i in range(12)]

    async def body():
        clients = [await Client(nodes[i % 3], **as_user(u)).__aenter__() for i, u in enumerate(users)]
        try:
            for u in users:
                wait_presence(redis_server, u)
            before = redis_server.calls("fcall")
            sent = send(nodes[0], {"users": users + ["ghost", "u0"], "data": {"all": True}})
            assert redis_server.calls("fcall") - before == 1
            assert sent["online"] == 12 and 3 <= sent["shards"] <= 6, sent
            # Each user once, on its own connection, though "u0" was named twice.
            for user, c in zip(users, clients):
                m = await c.recv()
                assert (m["user"], m["id"], m["data"]) == (user, sent["id"], {"all": True})
            for c in clients:
                await c.silent(0.1)
            received = sum(direct_received(gw) for gw in nodes)
            assert received == sent["shards"], "one Redis message per shard that holds a user"
        finally:
            for c in clients:
                await c.__aexit__(None, None, None)

    arun(body())


def test_direct_messages_follow_a_user_who_reconnects_to_another_node(redis_server, gateway):
    n1, n2 = start_cluster(gateway, redis_server, n=2)

    async def body():
        async with Client(n2, **as_user("carol")) as c:
            wait_presence(redis_server, "carol", "node2")
            sent = send(n1, {"user": "carol", "data": 1})
            assert (await c.recv())["id"] == sent["id"]
            # Acknowledged: not given again at the next connect.
            assert (await c.request({"op": "ack", "id": sent["id"], "ref": 1}))["type"] == "acked"
        # Gone from node 2: its entry is removed at once, not left to expire.
        wait_until(lambda: not presence(redis_server, "carol"), 5, what="presence removal")
        async with Client(n1, **as_user("carol")) as c:
            wait_presence(redis_server, "carol", "node1")
            sent = send(n2, {"user": "carol", "data": 2})
            assert sent["online"] == 1
            m = await c.recv()
            assert (m["user"], m["id"], m["data"]) == ("carol", sent["id"], 2)
        assert direct_received(n2) == 1 and direct_received(n1) == 1

    arun(body())


def test_a_killed_node_holds_nobody_within_five_seconds_and_its_entries_are_reaped(redis_server, gateway):
    n1, n2 = start_cluster(gateway, redis_server, n=2)
    rc = redis_server.client()

    async def body():
        c = await Client(n2, **as_user("dave")).__aenter__()
        wait_presence(redis_server, "dave", "node2")
        assert sorted(n1.http("GET", "/v1/nodes").json()["nodes"]) == ["node1", "node2"]
        n2.proc.kill()
        n2.proc.wait(5)
        n2.stopped = True
        # Nobody is left to remove dave's entry: sends skip it once node 2's heartbeat
        # (5 s) is gone, and node 1 reaps it 5 s after that.
        wait_until(lambda: send(n1, {"user": "dave", "data": 0})["online"] == 0, 7,
                   interval=0.1, what="dave to count as offline")
        wait_until(lambda: rc.exists("ringway:user:dave") == 0, 10, what="dave's entry to be reaped")
        wait_until(lambda: n1.http("GET", "/v1/nodes").json()["nodes"] == ["node1"], 5,
                   what="node2 to leave the registry")
        assert not [k for k in rc.scan_iter("ringway:conns:node2@*")], "the dead process's index is gone"
        await c.ws.close()

    arun(body())


def test_a_node_paused_past_its_heartbeat_registers_its_users_again(redis_server, gateway):
    """A node stopped for longer than its heartbeat lasts (a paused or starved process)
    looks dead: another node reaps its users' entries. When it runs again, its late
    heartbeat tells it so and it registers them again, without losing a connection."""
    n1, n2 = start_cluster(gateway, redis_server, n=2)
    rc = redis_server.client()

    async def body():
        async with Client(n1, **as_user("erin")) as c:
            wait_presence(redis_server, "erin", "node1")
            paused_until(n1, lambda: rc.exists("ringway:user:erin") == 0, 20, "node 2 to reap erin's entry")
            wait_presence(redis_server, "erin", "node1")
            # Its heartbeats say so until the node, having asked its shards, deletes the mark.
            wait_until(lambda: not list(rc.scan_iter("ringway:reaped:*")), 5, what="the reaper's mark to go")
            sent = send(n2, {"user": "erin", "data": "back"})
            assert sent["online"] == 1, sent
            m = await c.recv()
            assert m["data"] == "back", m

    arun(body())


def test_a_redis_that_stalls_for_everyone_gets_no_node_reaped(redis_server, gateway):
    """Redis stalls past the heartbeat's 5 s (CLIENT PAUSE WRITE, as a starved Redis
    looks to its clients): every node's beat is late at once. When Redis runs again it
    serves one node's queued beats before the other's, and a node that reaped then
    would take the other's entries and make it register everything again. Nodes whose
    own beat was late reap nobody, so every entry stays."""
    n1, n2 = start_cluster(gateway, redis_server, n=2)
    rc = redis_server.client()
    users = {n1: [f"left{i}" for i in range(10)], n2: [f"right{i}" for i in range(10)]}

    async def body():
        held = [await Client(gw, **as_user(u)).__aenter__() for gw, us in users.items() for u in us]
        for gw, us in users.items():
            for u in us:
                wait_presence(redis_server, u, gw.opts["node_id"])
        with registrations(redis_server) as registered:
            rc.client_pause(7000, all=False)
            time.sleep(7)
            wait_until(lambda: rc.exists("ringway:node:node1") and rc.exists("ringway:node:node2"), 5,
                       what="both heartbeats back")
            time.sleep(7)  # past the late marks: a reaper would take what is dead by now
        assert not list(rc.scan_iter("ringway:reaped:*")), "a node was reaped"
        assert not registered, f"registered again: {registered[0][2][:200]}"
        for us in users.values():
            for u in us:
                assert len(presence(redis_server, u)) == 1, (u, presence(redis_server, u))
        sent = send(n1, {"user": "right3", "data": "still here"})
        assert sent["online"] == 1, sent
        for c in held:
            await c.ws.close()

    arun(body(), timeout=60)


def test_a_dropped_command_connection_sends_the_same_redis_only_what_changed(redis_server, gateway):
    """Redis drops a node's command connections (CLIENT KILL) three times while users
    come and go. It is the same Redis (same run_id), so the node does not register the
    users it already had again: only what changed goes out, and presence ends exact.
    Registering everyone at each reconnect is what turns a Redis that answers late into
    a reconnect storm."""
    (n1,) = start_cluster(gateway, redis_server, n=1)
    rc = redis_server.client()
    steady = [f"steady{i}" for i in range(100)]

    def kill_command_links() -> None:
        ids = [c["id"] for c in rc.client_list(_type="normal") if c.get("name", "").endswith(":commands")]
        assert len(ids) == 2, rc.client_list(_type="normal")  # one per shard, named by the node
        before = n1.metric("ringway_redis_reconnects_total")
        for i in ids:
            rc.client_kill_filter(_id=i)
        wait_until(lambda: n1.metric("ringway_redis_reconnects_total") >= before + 2
                   and n1.metric("ringway_redis_commands_up") == 2, 10, what="the command links to come back")

    async def body():
        held = [await Client(n1, **as_user(u)).__aenter__() for u in steady]
        leaving = [await Client(n1, **as_user(f"leaving{i}")).__aenter__() for i in range(3)]
        for u in steady + [f"leaving{i}" for i in range(3)]:
            wait_presence(redis_server, u, "node1")
        came = []
        with registrations(redis_server) as registered:
            for i in range(3):
                kill_command_links()
                # Right after the drop, while the node may still be reconnecting.
                came.append(await Client(n1, **as_user(f"new{i}")).__aenter__())
                await leaving[i].ws.close()
            for i in range(3):
                wait_presence(redis_server, f"new{i}", "node1")
                wait_until(lambda: rc.exists(f"ringway:user:leaving{i}") == 0, 5, what=f"leaving{i} removed")
        for u in steady:
            assert len(presence(redis_server, u)) == 1, (u, presence(redis_server, u))
        again = [c for _, _, c in registered if "ringway:user:steady" in c]
        assert not again, f"{len(again)} registrations of users Redis already had, e.g. {again[0][:200]}"
        assert any("ringway:user:new" in c for _, _, c in registered), registered
        sent = send(n1, {"user": "steady7", "data": "still here"})
        assert sent["online"] == 1, sent
        for c in held + came:
            await c.ws.close()

    arun(body())


def test_a_heartbeat_waits_behind_a_few_registrations_only(redis_server, gateway):
    """Users connect while Redis is stalled (CLIENT PAUSE WRITE, as a starved Redis
    looks to its clients). The node writes their registrations a few calls at a time,
    so the heartbeats it writes meanwhile, on the same connection, run right after
    those few. Written all at once, a heartbeat would wait behind every registration;
    with a million users a node looked dead that way, was reaped, and registered
    everyone again, behind which its next heartbeat waited."""
    (n1,) = start_cluster(gateway, redis_server, n=1, shards=1)
    rc = redis_server.client()
    users = [f"crowd{i}" for i in range(400)]

    async def body():
        with watched(redis_server, "node_alive", "presence_set", "paused") as ran:
            wait_until(lambda: any("node_alive" in c for _, _, c in ran), 5, what="a heartbeat")
            rc.echo("paused")  # MONITOR leaves CLIENT PAUSE out: this marks its start
            rc.client_pause(4000, all=False)
            opened = time.monotonic()
            clients = await asyncio.gather(*(Client(n1, **as_user(u)).__aenter__() for u in users))
            took = time.monotonic() - opened
            wait_until(lambda: all(presence(redis_server, u) for u in users), 15, what="every user registered")
        assert took < 2.5, f"connecting took {took:.1f} s: the heartbeat checked came before the crowd"
        start = next(t for t, _, c in ran if "paused" in c)
        link = next(a for _, a, c in ran if "node_alive" in c)
        after = [(t, c) for t, a, c in ran if a == link and t > start]
        # The heartbeats written during the pause ran when it ended; the last of them
        # was written after every user had come.
        ended = after[0][0]
        assert ended > start + 3, after[:3]
        beats = [i for i, (t, c) in enumerate(after) if "node_alive" in c and t < ended + 0.5]
        assert len(beats) >= 3, after
        ahead = [c for _, c in after[:beats[-1]] if "presence_set" in c]
        assert len(ahead) <= 4, f"the heartbeat ran behind {len(ahead)} registration calls"
        calls = [c for _, _, c in ran if "presence_set" in c]
        assert sum(c.count("ringway:user:crowd") for c in calls) == len(users), "each user registered once"
        for c in clients:
            await c.ws.close()

    arun(body())


def test_a_restarted_redis_gets_every_connection_registered_again(redis_server, gateway):
    """A Redis that restarted empty (a new run_id) gets every presence entry again."""
    (n1,) = start_cluster(gateway, redis_server, n=1)

    async def body():
        async with Client(n1, **as_user("kim")) as c:
            wait_presence(redis_server, "kim", "node1")
            redis_server.restart()
            wait_presence(redis_server, "kim", "node1")
            # Counted online once the node's heartbeat is back too (within a second).
            wait_until(lambda: send(n1, {"user": "kim", "data": "after"})["online"] == 1, 5,
                       interval=0.1, what="kim to count as online")
            m = await c.recv()
            assert m["data"] == "after", m

    arun(body())


def test_a_late_heartbeat_that_nobody_reaped_registers_nothing_again(redis_server, gateway):
    """A node paused past its heartbeat with no other node to reap it (a starved
    process, or a Redis too slow to answer in time) still has every entry: it does not
    register them again. Only a reaper's mark makes it do so (the test above)."""
    (n1,) = start_cluster(gateway, redis_server, n=1)
    rc = redis_server.client()
    users = [f"late{i}" for i in range(20)]

    async def body():
        held = [await Client(n1, **as_user(u)).__aenter__() for u in users]
        for u in users:
            wait_presence(redis_server, u, "node1")
        with registrations(redis_server) as registered:
            paused_until(n1, lambda: rc.exists("ringway:node:node1") == 0, 10, "node 1's heartbeat key to expire")
            wait_until(lambda: rc.exists("ringway:node:node1") == 1, 5, what="node 1's heartbeat to come back")
            time.sleep(1.5)  # the late beat's answer, and anything it would have set off
        assert not registered, f"registered again: {registered[0][2][:200]}"
        assert n1.metric("ringway_redis_reconnects_total") == 0
        sent = send(n1, {"user": "late3", "data": "still here"})
        assert sent["online"] == 1, sent
        assert (await held[3].recv())["data"] == "still here"
        for c in held:
            await c.ws.close()

    arun(body())


def test_a_node_restarted_under_the_same_id_does_not_count_its_old_connections(redis_server, gateway):
    """The old process's entries carry its boot: the new process's heartbeat does not
    make them live, and they are reaped."""
    n1, n2 = start_cluster(gateway, redis_server, n=2)
    rc = redis_server.client()

    async def body():
        c = await Client(n2, **as_user("ivy")).__aenter__()
        wait_presence(redis_server, "ivy", "node2")
        n2.proc.kill()
        n2.proc.wait(5)
        n2.stopped = True
        (again,) = [gateway(**cluster_opts(redis_server, 2, allow_anonymous=True),
                            env={"RINGWAY_JWT_SECRET": SECRET})]
        assert "node2" in again.http("GET", "/v1/nodes").json()["nodes"]
        assert send(n1, {"user": "ivy", "data": 0})["online"] == 0
        wait_until(lambda: rc.exists("ringway:user:ivy") == 0, 20, what="the old entry to be reaped")
        async with Client(again, **as_user("ivy")) as back:
            wait_presence(redis_server, "ivy", "node2")
            sent = send(n1, {"user": "ivy", "data": 1})
            assert sent["online"] == 1 and sent["connections"] == 1
            # The message sent while ivy was offline was kept for her, then the new one.
            got = [await back.recv() for _ in range(2)]
            assert [g["data"] for g in got] == [0, 1] and got[1]["id"] == sent["id"]
        await c.ws.close()

    arun(body(), timeout=60)


def test_idle_connections_cost_redis_nothing(redis_server, gateway):
    """Entries are written once at connect: 400 idle identified connections make no
    Redis commands of their own, only each node's heartbeat does."""
    n1, n2 = start_cluster(gateway, redis_server, n=2)
    rc = redis_server.client()
    conns = 400

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            for i in range(conns):
                await stack.enter_async_context(Client((n1, n2)[i % 2], **as_user(f"idle{i}")))
            wait_until(lambda: all(rc.exists(f"ringway:user:idle{i}") for i in (0, conns - 1)), 5,
                       what="registration")
            await asyncio.sleep(1)
            before = rc.info("stats")["total_commands_processed"]
            hset = redis_server.calls("hset")
            await asyncio.sleep(4)
            spent = rc.info("stats")["total_commands_processed"] - before - 2  # the INFOs
            # Registering is HSET; at rest there is none, and everything Redis ran in
            # 4 s (heartbeats, PINGs) is far below one command per connection.
            assert redis_server.calls("hset") == hset
            assert spent < conns / 4, spent

    arun(body(), timeout=60)


def test_a_graceful_stop_removes_presence_and_the_node_at_once(redis_server, gateway):
    n1, n2 = start_cluster(gateway, redis_server, n=2)
    rc = redis_server.client()

    async def body():
        async with Client(n2, **as_user("erin")) as c:
            wait_presence(redis_server, "erin", "node2")
            assert "node2" in rc.zrange("ringway:nodes", 0, -1)
            n2.sigterm()
            assert await c.closed_with(10) == 1001
        assert n2.wait_exit(15) == 0
        n2.stopped = True
        # With a 300 s TTL, only the drain's removals explain these.
        assert rc.exists("ringway:user:erin") == 0
        assert rc.zrange("ringway:nodes", 0, -1) == ["node1"]
        assert rc.exists("ringway:node:node2") == 0
        # Its process's index is handed to the reaper and goes within a second or two.
        wait_until(lambda: not list(rc.scan_iter("ringway:conns:node2@*")), 5, what="node 2's index to go")
        wait_until(lambda: not [m for m in rc.zrange("ringway:incarnations", 0, -1) if m.startswith("node2@")], 5,
                   what="node 2's process to be forgotten")

    arun(body())


class PublishLoop(threading.Thread):
    """Publishes `topic` through `gw`'s admin API every 10 ms; records what was accepted
    (and when) and how many were refused."""

    def __init__(self, gw, topic: str, limit: float = 30):
        super().__init__(daemon=True)
        self.gw, self.topic, self.limit = gw, topic, limit
        self.accepted: list[tuple[float, str]] = []
        self.refused = 0
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        n = 0
        while not self.halt.is_set() and time.monotonic() < deadline:
            n += 1
            try:
                r = http_request(self.gw.admin_port, "POST", "/v1/publish",
                                 json.dumps({"topic": self.topic, "data": n}), timeout=6)
            except OSError:
                self.refused += 1
                continue
            if r.status == 200:
                self.accepted.append((time.monotonic(), r.json()["id"]))
            else:
                assert r.status == 503 and r.json()["error"] == "unavailable", (r.status, r.body)
                self.refused += 1
            time.sleep(0.01)


def test_delivery_resumes_after_redis_restarts_without_restarting_ringway(redis_server, gateway):
    n1, n2 = start_cluster(gateway, redis_server, n=2, client_publish=True)

    async def body():
        async with Client(n1) as sub, Client(n2, **as_user("frank")) as frank, Client(n2) as pub:
            await sub.subscribe("live")
            wait_presence(redis_server, "frank", "node2")
            loop = PublishLoop(n2, "live")
            loop.start()
            got: list[str] = []

            async def collect(until: float) -> None:
                while time.monotonic() < until:
                    try:
                        m = await sub.recv(timeout=max(0.01, until - time.monotonic()))
                    except asyncio.TimeoutError:
                        return
                    if m["type"] == "message":
                        got.append(m["id"])

            await collect(time.monotonic() + 0.5)
            assert got, "nothing delivered before the restart"
            redis_server.kill()
            for gw in (n1, n2):
                wait_until(lambda gw=gw: gw.http("GET", "/readyz").status == 503, 5, what="readyz 503")
            assert b"redis" in n1.http("GET", "/readyz").body
            assert n1.metric("ringway_redis_subscriber_up") == 0
            assert n1.metric("ringway_redis_commands_up") == 0
            # Local connections are still served: a new client is welcomed, a client's
            # publish gets a clear error, and a subscribe waits for Redis.
            async with Client(n1) as late:
                await late.send({"op": "subscribe", "topic": "late", "ref": 7})
                await pub.send({"op": "publish", "topic": "live", "data": 0, "ref": "p"})
                err = await pub.recv()
                assert (err["type"], err["code"], err["ref"]) == ("error", "unavailable", "p")
                # A subscribe still waiting for Redis, then an unsubscribe: both replies,
                # in order.
                async with Client(n1) as fickle:
                    await fickle.send({"op": "subscribe", "topic": "brief"})
                    await fickle.send({"op": "unsubscribe", "topic": "brief"})
                    assert (await fickle.recv())["type"] == "subscribed"
                    assert (await fickle.recv())["type"] == "unsubscribed"
                await collect(time.monotonic() + 0.3)
                redis_server.start()  # the same port, empty
                for gw in (n1, n2):
                    wait_until(lambda gw=gw: gw.http("GET", "/readyz").status == 200, 15,
                               interval=0.05, what="readyz 200 after the restart")
                recovered = time.monotonic()
                assert await late.recv() == {"type": "subscribed", "topic": "late", "ref": 7}
                assert redis_server.numsub("ringway:topic:late") == 1
                await collect(time.monotonic() + 1.0)
                loop.halt.set()
                loop.join(10)
                await collect(time.monotonic() + 1.0)
            # Every message accepted once both nodes were back arrived, once, in order.
            after = [mid for t, mid in loop.accepted if t > recovered]
            assert len(after) > 10, f"too few publishes after recovery: {len(after)}"
            assert set(after) <= set(got), sorted(set(after) - set(got))[:5]
            assert len(got) == len(set(got)), "duplicate deliveries"
            assert got == sorted(got, key=lambda i: tuple(int(p) for p in i.split("-")))
            assert loop.refused > 0, "the outage refused no publish: was Redis really down?"
            # Subscriptions and presence were restored, and nothing leaked.
            assert redis_server.numsub("ringway:topic:live") == 1
            wait_until(lambda: redis_server.numsub("ringway:topic:late") == 0, 5,
                       what="the closed client's topic to be released")
            wait_presence(redis_server, "frank", "node2")
            sent = send(n1, {"user": "frank", "data": "back"})
            assert (await frank.recv())["id"] == sent["id"]
            assert n1.metric("ringway_redis_reconnects_total") >= 2

    arun(body(), timeout=60)


def test_a_redis_that_hangs_is_noticed_and_recovered_from(redis_server, gateway):
    """SIGSTOP leaves Redis's sockets open but answering nothing: only ringway's own
    deadlines (a subscriber PING, a command reply) can tell."""
    (n1,) = start_cluster(gateway, redis_server, n=1)

    async def body():
        async with Client(n1) as sub:
            await sub.subscribe("hung")
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                wait_until(lambda: n1.http("GET", "/readyz").status == 503, 30, interval=0.2,
                           what="readyz 503 while Redis hangs")
                r = http_request(n1.admin_port, "POST", "/v1/publish",
                                 json.dumps({"topic": "hung", "data": 1}), timeout=15)
                assert r.status == 503 and r.json()["error"] == "unavailable", r.body
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            wait_until(lambda: n1.http("GET", "/readyz").status == 200, 30, interval=0.1,
                       what="readyz 200 once Redis answers again")
            mid = n1.publish("hung", 2)
            m = await sub.recv(timeout=10)
            if m["data"] == 1:
                # The publish that timed out was still in Redis's socket buffer and ran
                # when Redis woke: it is in the topic's stream, and the subscriber's
                # shard caught up on it after resubscribing. (503 `unavailable` means
                # "not known to be delivered", unlike `overloaded`.)
                m = await sub.recv(timeout=10)
            assert (m["id"], m["data"]) == (mid, 2)

    arun(body(), timeout=90)


def test_doctor_checks_the_configured_redis(redis_server):
    ok = run_cli("doctor", "--redis", redis_server.url)
    line = next(l for l in ok.stdout.splitlines() if " redis " in f" {l} ")
    assert line.startswith("PASS") and "Redis 7." in line, ok.stdout
    redis_server.kill()
    down = run_cli("doctor", "--redis", redis_server.url)
    assert down.returncode == 2, down.stdout
    line = next(l for l in down.stdout.splitlines() if " redis " in f" {l} ")
    assert line.startswith("FAIL") and "cannot connect" in line, down.stdout
    assert "fix: start Redis" in down.stdout


# What a gateway of an older release (before libraries carried a version) left loaded.
OLD_LIBRARY = "#!lua name=ringway\nredis.register_function('ringway_send', function() return 'old' end)\n"
# What a gateway of a newer release would load: its own public names, version 99.
NEWER_LIBRARY = """#!lua name=ringway
redis.register_function('ringway_publish', function() return 'newer' end)
redis.register_function{function_name = 'ringway_version', callback = function() return 99 end,
                        flags = {'no-writes'}}
"""


# This release's function library: `schema::LIBRARY_VERSION`, read from the source so a
# new contract needs no edit here.
THIS_VERSION = int(re.search(r"LIBRARY_VERSION: i64 = (\d+);",
                             (Path(__file__).parents[2] / "src/backplane/schema.rs").read_text())[1])
THIS_LIBRARY = f"ringway_v{THIS_VERSION}"


def libraries(r) -> set[str]:
    # RESP2: each library is a flat list of field, value pairs.
    return {dict(zip(lib[::2], lib[1::2]))["library_name"] for lib in r.client().function_list()}


def test_an_older_public_library_is_replaced_by_this_versions(redis_server, gateway):
    rc = redis_server.client()
    rc.function_load(OLD_LIBRARY)
    start_cluster(gateway, redis_server, n=2)
    wait_until(lambda: THIS_LIBRARY in libraries(redis_server), 5, what="this version's library")

    def public_version():
        try:
            return rc.fcall("ringway_version", 0)
        except Exception:
            return None

    assert wait_until(lambda: public_version() == THIS_VERSION, 5, what="the public library replaced")
    assert libraries(redis_server) == {"ringway", THIS_LIBRARY}
    # Services call the public names: the real functions now.
    fid, receivers = rc.fcall("ringway_publish", 1, "ringway:topic:x", "", json.dumps(1))
    assert "-" in fid and receivers == 0


def test_a_newer_public_library_is_left_alone_and_the_gateways_run_their_own(redis_server, gateway):
    rc = redis_server.client()
    rc.function_load(NEWER_LIBRARY)
    n1, n2 = start_cluster(gateway, redis_server, n=2)
    wait_until(lambda: THIS_LIBRARY in libraries(redis_server), 5, what="this version's library")
    time.sleep(0.5)
    # A newer gateway's public library is not downgraded...
    assert rc.fcall("ringway_version", 0) == 99
    assert rc.fcall("ringway_publish", 0) == "newer"

    async def body():
        # ... and this version's gateways still work, through their own functions.
        async with Client(n1) as a, Client(n2, **as_user("alice")) as b:
            await a.subscribe("news")
            mid = n2.publish("news", {"n": 1})
            m = await a.recv()
            assert (m["id"], m["data"]) == (mid, {"n": 1})
            assert [e[0] for e in rc.xrange("ringway:history:news")] == [mid]
            wait_presence(redis_server, "alice", "node2")
            sent = send(n1, {"users": ["alice"], "data": "hi"})
            assert sent["online"] == 1, sent
            m = await b.recv()
            assert m["data"] == "hi", m

    arun(body())
