#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets: the upgrade request, WebSocket frames,
# protocol requests, Redis replies, client tokens, the PROXY header) for FUZZ_SECS
# seconds each (default 45), starting from its checked-in corpus (fuzz/corpus/<target>).
# Installs what it needs: a nightly toolchain (rustup, minimal profile) and cargo-fuzz
# (crates.io). Built without a sanitizer but with debug assertions: the targets look for
# panics and arithmetic overflow in safe code (the only `unsafe` is the system calls in
# src/sys.rs, which no target reaches). A crash fails the run and leaves its input in
# fuzz/artifacts/<target>/: make it a regression test before fixing it.
#
#   bash tests/fuzz.sh               # all targets
#   FUZZ_SECS=600 bash tests/fuzz.sh frames
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${FUZZ_SECS:-45}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
work=$(mktemp -d "${TMPDIR:-/tmp}/ringway-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
targets=${*:-$(cargo +nightly fuzz list)}
cargo +nightly fuzz build --sanitizer none --debug-assertions
for t in $targets; do
  mkdir -p "$work/$t"
  echo "--- $t: ${SECS} s"
  # New inputs go to the scratch folder; the checked-in corpus is only read.
  rc=0
  cargo +nightly fuzz run --sanitizer none --debug-assertions "$t" "$work/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$SECS" -rss_limit_mb=2048 -print_final_stats=1 >"$work/$t.log" 2>&1 || rc=$?
  grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|Done)" "$work/$t.log" || true
  if [ "$rc" != 0 ]; then
    tail -40 "$work/$t.log" >&2
    echo "fuzz target $t failed (exit $rc); its input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
