"""Redis Cluster (`redis+cluster://`), against a real cluster of three masters with a
replica each: topics spread over the masters by sharded pub/sub, each node holds one
subscriber connection per shard and master, the user directory and direct sends never
cross slots, and delivery goes on through a slot migrated away (MOVED, ASK) and a
master failed over."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import trustme

from cluster import SECRET, RedisCluster, auth_headers, cluster_opts, token
from harness import HOST, Client, arun, http_request, run_cli, wait_until
from outage import Polling, Publishing, Received, publish


@pytest.fixture
def rcluster():
    c = RedisCluster().start()
    yield c
    c.stop()


def nodes(gateway, c: RedisCluster, n: int = 2, **opts):
    opts.setdefault("allow_anonymous", True)
    opts.setdefault("history_size", 10_000)
    return [gateway(**cluster_opts(c, i, **opts), env={"RINGWAY_JWT_SECRET": SECRET})
            for i in range(1, n + 1)]


def topics_over_every_master(c: RedisCluster, per_master: int = 2) -> list[str]:
    """Topics whose slots are served by every master, `per_master` each."""
    by_master: dict[int, list[str]] = {}
    i = 0
    while min((len(v) for v in by_master.values()), default=0) < per_master or len(by_master) < c.masters:
        t = f"spread/{i}"
        port = c.master_of("{" + t + "}").port
        if len(by_master.setdefault(port, [])) < per_master:
            by_master[port].append(t)
        i += 1
    return [t for ts in by_master.values() for t in ts]


def shard_channels(server) -> set[str]:
    return set(server.client().execute_command("PUBSUB", "SHARDCHANNELS"))


def links(server, node: str, role: str) -> int:
    """Connections named by `node`'s links of `role` on `server`."""
    return sum(1 for cl in server.client().client_list()
               if cl["name"].startswith(f"ringway:{node}:") and cl["name"].endswith(f":{role}"))


def test_topics_spread_over_the_masters_and_reach_every_node(rcluster, gateway):
    """Six topics, two on each master: subscribers on both nodes get what either
    node publishes; each topic's sharded channel is subscribed on its own master only;
    each node holds one subscriber and one command connection per shard and master."""
    n1, n2 = nodes(gateway, rcluster)
    topics = topics_over_every_master(rcluster)

    async def body():
        async with Client(n1) as a, Client(n2) as b:
            for t in topics:
                await a.subscribe(t)
                await b.subscribe(t)
            for i, t in enumerate(topics):
                assert publish((n1, n2)[i % 2], t, {"n": i})
            for c in (a, b):
                got = sorted([(m["topic"], m["data"]["n"]) for m in [await c.recv() for _ in topics]])
                assert got == sorted((t, i) for i, t in enumerate(topics))
                await c.silent()
            masters = rcluster.live_masters()
            assert len(masters) == 3
            for m in masters:
                mine = {f"ringway:topic:{{{t}}}" for t in topics
                        if rcluster.master_of("{" + t + "}").port == m.port}
                assert mine and shard_channels(m) >= mine, (m.port, shard_channels(m), mine)
                assert not any(c.startswith("ringway:topic:") for c in shard_channels(m) - mine)
                for node in ("node1", "node2"):
                    assert links(m, node, "subscriber") == 2
                    assert links(m, node, "commands") == 2

            # A topic whose keys would have an empty hash tag is refused, clearly.
            answer = await a.request({"op": "subscribe", "topic": "}x", "ref": 1})
            assert answer["type"] == "error" and "'}'" in answer["message"], answer

    arun(body(), timeout=30)
    # History went to each topic's master, keys in its slot.
    for t in topics:
        assert rcluster.master_of("{" + t + "}").client().xlen(f"ringway:history:{{{t}}}") == 1
    assert "CROSSSLOT" not in n1.stderr() + n2.stderr()


