"""`rediss://`: nodes join through a real redis-server that speaks TLS only (its
certificate from a throwaway CA, found through `SSL_CERT_FILE`). Topics cross nodes as
through plain Redis; a Redis whose certificate the host does not trust is never used,
and the log and `ringway doctor` say why."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
import trustme

from cluster import RedisServer, cluster_opts
from harness import HOST, Client, binary, clean_env, free_port, http_request, run_cli, wait_until


@pytest.fixture
def tls_redis(tmp_path):
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    r = RedisServer(tls=ca.issue_cert(HOST), ca_file=str(bundle)).start()
    yield r, bundle
    r.stop()


def test_nodes_share_topics_through_redis_over_tls(gateway, tls_redis):
    r, bundle = tls_redis
    assert r.url.startswith("rediss://")
    env = {"SSL_CERT_FILE": str(bundle)}
    a = gateway(**cluster_opts(r, 1), env=env)
    b = gateway(**cluster_opts(r, 2), env=env)

    async def body():
        async with Client(a) as on_a, Client(b) as on_b:
            await on_a.subscribe("t")
            await on_b.subscribe("t")
            b.publish("t", "across")
            a.publish("t", "back")
            for c in (on_a, on_b):
                got = sorted([(await c.recv())["data"], (await c.recv())["data"]])
                assert got == ["across", "back"], got

    asyncio.run(body())
    # The nodes' commands reached this Redis (over TLS: it has no plain port).
    assert r.calls("publish") + r.calls("fcall") >= 2
    ok = run_cli("doctor", "--redis", r.url, env=env)
    line = next(l for l in ok.stdout.splitlines() if " redis " in f" {l} ")
    assert line.startswith("PASS") and "Redis 7." in line, ok.stdout


def test_an_untrusted_redis_certificate_is_refused_and_said(tls_redis, tmp_path):
    r, _ = tls_redis
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    env = {"SSL_CERT_FILE": str(other)}
    admin = free_port()
    log = tmp_path / "stderr.log"
    # Not ready without its Redis, so started here rather than by the fixture (which
    # waits for /readyz).
    with open(log, "w") as err:
        proc = subprocess.Popen([str(binary()), "serve", "--listen", f"{HOST}:{free_port()}",
                                 "--admin", f"{HOST}:{admin}", "--redis", r.url],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=clean_env(env))
    try:
        wait_until(lambda: "invalid peer certificate" in log.read_text(), 10,
                   what="the refused certificate logged")
        assert http_request(admin, "GET", "/readyz").status == 503
        reply = http_request(admin, "POST", "/v1/publish", '{"topic":"t","data":1}')
        assert reply.status == 503, (reply.status, reply.body)
        assert proc.poll() is None, log.read_text()
    finally:
        proc.terminate()
        proc.wait(10)
    down = run_cli("doctor", "--redis", r.url, env=env)
    line = next(l for l in down.stdout.splitlines() if " redis " in f" {l} ")
    assert line.startswith("FAIL") and "certificate" in line, down.stdout
