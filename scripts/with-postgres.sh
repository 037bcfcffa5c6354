#!/usr/bin/env bash
# Run a command with a PostgreSQL server reachable at $KMS_TEST_PG_URL.
#
#   scripts/with-postgres.sh <command> [args...]
#
# 1. KMS_TEST_PG_URL already set: run the command as is.
# 2. A server answers on $KMS_PG_CHECK_HOST:$KMS_PG_CHECK_PORT (default 127.0.0.1:5432):
#    use it, KMS_TEST_PG_URL=postgres://postgres@HOST:PORT/postgres (trust auth assumed).
# 3. Otherwise start a throwaway cluster (trust auth, user postgres) in a temp dir on
#    a free port from 55432 up, listening on 127.0.0.1 only, run the command, then
#    stop the cluster and delete its directory whatever happens. KMS_TEST_PG_SOCKET_DIR
#    names its Unix socket directory.
# The command's exit status is returned.
#
# For benchmarks (scripts/bench-pg-own-core.sh): KMS_PG_THROWAWAY=1 skips 1 and 2,
# KMS_PG_DURABLE=1 keeps the server's durability settings (fsync, synchronous_commit and
# full_page_writes are turned off otherwise), KMS_PG_CPUS=LIST runs the server under
# `taskset -c LIST`.
set -euo pipefail

(($# > 0)) || { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

log() { echo "with-postgres: $*" >&2; }

throwaway_only=${KMS_PG_THROWAWAY:-0}
if [[ "$throwaway_only" != 1 && -n "${KMS_TEST_PG_URL:-}" ]]; then
    log "using KMS_TEST_PG_URL from the environment"
    exec "$@"
fi

check_host=${KMS_PG_CHECK_HOST:-127.0.0.1}
check_port=${KMS_PG_CHECK_PORT:-5432}
if [[ "$throwaway_only" != 1 ]] && command -v pg_isready >/dev/null &&
    pg_isready -q -h "$check_host" -p "$check_port" -t 3; then
    export KMS_TEST_PG_URL="postgres://postgres@$check_host:$check_port/postgres"
    log "using running server at $check_host:$check_port"
    exec "$@"
fi

# --- throwaway cluster ---------------------------------------------------------------
pg_bin=$(find /usr/lib/postgresql/*/bin -maxdepth 1 -name initdb -printf '%h\n' 2>/dev/null |
    sort -V | tail -n 1 || true)
[[ -n "$pg_bin" && -x "$pg_bin/pg_ctl" ]] ||
    { log "no server at $check_host:$check_port and no initdb under /usr/lib/postgresql/*/bin (apt-get install postgresql)"; exit 1; }

# initdb refuses to run as root: run the server tools as the postgres user then.
if ((EUID == 0)); then
    id postgres >/dev/null 2>&1 || { log "running as root but there is no 'postgres' user"; exit 1; }
    as_pg=(runuser -u postgres --)
else
    as_pg=()
fi

port=""
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kms-pg.XXXXXX")
data="$tmp/data"

# shellcheck disable=SC2317  # invoked from the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [[ -f "$data/postmaster.pid" ]]; then
        "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 ||
            log "warning: pg_ctl stop failed"
    fi
    rm -rf -- "$tmp"
    log "throwaway cluster ${port:+on port $port }removed"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

chmod 700 "$tmp"
((EUID == 0)) && chown postgres:postgres "$tmp"

if [[ "${KMS_PG_DURABLE:-0}" == 1 ]]; then
    durability=()
else
    # The cluster is thrown away: durability buys nothing here.
    durability=(-c fsync=off -c synchronous_commit=off -c full_page_writes=off)
fi
if [[ -n "${KMS_PG_CPUS:-}" ]]; then
    # The postmaster inherits pg_ctl's affinity, and every backend the postmaster's.
    pin=(taskset -c "$KMS_PG_CPUS")
else
    pin=()
fi

if [[ "$throwaway_only" == 1 ]]; then
    log "starting a throwaway cluster as asked (KMS_PG_THROWAWAY=1, $pg_bin)"
else
    log "no server at $check_host:$check_port; starting a throwaway cluster ($pg_bin)"
fi
if ! "${as_pg[@]}" "$pg_bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C \
    >"$tmp/initdb.log" 2>&1; then
    cat "$tmp/initdb.log" >&2
    log "initdb failed"
    exit 1
fi
# Try free ports from $KMS_PG_THROWAWAY_PORT (default 55432) up; another run may grab
# the same port between the probe and the start, so a failed start moves on.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
first_port=${KMS_PG_THROWAWAY_PORT:-55432}
port=""
for ((p = first_port; p < first_port + 50; p++)); do
    port_in_use "$p" && continue
    if "${as_pg[@]}" "${pin[@]}" "$pg_bin/pg_ctl" -D "$data" -l "$tmp/server.log" -w -t 30 \
        -o "-p $p -k '$tmp' -c listen_addresses=127.0.0.1 ${durability[*]} -c max_connections=200" \
        start >/dev/null 2>>"$tmp/pg_ctl.log"; then
        port=$p
        break
    fi
    log "could not start on port $p, trying the next one"
done
if [[ -z "$port" ]]; then
    cat "$tmp/pg_ctl.log" "$tmp/server.log" >&2 2>/dev/null || true
    log "pg_ctl start failed on every port from $first_port"
    exit 1
fi

export KMS_TEST_PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
export KMS_TEST_PG_SOCKET_DIR="$tmp"
log "KMS_TEST_PG_URL=$KMS_TEST_PG_URL${KMS_PG_CPUS:+ (server on CPUs $KMS_PG_CPUS)}"

# Run the command as a child so that a signal to this script (CI timeout, Ctrl-C) is
# handled at once: forwarded to the command, then the cluster is removed. The
# subshell restores default SIGINT/SIGQUIT, which bash ignores in background jobs,
# and <&0 keeps stdin.
(trap - INT QUIT; exec "$@") <&0 &
child=$!
# shellcheck disable=SC2317  # invoked from traps
forward() {
    kill -"$1" "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
    exit "$2"
}
trap 'forward INT 130' INT
trap 'forward TERM 143' TERM
trap 'forward HUP 129' HUP
rc=0
wait "$child" || rc=$?
exit "$rc"
