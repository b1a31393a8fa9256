"""Fixtures: a real `ringway serve` process per test (or per module), on free ports.

`gateway(**opts)` starts one gateway with `opts` as flags (`client_publish=True` →
`--client-publish true`), waits for `GET /readyz` = 200 (10 s), and on teardown sends
SIGTERM, waits ≤10 s, kills if needed and fails the test if the process panicked, had
died on its own, or did not exit 0. Extra keyword arguments: `env={...}` (process
environment additions) and `args=[...]` (raw extra command-line arguments).

The binary is `$RINGWAY_BIN`, default `target/debug/ringway` relative to the repo root;
build it first with `cargo build`.
"""

from __future__ import annotations

import os

import pytest

from harness import Gateway, binary
from cluster import HAProxy, RedisServer


def pytest_configure(config):
    if not binary().exists():
        raise pytest.UsageError(f"ringway binary not found at {binary()}: run `cargo build` "
                                "or set RINGWAY_BIN")


class _Factory:
    def __init__(self):
        self.started: list[Gateway] = []

    def __call__(self, env: dict[str, str] | None = None, args: list[str] | None = None,
                 nofile: int | None = None, **opts) -> Gateway:
        opts.setdefault("shards", 2)
        # The suite runs once per I/O driver (tests/run.sh sets RINGWAY_TEST_DRIVER);
        # a test that names a driver keeps it.
        if os.environ.get("RINGWAY_TEST_DRIVER"):
            opts.setdefault("driver", os.environ["RINGWAY_TEST_DRIVER"])
        gw = Gateway(opts, env=env, args=args, nofile=nofile)
        self.started.append(gw)
        return gw.start()

    def finish(self) -> None:
        problems = []
        for gw in self.started:
            problems += gw.stop()
        if problems:
            pytest.fail("gateway teardown: " + "\n".join(problems), pytrace=False)


@pytest.fixture
def gateway():
    """Factory: `gw = gateway(shards=2, client_publish=True)`; stopped after the test."""
    f = _Factory()
    yield f
    f.finish()


@pytest.fixture(scope="module")
def module_gateway():
    """Like `gateway`, shared by every test of a module (for independent tests)."""
    f = _Factory()
    yield f
    f.finish()


@pytest.fixture
def redis_server():
    """A private redis-server on a free port (request it before `gateway`, so gateways
    stop first and their last presence removals reach it)."""
    r = RedisServer().start()
    yield r
    r.stop()


@pytest.fixture
def haproxy():
    """Factory: `lb = haproxy(["127.0.0.1:p1", ...])`; stopped after the test."""
    started: list[HAProxy] = []

    def make(backends: list[str], server_opts: str = "") -> HAProxy:
        lb = HAProxy(backends, server_opts)
        started.append(lb)
        return lb.start()

    yield make
    for lb in started:
        lb.stop()
