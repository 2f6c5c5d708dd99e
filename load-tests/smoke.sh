#!/usr/bin/env bash
# A seconds-long run of the load-test harness, to prove it works (never a timing assertion).
# Builds in debug, reusing the workspace's target dir; needs the gateway's debug binary
# (`cargo build` or `cargo test` at the root builds it). Run from anywhere.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
cargo build --bin tributary
cargo build --manifest-path load-tests/Cargo.toml
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$CARGO_TARGET_DIR/debug/load-tests" run --gateway "$CARGO_TARGET_DIR/debug/tributary" --repo "$root" --out "$out" smoke
test -s "$out/smoke.json" && test -s "$out/smoke.md" && test -s "$out/smoke.svg"
echo "load-tests smoke: OK"
