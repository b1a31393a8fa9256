"""Client identity at the upgrade: a JWT (HS256, RS256 or EdDSA) from the Authorization
header, a `bearer.<token>` subprotocol or `?token=`; 401 with a reason for a missing,
forged or expired token; anonymous clients only where allowed, and never the target of
a direct message. Single node (no Redis): direct messages go through the in-process
directory."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from cluster import SECRET, auth_headers, token
from harness import Client, arun, raw_http, run_cli, shard_of, status_of, upgrade_request


def hs_gateway(gateway, **opts):
    return gateway(env={"RINGWAY_JWT_SECRET": SECRET}, **opts)


def refused(gw, path: str = "/ws", headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Status and body of an upgrade request with `headers`."""
    req, _ = upgrade_request(path)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
    resp = raw_http(gw.port, req[:-2] + extra + b"\r\n")
    return status_of(resp), resp.partition(b"\r\n\r\n")[2].decode()


def send(gw, body: dict) -> dict:
    res = gw.http("POST", "/v1/send", json.dumps(body), {"Content-Type": "application/json"})
    assert res.status == 200, (res.status, res.body)
    return res.json()


def test_a_valid_token_is_accepted_from_each_place(gateway):
    gw = hs_gateway(gateway)
    tok = token("alice")

    async def body():
        async with Client(gw, additional_headers=auth_headers(tok)) as c:
            assert c.welcome["type"] == "welcome"
        async with Client(gw, subprotocols=["ringway.v1", f"bearer.{tok}"]) as c:
            # The gateway selects ringway.v1, never echoes the token.
            assert c.ws.subprotocol == "ringway.v1"
        async with Client(gw, path=f"/ws?token={tok}") as c:
            assert c.welcome["type"] == "welcome"
        # A browser offering only the token entry gets it selected: a 101 selecting none
        # of the offered subprotocols would fail the connection there.
        async with Client(gw, subprotocols=[f"bearer.{tok}"]) as c:
            assert c.ws.subprotocol == f"bearer.{tok}"

    arun(body())


@pytest.mark.parametrize("case,tok,reason", [
    ("missing", None, "a token is required"),
    ("expired", token("alice", expires_in=-3600), "token expired"),
    ("forged", token("alice", secret="not-the-gateway-secret-at-all-0123456789"), "signature does not verify"),
    ("not yet valid", token("alice", nbf=int(time.time()) + 3600), "not valid yet"),
    ("no subject", jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256"), "no `sub`"),
    ("no expiry", jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"), "no `exp`"),
    ("garbage", "abc.def.ghi", "malformed token"),
    ("algorithm none", jwt.encode({"sub": "alice"}, None, algorithm="none"), "malformed token"),
])
def test_a_bad_token_is_refused_with_401_and_a_reason(gateway, case, tok, reason):
    gw = hs_gateway(gateway)
    headers = auth_headers(tok) if tok else {}
    status, body = refused(gw, headers=headers)
    assert status == 401, (case, status, body)
    assert reason in body, (case, body)
    assert gw.metric("ringway_handshake_failures_total", reason="unauthorized") == 1


def test_anonymous_clients_where_allowed_but_never_a_forged_token(gateway):
    gw = hs_gateway(gateway, allow_anonymous=True)

    async def body():
        async with Client(gw) as anon:
            await anon.subscribe("public")
            gw.publish("public", 1)
            assert (await anon.recv())["data"] == 1

    arun(body())
    status, body = refused(gw, headers=auth_headers(token("x", secret="forged-forged-forged-forged-forged-forged")))
    assert status == 401 and "signature" in body


def test_without_a_key_everyone_is_anonymous_and_direct_sends_find_nobody(gateway):
    gw = gateway()

    async def body():
        async with Client(gw, additional_headers=auth_headers(token("alice"))) as c:
            assert send(gw, {"user": "alice", "data": 1})["online"] == 0
            await c.silent()

    arun(body())


def test_direct_messages_on_a_single_node_reach_every_connection_of_the_user(gateway):
    gw = hs_gateway(gateway, allow_anonymous=True)

    async def body():
        tok = token("alice")
        conns = [await Client(gw, additional_headers=auth_headers(tok)).__aenter__() for _ in range(6)]
        async with Client(gw) as anon, Client(gw, additional_headers=auth_headers(token("bob"))) as bob:
            try:
                sent = send(gw, {"users": ["alice"], "data": {"to": "alice"}})
                assert sent["online"] == 1
                assert sent["shards"] == len({shard_of(c) for c in conns})
                for c in conns:
                    assert await c.recv() == {"type": "message", "user": "alice", "id": sent["id"],
                                              "data": {"to": "alice"}}
                await anon.silent()
                await bob.silent()
                touched = {s for s in ("0", "1")
                           if gw.metric("ringway_direct_received_total", shard=s) > 0}
                assert touched == {shard_of(c) for c in conns}
            finally:
                for c in conns:
                    await c.__aexit__(None, None, None)
        # All of alice's connections closed: she is offline.
        assert send(gw, {"user": "alice", "data": 0})["online"] == 0

    arun(body())


@pytest.mark.parametrize("bad", [
    b"{}", b'{"user":"a","users":["b"],"data":1}', b'{"users":[],"data":1}', b'{"user":5}',
    b'{"user":"","data":1}', b'{"user":"a","data":1,"extra":2}', b"not json",
])
def test_send_refuses_a_bad_body_with_400(gateway, bad):
    gw = gateway()
    res = gw.http("POST", "/v1/send", bad, {"Content-Type": "application/json"})
    assert res.status == 400, (bad, res.status, res.body)
    assert res.json()["error"] in ("bad_json", "bad_request")


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("alg", ["RS256", "EdDSA"])
def test_public_key_tokens(gateway, tmp_path, alg):
    if alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    pem = tmp_path / "key.pem"
    pem.write_bytes(_pem_public(key))
    gw = gateway(jwt_key=str(pem))
    exp = int(time.time()) + 60
    good = jwt.encode({"sub": "kim", "exp": exp}, key, algorithm=alg)
    forged = jwt.encode({"sub": "kim", "exp": exp}, other, algorithm=alg)
    # An HS256 token where a public-key algorithm is expected (algorithm confusion).
    confused = jwt.encode({"sub": "kim"}, SECRET, algorithm="HS256")

    async def body():
        async with Client(gw, additional_headers=auth_headers(good)) as c:
            sent = send(gw, {"user": "kim", "data": 1})
            assert (await c.recv())["id"] == sent["id"]

    arun(body())
    assert refused(gw, headers=auth_headers(forged))[0] == 401
    status, reason = refused(gw, headers=auth_headers(confused))
    assert status == 401 and "algorithm" in reason


def test_an_unreadable_key_stops_the_start_with_a_clear_error():
    out = run_cli("serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--jwt-key",
                  "/nonexistent/key.pem", timeout=10)
    assert out.returncode != 0
    assert "jwt_key" in out.stderr and "/nonexistent/key.pem" in out.stderr
