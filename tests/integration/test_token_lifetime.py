"""Token lifetime: a connection whose token expires is closed with 4001 ("token
expired") at `exp` plus the leeway, unless the client first sends
`{"op":"refresh","token":"…"}` with a valid token of the same user, answered
`{"type":"refreshed","exp":…}`. A bad refresh gets `bad_token` and changes nothing."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from websockets.exceptions import InvalidStatus

from cluster import SECRET, auth_headers, token
from harness import Client, arun, wait_until


def short_lived_gateway(gateway, **opts):
    # No leeway, so a token two seconds from `exp` closes its connection in two.
    return gateway(jwt_leeway_secs=0, allow_anonymous=True, env={"RINGWAY_JWT_SECRET": SECRET}, **opts)


def test_an_expired_token_closes_its_connection_with_4001(gateway):
    gw = short_lived_gateway(gateway)

    async def body():
        async with Client(gw, additional_headers=auth_headers(token("alice", expires_in=2))) as alice, \
                Client(gw, additional_headers=auth_headers(token("bob"))) as bob:
            await alice.subscribe("t")
            await bob.subscribe("t")
            start = time.monotonic()
            assert await alice.closed_with(timeout=6) == 4001
            assert alice.ws.close_reason == "token expired"
            assert 1 <= time.monotonic() - start <= 5
            # Others carry on.
            gw.publish("t", 1)
            assert (await bob.recv())["data"] == 1

    arun(body())
    wait_until(lambda: gw.metric("ringway_closes_total", reason="token_expired") == 1, 5,
               what="the close counted")


def test_a_refresh_extends_the_connection(gateway):
    gw = short_lived_gateway(gateway)

    async def body():
        async with Client(gw, additional_headers=auth_headers(token("alice", expires_in=2))) as alice:
            fresh = token("alice", expires_in=600)
            reply = await alice.request({"op": "refresh", "token": fresh, "ref": 7})
            assert reply["type"] == "refreshed" and reply["ref"] == 7, reply
            assert abs(reply["exp"] - (time.time() + 600)) < 5, reply
            await asyncio.sleep(3.5)
            # Past the first token's exp, and still open.
            await alice.subscribe("t")
            gw.publish("t", 2)
            assert (await alice.recv())["data"] == 2

    arun(body())
    assert gw.metric("ringway_closes_total", reason="token_expired") == 0


def test_a_bad_refresh_is_refused_and_the_old_time_still_runs(gateway):
    gw = short_lived_gateway(gateway)

    async def body():
        async with Client(gw, additional_headers=auth_headers(token("alice", expires_in=3))) as alice:
            for bad, reason in [
                (token("mallory", expires_in=600), "another user"),
                (token("alice", expires_in=-10), "token expired"),
                (token("alice", secret="not-the-gateway-secret-0123456789"), "signature"),
                ("garbage", "malformed"),
            ]:
                reply = await alice.request({"op": "refresh", "token": bad})
                assert reply["type"] == "error" and reply["code"] == "bad_token", reply
                assert reason in reply["message"], reply
            reply = await alice.request({"op": "refresh"})
            assert reply["code"] == "bad_request", reply
            assert await alice.closed_with(timeout=6) == 4001
        async with Client(gw) as anon:
            reply = await anon.request({"op": "refresh", "token": token("alice")})
            assert reply["code"] == "bad_token" and "anonymous" in reply["message"], reply

    arun(body())


def test_sighup_rotates_the_secret_without_dropping_connections(gateway, tmp_path):
    path = tmp_path / "ringway.toml"
    path.write_text(f'jwt_secret = "{SECRET}"\n')
    gw = gateway(config=str(path))
    new_secret = "rotated-secret-0123456789abcdef-0123"

    async def body():
        async with Client(gw, additional_headers=auth_headers(token("alice"))) as alice:
            await alice.subscribe("t")
            path.write_text(f'jwt_secret = "{new_secret}"\n')
            gw.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "configuration reloaded" in gw.stderr(), 5, what="the reload")
            assert "jwt_secret" in gw.stderr()
            # New upgrades need the new key; the old one is refused.
            async with Client(gw, additional_headers=auth_headers(token("bob", secret=new_secret))):
                pass
            with pytest.raises(InvalidStatus) as refused:
                async with Client(gw, additional_headers=auth_headers(token("carol"))):
                    pass
            assert refused.value.response.status_code == 401
            # The open connection carries on, and refreshes with the new key.
            reply = await alice.request({"op": "refresh", "token": token("alice", secret=new_secret)})
            assert reply["type"] == "refreshed", reply
            gw.publish("t", 5)
            assert (await alice.recv())["data"] == 5

    arun(body())
