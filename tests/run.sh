#!/usr/bin/env bash
# The whole ringway test suite: the command README.md gives and .ci/run calls.
# Installs what the tests need (redis-server and haproxy from Debian's packages, a Python
# venv with pinned test clients; Autobahn's runner installs itself), then runs, in order: format and lint checks, unit tests,
# integration tests against the real binary with an independent client (Python
# `websockets`), the Autobahn|Testsuite conformance run, the load generator's small
# correctness scenarios, and every fuzz target for a bounded time (tests/fuzz.sh).
#
# It runs from a fresh copy of the project's files (what git tracks, plus new files it does
# not ignore) in an empty temporary folder, so a test that leans on anything beside the
# checkout fails here as it would in a user's clone. The build folder and the venv of the
# checkout are reused to save time (RINGWAY_TEST_IN_PLACE=1 skips the copy).
#
#   bash tests/run.sh            # everything
#   SKIP_AUTOBAHN=1 SKIP_FUZZ=1 bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
step() { printf '\n=== %s\n' "$*"; }

if [ "${RINGWAY_TEST_IN_PLACE:-0}" != 1 ] && git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  step "copy of the project alone into an empty folder"
  work=$(mktemp -d "${TMPDIR:-/tmp}/ringway-tests.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  # Files git knows or would add; deleted-but-unstaged files are skipped.
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    xargs -0 cp --parents -t "$work" --
  echo "running from $work (nothing beside it)"
  set +e
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}" RINGWAY_TEST_VENV="$ROOT/.venv" \
    RINGWAY_TEST_IN_PLACE=1 bash "$work/tests/run.sh" "$@"
  rc=$?
  exit $rc
fi
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
VENV=${RINGWAY_TEST_VENV:-$ROOT/.venv}

step "the project stands alone: nothing refers to files outside the repository"
if grep -rIl --exclude-dir=target --exclude-dir=.venv --exclude-dir=.git -e '\.\./shared' . ; then
  echo "these files refer to a folder beside the checkout, which a user's clone does not have" >&2
  exit 1
fi

step "system packages: redis-server, redis-cli, haproxy, systemd-analyze (Debian packages)"
need=()
command -v redis-server >/dev/null || need+=(redis-server)
# redis-cli makes the Redis Cluster of the cluster tests (`--cluster create`).
command -v redis-cli >/dev/null || need+=(redis-tools)
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
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tests/requirements.txt

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "unit tests"
cargo test --workspace

step "build the gateway and the load generator"
cargo build --workspace
export RINGWAY_BIN="$TARGET/debug/ringway"
export RINGWAY_BENCH_BIN="$TARGET/debug/ringway-bench"
export RINGWAY_BASELINE_BIN="$TARGET/debug/ringway-baseline"

step "integration tests (real gateway processes, Python websockets client), default driver (io_uring)"
"$VENV/bin/python" -m pytest tests/integration -q -p no:cacheprovider

# Again on the epoll driver; the modules that already run on both drivers are left out.
step "integration tests on the epoll driver"
RINGWAY_TEST_DRIVER=epoll "$VENV/bin/python" -m pytest tests/integration -q -p no:cacheprovider \
  --ignore=tests/integration/test_pubsub.py --ignore=tests/integration/test_bad_input.py \
  --ignore=tests/integration/test_history.py --ignore=tests/integration/test_bench_smoke.py

if [ "${SKIP_AUTOBAHN:-0}" != 1 ]; then
  step "Autobahn|Testsuite against /echo"
  bash tests/autobahn.sh
fi

if [ "${SKIP_FUZZ:-0}" != 1 ]; then
  step "fuzzing: every target for ${FUZZ_SECS:-45} s from its checked-in corpus (nightly, cargo-fuzz)"
  bash tests/fuzz.sh
fi
