"""Configuration: defaults < TOML file (--config) < RINGWAY_* environment < flags;
invalid configuration exits 64 naming the option; a busy port fails cleanly."""

import os
import signal
import socket
import subprocess

import pytest

from harness import HOST, Client, arun, binary, clean_env, free_port, wait_until


def write_config(tmp_path, text: str) -> str:
    p = tmp_path / "ringway.toml"
    p.write_text(text)
    return str(p)


def serve_expect_exit(*args: str, env=None, timeout: float = 10) -> subprocess.CompletedProcess:
    """Runs `ringway serve` (on free ports unless overridden) and expects it to exit."""
    base = []
    for flag in ("--listen", "--admin"):
        if flag not in args:
            base += [flag, f"{HOST}:{free_port()}"]
    cmd = [str(binary()), "serve", *base, *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(env), timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"`{' '.join(cmd)}` kept running; expected it to exit\n{e.stderr}") from None


def shard_count(gw) -> int:
    return len([k for k in gw.metrics() if k.startswith("ringway_connections{")])


def welcome_node(gw) -> str:
    async def body():
        async with Client(gw) as c:
            return c.welcome["node"]

    return arun(body())


# === layering ===


def test_config_file_applies(gateway, tmp_path):
    cfg = write_config(tmp_path, 'node_id = "from-file"\nclient_publish = true\nmax_topic_bytes = 8\nshards = 1\n')
    gw = gateway(config=cfg, shards=None)
    assert shard_count(gw) == 1

    async def body():
        async with Client(gw) as c:
            assert c.welcome["node"] == "from-file"
            await c.subscribe("12345678")
            err = await c.request({"op": "subscribe", "topic": "123456789"})
            assert err["code"] == "bad_topic", err
            reply = await c.request({"op": "publish", "topic": "12345678", "data": 1, "ref": 1})
            assert reply["type"] in ("published", "message"), reply

    arun(body())


def test_flag_overrides_file(gateway, tmp_path):
    cfg = write_config(tmp_path, 'node_id = "from-file"\nshards = 1\nmax_topic_bytes = 8\n')
    gw = gateway(config=cfg, node_id="from-flag", shards=2)
    assert welcome_node(gw) == "from-flag"
    assert shard_count(gw) == 2

    async def body():
        async with Client(gw) as c:  # the file's other values still apply
            assert (await c.request({"op": "subscribe", "topic": "123456789"}))["code"] == "bad_topic"

    arun(body())


def test_env_applies(gateway):
    gw = gateway(shards=None, env={"RINGWAY_SHARDS": "1", "RINGWAY_NODE_ID": "from-env"})
    assert shard_count(gw) == 1
    assert welcome_node(gw) == "from-env"


def test_env_overrides_file(gateway, tmp_path):
    cfg = write_config(tmp_path, 'shards = 2\nnode_id = "from-file"\n')
    gw = gateway(config=cfg, shards=None, env={"RINGWAY_SHARDS": "1"})
    assert shard_count(gw) == 1
    assert welcome_node(gw) == "from-file"


def test_flag_overrides_env(gateway):
    gw = gateway(shards=2, node_id="from-flag", env={"RINGWAY_SHARDS": "1", "RINGWAY_NODE_ID": "from-env"})
    assert shard_count(gw) == 2
    assert welcome_node(gw) == "from-flag"


def test_config_file_from_env(gateway, tmp_path):
    cfg = write_config(tmp_path, 'node_id = "via-env-path"\n')
    gw = gateway(env={"RINGWAY_CONFIG": cfg})
    assert welcome_node(gw) == "via-env-path"


def test_shards_zero_means_one_per_allowed_cpu(gateway):
    gw = gateway(shards=0)
    assert shard_count(gw) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("how", ["flag", "env", "file"])
