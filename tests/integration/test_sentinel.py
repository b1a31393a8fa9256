"""Redis Sentinel (`redis+sentinel://`), against real Sentinels (three, quorum 2) over a
password-protected master and its replica: the gateway finds the master through the
Sentinels, follows a failover without a restart, answers 503 on /readyz while it has
no master, and loses none of the messages it accepted."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest

from cluster import RedisServer, Sentinels
from outage import Polling, Publishing, Received, publish
from harness import HOST, Client, arun, binary, clean_env, free_port, http_request, id_key, run_cli, wait_until

PASSWORD = "s3ntinel-test"


@pytest.fixture
def group():
    master = RedisServer(password=PASSWORD).start()
    replica = RedisServer(password=PASSWORD, replica_of=master).start()
    sentinels = Sentinels(master)
    try:
        sentinels.start()
        yield master, replica, sentinels
    finally:
        sentinels.stop()
        replica.stop()
        master.stop()


def nodes(gateway, sentinels: Sentinels, n: int = 2):
    return [gateway(redis=sentinels.url, node_id=f"node{i}", shards=2, allow_anonymous=True,
                    history_size=10_000)
            for i in range(1, n + 1)]


def test_killing_the_master_while_publishing_loses_nothing(group, gateway):
    """SIGKILL the master while two nodes publish: /readyz goes 503 and comes back,
    delivery resumes within 10 s of the kill, connected subscribers on both nodes get
    every accepted message once and in order, and a client that was away resumes with
    `since` and misses nothing."""
    master, replica, sentinels = group
    n1, n2 = nodes(gateway, sentinels)
    t = "sentinel/kill"

    async def body():
        async with Client(n1) as s1, Client(n2) as s2:
            received = await Received.subscribed([s1, s2], t)
            with Publishing([n1, n2], t) as pub, Polling(n1) as ready:
                # A client that leaves at the kill and comes back after the failover.
                async with Client(n2) as away:
                    await away.subscribe(t)
                    await asyncio.sleep(1.5)
                    last = None
                    while last is None or id_key(last["id"]) < id_key(pub.accepted[-1][0]):
                        last = await away.recv(timeout=5)
                    killed = time.monotonic()
                    await asyncio.to_thread(master.kill)
                await asyncio.to_thread(wait_until, lambda: ready.went(503, killed),
                                        10, 0.05, "/readyz 503 after the master died")
                await asyncio.to_thread(wait_until, lambda: ready.is_now(200, killed),
                                        30, 0.05, "/readyz 200 after the failover")
                await asyncio.sleep(2)
            assert sentinels.master_port() == replica.port
            ids = pub.ids()
            await received.until_caught_up(ids)
            received.check(pub, since=killed)
            # The client that was away resumes on the other node, from the new master.
            async with Client(n1) as back:
                answer = await back.request({"op": "subscribe", "topic": t, "ref": "r",
                                             "since": {"offset": last["id"], "epoch": last["epoch"]}},
                                            timeout=10)
                assert answer["recovered"] is True, answer
                owed = [i for i in ids if id_key(i) > id_key(last["id"])]
                caught = [(await back.recv(timeout=10))["id"] for _ in owed]
                assert caught == owed
                await back.silent()
            assert len(ids) > 200

    arun(body(), timeout=120)
    assert n1.metric("ringway_redis_reconnects_total") >= 2


def test_a_master_cut_off_from_the_sentinels_is_left_for_the_new_one(group, gateway):
    """The Sentinels lose the master while the gateway still reaches it (a partition):
    they promote the replica but cannot tell the old master, which keeps serving the
    gateway's connections. Only Sentinel's `+switch-master` says the master moved; the
    node's subscriptions and commands follow it."""
    master, replica, sentinels = group
    (n1,) = nodes(gateway, sentinels, n=1)
    t = "sentinel/partition"
    channel = f"ringway:topic:{t}"

    def numsub(r: RedisServer) -> int:
        return dict(r.client().pubsub_numsub(channel)).get(channel, 0)

    async def body():
        async with Client(n1) as c:
            await c.subscribe(t)
            assert numsub(master) == 1 and numsub(replica) == 0
            # The partition: the Sentinels' connections go, and their password with
            # them; the gateway's (and the replica's) stay.
            admin = master.client()
            admin.config_set("requirepass", "cut-off")
            for client in admin.client_list():
                if client["name"].startswith("sentinel-"):
                    admin.client_kill_filter(_id=client["id"])
            master.password = "cut-off"
            await asyncio.to_thread(wait_until, lambda: sentinels.master_port() == replica.port, 30, 0.1,
                                    "the Sentinels to promote the replica")
            await asyncio.to_thread(wait_until, lambda: numsub(replica) == 1 and numsub(master) == 0, 15, 0.1,
                                    "the subscription to move to the new master")
            assert master.client().info("replication")["role"] == "master"  # still, to itself
            await asyncio.to_thread(wait_until, lambda: publish(n1, t, "after") is not None, 15, 0.1,
                                    "a publish through the new master")
            assert replica.client().xlen(f"ringway:history:{t}") == 1
            m = await c.recv(timeout=5)
            assert m["data"] == "after"
            # Published by a service straight on the new master.
            replica.client().publish(channel, json.dumps({"data": "direct"}))
            m = await c.recv(timeout=5)
            while m["data"] == "after":  # retries of the wait above that got through
                m = await c.recv(timeout=5)
            assert m["data"] == "direct"
            assert n1.http("GET", "/readyz").status == 200

    arun(body(), timeout=90)
    assert n1.metric("ringway_redis_reconnects_total") >= 2


