#!/usr/bin/env bash
# RFC 6455 conformance: starts the gateway with /echo on free ports and runs the
# Autobahn|Testsuite fuzzing client against it (tests/autobahn/runner.py installs the
# client, runs every case but permessage-deflate's, prints the summary and applies the pass
# rule). Limits are raised so the 9.* cases' 16 MiB messages pass.
#
#   bash tests/autobahn.sh [runner options, e.g. --cases 1.*,5.*]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${RINGWAY_BIN:-target/debug/ringway}
[ -x "$BIN" ] || { echo "autobahn: $BIN not built" >&2; exit 2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
admin=$(free_port)
log=$(mktemp)
"$BIN" serve --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" --echo true \
  --max-message-bytes 20000000 --outbound-queue-bytes 40000000 2>"$log" &
gw=$!
trap 'kill $gw 2>/dev/null || true; wait $gw 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null || { echo "autobahn: gateway not ready" >&2; cat "$log" >&2; exit 2; }
set +e
python3 tests/autobahn/runner.py "$@" "ws://127.0.0.1:$port/echo"
rc=$?
set -e
if grep -q panicked "$log"; then echo "autobahn: the gateway panicked:" >&2; cat "$log" >&2; exit 1; fi
kill -0 $gw 2>/dev/null || { echo "autobahn: the gateway exited during the run" >&2; cat "$log" >&2; exit 1; }
exit $rc