def test_driver_io_uring_spelling(gateway, tmp_path, how):
    """The driver is named `io_uring` everywhere (config file, metrics, logs, the error
    that says `--driver epoll`); the flag and RINGWAY_DRIVER must accept that name."""
    # driver=None: no --driver flag from the harness, whatever driver the suite runs on.
    if how == "flag":
        gw = gateway(driver=None, args=["--driver", "io_uring"])
    elif how == "env":
        gw = gateway(driver=None, env={"RINGWAY_DRIVER": "io_uring"})
    else:
        gw = gateway(driver=None, config=write_config(tmp_path, 'driver = "io_uring"\n'))
    info = [k for k in gw.metrics() if k.startswith("ringway_info{")]
    assert 'driver="io_uring"' in info[0], info


def test_epoll_driver_by_flag_and_file(gateway, tmp_path):
    assert 'driver="epoll"' in gateway(driver="epoll").metrics_text()
    gw = gateway(config=write_config(tmp_path, 'driver = "epoll"\n'))
    assert 'driver="epoll"' in gw.metrics_text()


# === invalid configuration: exit 64, naming the option ===


def test_unknown_key_in_file_exits_64(tmp_path):
    cfg = write_config(tmp_path, 'node_id = "x"\nlisten_adress = "127.0.0.1:1"\n')
    p = serve_expect_exit("--config", cfg)
    assert p.returncode == 64, p
    assert "listen_adress" in p.stderr, p.stderr


def test_wrong_type_in_file_exits_64(tmp_path):
    p = serve_expect_exit("--config", write_config(tmp_path, 'shards = "two"\n'))
    assert p.returncode == 64, p
    assert "shards" in p.stderr, p.stderr


@pytest.mark.parametrize("text,named", [
    ('[[namespace]]\nprefix = "a:"\n[[namespace]]\nprefix = "a:"\n', "declared twice"),
    ('[[namespace]]\nprefix = "a:*"\n', "without `*`"),
    ('[[namespace]]\nprefx = "a:"\n', "prefx"),
    ('[[namespace]]\nanonymous = true\n', "prefix"),
])
def test_a_bad_namespace_exits_64(tmp_path, text, named):
    p = serve_expect_exit("--config", write_config(tmp_path, text))
    assert p.returncode == 64, p
    assert named in p.stderr, p.stderr


def test_unreadable_config_file_exits_64(tmp_path):
    missing = str(tmp_path / "nope.toml")
    p = serve_expect_exit("--config", missing)
    assert p.returncode == 64, p
    assert missing in p.stderr, p.stderr


def named(stderr: str, option: str) -> bool:
    return option in stderr or option.replace("_", "-") in stderr


