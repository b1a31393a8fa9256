#!/usr/bin/env bash
# The whole ringway test suite: the command README.md gives and .ci/run calls.
# Installs what the tests need (redis-server and haproxy from Debian's packages, a Python
# venv with pinned test clients; Autobahn's runner installs itself), then runs, in order: format and lint checks, unit tests,
# integration tests against the real binary with an independent client (Python
# `websockets`), the Autobahn|Testsuite conformance run, and the load generator's
# small correctness scenarios.
#
#   bash tests/run.sh            # everything
#   SKIP_AUTOBAHN=1 bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
step() { printf '\n=== %s\n' "$*"; }

step "system packages: redis-server, haproxy, systemd-analyze (Debian packages)"
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
# systemd-analyze expands the unit's system-call filter groups for the seccomp test.
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  # Debian's packages start no service here (no init in CI); the tests start their own
  # redis-server and haproxy on free ports.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi
redis-server --version

step "test clients (Python venv: tests/requirements.txt)"
PY=${PYTHON3:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r tests/requirements.txt

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "unit tests"
cargo test --workspace

step "build the gateway and the load generator"
cargo build --workspace
export RINGWAY_BIN="$ROOT/target/debug/ringway"
export RINGWAY_BENCH_BIN="$ROOT/target/debug/ringway-bench"
export RINGWAY_BASELINE_BIN="$ROOT/target/debug/ringway-baseline"

step "integration tests (real gateway processes, Python websockets client)"
.venv/bin/python -m pytest tests/integration -q -p no:cacheprovider

if [ "${SKIP_AUTOBAHN:-0}" != 1 ]; then
  step "Autobahn|Testsuite against /echo"
  bash tests/autobahn.sh
fi