def test_a_subscriber_resumes_from_history_in_a_cluster(rcluster, gateway):
    (n1,) = nodes(gateway, rcluster, n=1)
    t = "cluster/history"
    ids = [publish(n1, t, i) for i in range(5)]
    assert all(ids)

    async def body():
        async with Client(n1) as c:
            answer = await c.request({"op": "subscribe", "topic": t, "ref": "r",
                                      "since": {"offset": ids[1], "epoch": n1_epoch(rcluster, t)}})
            assert answer["recovered"] is True, answer
            assert [(await c.recv())["data"] for _ in range(3)] == [2, 3, 4]
            await c.silent()

    arun(body(), timeout=20)


def n1_epoch(c: RedisCluster, t: str) -> str:
    return c.master_of("{" + t + "}").client().get(f"ringway:epoch:{{{t}}}")


def test_direct_messages_and_presence_stay_in_one_slot(rcluster, gateway):
    """Users on both nodes: one send to all of them (stored in their inboxes) reaches
    every one, once, without a CROSSSLOT error; presence lives under `{ringway}:`."""
    n1, n2 = nodes(gateway, rcluster, allow_anonymous=False)
    users = [f"u{i}" for i in range(6)]
    home = rcluster.master_of("{ringway}")

    async def body():
        clients = [await Client((n1, n2)[i % 2], additional_headers=auth_headers(token(u))).__aenter__()
                   for i, u in enumerate(users)]
        try:
            await asyncio.to_thread(
                wait_until, lambda: all(home.client().zcard(f"{{ringway}}:user:{u}") == 1 for u in users),
                10, 0.05, "every user registered")
            r = n2.http("POST", "/v1/send", json.dumps({"users": users, "data": {"hi": 1}}),
                        {"Content-Type": "application/json"})
            assert r.status == 200, (r.status, r.body)
            sent = r.json()
            assert sent["online"] == len(users) and sent["stored"] is True, sent
            for c in clients:
                m = await c.recv()
                assert m["user"] in users and m["data"] == {"hi": 1}, m
                await c.silent()
            assert home.client().xlen("{ringway}:inbox:u0") == 1
            acked = await clients[0].request({"op": "ack", "id": sent["id"], "ref": "a"})
            assert acked == {"type": "acked", "id": sent["id"], "removed": 1, "ref": "a"}, acked
            assert home.client().xlen("{ringway}:inbox:u0") == 0
        finally:
            for c in clients:
                await c.__aexit__(None, None, None)

    arun(body(), timeout=30)
    assert "CROSSSLOT" not in n1.stderr() + n2.stderr()


def test_a_killed_node_is_forgotten_and_its_entries_reaped(rcluster, gateway):
    """The heartbeat and the reaper run in the one slot of `{ringway}:`: a killed node
    holds nobody within 5 s, and the surviving node removes its entries."""
    n1, n2 = nodes(gateway, rcluster, allow_anonymous=False)
    home = rcluster.master_of("{ringway}").client()

    async def body():
        c = await Client(n2, additional_headers=auth_headers(token("dave"))).__aenter__()
        await asyncio.to_thread(wait_until, lambda: home.zcard("{ringway}:user:dave") == 1, 5, 0.05,
                                "dave registered")
        assert sorted(n1.http("GET", "/v1/nodes").json()["nodes"]) == ["node1", "node2"]
        n2.proc.kill()
        n2.proc.wait(5)
        n2.stopped = True

        def online() -> int:
            r = n1.http("POST", "/v1/send", json.dumps({"user": "dave", "data": 0}),
                        {"Content-Type": "application/json"})
            assert r.status == 200, (r.status, r.body)
            return r.json()["online"]

        await asyncio.to_thread(wait_until, lambda: online() == 0, 7, 0.1, "dave to count as offline")
        await asyncio.to_thread(wait_until, lambda: home.exists("{ringway}:user:dave") == 0, 10, 0.1,
                                "dave's entry to be reaped")
        assert not list(home.scan_iter("{ringway}:conns:node2@*")), "the dead process's index is gone"
        await c.ws.close()

    arun(body(), timeout=40)


