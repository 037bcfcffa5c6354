#!/usr/bin/env bash
# notes-bench with PostgreSQL on a core of its own: the nearest this two-core machine comes to
# the deployment notes-store's PostgreSQL mode is for (a database server shared by a clinic
# group, on its own host).
#
#   scripts/bench-pg-own-core.sh [notes-bench options]    e.g. --seconds 8 --warmup 1
#
# A throwaway PostgreSQL cluster with its default durability settings (fsync and
# synchronous_commit on) runs on CPU 1 (scripts/with-postgres.sh, KMS_PG_CPUS=1); notes-bench
# and the kms-server and notes-store it starts run on CPU 0. Both sides of every ratio are
# then measured with the same single core for the load generator and our two services:
# GenerateDataKey on CPU 0 alone, CreateNote on CPU 0 with PostgreSQL's work on CPU 1.
# The SQLite run, also on CPU 0, shows the one-core figures without PostgreSQL.
# `notes-bench` (make bench) measures the default: everything sharing both cores.
#
# Progress goes to stderr; the JSON lines go to stdout and to target/bench/pg-own-core.jsonl.
set -euo pipefail

cd -- "$(dirname -- "$0")/.."
if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi
CARGO=${CARGO:-cargo}

cpus=$(nproc)
if ((cpus < 2)); then
    echo "bench-pg-own-core: needs 2 CPUs, this machine has $cpus" >&2
    exit 1
fi

# The whole workspace's binaries: the same feature set, so the same build, as `make build`.
"$CARGO" build --release --bins

target=${CARGO_TARGET_DIR:-target}
[[ "$target" = /* ]] || target="$PWD/$target"
export KMS_KMS_SERVER_BIN="$target/release/kms-server"
export KMS_NOTES_STORE_BIN="$target/release/notes-store"
mkdir -p -- "$target/bench"
KMS_PG_THROWAWAY=1 KMS_PG_DURABLE=1 KMS_PG_CPUS=1 scripts/with-postgres.sh \
    taskset -c 0 "$target/release/notes-bench" "$@" |
    tee -- "$target/bench/pg-own-core.jsonl"
