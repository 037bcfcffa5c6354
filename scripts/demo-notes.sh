#!/usr/bin/env bash
# Session-notes part of `make demo` (called by scripts/demo.sh; runs on its own too), on the
# dev environment (.dev/softhsm, .dev/pki) with the release binaries kms-server, notes-store,
# kmsctl and notesctl. Two sites, a and b, each with its own notes-store (client certificate
# spiffe://dev.clinic/site/<s>/notes-store, KMS key notes/<s>) and its own practice app
# (spiffe://dev.clinic/site/<s>/app, bound to its site by notes-store's [[callers]]). Shows:
# a note written and read back; only ciphertext in the database; with the KMS stopped the
# read is refused (UNAVAILABLE) and, once the KMS is back, succeeds without restarting
# notes-store; a cross-site read refused by notes-store (PERMISSION_DENIED); site B's
# notes-store given a copy of site A's database cannot unwrap site A's keys (the KMS refuses
# it: DATA_LOSS from notes-store, the refusal in the KMS audit log). Everything is stopped
# with SIGTERM, also on failure.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$root"
dev="$root/.dev"
pki="$dev/pki"
bin="$root/target/release"
work="$dev/notes-demo"    # this run's databases, logs and ready files

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ok() { printf '   ok: %s\n' "$*"; }
fail() { printf '   FAILED: %s\n' "$*" >&2; exit 1; }
expect_refused() {
    local code=$1; shift
    local out
    if out=$("$@" 2>&1); then fail "accepted: $*"; fi
    [[ "$out" == *"$code"* ]] || fail "wanted $code, got: $out"
    ok "refused with $code: ${out#error: }"
}

for b in kms-server kmsctl notes-store notesctl; do
    [[ -x "$bin/$b" ]] || fail "release binary $b missing: run make build"
done
[[ -f "$dev/softhsm/softhsm2.conf" && -f "$pki/ca.key" && -f "$pki/admin.pem" ]] ||
    fail "dev environment missing: run make dev-env"
command -v sqlite3 >/dev/null || fail "sqlite3 missing: run make deps"
rm -rf "$work"
mkdir -p -m 0700 "$work"
start_ms=$(date +%s%3N)

export SOFTHSM2_CONF="$dev/softhsm/softhsm2.conf"
export KMS_PKCS11_PIN_FILE="$dev/softhsm/user.pin" KMS_PKCS11_TOKEN_LABEL=kms-dev
# scripts/demo.sh sets KMS_DEMO_CONFIG / KMS_DEMO_DB for BACKEND=tpm (and KMS_TPM_TCTI).
kms_config=${KMS_DEMO_CONFIG:-config/kms-server.example.toml}
export KMS_DATABASE_URL="sqlite:${KMS_DEMO_DB:-$dev/kms.db}" KMS_METRICS_LISTEN=""
export KMS_TLS_CERT="$pki/server.pem" KMS_TLS_KEY="$pki/server.key" KMS_TLS_CLIENT_CA="$pki/ca.pem"
export KMSCTL_CA="$pki/ca.pem"

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# wait_ready OUT PID TAG LOG: waits for "TAG listen=ADDR" in OUT, prints ADDR.
wait_ready() {
    for _ in $(seq 1 150); do
        grep -q "^$3 " "$1" 2>/dev/null && break
        kill -0 "$2" 2>/dev/null || { cat "$4" >&2; fail "$3: process $2 exited"; }
        sleep 0.1
    done
    sed -n "s/^$3 listen=//p" "$1" | grep . || fail "no $3 line (see $4)"
}
# stop PID NAME: SIGTERM and a clean exit.
stop() {
    kill -TERM "$1"
    wait "$1" || fail "$2 exit status $?"
    ok "$2 (pid $1) exited cleanly"
}

# start_kms LISTEN: sets kms_pid and kms_addr.
start_kms() {
    KMS_LISTEN=$1 "$bin/kms-server" --config "$kms_config" \
        >"$work/kms.ready" 2>>"$work/kms-server.log" &
    kms_pid=$!
    pids+=("$kms_pid")
    kms_addr=$(wait_ready "$work/kms.ready" "$kms_pid" KMS_READY "$work/kms-server.log")
}

