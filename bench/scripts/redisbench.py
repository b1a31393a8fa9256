"""Helpers shared by the Python benchmark scripts that run gateways on a private
redis-server (presence.py, nodes.py): free ports, waiting, and the processes' lifetimes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str) -> None:
    """Polls `pred` (exceptions count as not yet) until it is true; exits on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def admin_get(admin: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=5) as r:
        return r.read().decode()


@contextmanager
def redis_server():
    """A fresh redis-server on a free port, no persistence; yields (port, client)."""
    tmp = tempfile.mkdtemp(prefix="ringway-bench-redis-")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", tmp, "--maxclients", "10000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, decode_responses=True)
        wait_for(client.ping, 10, "redis-server")
        yield port, client
    finally:
        proc.kill()
        proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def gateways(binary: str, redis_port: int, count: int, shards: int, extra: list[str], secret: str):
    """`count` gateways on that Redis (node ids n0…), each ready; yields [(port, admin)]."""
    env = {**os.environ, "RINGWAY_JWT_SECRET": secret}
    env.pop("RUST_LOG", None)
    procs, addrs = [], []
    try:
        for n in range(count):
            port, admin = free_port(), free_port()
            procs.append(subprocess.Popen(
                [binary, "serve", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                 "--redis", f"redis://127.0.0.1:{redis_port}", "--node-id", f"n{n}", "--shards", str(shards),
                 *extra],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            addrs.append((port, admin))
        for _, admin in addrs:
            wait_for(lambda a=admin: admin_get(a, "/readyz") == "ready\n", 30, "a gateway ready")
        yield addrs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
