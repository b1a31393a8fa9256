"""Behind an L4 load balancer: HAProxy in TCP mode, round robin over three nodes. A
client that reconnects through it and lands on another node (because it chose to, or
because its node was stopped) keeps receiving its topics and its direct messages."""

from __future__ import annotations

import json

from cluster import SECRET, auth_headers, cluster_opts, token
from harness import HOST, Client, arun, wait_until


def test_a_client_that_lands_on_another_node_keeps_its_topics_and_direct_messages(
        redis_server, gateway, haproxy):
    nodes = [gateway(**cluster_opts(redis_server, i), env={"RINGWAY_JWT_SECRET": SECRET})
             for i in (1, 2, 3)]
    by_id = {f"node{i}": gw for i, gw in enumerate(nodes, 1)}
    lb = haproxy([f"{HOST}:{gw.port}" for gw in nodes])
    rc = redis_server.client()
    headers = auth_headers(token("gina"))

    def registered_on(node: str) -> bool:
        return any(m.startswith(node + "/") for m in rc.zrange("ringway:user:gina", 0, -1))

    async def check(c: Client, publisher, sender) -> None:
        """`c` (subscribed to "room") gets a topic message and a direct message."""
        mid = publisher.publish("room", {"via": "topic"})
        m = await c.recv()
        assert (m["type"], m["topic"], m["id"], m["data"]) == ("message", "room", mid, {"via": "topic"}), m
        assert m["epoch"] == rc.get("ringway:epoch:room")
        wait_until(lambda: registered_on(c.welcome["node"]), 5, what="gina's presence")
        r = sender.http("POST", "/v1/send", json.dumps({"user": "gina", "data": "direct"}))
        assert r.status == 200 and r.json()["online"] == 1, r.body
        m = await c.recv()
        assert (m["user"], m["id"], m["data"]) == ("gina", r.json()["id"], "direct")
        # Acknowledged, so the next connection is not given it again.
        assert (await c.request({"op": "ack", "id": m["id"], "ref": 1}))["type"] == "acked"

    async def connect() -> Client:
        c = await Client(lb, additional_headers=headers).__aenter__()
        await c.subscribe("room")
        return c

    async def body():
        c = await connect()
        first = c.welcome["node"]
        await check(c, nodes[2], nodes[0])
        # Reconnect until the balancer puts us on another node.
        for _ in range(6):
            await c.__aexit__(None, None, None)
            c = await connect()
            if c.welcome["node"] != first:
                break
        second = c.welcome["node"]
        assert second != first, "round robin never moved the client"
        wait_until(lambda: not registered_on(first), 5, what="the old presence entry to go")
        await check(c, nodes[0], nodes[1])
        # The node goes away (drain): the client is asked to reconnect, and the balancer
        # sends it to a live node.
        gone = by_id[second]
        gone.sigterm()
        assert await c.closed_with(10) == 1001
        assert gone.wait_exit(15) == 0
        gone.stopped = True
        c = await connect()
        third = c.welcome["node"]
        assert third != second
        alive = [gw for gw in nodes if gw is not gone]
        await check(c, alive[0], alive[1])
        await c.__aexit__(None, None, None)

    arun(body(), timeout=60)
