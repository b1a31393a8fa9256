"""Zero-downtime restart on one host, run inside a private network namespace by
test_restart.py (`ip netns exec NS python restart_scenario.py BIN`).

1. Old gateway A listens on PORT; subscribers connect to it and subscribe.
2. Connector threads keep opening connections (upgrade + welcome) the whole time.
3. A publisher publishes to A's admin API with increasing sequence numbers.
4. New gateway B starts on the same PORT (SO_REUSEPORT) and becomes ready.
5. A gets SIGTERM: it stops accepting, closes its clients with 1001 over its spread
   window, and exits 0.
Prints a JSON report: every connection attempt's outcome and, per subscriber, whether
the messages it received before its 1001 are an unbroken prefix of what A acknowledged.
"""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import RawWS, free_port  # noqa: E402

BIN = sys.argv[1]
PORT = free_port()


def start(admin: int) -> subprocess.Popen:
    p = subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{PORT}", "--admin", f"127.0.0.1:{admin}",
                          "--shards", "2", "--drain-spread-secs", "1", "--drain-timeout-secs", "5"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1).status == 200:
                return p
        except OSError:
            time.sleep(0.05)
    raise SystemExit("gateway did not become ready")


admin_a, admin_b = free_port(), free_port()
a = start(admin_a)
subs = [RawWS(PORT) for _ in range(20)]
for s in subs:
    assert s.recv_json()["type"] == "welcome"
    s.send_json({"op": "subscribe", "topic": "t"})
    assert s.recv_json()["type"] == "subscribed"

stop = threading.Event()
outcomes: dict[str, int] = {}
lock = threading.Lock()


def count(what: str) -> None:
    with lock:
        outcomes[what] = outcomes.get(what, 0) + 1


def connector() -> None:
    while not stop.is_set():
        try:
            r = RawWS(PORT, timeout=5)
            first = r.recv_json()
            count("upgraded" if first.get("type") == "welcome" else "unexpected")
            r.close()
        except ConnectionRefusedError:
            count("refused")
        except (ConnectionResetError, BrokenPipeError, EOFError):
            count("reset")
        except (TimeoutError, socket.timeout):
            count("timeout")
        except AssertionError as e:  # a non-101 answer
            count("http_error: " + str(e)[:60])


acked: list[str] = []


def publisher() -> None:
    seq = 0
    while not stop.is_set():
        body = json.dumps({"topic": "t", "data": seq}).encode()
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{admin_a}/v1/publish", data=body, method="POST")
            acked.append(json.loads(urllib.request.urlopen(req, timeout=2).read())["id"])
        except OSError:
            return  # A's admin is gone
        seq += 1
        time.sleep(0.005)


threads = [threading.Thread(target=connector) for _ in range(4)] + [threading.Thread(target=publisher)]
for t in threads:
    t.start()
time.sleep(0.5)
b = start(admin_b)
time.sleep(0.5)
t_term = time.monotonic()
a.terminate()
a_rc = a.wait(10)
drain_secs = time.monotonic() - t_term
time.sleep(0.5)  # keep connecting to B alone for a moment
stop.set()
for t in threads:
    t.join(10)


def received_until_close(s: RawWS) -> tuple[list[str], int | None]:
    ids, code = [], None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            f = s.recv_frame(max(0.01, deadline - time.monotonic()))
        except (TimeoutError, EOFError):
            break
        if f.opcode == 0x1:
            ids.append(json.loads(f.payload)["id"])
        elif f.opcode == 0x8:
            code = int.from_bytes(f.payload[:2], "big")
            break
    return ids, code


report = {"a_exit": a_rc, "drain_secs": round(drain_secs, 2), "outcomes": outcomes, "acked": len(acked),
          "subscribers": []}
for s in subs:
    ids, code = received_until_close(s)
    report["subscribers"].append({"close": code, "received": len(ids), "prefix": ids == acked[:len(ids)]})
b.terminate()
report["b_exit"] = b.wait(10)
report["a_panicked"] = b"panicked" in a.stderr.read()
print(json.dumps(report))