# start_notes NAME SITE DB: a notes-store with site SITE's KMS identity and key; sets
# notes_pid and notes_addr.
start_notes() {
    local name=$1 site=$2 db=$3
    NOTES_LISTEN=127.0.0.1:0 NOTES_METRICS_LISTEN="" NOTES_DATABASE_URL="sqlite:$db" \
        NOTES_TLS_CERT="$pki/server.pem" NOTES_TLS_KEY="$pki/server.key" \
        NOTES_TLS_CLIENT_CA="$pki/ca.pem" NOTES_KMS_CA="$pki/ca.pem" \
        NOTES_KMS_ENDPOINTS="https://localhost:${kms_addr##*:}" NOTES_KMS_KEY="notes/$site" \
        NOTES_KMS_CLIENT_CERT="$pki/site-$site-notes.pem" \
        NOTES_KMS_CLIENT_KEY="$pki/site-$site-notes.key" \
        "$bin/notes-store" --config config/notes-store.example.toml \
        >"$work/$name.ready" 2>"$work/$name.log" &
    notes_pid=$!
    pids+=("$notes_pid")
    notes_addr=$(wait_ready "$work/$name.ready" "$notes_pid" NOTES_READY "$work/$name.log")
}

# app SITE ADDR notesctl-args...: notesctl as site SITE's practice app against ADDR.
app() {
    local site=$1 addr=$2; shift 2
    NOTESCTL_ENDPOINT="https://localhost:${addr##*:}" NOTESCTL_CA="$pki/ca.pem" \
        NOTESCTL_CERT="$pki/site-$site-app.pem" NOTESCTL_KEY="$pki/site-$site-app.key" \
        "$bin/notesctl" "$@"
}
admin() { KMSCTL_CERT="$pki/admin.pem" KMSCTL_KEY="$pki/admin.key" "$bin/kmsctl" "$@"; }
auditor() { KMSCTL_CERT="$pki/auditor.pem" KMSCTL_KEY="$pki/auditor.key" "$bin/kmsctl" "$@"; }

step "Issue each site's certificates: its notes-store (for the KMS) and its practice app"
for s in a b; do
    for role in notes:notes-store app:app; do
        name="site-$s-${role%%:*}" uri="spiffe://dev.clinic/site/$s/${role#*:}"
        status=$("$bin/kmsctl" --json pki issue-client --dir "$pki" --name "$name" --uri "$uri" |
            jq -r .status)
        ok "$name.pem  $uri  ($status)"
    done
done

step "Start kms-server; the admin creates one key per site: notes/a and notes/b"
start_kms 127.0.0.1:0
export KMSCTL_ENDPOINT="https://localhost:${kms_addr##*:}"
ok "kms-server on $kms_addr (pid $kms_pid)"
for s in a b; do
    if ! admin key describe "notes/$s" >/dev/null 2>&1; then
        admin key create --alias "notes/$s" --description "session notes of site $s" >/dev/null
    fi
    ok "notes/$s: key $(admin --json key describe "notes/$s" | jq -r .key_id)"
done

step "Start site A's notes-store (KMS identity spiffe://dev.clinic/site/a/notes-store, key notes/a)"
db_a="$work/site-a.db"
start_notes notes-a a "$db_a"
pid_a=$notes_pid addr_a=$notes_addr
ok "listening on $addr_a (pid $pid_a), database $db_a"

step "Site A's app writes a session note"
marker="demo-$(date +%s%N)"
body_a="Client reports fewer panic attacks since starting the breathing exercises. [$marker]"
note_a=$(app a "$addr_a" --json create-note --site a --client c-1001 --author dr-lee \
    --session-date 2026-11-28 --body "$body_a" | jq -r .note_id)
ok "note $note_a (site a, client c-1001)"

step "It reads the note back (notes-store asks the KMS to unwrap its data key)"
app a "$addr_a" get-note "$note_a" --acting-user dr-lee --purpose TREATMENT | sed 's/^/   /'
[[ $(app a "$addr_a" --json get-note "$note_a" --acting-user dr-lee | jq -r .body) == "$body_a" ]] ||
    fail "the body read back differs"
ok "same body returned"

step "The database holds only ciphertext and a KMS-wrapped data key"
sqlite3 "$db_a" "SELECT note_id, revision, length(wrapped_key) AS wrapped_key_bytes,
    hex(substr(body_ciphertext, 1, 16)) || '...' AS body_ciphertext FROM note_revisions" \
    -header -column | sed 's/^/   /'