def test_an_older_public_library_on_one_master_is_replaced(rcluster, gateway):
    """Every master gets this version's libraries; masters that hold an older public
    `ringway` library get it replaced, though another has none (that one's answer to
    the version check, this version, is not the one that counts: the oldest is; the
    unit test of `order` shows that rule whatever order the answers come in)."""
    from test_cluster import THIS_LIBRARY, THIS_VERSION
    masters = rcluster.live_masters()
    # On every master but one (the master of slot 0).
    first = next(int(nodes[0][1]) for start, _, *nodes in
                 rcluster.servers[0].client().execute_command("CLUSTER", "SLOTS") if start == 0)
    for m in masters:
        if m.port != first:
            m.client().function_load("#!lua name=ringway\nredis.register_function{function_name = "
                                     "'ringway_version', callback = function() return 1 end, "
                                     "flags = {'no-writes'}}\n")
            assert m.client().fcall("ringway_version", 0) == 1 < THIS_VERSION
    nodes(gateway, rcluster, n=1)

    def versions() -> list:
        out = []
        for m in masters:
            try:
                out.append(m.client().fcall("ringway_version", 0))
            except Exception:
                out.append(None)
        return out

    wait_until(lambda: versions() == [THIS_VERSION] * len(masters), 10, 0.1,
               what="this version's public library on every master")
    for m in masters:
        names = {dict(zip(lib[::2], lib[1::2]))["library_name"] for lib in m.client().function_list()}
        assert names == {"ringway", THIS_LIBRARY}, (m.port, names)


class Migration:
    """Moves `key`'s slot from its master to another, as `redis-cli --cluster reshard`
    does: `begin` (IMPORTING on the target, MIGRATING on the source), `move_keys`
    (MIGRATE), `end` (NODE on every master)."""

    def __init__(self, c: RedisCluster, key: str):
        self.c = c
        self.source = c.master_of(key)
        self.target = next(m for m in c.live_masters() if m.port != self.source.port)
        self.slot = int(self.source.client().execute_command("CLUSTER", "KEYSLOT", key))
        self.src, self.dst = self.source.client(), self.target.client()

    def begin(self) -> "Migration":
        self.dst.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING",
                                 self.src.execute_command("CLUSTER", "MYID"))
        self.src.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING",
                                 self.dst.execute_command("CLUSTER", "MYID"))
        return self

    def move_keys(self) -> None:
        while keys := self.src.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 100):
            self.src.execute_command("MIGRATE", HOST, self.target.port, "", 0, 5000, "KEYS", *keys)

    def end(self) -> None:
        target_id = self.dst.execute_command("CLUSTER", "MYID")
        for m in self.c.live_masters():
            m.client().execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", target_id)

    def run(self) -> None:
        self.begin()
        self.move_keys()
        self.end()


def test_a_topic_whose_slot_moves_to_another_master_loses_nothing(rcluster, gateway):
    """Publishing all along while the topic's slot is resharded to another master: the
    subscribers on both nodes get every accepted message once and in order, and the
    subscription ends up on the new master."""
    n1, n2 = nodes(gateway, rcluster)
    t = "cluster/moving"
    key = "{" + t + "}"

    async def body():
        async with Client(n1) as a, Client(n2) as b:
            received = await Received.subscribed([a, b], t)
            with Publishing([n1, n2], t) as pub:
                await asyncio.sleep(1)
                moved = time.monotonic()
                migration = Migration(rcluster, key)
                source, target = migration.source, migration.target
                await asyncio.to_thread(migration.run)
                await asyncio.to_thread(wait_until, lambda: f"ringway:topic:{key}" in shard_channels(target)
                                        and f"ringway:topic:{key}" not in shard_channels(source),
                                        15, 0.05, "the subscriptions to follow the slot")
                await asyncio.sleep(1)
            await received.until_caught_up(pub.ids())
            received.check(pub, since=moved)
            assert len(pub.accepted) > 100
            assert target.client().xlen(f"ringway:history:{key}") == len(pub.accepted)

    arun(body(), timeout=90)


