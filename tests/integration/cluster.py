"""Helpers for multi-node tests: a real redis-server on a free port, HAProxy in TCP mode
in front of gateways, and client tokens (JWT).

    r = RedisServer().start()          # redis-server on 127.0.0.1:<free port>
    nodes = [gateway(**cluster_opts(r, i)) for i in (1, 2, 3)]
    async with Client(nodes[1], token=token("alice")) as alice: ...
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
import redis

from harness import HOST, free_port, wait_until

SECRET = "integration-test-secret-0123456789"


def token(user: str, secret: str = SECRET, expires_in: int = 600, **claims) -> str:
    """An HS256 token for `user` (its `sub`), valid for `expires_in` seconds."""
    body = {"sub": user, "exp": int(time.time()) + expires_in, **claims}
    return jwt.encode(body, secret, algorithm="HS256")


def auth_headers(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def _find(program: str) -> str:
    path = shutil.which(program) or next(
        (p for p in (f"/usr/bin/{program}", f"/usr/sbin/{program}") if os.path.exists(p)), None)
    if not path:
        raise AssertionError(f"{program} not found: tests/run.sh installs it (apt-get)")
    return path


class RedisServer:
    """A private redis-server, loopback only, on a free port; no persistence unless
    `aof` (append-only file, fsync every second)."""

    def __init__(self, aof: bool = False, tls: Any = None, ca_file: str | None = None,
                 password: str | None = None, replica_of: "RedisServer | None" = None,
                 cluster: bool = False):
        # `tls`: a trustme leaf certificate, and `ca_file` its CA: the server speaks TLS
        # only (`rediss://`), without asking clients for certificates. `password`: AUTH
        # required (and used towards its master); `replica_of`: start as its replica.
        self.aof = aof
        self.tls, self.ca_file = tls, ca_file
        self.password, self.replica_of = password, replica_of
        # `cluster`: cluster mode, joined into one by `RedisCluster`.
        self.cluster = cluster
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="ringway-redis-")
        self._log = Path(self.dir) / "redis.log"

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{HOST}:{self.port}"

    def start(self) -> "RedisServer":
        cmd = [_find("redis-server"), "--port", str(self.port), "--bind", HOST,
               "--save", "", "--appendonly", "yes" if self.aof else "no", "--dir", self.dir,
               "--logfile", str(self._log), "--protected-mode", "no"]
        if self.tls:
            cert, key = Path(self.dir) / "cert.pem", Path(self.dir) / "key.pem"
            self.tls.cert_chain_pems[0].write_to_path(str(cert))
            self.tls.private_key_pem.write_to_path(str(key))
            cmd[cmd.index("--port") + 1] = "0"
            cmd += ["--tls-port", str(self.port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                    "--tls-ca-cert-file", self.ca_file, "--tls-auth-clients", "no"]
        if self.password:
            cmd += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of:
            cmd += ["--replicaof", HOST, str(self.replica_of.port)]
        if self.cluster:
            # A master unreachable for one second is failed over to its replica.
            # The bus port is given: port + 10000 (the default) may be taken, or past 65535.
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", f"{self.dir}/nodes.conf",
                    "--cluster-node-timeout", "1000", "--cluster-port", str(free_port())]
            if self.tls:
                cmd += ["--tls-cluster", "yes", "--tls-replication", "yes"]
        # Replicas sync at once (Redis 7 waits 5 s for more replicas by default).
        cmd += ["--repl-diskless-sync-delay", "0"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(self._pings, 10, what=f"redis-server on port {self.port}")
        if self.replica_of:
            wait_until(lambda: self.client().info("replication")["master_link_status"] == "up", 15,
                       what=f"redis-server on port {self.port} to sync with its master")
        return self

    def _pings(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": self.ca_file} if self.tls else {}
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, decode_responses=True,
                           password=self.password, **tls)

    def kill(self) -> None:
        """SIGKILL: Redis vanishes with every connection, subscription and key."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def restart(self) -> None:
        self.kill()
        self.start()

    def shutdown(self) -> None:
        """SIGTERM: Redis writes its append-only file out and exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    def restart_gracefully(self) -> None:
        self.shutdown()
        self.start()

    def calls(self, command: str) -> int:
        """Calls of `command` so far (INFO commandstats)."""
        stats = self.client().info("commandstats")
        return int(stats.get(f"cmdstat_{command.lower()}", {}).get("calls", 0))

    def numsub(self, channel: str) -> int:
        return dict(self.client().pubsub_numsub(channel)).get(channel, 0)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """A Redis Cluster of `masters` masters with one replica each, on free ports, made
    with `redis-cli --cluster create`; a master unreachable for a second fails over."""

    def __init__(self, masters: int = 3, tls: Any = None, ca_file: str | None = None):
        # `tls`, `ca_file`: every node speaks TLS only, its bus and replication too.
        self.servers = [RedisServer(cluster=True, tls=tls, ca_file=ca_file) for _ in range(2 * masters)]
        self.masters = masters
        self.tls, self.ca_file = tls, ca_file

    @property
    def url(self) -> str:
        """The gateway's `redis` option: two of the nodes as seeds."""
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://" + ",".join(f"{HOST}:{s.port}" for s in self.servers[:2])

    def start(self) -> "RedisCluster":
        for s in self.servers:
            s.start()
        tls = ["--tls", "--cacert", self.ca_file] if self.tls else []
        subprocess.run([_find("redis-cli"), *tls, "--cluster", "create",
                        *(f"{HOST}:{s.port}" for s in self.servers),
                        "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=60)
        wait_until(self._settled, 30, interval=0.2, what="every cluster node to see all slots served")
        return self

    def _settled(self) -> bool:
        try:
            for s in self.servers:
                info = s.client().execute_command("CLUSTER", "INFO")
                if "cluster_state:ok" not in info:
                    return False
                if s.client().info("replication")["role"] == "slave" and \
                        s.client().info("replication").get("master_link_status") != "up":
                    return False
            return True
        except redis.RedisError:
            return False

    def client(self) -> "redis.RedisCluster":
        return redis.RedisCluster(host=HOST, port=self.servers[0].port, decode_responses=True,
                                  socket_timeout=5)

    def master_of(self, key: str) -> RedisServer:
        """The server that serves `key`'s slot now."""
        slot = int(self.servers[0].client().execute_command("CLUSTER", "KEYSLOT", key))
        for s in self.servers:
            if s.proc and s.proc.poll() is None:
                try:
                    for start, end, *nodes in s.client().execute_command("CLUSTER", "SLOTS"):
                        if start <= slot <= end:
                            port = int(nodes[0][1])
                            return next(x for x in self.servers if x.port == port)
                except redis.RedisError:
                    continue
        raise AssertionError(f"no node serves slot {slot}")

    def live_masters(self) -> list[RedisServer]:
        out = []
        for s in self.servers:
            try:
                if s.proc and s.proc.poll() is None and s.client().info("replication")["role"] == "master":
                    out.append(s)
            except redis.RedisError:
                pass
        return out

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


class Sentinels:
    """`count` Redis Sentinels (redis-server --sentinel) watching `master` under `name`,
    quorum 2: a master unreachable for one second is failed over to its replica."""

    def __init__(self, master: RedisServer, name: str = "mymaster", count: int = 3):
        self.master, self.name = master, name
        self.ports = [free_port() for _ in range(count)]
        self.procs: list[subprocess.Popen] = []
        self.dir = tempfile.mkdtemp(prefix="ringway-sentinel-")

    @property
    def url(self) -> str:
        """The gateway's `redis` option: the master's password, every Sentinel."""
        auth = f":{self.master.password}@" if self.master.password else ""
        hosts = ",".join(f"{HOST}:{p}" for p in self.ports)
        return f"redis+sentinel://{auth}{hosts}/{self.name}"

    def start(self, replicas: int = 1) -> "Sentinels":
        for port in self.ports:
            conf = Path(self.dir) / f"sentinel-{port}.conf"
            lines = [f"port {port}", f"bind {HOST}", f"dir {self.dir}",
                     f"logfile {self.dir}/sentinel-{port}.log",
                     f"sentinel monitor {self.name} {HOST} {self.master.port} 2",
                     f"sentinel down-after-milliseconds {self.name} 1000",
                     f"sentinel failover-timeout {self.name} 3000",
                     f"sentinel parallel-syncs {self.name} 1"]
            if self.master.password:
                lines.append(f"sentinel auth-pass {self.name} {self.master.password}")
            conf.write_text("\n".join(lines) + "\n")
            self.procs.append(subprocess.Popen([_find("redis-server"), str(conf), "--sentinel"],
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
        # Only Sentinels that know each other and the replica can fail over.
        wait_until(lambda: self._settled(replicas), 30, interval=0.2,
                   what="sentinels that know each other and the replica")
        return self

    def client(self, i: int = 0) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.ports[i], socket_timeout=5, decode_responses=True)

    def _settled(self, replicas: int) -> bool:
        try:
            for i in range(len(self.ports)):
                m = self.client(i).sentinel_master(self.name)
                if m["num-other-sentinels"] < len(self.ports) - 1 or m["num-slaves"] < replicas:
                    return False
            return True
        except redis.RedisError:
            return False

    def master_port(self) -> int:
        """The master's port as the first Sentinel sees it."""
        return int(self.client().sentinel_get_master_addr_by_name(self.name)[1])

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def cluster_opts(r: RedisServer, n: int, **opts) -> dict:
    """Flags for node `n` of a cluster on Redis `r` (2 shards, node id `node<n>`)."""
    return {"redis": r.url, "node_id": f"node{n}", "shards": 2, **opts}


class HAProxy:
    """HAProxy in TCP mode, round robin over `backends` (host:port), with retries and
    redispatch so a client that reconnects after a node goes away lands on a live one."""

    def __init__(self, backends: list[str], server_opts: str = ""):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ringway-haproxy-")
        lines = [
            "global",
            "  maxconn 1000",
            "defaults",
            "  mode tcp",
            "  timeout connect 2s",
            "  timeout client 60s",
            "  timeout server 60s",
            "  retries 3",
            "  option redispatch",
            "frontend ws",
            f"  bind {HOST}:{self.port}",
            "  default_backend nodes",
            "backend nodes",
            "  balance roundrobin",
        ]
        lines += [f"  server n{i} {b} check inter 500ms fall 1 rise 1 {server_opts}".rstrip()
                  for i, b in enumerate(backends, 1)]
        self.config = Path(self.dir) / "haproxy.cfg"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "HAProxy":
        haproxy = _find("haproxy")
        check = subprocess.run([haproxy, "-c", "-f", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen([haproxy, "-db", "-f", str(self.config)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_until(self._listening, 10, what=f"haproxy on port {self.port}")
        return self

    def _listening(self) -> bool:
        import socket
        with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=1):
            return True
        return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
