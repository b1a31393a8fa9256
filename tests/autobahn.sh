#!/usr/bin/env bash
# RFC 6455 conformance: runs the Autobahn|Testsuite fuzzing client (shared/checks/autobahn)
# against the gateway's /echo endpoint. Limits are raised so the 9.* cases' 16 MiB
# messages pass; every case must be OK or NON-STRICT (the runner exits 1 otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${RINGWAY_BIN:-target/debug/ringway}
RUNNER=${AUTOBAHN_RUNNER:-../shared/checks/autobahn/run.sh}
[ -x "$BIN" ] || { echo "autobahn: $BIN not built" >&2; exit 2; }
[ -f "$RUNNER" ] || { echo "autobahn: runner $RUNNER not found" >&2; exit 2; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
admin=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$(mktemp)
"$BIN" serve --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" --echo true \
  --max-message-bytes 20000000 --outbound-queue-bytes 40000000 2>"$log" &
gw=$!
trap 'kill $gw 2>/dev/null || true; wait $gw 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
set +e
bash "$RUNNER" --timeout 900 "ws://127.0.0.1:$port/echo"
rc=$?
set -e
if grep -q panicked "$log"; then echo "autobahn: the gateway panicked:" >&2; cat "$log" >&2; exit 1; fi
exit $rc
