"""systemd integration: the notify protocol over a real NOTIFY_SOCKET (READY=1 once
every shard listens, STOPPING=1 on drain, WATCHDOG=1 pings), and `ringway doctor`."""

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

from harness import (REPO, Client, arun, binary, clean_env, free_port, http_request, run_cli,
                     wait_until)


def notify_socket(tmp_path, abstract: bool):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"ringway-test-{os.getpid()}-{time.monotonic_ns()}"
        s.bind("\0" + name)
        address = "@" + name
    else:
        path = str(tmp_path / "notify.sock")
        s.bind(path)
        address = path
    s.settimeout(0.2)
    return s, address


def wait_for(sock, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            continue
        if msg.startswith(prefix):
            return msg
    raise AssertionError(f"no {prefix!r} notification within {timeout} s")


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_then_stopping(gateway, tmp_path, abstract):
    sock, address = notify_socket(tmp_path, abstract)
    gw = gateway(shards=2, env={"NOTIFY_SOCKET": address})
    ready = wait_for(sock, "READY=1", 10)
    assert "2 shard(s)" in ready, ready
    # READY came after the shards listen: the readiness endpoint agrees.
    assert gw.http("GET", "/readyz").status == 200
    gw.sigterm()
    gw.stopped = True  # this test checks the exit itself
    assert wait_for(sock, "STOPPING=1", 10)
    assert gw.wait_exit(15) == 0
    sock.close()


def test_watchdog_pings_while_shards_tick(gateway, tmp_path):
    sock, address = notify_socket(tmp_path, False)
    gateway(shards=2, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000"})
    wait_for(sock, "READY=1", 10)
    # Period 1.5 s; the shards' sweepers tick every second, so pings keep coming.
    for _ in range(2):
        wait_for(sock, "WATCHDOG=1", 5)
    sock.close()


def test_no_notify_socket_is_fine(gateway):
    gw = gateway(shards=1)
    assert gw.http("GET", "/readyz").status == 200


def levels(stdout: str) -> list[str]:
    return [line.split()[0] for line in stdout.splitlines() if line[:4] in ("PASS", "WARN", "FAIL")]


def test_doctor_reports_every_check_and_exits_with_the_worst():
    p = run_cli("doctor")
    lv = levels(p.stdout)
    for name in ("configuration", "io_uring", "file limit", "net.core.somaxconn", "shards"):
        assert name in p.stdout, p.stdout
    worst = 2 if "FAIL" in lv else 1 if "WARN" in lv else 0
    assert p.returncode == worst, (p.returncode, p.stdout)
    # Every WARN or FAIL line is followed by its fix.
    lines = p.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("WARN", "FAIL")):
            assert i + 1 < len(lines) and "fix:" in lines[i + 1], p.stdout


def test_doctor_warns_about_more_shards_than_cpus():
    p = run_cli("doctor", "--shards", str(os.cpu_count() * 4))
    line = next(l for l in p.stdout.splitlines() if l.split()[1:2] == ["shards"])
    assert line.startswith("WARN"), p.stdout
    assert p.returncode >= 1


def test_doctor_fails_on_invalid_configuration():
    p = run_cli("doctor", "--ping-interval-secs", "30", "--idle-timeout-secs", "10")
    assert p.returncode == 2, p.stdout
    assert p.stdout.startswith("FAIL") and "idle_timeout_secs" in p.stdout


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_the_gateway_runs_under_the_units_system_call_filter(redis_server, tmp_path, tls):
    """systemd/ringway.service's SystemCallFilter=, applied with libseccomp outside
    systemd (tests/seccomp/filtered.py): the gateway starts on the driver it would use
    anyway (io_uring where the host allows it), joins Redis by host name (a resolver
    thread), serves a client (over TLS too: the key exchange needs randomness) and
    drains on SIGTERM."""
    port, admin = free_port(), free_port()
    log = tmp_path / "stderr.log"
    wrapper = REPO / "tests" / "seccomp" / "filtered.py"
    cmd = [sys.executable, str(wrapper), str(binary()), "serve", "--listen", f"127.0.0.1:{port}",
           "--admin", f"127.0.0.1:{admin}", "--shards", "2",
           "--redis", f"redis://localhost:{redis_server.port}"]
    client_kw = {}
    if tls:
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1")
        issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
        issued.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        cmd += ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ca.configure_trust(ctx)
        client_kw["ssl"] = ctx
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=clean_env())
    try:
        wait_until(lambda: _ready(admin) or proc.poll() is not None, 20, what="the filtered gateway")
        assert proc.poll() is None, log.read_text()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert re.search(r"^Seccomp:\s+2$", status, re.M), "no seccomp filter on the process"
        metrics = http_request(admin, "GET", "/metrics").body.decode()
        driver = re.search(r'ringway_info\{[^}]*driver="(\w+)"', metrics).group(1)
        expected = "io_uring" if _uring_available() else "epoll"
        assert driver == expected, (driver, log.read_text())

        async def body():
            gw = type("Addr", (), {"port": port})
            async with Client(gw, **client_kw) as c:
                await c.subscribe("filtered")
                r = http_request(admin, "POST", "/v1/publish", json.dumps({"topic": "filtered", "data": 1}))
                assert r.status == 200, r.body
                assert (await c.recv())["data"] == 1

        arun(body())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
        assert "panicked" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _ready(admin: int) -> bool:
    try:
        return http_request(admin, "GET", "/readyz", timeout=1).status == 200
    except OSError:
        return False


def _uring_available() -> bool:
    """What the unfiltered binary reports (`ringway doctor`)."""
    out = run_cli("doctor").stdout
    return bool(re.search(r"io_uring available", out))