def test_a_publish_to_a_slot_being_migrated_follows_ask(rcluster, gateway):
    """Mid-migration (the slot MIGRATING on its master, its keys already on the
    importing one), the old master answers ASK and the new one TRYAGAIN until the
    migration ends: the publish follows both and succeeds, on the new master."""
    (n1,) = nodes(gateway, rcluster, n=1)
    t = "cluster/ask"
    key = "{" + t + "}"
    assert publish(n1, t, "before")
    migration = Migration(rcluster, key).begin()
    migration.move_keys()
    dst = migration.dst
    asks_before = int(dst.info("commandstats").get("cmdstat_asking", {}).get("calls", 0))

    def finish():
        time.sleep(0.5)
        migration.end()

    th = threading.Thread(target=finish)
    th.start()
    started = time.monotonic()
    r = http_request(n1.admin_port, "POST", "/v1/publish", json.dumps({"topic": t, "data": "during"}))
    th.join()
    assert r.status == 200, (r.status, r.body)
    # It waited for the migration to end rather than fail.
    assert time.monotonic() - started >= 0.4
    assert int(dst.info("commandstats")["cmdstat_asking"]["calls"]) > asks_before
    assert dst.xlen(f"ringway:history:{key}") == 2
    assert publish(n1, t, "after")
    assert dst.xlen(f"ringway:history:{key}") == 3


def test_a_message_out_of_history_reaches_subscribers_while_its_slot_migrates(rcluster, gateway):
    """History off: the topic has no keys, so a function call would follow ASK to the
    importing master, where nobody is subscribed yet. A plain SPUBLISH stays with the
    master that holds the subscriptions until the migration ends."""
    n1, n2 = nodes(gateway, rcluster, history_size=0)
    t = "cluster/no-history"
    key = "{" + t + "}"

    async def body():
        async with Client(n1) as c:
            await c.subscribe(t)
            migration = Migration(rcluster, key).begin()
            try:
                mid = publish(n2, t, "during")
                assert mid
                m = await c.recv()
                assert (m["id"], m["data"]) == (mid, "during")
            finally:
                migration.end()

    arun(body(), timeout=30)


def test_killing_a_master_while_publishing_loses_nothing(rcluster, gateway):
    """SIGKILL the master of a topic's slot while both nodes publish to it: /readyz goes
    503 and back to 200 once the replica is promoted, publishing resumes, subscribers
    on both nodes get every accepted message once and in order, and a client that
    resumes with `since` on the other node misses nothing. The old master, started
    again, rejoins as a replica and changes nothing."""
    n1, n2 = nodes(gateway, rcluster)
    t = "cluster/failover"
    key = "{" + t + "}"

    async def body():
        async with Client(n1) as a, Client(n2) as b:
            received = await Received.subscribed([a, b], t)
            victim = rcluster.master_of(key)
            with Publishing([n1, n2], t) as pub, Polling(n1) as ready:
                await asyncio.sleep(1.5)
                killed = time.monotonic()
                await asyncio.to_thread(victim.kill)
                await asyncio.to_thread(wait_until, lambda: ready.went(503, killed),
                                        10, 0.05, "/readyz 503 after the master died")
                await asyncio.to_thread(wait_until, lambda: ready.is_now(200, killed),
                                        30, 0.05, "/readyz 200 after the failover")
                await asyncio.to_thread(wait_until, lambda: n2.http("GET", "/readyz").status == 200, 30, 0.05,
                                        "node 2 ready after the failover")
                await asyncio.sleep(1.5)
                # The old master comes back: it rejoins as its replica's replica.
                await asyncio.to_thread(victim.start)
                await asyncio.to_thread(wait_until, lambda: victim.client().info("replication")["role"] == "slave",
                                        30, 0.1, "the old master to rejoin as a replica")
                await asyncio.sleep(1)
            assert rcluster.master_of(key).port != victim.port
            ids = pub.ids()
            await received.until_caught_up(ids)
            received.check(pub, since=killed)
            async with Client(n2) as back:
                epoch = rcluster.master_of(key).client().get(f"ringway:epoch:{key}")
                answer = await back.request({"op": "subscribe", "topic": t, "ref": "r",
                                             "since": {"offset": ids[0], "epoch": epoch}}, timeout=10)
                assert answer["recovered"] is True, answer
                caught = [(await back.recv(timeout=10))["id"] for _ in ids[1:]]
                assert caught == ids[1:]
            assert len(ids) > 200

    arun(body(), timeout=120)