if grep -qaF "$marker" "$db_a"*; then fail "the note text is in $db_a"; fi
ok "the note text appears nowhere in $(basename -a "$db_a"* | tr '\n' ' ')"

step "Stop the KMS: notes-store cannot read the note (fails closed)"
kms_port=${kms_addr##*:}
stop "$kms_pid" kms-server
expect_refused UNAVAILABLE app a "$addr_a" get-note "$note_a" --acting-user dr-lee

step "Restart the KMS on the same port: the same notes-store process reads again"
start_kms "127.0.0.1:$kms_port"
ok "kms-server back on $kms_addr (pid $kms_pid)"
for attempt in $(seq 1 20); do
    if out=$(app a "$addr_a" --json get-note "$note_a" --acting-user dr-lee 2>&1); then break; fi
    sleep 0.5
done
[[ $(jq -r .body <<<"$out" 2>/dev/null) == "$body_a" ]] || fail "no read after the restart: $out"
kill -0 "$pid_a" || fail "notes-store is gone"
ok "read the note again (attempt $attempt), notes-store still pid $pid_a"

step "Start site B's notes-store (spiffe://dev.clinic/site/b/notes-store, key notes/b); B's app writes"
start_notes notes-b b "$work/site-b.db"
pid_b=$notes_pid addr_b=$notes_addr
ok "listening on $addr_b (pid $pid_b)"
body_b="Site B intake: sleep improving. [$marker-b]"
note_b=$(app b "$addr_b" --json create-note --site b --client c-2001 --author dr-kim \
    --session-date 2026-11-28 --body "$body_b" | jq -r .note_id)
[[ $(app b "$addr_b" --json get-note "$note_b" --acting-user dr-kim | jq -r .body) == "$body_b" ]] ||
    fail "site B's note did not read back"
ok "note $note_b written and read back by site B's app"

step "Site B's app cannot read, list or write site A's notes (notes-store [[callers]])"
expect_refused PERMISSION_DENIED app b "$addr_a" get-note "$note_a" --acting-user dr-kim
expect_refused PERMISSION_DENIED app b "$addr_a" list-notes --site a --client c-1001
expect_refused PERMISSION_DENIED app b "$addr_b" create-note --site a --client c-1001 \
    --author dr-kim --session-date 2026-11-28 --body "not allowed"

step "Site B's notes-store given a copy of site A's database cannot decrypt it (the KMS refuses)"
sqlite3 "$db_a" ".backup '$work/site-a-copy.db'"
start_notes notes-b-with-a-copy b "$work/site-a-copy.db"
pid_c=$notes_pid addr_c=$notes_addr
ok "site B's identity on a copy of site A's notes: $addr_c (pid $pid_c)"
# The app is site A's, so notes-store lets the call through; the KMS then refuses to unwrap a
# notes/a data key for spiffe://dev.clinic/site/b/notes-store. To a caller with no right on a
# key the KMS answers NOT_FOUND (it does not confirm the key exists), which notes-store reports
# as DATA_LOSS: the stored record cannot be opened. The KMS audit log records the refusal.
expect_refused DATA_LOSS app a "$addr_c" get-note "$note_a" --acting-user dr-lee
query=(audit query --from "$start_ms" --operation Decrypt
    --caller spiffe://dev.clinic/site/b/notes-store --context site=a)
auditor "${query[@]}" | sed 's/^/   /'
events=$(auditor --json "${query[@]}")
outcomes=$(jq -r .outcome <<<"$events" | sort -u | paste -sd, -)
keys=$(jq -r .key_id <<<"$events" | sort -u | paste -sd, -)
[[ -n "$outcomes" && "$outcomes" != *OK* ]] ||
    fail "site B's Decrypt of site A data in the audit log: '${outcomes}'"
ok "the KMS audit log records site B's Decrypt of site A data (key $keys) as refused: $outcomes"

step "Stop everything with SIGTERM"
stop "$pid_c" "notes-store (B on A's copy)"
stop "$pid_b" "notes-store B"
stop "$pid_a" "notes-store A"
stop "$kms_pid" kms-server
trap - EXIT
if grep -qF "$marker" "$work"/*.log; then fail "note text appears in a server log"; fi
ok "no note text in the server logs ($work/*.log)"
