"""Zero-downtime restart on one host: a new process starts beside the old one on the
same port (SO_REUSEPORT) and takes new connections while the old one drains. Runs in a
private network namespace with net.ipv4.tcp_migrate_req=1 (tuning/99-ringway.conf), so
connections still queued on the old process's listeners move to the new one when it
closes them instead of being reset."""

import json
import os
import subprocess
import sys
from pathlib import Path

from harness import binary


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def test_restart_beside_the_old_process_refuses_nothing_and_loses_nothing():
    ns = f"ringway-restart-{os.getpid()}"
    made = sh("ip", "netns", "add", ns)
    assert made.returncode == 0, f"needs root and iproute2 to create a network namespace: {made.stderr}"
    try:
        for cmd in (["ip", "link", "set", "lo", "up"], ["sysctl", "-qw", "net.ipv4.tcp_migrate_req=1"]):
            r = sh("ip", "netns", "exec", ns, *cmd)
            assert r.returncode == 0, r.stderr
        scenario = Path(__file__).with_name("restart_scenario.py")
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(scenario), str(binary())],
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        report = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        sh("ip", "netns", "del", ns)
    outcomes = report["outcomes"]
    assert report["a_exit"] == 0 and report["b_exit"] == 0, report
    assert not report["a_panicked"], report
    assert outcomes.get("upgraded", 0) > 100, report
    failures = {k: v for k, v in outcomes.items() if k != "upgraded"}
    assert not failures, f"connection attempts that failed during the restart: {report}"
    assert report["acked"] > 20, report
    for s in report["subscribers"]:
        assert s["close"] == 1001, report
        assert s["prefix"] and s["received"] > 0, f"a subscriber of the old process missed messages: {report}"