def test_doctor_finds_the_master_through_the_sentinels(group):
    master, _, sentinels = group
    ok = run_cli("doctor", "--redis", sentinels.url)
    line = next(l for l in ok.stdout.splitlines() if " redis " in f" {l} ")
    assert line.startswith("PASS") and f":{master.port} answers, Redis 7." in line, ok.stdout
    line = next(l for l in ok.stdout.splitlines() if " sentinel " in f" {l} ")
    assert line.startswith("PASS") and f"3 of 3 Sentinels name 127.0.0.1:{master.port}" in line, ok.stdout
    # One Sentinel down: the master is still found, and the doctor warns.
    sentinels.procs[2].kill()
    sentinels.procs[2].wait(5)
    one_down = run_cli("doctor", "--redis", sentinels.url)
    line = next(l for l in one_down.stdout.splitlines() if " redis " in f" {l} ")
    assert line.startswith("PASS"), one_down.stdout
    line = next(l for l in one_down.stdout.splitlines() if " sentinel " in f" {l} ")
    assert line.startswith("WARN") and "2 of 3 Sentinels answer" in line and f":{sentinels.ports[2]}" in line, one_down.stdout
    unknown = sentinels.url.replace("/mymaster", "/nosuchmaster")
    bad = run_cli("doctor", "--redis", unknown)
    line = next(l for l in bad.stdout.splitlines() if " redis " in f" {l} ")
    assert line.startswith("FAIL") and "does not know" in line, bad.stdout


def test_a_wrong_master_password_is_said_and_not_ready(group, tmp_path):
    """The Sentinels answer but the master refuses the password: the gateway says why
    in its log, keeps retrying, and /readyz stays 503."""
    _, _, sentinels = group
    admin = free_port()
    log = tmp_path / "stderr.log"
    url = sentinels.url.replace(PASSWORD, "wrong")
    # Not ready without its Redis, so started here rather than by the fixture (which
    # waits for /readyz).
    with open(log, "w") as err:
        proc = subprocess.Popen([str(binary()), "serve", "--listen", f"{HOST}:{free_port()}",
                                 "--admin", f"{HOST}:{admin}", "--redis", url, "--allow-anonymous"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=clean_env())
    try:
        wait_until(lambda: "WRONGPASS" in log.read_text(), 10, what="the refused password logged")
        assert http_request(admin, "GET", "/readyz").status == 503
        assert proc.poll() is None, log.read_text()
    finally:
        proc.terminate()
        proc.wait(10)
