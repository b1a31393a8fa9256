"""The first frame after the upgrade: {"type":"welcome","conn":"<shard>-<n>","node":…}."""

import contextlib
import re

import pytest

from harness import Client, arun, open_on_every_shard, shard_of


def test_first_frame_is_welcome_with_conn_and_node(gateway):
    gw = gateway(node_id="edge-1")

    async def body():
        async with Client(gw) as c:
            w = c.welcome
            assert set(w) == {"type", "conn", "node"}, w
            assert w["type"] == "welcome"
            assert w["node"] == "edge-1"
            assert re.fullmatch(r"\d+-\d+", w["conn"]), w
            assert int(w["conn"].split("-")[0]) in (0, 1), "shard prefix out of range"

    arun(body())


def test_default_node_id_is_hostname_dash_pid(gateway):
    gw = gateway()

    async def body():
        async with Client(gw) as c:
            host = open("/proc/sys/kernel/hostname").read().strip()
            assert c.welcome["node"] == f"{host}-{gw.proc.pid}"

    arun(body())


def test_conn_ids_are_unique_and_prefixed_by_shard(gateway):
    gw = gateway(shards=2)

    async def body():
        async with contextlib.AsyncExitStack() as stack:
            clients = await open_on_every_shard(stack, gw, 16)
            ids = [c.welcome["conn"] for c in clients]
            assert len(set(ids)) == len(ids), ids
            per_shard = {}
            for c in clients:
                per_shard[shard_of(c)] = per_shard.get(shard_of(c), 0) + 1
            assert set(per_shard) == {"0", "1"}, ids
            m = gw.metrics()
            for shard, n in per_shard.items():
                assert m[f'ringway_connections{{shard="{shard}"}}'] == n, (per_shard, m)

    arun(body())


@pytest.mark.parametrize("shards", [1, 2])
def test_welcome_node_matches_metrics_info(gateway, shards):
    gw = gateway(shards=shards, node_id="n.1:a_b-c")

    async def body():
        async with Client(gw) as c:
            assert c.welcome["node"] == "n.1:a_b-c"
        info = [k for k in gw.metrics() if k.startswith("ringway_info{")]
        assert len(info) == 1 and 'node="n.1:a_b-c"' in info[0], info

    arun(body())


def test_welcome_is_counted_as_a_frame_out(gateway):
    """The welcome leaves with the 101 response; it still counts in frames_out and
    bytes_out (the 101 in bytes_out too)."""
    gw = gateway(shards=1)

    async def body():
        async with Client(gw) as c:
            assert c.welcome["type"] == "welcome"
            assert gw.metric("ringway_frames_out_total") == 1
            assert gw.metric("ringway_bytes_out_total") > 129  # "HTTP/1.1 101 …" alone is 129+

    arun(body())
