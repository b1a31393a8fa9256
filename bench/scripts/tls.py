#!/usr/bin/env python3
"""What TLS costs the gateway: the same client load against one ringway build with and
without `tls_cert`/`tls_key`, alternating in one session, RUNS times.

    cargo build --release -p ringway
    python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt
    .venv/bin/python bench/scripts/tls.py            # --runs, --conns, --subs, --rate, --secs

Each run starts a fresh gateway (2 shards) per mode and measures, from its /proc entry:
- handshakes: `--conns` upgrades (TCP, then TLS, then HTTP; 64 in flight) per gateway
  CPU-second, and the gateway's RSS growth per open connection;
- fan-out: `--subs` of them subscribe to one topic, the admin API publishes `--rate`
  messages/s for `--secs` s (one keep-alive connection), and every frame received is
  counted; deliveries per gateway CPU-second over the phase, and loss (what has not
  arrived 5 s after the last publish).
The client is Python (`websockets` over OpenSSL): it, not the gateway, bounds the rates
here, so compare the per-CPU-second figures, which are the gateway's own. The summary
gives each figure's median and the ratio TLS / plain taken run by run, then its median.
Results: bench/results/tls-<timestamp>/ (runs.jsonl, summary.md).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme
import websockets

REPO = Path(__file__).resolve().parents[2]
HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


class Gateway:
    def __init__(self, binary: str, tls: tuple[str, str] | None):
        self.port, self.admin = free_port(), free_port()
        cmd = [binary, "serve", "--listen", f"127.0.0.1:{self.port}", "--admin",
               f"127.0.0.1:{self.admin}", "--shards", "2", "--log", "warn"]
        if tls:
            cmd += ["--tls-cert", tls[0], "--tls-key", tls[1]]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=1)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"gateway did not start: {cmd}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


async def run_mode(gw: Gateway, ctx: ssl.SSLContext | None, a: argparse.Namespace) -> dict:
    scheme = "wss" if ctx else "ws"
    url = f"{scheme}://127.0.0.1:{gw.port}/ws"
    pid = gw.proc.pid
    sem = asyncio.Semaphore(64)
    conns: list = []

    async def connect():
        async with sem:
            ws = await websockets.connect(url, ssl=ctx, open_timeout=30, ping_interval=None,
                                          max_queue=None, compression=None)
            await ws.recv()  # welcome
            conns.append(ws)

    rss0, cpu0, t0 = rss_bytes(pid), cpu_seconds(pid), time.monotonic()
    await asyncio.gather(*(connect() for _ in range(a.conns)))
    hs_cpu, hs_wall = cpu_seconds(pid) - cpu0, time.monotonic() - t0
    await asyncio.sleep(1)
    rss_per_conn = (rss_bytes(pid) - rss0) / a.conns

    subs = conns[: a.subs]
    for ws in subs:
        await ws.send('{"op":"subscribe","topic":"f"}')
        await ws.recv()
    received = [0]

    async def reader(ws):
        try:
            async for _ in ws:
                received[0] += 1
        except websockets.ConnectionClosed:
            pass

    readers = [asyncio.ensure_future(reader(ws)) for ws in subs]
    body = json.dumps({"topic": "f", "data": {"pad": "x" * a.payload}})
    pub = http.client.HTTPConnection("127.0.0.1", gw.admin, timeout=5)
    total = int(a.rate * a.secs)
    cpu1, start = cpu_seconds(pid), time.monotonic()
    for i in range(total):
        due = start + i / a.rate
        while (now := time.monotonic()) < due:
            await asyncio.sleep(due - now)
        await asyncio.to_thread(lambda: (pub.request("POST", "/v1/publish", body,
                                                     {"Content-Type": "application/json"}),
                                         pub.getresponse().read()))
    expected = total * len(subs)
    drain_end = time.monotonic() + 5
    while received[0] < expected and time.monotonic() < drain_end:
        await asyncio.sleep(0.05)
    fan_cpu = cpu_seconds(pid) - cpu1
    delivered = received[0]
    for r in readers:
        r.cancel()
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    return {
        "handshakes_per_cpu_s": a.conns / hs_cpu if hs_cpu else float("inf"),
        "handshakes_per_s": a.conns / hs_wall,
        "rss_per_conn": rss_per_conn,
        "deliveries_per_cpu_s": delivered / fan_cpu if fan_cpu else float("inf"),
        "delivered": delivered,
        "lost": expected - delivered,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--conns", type=int, default=2000)
    p.add_argument("--subs", type=int, default=500)
    p.add_argument("--rate", type=float, default=40)
    p.add_argument("--secs", type=float, default=10)
    p.add_argument("--payload", type=int, default=100, help="bytes of padding per message")
    p.add_argument("--bin", default=str(REPO / "target/release/ringway"))
    p.add_argument("--out", default=str(REPO / "bench/results" / time.strftime("tls-%Y%m%d-%H%M%S", time.gmtime())))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ringway-tls-bench-"))
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)

    rows = []
    with open(out / "runs.jsonl", "w") as log:
        for run in range(1, a.runs + 1):
            row = {}
            for mode in ("plain", "tls"):
                gw = Gateway(a.bin, (str(cert), str(key)) if mode == "tls" else None)
                try:
                    r = asyncio.run(run_mode(gw, ctx if mode == "tls" else None, a))
                finally:
                    gw.stop()
                r.update(run=run, mode=mode)
                log.write(json.dumps(r) + "\n")
                log.flush()
                print(json.dumps(r), file=sys.stderr)
                row[mode] = r
            rows.append(row)

    figures = [("handshakes_per_cpu_s", "handshakes per gateway CPU-second", "{:,.0f}"),
               ("rss_per_conn", "gateway RSS per open connection (bytes)", "{:,.0f}"),
               ("deliveries_per_cpu_s", "deliveries per gateway CPU-second", "{:,.0f}"),
               ("lost", "deliveries lost (not arrived 5 s after the last publish)", "{:,.0f}")]
    lines = [f"`{' '.join(sys.argv)}`: {a.runs} runs, {a.conns} connections, {a.subs} subscribers × "
             f"{a.rate:g} msg/s × {a.secs:g} s, {a.payload}-byte padding", "",
             "| figure | plain (median) | TLS (median) | TLS ÷ plain (median of per-run ratios) |",
             "|---|---|---|---|"]
    for k, label, fmt in figures:
        plain = statistics.median(r["plain"][k] for r in rows)
        tls = statistics.median(r["tls"][k] for r in rows)
        ratios = [r["tls"][k] / r["plain"][k] for r in rows if r["plain"][k]]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "–"
        lines.append(f"| {label} | {fmt.format(plain)} | {fmt.format(tls)} | {ratio} |")
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
