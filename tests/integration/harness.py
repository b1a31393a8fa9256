"""Test harness for ringway's integration tests: a real gateway process, an independent
WebSocket client (`websockets`), a raw-socket WebSocket client for malformed input, and
small HTTP helpers. Everything talks to 127.0.0.1 only; every wait has a deadline.

    gw = gateway(shards=2, client_publish=True)   # fixture from conftest.py
    async with Client(gw) as c:                    # websockets client, welcome already read
        await c.subscribe("news")
        gw.publish("news", {"n": 1})               # admin HTTP API
        assert (await c.recv())["data"] == {"n": 1}
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import resource
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# The I/O drivers the pub/sub and bad-input tests run on (`--driver NAME`).
DRIVERS = ["io_uring", "epoll"]


def binary() -> Path:
    """The ringway binary: `$RINGWAY_BIN`, else target/debug/ringway (relative to repo)."""
    p = Path(os.environ.get("RINGWAY_BIN", "target/debug/ringway"))
    return p if p.is_absolute() else REPO / p


def free_port() -> int:
    """A port nothing listens on right now (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without RINGWAY_* / RUST_LOG, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGWAY_") and k != "RUST_LOG"}
    env.update(extra or {})
    return env


def flag_args(opts: dict[str, Any]) -> list[str]:
    """`{"client_publish": True, "shards": 2}` → `--client-publish true --shards 2`."""
    out: list[str] = []
    for key, value in opts.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        out += ["--" + key.replace("_", "-"), str(value)]
    return out


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "") -> Any:
    """Polls `pred` until it returns something truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(interval)


def arun(coro, timeout: float = 30):
    """Runs an async test body with an overall deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# === metrics ===

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus/OpenMetrics text → {'name{labels}': value} (`name` alone without labels)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise AssertionError(f"unparseable metrics line: {line!r}")
        name, labels, value = m.groups()
        key = name + (labels if labels and labels != "{}" else "")
        out[key] = float(value)
    return out


