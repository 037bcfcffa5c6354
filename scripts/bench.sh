#!/usr/bin/env bash
# Benchmark kms-server's hot path (GenerateDataKey, Decrypt over mutual TLS) against the raw
# SoftHSM ceiling of the same token. Self-contained: builds the release binaries, then
# kms-bench starts its own kms-server (own SoftHSM token, dev PKI, SQLite, free port).
#
#   scripts/bench.sh [kms-bench options]     e.g. --streams 16 --seconds 10 --channels auto
#   make bench BENCH_ARGS="--streams 32"
#
# Progress goes to stderr; the JSON lines (one per benchmark) go to stdout and to
# target/bench/results.jsonl.
set -euo pipefail

cd -- "$(dirname -- "$0")/.."
if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi
CARGO=${CARGO:-cargo}

"$CARGO" build --release -p kms-server --bin kms-server -p kms-tests --bin kms-bench

target=${CARGO_TARGET_DIR:-target}
[[ "$target" = /* ]] || target="$PWD/$target"
# The harness finds the server through this variable (it would prefer target/debug otherwise).
export KMS_KMS_SERVER_BIN="$target/release/kms-server"
mkdir -p -- "$target/bench"
"$target/release/kms-bench" "$@" | tee -- "$target/bench/results.jsonl"