def check_line(out: str, name: str) -> str:
    """`ringway doctor`'s line for check `name`."""
    return next(l for l in out.splitlines() if l.split()[1:2] == [name])


def test_doctor_checks_the_seeds_and_every_master(rcluster):
    ok = run_cli("doctor", "--redis", rcluster.url)
    line = check_line(ok.stdout, "redis")
    assert "the cluster of" in line and "Redis 7" in line, ok.stdout
    line = check_line(ok.stdout, "cluster")
    assert "2 of 2 seeds answer; 3 of 3 masters serving every slot answer" in line, ok.stdout
    # A seed that is down is a warning; a master that is down fails the check.
    dead = f"redis+cluster://127.0.0.1:1,127.0.0.1:{rcluster.servers[0].port}"
    warn = run_cli("doctor", "--redis", dead)
    line = check_line(warn.stdout, "cluster")
    assert "1 of 2 seeds answer" in line and "seed 127.0.0.1:1" in line, warn.stdout
    assert check_line(warn.stdout, "redis").startswith("PASS"), warn.stdout
    # A master and its replica both gone: slots nobody serves (or, before the cluster
    # notices, a master that does not answer).
    victim = next(m for m in rcluster.live_masters() if m.port not in
                  (rcluster.servers[0].port, rcluster.servers[1].port))
    for s in rcluster.servers:
        if s.proc and s.proc.poll() is None and s is not victim and \
                int(s.client().info("replication").get("master_port", 0)) == victim.port:
            s.kill()
    victim.kill()
    down = run_cli("doctor", "--redis", rcluster.url)
    line = check_line(down.stdout, "cluster")
    assert f"master 127.0.0.1:{victim.port}" in line or "served by no master" in line, down.stdout
    assert down.returncode == 2, down.stdout


def test_a_cluster_over_tls(tmp_path, gateway):
    """`rediss+cluster://`: every node speaks TLS only; the nodes reach each master at
    its TLS port and topics cross nodes as over plain connections."""
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    c = RedisCluster(tls=ca.issue_cert(HOST), ca_file=str(bundle)).start()
    try:
        assert c.url.startswith("rediss+cluster://")
        env = {"SSL_CERT_FILE": str(bundle), "RINGWAY_JWT_SECRET": SECRET}
        n1, n2 = [gateway(**cluster_opts(c, i, allow_anonymous=True), env=env) for i in (1, 2)]
        topics = topics_over_every_master(c, per_master=1)

        async def body():
            async with Client(n1) as a, Client(n2) as b:
                for t in topics:
                    await a.subscribe(t)
                    await b.subscribe(t)
                for i, t in enumerate(topics):
                    assert publish((n2, n1)[i % 2], t, i)
                for cl in (a, b):
                    got = sorted((m["topic"], m["data"]) for m in [await cl.recv() for _ in topics])
                    assert got == sorted((t, i) for i, t in enumerate(topics))

        arun(body(), timeout=30)
        ok = run_cli("doctor", "--redis", c.url, env=env)
        assert check_line(ok.stdout, "cluster").startswith("PASS"), ok.stdout
    finally:
        c.stop()