def labels_of(key: str) -> tuple[str, dict[str, str]]:
    name, _, rest = key.partition("{")
    return name, dict(_LABEL.findall(rest))


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of every series of `name` whose labels include `labels` (e.g. over shards)."""
    total = 0.0
    for key, value in metrics.items():
        n, ls = labels_of(key)
        if n == name and all(ls.get(k) == v for k, v in labels.items()):
            total += value
    return total


# === HTTP ===


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(port: int, method: str, path: str, body: bytes | str | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 5) -> HttpResponse:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        if isinstance(body, str):
            body = body.encode()
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return HttpResponse(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def raw_http(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Sends raw bytes and returns everything received until EOF, reset or timeout."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(request)
        return read_until_eof(s, timeout)


def read_until_eof(s: socket.socket, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


def status_of(response: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
    assert m, f"no HTTP status line in {response[:200]!r}"
    return int(m.group(1))


# === the gateway process ===


class Gateway:
    """One `ringway serve` process on free ports."""

    def __init__(self, opts: dict[str, Any], env: dict[str, str] | None = None,
                 args: list[str] | None = None, nofile: int | None = None):
        self.opts = dict(opts)
        # A file limit for the gateway process (soft and hard), for tests that run it
        # out of descriptors.
        self.nofile = nofile
        self.extra_env = env or {}
        self.extra_args = args or []
        self.port = 0
        self.admin_port = 0
        self.proc: subprocess.Popen | None = None
        self.stopped = False
        self._stderr = tempfile.NamedTemporaryFile(prefix="ringway-stderr-", suffix=".log", delete=False)
        self._raw: list[RawWS] = []

    # --- addresses ---
    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws"

    @property
    def echo_url(self) -> str:
        return f"ws://{HOST}:{self.port}/echo"

    @property
    def admin_addr(self) -> str:
        return f"{HOST}:{self.admin_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_addr}"

    # --- lifecycle ---
    def start(self, attempts: int = 3) -> "Gateway":
        for attempt in range(attempts):
            self.port, self.admin_port = free_port(), free_port()
            while self.admin_port == self.port:
                self.admin_port = free_port()
            opts = {"listen": f"{HOST}:{self.port}", "admin": self.admin_addr, **self.opts}
            cmd = [str(binary()), "serve", *flag_args(opts), *self.extra_args]
            self._stderr.seek(0)
            self._stderr.truncate()
            limit = None
            if self.nofile:
                n = self.nofile

                def limit():
                    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=self._stderr, env=clean_env(self.extra_env),
                                         preexec_fn=limit)
            if self._wait_ready(10.0):
                return self
            err = self.stderr()
            if self.proc.poll() is not None and "cannot listen" in err and attempt + 1 < attempts:
                continue  # lost a race for a free port: try new ones
            self._kill()
            self.stopped = True  # nothing left to tear down
            raise AssertionError(f"gateway not ready within 10 s: {cmd}\nstderr:\n{err}")
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if http_request(self.admin_port, "GET", "/readyz", timeout=1).status == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def stderr(self) -> str:
        return Path(self._stderr.name).read_text(errors="replace")

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> list[str]:
        """Closes harness sockets, SIGTERMs, waits ≤10 s, kills if needed. Returns problems."""
        problems: list[str] = []
        for r in self._raw:
            r.close()
        if self.proc is None:
            return problems
        if not self.stopped:
            rc = self.proc.poll()
            if rc is not None:
                problems.append(f"gateway exited on its own during the test (rc={rc})")
            else:
                self.sigterm()
                rc = self.wait_exit(10)
                if rc is None:
                    problems.append("gateway did not exit within 10 s of SIGTERM (killed)")
                    self._kill()
                elif rc != 0:
                    problems.append(f"gateway exited with {rc} after SIGTERM")
        else:
            self._kill()
        err = self.stderr()
        if "panicked" in err:
            problems.append("gateway stderr contains 'panicked'")
        if problems:
            problems.append("stderr:\n" + err[-6000:])
        with contextlib.suppress(OSError):
            os.unlink(self._stderr.name)
        return problems

    # --- admin API ---
    def http(self, method: str, path: str, body: bytes | str | None = None,
             headers: dict[str, str] | None = None) -> HttpResponse:
        return http_request(self.admin_port, method, path, body, headers)

    def metrics_text(self) -> str:
        r = self.http("GET", "/metrics")
        assert r.status == 200, r
        return r.body.decode()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.metrics_text())

    def metric(self, name: str, **labels: str) -> float:
        """Sum over every series of `name` matching `labels`."""
        return metric_sum(self.metrics(), name, **labels)

    @property
    def epoch(self) -> str:
        """This node's history epoch (single node), as `GET /v1/history` tells it."""
        if getattr(self, "_epoch", None) is None:
            r = self.http("GET", "/v1/history?topic=_")
            assert r.status == 200, r
            self._epoch = r.json()["epoch"]
        return self._epoch

    def publish(self, topic: str, data: Any) -> str:
        """POST /v1/publish; returns the message id."""
        r = self.http("POST", "/v1/publish", json.dumps({"topic": topic, "data": data}),
                      {"Content-Type": "application/json"})
        assert r.status == 200, (r.status, r.body)
        return r.json()["id"]

    def publisher(self) -> "Publisher":
        return Publisher(self.admin_port)

    # --- command line ---
    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 15) -> subprocess.CompletedProcess:
        return run_cli(*args, env=env, timeout=timeout)

    # --- raw sockets ---
    def raw(self, path: str = "/ws", **kw) -> "RawWS":
        r = RawWS(self.port, path, **kw)
        self._raw.append(r)
        return r

    def raw_http(self, request: bytes, timeout: float = 5) -> bytes:
        return raw_http(self.port, request, timeout)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary()), *args], capture_output=True, text=True,
                          env=clean_env(env), timeout=timeout, stdin=subprocess.DEVNULL)


