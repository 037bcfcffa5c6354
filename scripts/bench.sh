#!/usr/bin/env bash
# Benchmark kms-server's hot path (GenerateDataKey, Decrypt over mutual TLS) against the raw
# SoftHSM ceiling of the same token, then notes-store (CreateNote, GetNote on SQLite and
# PostgreSQL) as a ratio of the same KMS's GenerateDataKey rate, and the KMS's durable audit
# event rate under full GenerateDataKey load, and notes-store's re-wrap campaign (rewrap-bench:
# blobs re-wrapped per second over 1,000,000 stored notes, ratio to half the HSM ceiling).
# Self-contained: builds the release binaries, then
# kms-bench and notes-bench start their own servers (own SoftHSM token, dev PKI, free port).
# notes-bench's PostgreSQL runs use KMS_TEST_PG_URL (default 127.0.0.1:5432; they are skipped
# when no server answers).
#
#   scripts/bench.sh [kms-bench options]     e.g. --streams 16 --seconds 10 --channels auto
#   make bench BENCH_ARGS="--streams 32"
#   NOTES_BENCH_ARGS="--db sqlite --seconds 4" scripts/bench.sh
#
# Progress goes to stderr; the JSON lines (one per benchmark) go to stdout and to
# target/bench/results.jsonl.
set -euo pipefail

cd -- "$(dirname -- "$0")/.."
if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi
CARGO=${CARGO:-cargo}

"$CARGO" build --release -p kms-server --bin kms-server -p notes-store --bin notes-store \
    -p kms-tests --bin kms-bench --bin notes-bench --bin rewrap-bench

target=${CARGO_TARGET_DIR:-target}
[[ "$target" = /* ]] || target="$PWD/$target"
# The harness finds the server through this variable (it would prefer target/debug otherwise).
export KMS_KMS_SERVER_BIN="$target/release/kms-server"
export KMS_NOTES_STORE_BIN="$target/release/notes-store"
mkdir -p -- "$target/bench"
"$target/release/kms-bench" "$@" | tee -- "$target/bench/results.jsonl"
# shellcheck disable=SC2086 # NOTES_BENCH_ARGS is a list of options
"$target/release/notes-bench" ${NOTES_BENCH_ARGS:-} | tee -a -- "$target/bench/results.jsonl"
# notes-store re-wrap campaign over 1,000,000 synthetic notes vs half the raw HSM ceiling
# (REWRAP_BENCH_ARGS="--notes 100000" for a shorter run).
# shellcheck disable=SC2086 # REWRAP_BENCH_ARGS is a list of options
"$target/release/rewrap-bench" ${REWRAP_BENCH_ARGS:-} | tee -a -- "$target/bench/results.jsonl"
