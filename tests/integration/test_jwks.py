"""Token keys from a JSON Web Key Set (`jwt_jwks_url`): served here by a real HTTP(S)
server on a free port, with keys and tokens made by PyJWT. A token verifies against the
key its `kid` names; a `kid` not in the set is refused and sets off one fetch, so a key
published before use works on the client's retry; a gateway starts while the key
server is down and catches up; SIGHUP fetches the set at once; HTTPS is checked
against the CA bundle in `SSL_CERT_FILE`."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import InvalidStatus

from cluster import auth_headers
from harness import HOST, Client, arun, free_port, run_cli, wait_until


class KeyServer:
    """Serves `keys` as a JWKS at /jwks.json and counts the fetches."""

    def __init__(self, port: int | None = None, tls: trustme.LeafCert | None = None):
        self.keys: list[dict] = []
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.fetches += 1
                body = json.dumps({"keys": server.keys}).encode()
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((HOST, port or free_port()), Handler)
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.configure_cert(ctx)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.httpd.server_address[1]}/jwks.json"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class SigningKey:
    def __init__(self, kid: str, kind: str = "rsa"):
        self.kid = kid
        if kind == "rsa":
            self.private, self.alg = rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private, self.alg = ec.generate_private_key(ec.SECP256R1()), "ES256"
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk = {**jwk, "kid": kid, "use": "sig", "alg": self.alg}

    def token(self, user: str, kid: str | None = "own") -> str:
        headers = {} if kid is None else {"kid": self.kid if kid == "own" else kid}
        body = {"sub": user, "exp": int(time.time()) + 600}
        return jwt.encode(body, self.private, algorithm=self.alg, headers=headers)


@pytest.fixture
def key_servers():
    started: list[KeyServer] = []

    def make(**kw) -> KeyServer:
        s = KeyServer(**kw)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


async def connect(gw, tok: str) -> str:
    """Who the gateway takes `tok`'s holder for: the user a direct send reaches."""
    async with Client(gw, additional_headers=auth_headers(tok)) as c:
        sub = jwt.decode(tok, options={"verify_signature": False})["sub"]
        r = gw.http("POST", "/v1/send", json.dumps({"user": sub, "data": "hi"}),
                    {"Content-Type": "application/json"})
        assert r.status == 200, (r.status, r.body)
        msg = await c.recv()
        assert msg["data"] == "hi", msg
        return sub


async def connects_within(gw, tok: str, seconds: float, what: str) -> None:
    """Retries `tok` (refused with 401 meanwhile) until the gateway takes it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            await connect(gw, tok)
            return
        except InvalidStatus as e:
            assert e.response.status_code == 401, e.response
            assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
            await asyncio.sleep(0.1)


async def refused(gw, tok: str) -> str:
    with pytest.raises(InvalidStatus) as e:
        await connect(gw, tok)
    assert e.value.response.status_code == 401, e.value.response
    return e.value.response.body.decode()


def test_tokens_verify_by_kid_and_an_unknown_kid_fetches_the_set_once(gateway, key_servers):
    a, b = SigningKey("a"), SigningKey("b", kind="ec")
    server = key_servers()
    server.keys = [a.jwk]
    gw = gateway(jwt_jwks_url=server.url)

    async def body():
        assert await connect(gw, a.token("alice")) == "alice"
        assert server.fetches == 1
        # Signed by another RSA key but naming a: the signature does not verify; an
        # ES256 token naming a (an RS256 key) is refused for its algorithm.
        assert "signature" in await refused(gw, SigningKey("x").token("mallory", kid="a"))
        assert "algorithm" in await refused(gw, b.token("mallory", kid="a"))
        # The provider publishes b before signing with it; the first token with it is
        # refused and sets off a fetch, and the retry passes.
        server.keys = [a.jwk, b.jwk]
        assert "being fetched again" in await refused(gw, b.token("bob"))
        await connects_within(gw, b.token("bob"), 5, "the new key fetched")
        assert server.fetches == 2
        # A flood of unknown key ids costs the provider no more than one fetch per 10 s.
        for i in range(20):
            await refused(gw, a.token("eve", kid=f"nope{i}"))
        assert server.fetches <= 3, server.fetches
        # With two keys in the set, a token without `kid` cannot be matched.
        assert "key id" in await refused(gw, a.token("carol", kid=None))

    arun(body())


def test_the_gateway_starts_while_the_key_server_is_down_and_catches_up(gateway, key_servers):
    a = SigningKey("a")
    port = free_port()
    gw = gateway(jwt_jwks_url=f"http://{HOST}:{port}/jwks.json")

    async def body():
        assert "not fetched yet" in await refused(gw, a.token("alice"))
        server = key_servers(port=port)
        server.keys = [a.jwk]
        # Retried every 5 s while the set is empty.
        await connects_within(gw, a.token("alice"), 12, "the key set fetched")

    arun(body())


def test_sighup_fetches_the_set_at_once(gateway, key_servers):
    a, c = SigningKey("a"), SigningKey("c")
    server = key_servers()
    server.keys = [a.jwk]
    gw = gateway(jwt_jwks_url=server.url)

    async def body():
        assert await connect(gw, a.token("alice")) == "alice"
        # The provider retires a and publishes c; the operator reloads.
        server.keys = [c.jwk]
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: server.fetches >= 2, 5, what="the fetch SIGHUP sets off")
        assert await connect(gw, c.token("carol")) == "carol"
        await refused(gw, a.token("alice"))

    arun(body())


def test_https_is_checked_against_the_hosts_ca_bundle(gateway, key_servers, tmp_path):
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    a = SigningKey("a")
    server = key_servers(tls=ca.issue_cert(HOST))
    server.keys = [a.jwk]
    trusted = gateway(jwt_jwks_url=server.url, env={"SSL_CERT_FILE": str(bundle)})
    # Another bundle: the provider's certificate does not verify, nothing is fetched.
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    untrusting = gateway(jwt_jwks_url=server.url, env={"SSL_CERT_FILE": str(other)})

    async def body():
        assert await connect(trusted, a.token("alice")) == "alice"
        assert "not fetched yet" in await refused(untrusting, a.token("alice"))

    arun(body())
    assert "token keys not fetched yet" in untrusting.stderr()


def test_jwks_configuration_errors_exit_64():
    both = run_cli("serve", "--jwt-jwks-url", "https://id.example.com/jwks.json", "--listen", f"{HOST}:0",
                   "--admin", f"{HOST}:0", env={"RINGWAY_JWT_SECRET": "s" * 32})
    assert both.returncode == 64 and "jwt_jwks_url" in both.stderr, both.stderr
    scheme = run_cli("serve", "--jwt-jwks-url", "ftp://id.example.com/jwks.json", "--listen", f"{HOST}:0",
                     "--admin", f"{HOST}:0")
    assert scheme.returncode == 64 and "http" in scheme.stderr, scheme.stderr
