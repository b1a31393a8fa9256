#!/usr/bin/env python3
"""ringway's Autobahn|Testsuite runner: RFC 6455 conformance of a WebSocket echo endpoint.

    python3 tests/autobahn/runner.py ws://127.0.0.1:PORT/echo [--cases 1.*,2.*] [--timeout 900]

What it does, in order:
1. Installs the fuzzing client if it is not there yet. The reference engine is the
   original `wstest` (autobahntestsuite 25.10.1, Python 2.7 only): it is installed into a
   virtualenv under the cache folder with the pins in `requirements-py27.txt`. A Python
   2.7 is looked for in `$PYTHON2`, on PATH and under pyenv. Without one it falls back to
   `kosoku` (PyPI), a Python 3 runner of the same case files, and says so.
2. Writes the fuzzing client's spec (every case but 12.* and 13.*: ringway does not offer
   permessage-deflate, so those are UNIMPLEMENTED by design and not run).
3. Runs the suite under a hard time limit.
4. Reads the results and prints a summary: counts per verdict, then every case that was
   not OK by name (NON-STRICT, INFORMATIONAL, UNIMPLEMENTED, FAILED), and the cases whose
   closing behaviour was not clean.
5. Applies the pass rule: every case OK or NON-STRICT, with INFORMATIONAL allowed (those
   cases have no right answer: they record what a close code or reason looked like).

Exit status: 0 pass; 1 some case is FAILED, UNIMPLEMENTED or of an unknown verdict;
2 no results (install failed, the run crashed or hit the time limit).

Environment: PYTHON2 (a Python 2.7), RINGWAY_AUTOBAHN_CACHE (install folder, default
`~/.cache/ringway/autobahn`), AUTOBAHN_ENGINE (`auto`, `wstest` or `kosoku`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WSTEST_VERSION = "25.10.1"
# The last virtualenv release that runs on, and creates, Python 2.7.
VIRTUALENV_PY27 = "20.15.1"
KOSOKU_VERSION = "0.1.0"
# permessage-deflate cases; ringway negotiates no extension.
DEFAULT_EXCLUDE = ["12.*", "13.*"]
PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}
ORDER = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]


def log(msg: str) -> None:
    print(f"autobahn: {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    base = os.environ.get("RINGWAY_AUTOBAHN_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ringway" / "autobahn"


def is_py27(candidate: str) -> bool:
    try:
        out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (2, 7))"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == "True"


def find_python27() -> str | None:
    candidates = [os.environ.get("PYTHON2", ""), shutil.which("python2.7") or "", shutil.which("python2") or ""]
    pyenv = Path(os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))) / "versions"
    if pyenv.is_dir():
        candidates += [str(p / "bin" / "python2.7") for p in sorted(pyenv.glob("2.7*"))]
    candidates += ["/usr/local/bin/python2.7", "/usr/bin/python2.7"]
    for c in candidates:
        if c and os.access(c, os.X_OK) and is_py27(c):
            return c
    return None


def run_quiet(cmd: list[str], **kw) -> None:
    """Runs an install step; on failure prints its output and raises."""
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
        raise RuntimeError(f"{' '.join(cmd[:4])} … exited {p.returncode}")


def install_wstest(cache: Path) -> Path | None:
    """The wstest executable, installing it first if needed; None without a Python 2.7."""
    venv = cache / "wstest-py27"
    wstest = venv / "bin" / "wstest"
    marker = venv / f".installed-{WSTEST_VERSION}"
    if wstest.exists() and marker.exists():
        return wstest
    py2 = find_python27()
    if py2 is None:
        log("no Python 2.7 found (set PYTHON2)")
        return None
    log(f"installing autobahntestsuite {WSTEST_VERSION} into {venv} with {py2}")
    shutil.rmtree(venv, ignore_errors=True)
    tools = cache / "virtualenv-py27"
    pip = ["-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run_quiet([py2, *pip, "--target", str(tools), f"virtualenv=={VIRTUALENV_PY27}"])
    run_quiet([py2, "-m", "virtualenv", "-q", str(venv)], env={**os.environ, "PYTHONPATH": str(tools)})
    vpy = str(venv / "bin" / "python")
    run_quiet([vpy, *pip, "-r", str(HERE / "requirements-py27.txt")])
    run_quiet([vpy, *pip, f"autobahntestsuite=={WSTEST_VERSION}"])
    run_quiet([str(wstest), "--autobahnversion"])
    marker.touch()
    return wstest


def install_kosoku(cache: Path) -> Path:
    venv = cache / "kosoku"
    exe = venv / "bin" / "kosoku"
    if exe.exists():
        return exe
    log(f"installing kosoku {KOSOKU_VERSION} into {venv}")
    run_quiet([sys.executable, "-m", "venv", str(venv)])
    run_quiet([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
               f"kosoku=={KOSOKU_VERSION}"])
    return exe


def split(s: str) -> list[str]:
    return [c.strip() for c in s.split(",") if c.strip()]


def run_suite(engine: str, exe: Path, url: str, cases: list[str], exclude: list[str], outdir: Path,
              timeout: int) -> int:
    """Runs the fuzzing client; returns its exit status (124 on the time limit)."""
    logfile = outdir / f"{engine}.log"
    if engine == "wstest":
        spec = {"outdir": str(outdir), "servers": [{"agent": "ringway", "url": url}],
                "cases": cases, "exclude-cases": exclude, "exclude-agent-cases": {}}
        (outdir / "spec.json").write_text(json.dumps(spec, indent=1))
        cmd = [str(exe), "-m", "fuzzingclient", "-s", str(outdir / "spec.json")]
    else:
        cmd = [str(exe), "-m", "fuzzingclient", "-o", str(outdir)]
        cmd += [a for c in cases if c != "*" for a in ("-i", c)]
        cmd += [a for c in exclude for a in ("-x", c)]
        cmd.append(url)
    with open(logfile, "w") as out:
        try:
            return subprocess.run(cmd, cwd=outdir, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124


def case_key(case_id: str) -> list:
    return [int(x) if x.isdigit() else x for x in case_id.split(".")]


def summarise(results: dict) -> tuple[bool, str]:
    """The summary text and whether the pass rule holds."""
    cases: dict[str, dict] = {}
    for per_agent in results.values():
        cases.update(per_agent)
    by: dict[str, list[str]] = {}
    for cid, r in cases.items():
        by.setdefault(r.get("behavior", "?"), []).append(cid)
    lines = [f"cases={len(cases)}  " + "  ".join(f"{k}={len(by.get(k, []))}" for k in ORDER)]
    unknown = sorted(set(by) - set(ORDER))
    if unknown:
        lines.append("other verdicts: " + ", ".join(f"{k}={len(by[k])}" for k in unknown))
    for verdict in ORDER[1:] + unknown:
        ids = sorted(by.get(verdict, []), key=case_key)
        if ids:
            lines.append(f"{verdict}: {' '.join(ids)}")
    unclean = sorted((c for c, r in cases.items() if r.get("behaviorClose") not in ("OK", "INFORMATIONAL", None)),
                     key=case_key)
    if unclean:
        lines.append("closing behaviour not clean (reported, not failing): "
                     + " ".join(f"{c}({cases[c]['behaviorClose']})" for c in unclean))
    bad = [c for c, r in cases.items() if r.get("behavior") not in PASSING]
    ok = bool(cases) and not bad
    lines.append("PASS: every case OK, NON-STRICT or INFORMATIONAL" if ok
                 else f"FAIL: {len(bad)} case(s) neither OK, NON-STRICT nor INFORMATIONAL" if cases
                 else "FAIL: no cases ran")
    return ok, "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("url", help="ws:// URL of an echo endpoint")
    ap.add_argument("--cases", default="*", help="comma-separated case ids or globs (default: all)")
    ap.add_argument("--exclude", default="", help="more comma-separated case ids or globs to leave out")
    ap.add_argument("--engine", default=os.environ.get("AUTOBAHN_ENGINE", "auto"),
                    choices=["auto", "wstest", "kosoku"])
    ap.add_argument("--outdir", help="report folder (default: a new folder under /tmp)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds the whole run may take")
    args = ap.parse_args()

    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        engine, exe = args.engine, None
        if engine in ("auto", "wstest"):
            exe = install_wstest(cache)
            if exe is None and engine == "wstest":
                return 2
            engine = "wstest" if exe else "kosoku"
            if exe is None:
                log("falling back to kosoku (Python 3 runner of the same cases)")
        if engine == "kosoku":
            exe = install_kosoku(cache)
    except (RuntimeError, OSError) as e:
        log(f"install failed: {e}")
        return 2

    outdir = Path(args.outdir or f"/tmp/ringway-autobahn-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    outdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rc = run_suite(engine, exe, args.url, split(args.cases) or ["*"], DEFAULT_EXCLUDE + split(args.exclude),
                   outdir, args.timeout)
    print(f"engine={engine} url={args.url} exit={rc} wall_s={time.monotonic() - started:.0f} reports={outdir}")
    if rc == 124:
        log(f"the run hit the {args.timeout} s limit")
    index = outdir / "index.json"
    if not index.exists():
        log(f"no results ({index} missing); the engine's log follows")
        sys.stderr.write((outdir / f"{engine}.log").read_text()[-4000:])
        return 2
    ok, text = summarise(json.loads(index.read_text()))
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
