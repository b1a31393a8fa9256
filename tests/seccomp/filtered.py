"""Runs a command under the system-call filter of systemd/ringway.service, outside
systemd: reads its SystemCallFilter= lines, expands the @groups the way systemd does
(`systemd-analyze syscall-filter`), installs the same allow-list with libseccomp
(everything else fails with EPERM, as SystemCallErrorNumber=EPERM says), then execs.

    python tests/seccomp/filtered.py target/debug/ringway serve …
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pyseccomp as seccomp

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "ringway.service"


@functools.cache
def group(name: str) -> frozenset[str]:
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True,
                         text=True, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= group(item) if item.startswith("@") else {item}
    return frozenset(calls)


def expand(items: list[str]) -> set[str]:
    calls: set[str] = set()
    for item in items:
        calls |= group(item) if item.startswith("@") else {item}
    return calls


def allowed_calls(unit: Path = UNIT) -> set[str]:
    """SystemCallFilter= lines in order: an allow-list, then `~` lines removing calls."""
    allowed: set[str] | None = None
    for line in unit.read_text().splitlines():
        m = re.match(r"\s*SystemCallFilter=(.*)", line)
        if not m:
            continue
        value = m.group(1).strip()
        if value.startswith("~"):
            assert allowed is not None, "a deny line before any allow line"
            allowed -= expand(value[1:].split())
        else:
            allowed = (allowed or set()) | expand(value.split())
    assert allowed, f"no SystemCallFilter= in {unit}"
    return allowed


def main() -> None:
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(1))  # EPERM
    for name in sorted(allowed_calls()):
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (ValueError, OSError, RuntimeError):
            pass  # not a system call on this architecture
    f.load()
    os.execv(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