class Publisher:
    """A keep-alive HTTP connection for publishing many messages quickly."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection(HOST, port, timeout=5)

    def publish(self, topic: str, data: Any) -> str:
        self.conn.request("POST", "/v1/publish", body=json.dumps({"topic": topic, "data": data}),
                          headers={"Content-Type": "application/json"})
        r = self.conn.getresponse()
        body = r.read()
        assert r.status == 200, (r.status, body)
        return json.loads(body)["id"]

    def close(self) -> None:
        self.conn.close()


def id_key(message_id: str) -> tuple[int, ...]:
    """Message ids are `<ms>-<seq>`; compare them as numbers."""
    assert re.fullmatch(r"\d+-\d+", message_id), message_id
    return tuple(int(p) for p in message_id.split("-"))


# === the independent client (websockets) ===


class Client:
    """A protocol v1 client on the `websockets` library. `welcome` holds the first frame."""

    def __init__(self, gw: Gateway, path: str = "/ws", expect_welcome: bool = True, **kw):
        # `ssl=<SSLContext>`: the same client over `wss://`.
        scheme = "wss" if kw.get("ssl") else "ws"
        self.url = f"{scheme}://{HOST}:{gw.port}{path}"
        self.expect_welcome = expect_welcome
        kw.setdefault("open_timeout", 5)
        kw.setdefault("close_timeout", 3)
        kw.setdefault("ping_interval", None)
        kw.setdefault("max_queue", None)
        self.kw = kw
        self.ws = None
        self.welcome: dict | None = None

    async def __aenter__(self) -> "Client":
        self.ws = await ws_connect(self.url, **self.kw)
        if self.expect_welcome:
            self.welcome = await self.recv()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()

    async def send(self, msg: Any) -> None:
        await self.ws.send(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))

    async def recv_raw(self, timeout: float = 5):
        return await asyncio.wait_for(self.ws.recv(), timeout)

    async def recv(self, timeout: float = 5) -> dict:
        raw = await self.recv_raw(timeout)
        assert isinstance(raw, str), f"expected a text frame, got {raw!r}"
        return json.loads(raw)

    async def request(self, msg: Any, timeout: float = 5) -> dict:
        await self.send(msg)
        return await self.recv(timeout)

    async def subscribe(self, topic: str) -> None:
        reply = await self.request({"op": "subscribe", "topic": topic})
        assert reply == {"type": "subscribed", "topic": topic}, reply

    async def unsubscribe(self, topic: str) -> None:
        reply = await self.request({"op": "unsubscribe", "topic": topic})
        assert reply == {"type": "unsubscribed", "topic": topic}, reply

    async def silent(self, within: float = 0.3) -> None:
        """Asserts nothing arrives within `within` seconds."""
        try:
            got = await asyncio.wait_for(self.ws.recv(), within)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {got!r}")

    async def closed_with(self, timeout: float = 5) -> int | None:
        """Waits for the server's close (discarding messages); returns its close code."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                await asyncio.wait_for(self.ws.recv(), max(0.01, deadline - time.monotonic()))
        except ConnectionClosed as e:
            return e.rcvd.code if e.rcvd else None
        except asyncio.TimeoutError:
            pass
        raise AssertionError(f"connection not closed within {timeout}s")


async def open_clients(stack: contextlib.AsyncExitStack, gw: Gateway, n: int, **kw) -> list[Client]:
    return [await stack.enter_async_context(Client(gw, **kw)) for _ in range(n)]


def shard_of(c: Client) -> str:
    """The shard a connection landed on: the prefix of its welcome `conn`."""
    return c.welcome["conn"].split("-")[0]


async def open_on_every_shard(stack: contextlib.AsyncExitStack, gw: Gateway, want: int, shards: int = 2,
                              limit: int = 64) -> list[Client]:
    """At least `want` clients, with some on each shard (SO_REUSEPORT spreads them by
    hash, so a few more are opened when needed, up to `limit`)."""
    clients = await open_clients(stack, gw, want)
    while len({shard_of(c) for c in clients}) < shards and len(clients) < limit:
        clients += await open_clients(stack, gw, 4)
    seen = {shard_of(c) for c in clients}
    assert seen == {str(i) for i in range(shards)}, f"all {len(clients)} connections landed on shard(s) {seen}"
    return clients


