"""`ringway publish`: prints the id and exits 0; 65 for bad JSON, 69 when the admin API
cannot be reached (sysexits)."""

import itertools
import json

import pytest

from harness import Client, arun, free_port, id_key, run_cli

_names = itertools.count()


def topic() -> str:
    return f"cli/{next(_names)}"


@pytest.fixture(scope="module")
def gw(module_gateway):
    return module_gateway(shards=2)


@pytest.mark.parametrize("data", ['{"a":[1,2,{"b":null}]}', '"text \\u00e9"', "3.5", "null", "[true,false]"])
def test_publish_prints_id_and_subscriber_receives(gw, data):
    async def body():
        async with Client(gw) as c:
            t = topic()
            await c.subscribe(t)
            p = gw.cli("publish", "--admin", gw.admin_addr, "--topic", t, data)
            assert p.returncode == 0, p
            printed = p.stdout.strip()
            id_key(printed)
            assert p.stdout == printed + "\n", p.stdout
            assert await c.recv() == {"type": "message", "topic": t, "id": printed, "epoch": gw.epoch, "data": json.loads(data)}

    arun(body())


def test_history_prints_a_topics_messages_and_refuses_a_lost_range(gw):
    t = topic()
    ids = [gw.publish(t, {"n": i}) for i in range(3)]
    p = gw.cli("history", "--admin", gw.admin_addr, "--topic", t)
    assert p.returncode == 0, p
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert [m["id"] for m in lines] == ids and [m["data"] for m in lines] == [{"n": 0}, {"n": 1}, {"n": 2}]
    p = gw.cli("history", "--admin", gw.admin_addr, "--topic", t, "--since", ids[0], "--epoch", gw.epoch,
               "--limit", "1")
    assert p.returncode == 0, p
    assert [json.loads(line)["id"] for line in p.stdout.splitlines()] == [ids[1]]
    assert "more messages follow" in p.stderr
    p = gw.cli("history", "--admin", gw.admin_addr, "--topic", t, "--since", ids[0], "--epoch", "gone")
    assert p.returncode == 1 and "410" in p.stderr and "epoch_changed" in p.stderr, p
    assert gw.cli("history", "--admin", gw.admin_addr, "--topic", t, "--since", ids[0]).returncode == 64


def test_publish_reads_admin_from_env(gw):
    async def body():
        async with Client(gw) as c:
            t = topic()
            await c.subscribe(t)
            p = gw.cli("publish", "--topic", t, "1", env={"RINGWAY_ADMIN": gw.admin_addr})
            assert p.returncode == 0, p
            assert (await c.recv())["id"] == p.stdout.strip()

    arun(body())


@pytest.mark.parametrize("data", ["{", "not json", "", "[1,", "{'a':1}"])
def test_publish_invalid_json_exits_65(gw, data):
    p = gw.cli("publish", "--admin", gw.admin_addr, "--topic", topic(), data)
    assert p.returncode == 65, p
    assert p.stdout == ""
    assert "json" in p.stderr.lower(), p.stderr


def test_publish_unreachable_admin_exits_69():
    port = free_port()  # nothing listens there
    p = run_cli("publish", "--admin", f"127.0.0.1:{port}", "--topic", "t", "1")
    assert p.returncode == 69, p
    assert str(port) in p.stderr, p.stderr


def test_publish_refused_topic_fails_with_the_reason(gw):
    p = gw.cli("publish", "--admin", gw.admin_addr, "--topic", "", "1")
    assert p.returncode != 0, p
    assert p.stdout == ""
    assert "bad_topic" in p.stderr, p.stderr


def test_usage_error_exits_64():
    """cli.rs documents exit 64 for bad usage (sysexits EX_USAGE)."""
    p = run_cli("publish", "--admin", "127.0.0.1:1")  # no --topic, no data
    assert p.returncode == 64, p
    assert "--topic" in p.stderr, p.stderr


def test_version_and_help():
    p = run_cli("--version")
    assert p.returncode == 0 and "ringway" in p.stdout, p
    p = run_cli("--help")
    assert p.returncode == 0 and "serve" in p.stdout and "publish" in p.stdout, p