INVALID = {
    "idle-not-above-ping": (["--idle-timeout-secs", "1", "--ping-interval-secs", "5"], "idle_timeout_secs"),
    "idle-equals-ping": (["--idle-timeout-secs", "5", "--ping-interval-secs", "5"], "idle_timeout_secs"),
    "ping-zero": (["--ping-interval-secs", "0"], "ping_interval_secs"),
    "max-message-tiny": (["--max-message-bytes", "100"], "max_message_bytes"),
    "max-header-tiny": (["--max-header-bytes", "100"], "max_header_bytes"),
    "max-topic-zero": (["--max-topic-bytes", "0"], "max_topic_bytes"),
    "queue-tiny": (["--outbound-queue-bytes", "100"], "outbound_queue_bytes"),
    "inbox-zero": (["--inbox-capacity", "0"], "inbox_capacity"),
    "publish-wait-too-long": (["--publish-wait-ms", "60001"], "publish_wait_ms"),
    "history-too-long": (["--history-size", "100001"], "history_size"),
    "history-ttl-too-long": (["--history-ttl-secs", "604801"], "history_ttl_secs"),
    "direct-inbox-too-big": (["--direct-inbox-size", "10001"], "direct_inbox_size"),
    "direct-inbox-ttl-too-long": (["--direct-inbox-ttl-secs", "604801"], "direct_inbox_ttl_secs"),
    "uring-entries-not-power-of-two": (["--uring-entries", "3"], "uring_entries"),
    "handshake-timeout-zero": (["--handshake-timeout-ms", "0"], "handshake_timeout_ms"),
    "node-id-with-space": (["--node-id", "a b"], "node_id"),
    "node-id-too-long": (["--node-id", "n" * 65], "node_id"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_value_exits_64_naming_the_option(case):
    args, option = INVALID[case]
    p = serve_expect_exit(*args)
    assert p.returncode == 64, p
    assert named(p.stderr, option), p.stderr


def test_invalid_value_from_env_exits_64():
    p = serve_expect_exit(env={"RINGWAY_IDLE_TIMEOUT_SECS": "1", "RINGWAY_PING_INTERVAL_SECS": "5"})
    assert p.returncode == 64, p
    assert named(p.stderr, "idle_timeout_secs"), p.stderr


def test_listen_equal_to_admin_exits_64():
    port = free_port()
    p = serve_expect_exit("--listen", f"{HOST}:{port}", "--admin", f"{HOST}:{port}")
    assert p.returncode == 64, p
    assert "admin" in p.stderr, p.stderr


@pytest.mark.parametrize("args,option", [(["--shards", "two"], "shards"), (["--slow-consumer", "maybe"], "slow-consumer"),
                                         (["--no-such-option", "1"], "no-such-option")])
def test_unparseable_flag_exits_64(args, option):
    """cli.rs: exit 64 for bad usage or configuration (not clap's default 2)."""
    p = serve_expect_exit(*args)
    assert p.returncode == 64, p
    assert option in p.stderr, p.stderr


# === ports ===


def test_listen_port_taken_by_plain_socket_fails_clearly():
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        p = serve_expect_exit("--listen", f"{HOST}:{port}", "--shards", "2")
    assert p.returncode != 0, p
    assert f"{HOST}:{port}" in p.stderr and "listen" in p.stderr.lower(), p.stderr
    assert "panicked" not in p.stderr


def test_admin_port_taken_fails_clearly():
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        p = serve_expect_exit("--admin", f"{HOST}:{port}", "--shards", "2")
    assert p.returncode != 0, p
    assert f"{HOST}:{port}" in p.stderr and "admin" in p.stderr.lower(), p.stderr
    assert "panicked" not in p.stderr


# === reload (SIGHUP) ===


def test_sighup_reloads_limits_and_says_what_needs_a_restart(gateway, tmp_path):
    path = tmp_path / "ringway.toml"
    path.write_text("max_subscriptions = 2\nclient_publish = false\n")
    gw = gateway(config=str(path), shards=1)

    async def subscribe_all(c, n: int) -> list[str]:
        return [(await c.request({"op": "subscribe", "topic": f"t{i}"}))["type"] for i in range(n)]

    async def before():
        async with Client(gw) as c:
            assert await subscribe_all(c, 3) == ["subscribed", "subscribed", "error"]

    arun(before())
    path.write_text('max_subscriptions = 3\nclient_publish = true\nnode_id = "renamed"\n')
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in gw.stderr(), 5, what="the reload log line")
    err = gw.stderr()
    assert "client_publish,max_subscriptions" in err, err
    assert "node_id" in err and "need a restart" in err, err

    async def three_allowed() -> bool:
        async with Client(gw) as c:
            return await subscribe_all(c, 3) == ["subscribed"] * 3

    # Shards take a new configuration at their next sweep (about a second).
    wait_until(lambda: arun(three_allowed()), 10, interval=0.2, what="the new limit on the shard")

    async def after():
        async with Client(gw) as c:
            assert c.welcome["node"] != "renamed"
            assert await subscribe_all(c, 4) == ["subscribed"] * 3 + ["error"]
            reply = await c.request({"op": "publish", "topic": "t0", "data": 1, "ref": 1})
            assert reply["type"] in ("published", "message"), reply

    arun(after())
    # A broken file is refused; the running configuration stays and so does the process.
    path.write_text("max_subscriptions = -1\n")
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "not reloaded" in gw.stderr(), 5, what="the refusal")
    assert gw.proc.poll() is None
    assert gw.http("GET", "/readyz").status == 200