class Collector:
    """Reads a client's frames in the background into `messages` (keeps it reading)."""

    def __init__(self, client: Client):
        self.client = client
        self.messages: list[dict] = []
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.client.ws:
                self.messages.append(json.loads(raw))

    async def wait_for(self, count: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline and not self.task.done():
            await asyncio.sleep(0.01)
        return self.messages

    def stop(self) -> None:
        self.task.cancel()


# === the raw WebSocket client ===


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        assert self.opcode == 0x8, self
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    def json(self) -> Any:
        assert self.opcode == 0x1, self
        return json.loads(self.payload)


def encode_frame(opcode: int, payload: bytes = b"", fin: bool = True, masked: bool = True,
                 rsv: int = 0, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    mbit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def upgrade_request(path: str = "/ws", key: str | None = None, host: bool = True) -> tuple[bytes, str]:
    key = key or base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1"]
    if host:
        lines.append(f"Host: {HOST}")
    lines += ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
              "Sec-WebSocket-Version: 13"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), key


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


class RawWS:
    """A hand-made WebSocket client over a plain socket, for what real clients never send."""

    def __init__(self, port: int, path: str = "/ws", rcvbuf: int | None = None,
                 timeout: float = 5, handshake: bool = True, after_request: bytes = b"",
                 ssl: Any = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((HOST, port))
        if ssl is not None:
            # `ssl`: an SSLContext; the same client over TLS (`wss://`).
            self.sock = ssl.wrap_socket(self.sock, server_hostname=HOST)
        self.buf = b""
        self.path = path
        self.upgraded_at: float | None = None
        if handshake:
            self.handshake(after_request)

    def handshake(self, after_request: bytes = b"") -> None:
        req, key = upgrade_request(self.path)
        self.sock.sendall(req + after_request)
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in self.buf:
            assert time.monotonic() < deadline, "no upgrade response within 5 s"
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            assert chunk, f"EOF during handshake: {self.buf!r}"
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        )
        assert headers.get(b"sec-websocket-accept") == accept_for(key).encode(), head
        self.upgraded_at = time.monotonic()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes = b"", **kw) -> None:
        self.sock.sendall(encode_frame(opcode, payload, **kw))

    def send_json(self, obj: Any) -> None:
        self.send_frame(0x1, json.dumps(obj).encode())

    def _fill(self, need: int, deadline: float) -> None:
        while len(self.buf) < need:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame before the deadline")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout as e:
                raise TimeoutError("no frame before the deadline") from e
            if not chunk:
                raise EOFError("connection closed by the gateway")
            self.buf += chunk

    def recv_frame(self, timeout: float = 5) -> Frame:
        deadline = time.monotonic() + timeout
        self._fill(2, deadline)
        b0, b1 = self.buf[0], self.buf[1]
        assert not b1 & 0x80, "server frames must not be masked"
        n, at = b1 & 0x7F, 2
        if n == 126:
            self._fill(4, deadline)
            n, at = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            self._fill(10, deadline)
            n, at = struct.unpack("!Q", self.buf[2:10])[0], 10
        self._fill(at + n, deadline)
        frame = Frame(bool(b0 & 0x80), b0 & 0x0F, self.buf[at:at + n])
        self.buf = self.buf[at + n:]
        return frame

    def recv_json(self, timeout: float = 5) -> Any:
        return self.recv_frame(timeout).json()

    def recv_close(self, timeout: float = 5) -> Frame:
        """Reads frames until a close frame (data frames and pings are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if f.opcode == 0x8:
                return f

    def at_eof(self, timeout: float = 5) -> bool:
        """True once the gateway closed the TCP connection (EOF or reset) within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not chunk:
                return True
            self.buf += chunk
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
