#!/usr/bin/env bash
# End-to-end demo on the dev environment that `make demo` prepared (.dev/softhsm, .dev/pki):
# starts kms-server (release build) on 127.0.0.1, creates a key, generates a data key,
# decrypts it, shows that a tampered blob, a wrong encryption context and a disabled key are
# refused, prints the demo's audit trail (as the auditor), exports it, verifies it offline
# against the HSM-held signing key and shows that an edited export fails verification, then
# stops the server with SIGTERM. Then scripts/demo-notes.sh: encrypted session notes through
# notes-store for two sites (ciphertext at rest, KMS outage and recovery, cross-site refusals).
# Exits non-zero if any step does not behave.
#
# BACKEND=tpm (`make demo BACKEND=tpm`): the same scenario with the master keys in a TPM: a
# swtpm started here (state in .dev/swtpm, port $SWTPM_PORT or 2321/2322), stopped at the
# end, config/kms-server.tpm.example.toml and its own metadata database .dev/kms-tpm.db.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$root"
dev="$root/.dev"
bin="$root/target/release"
log="$dev/kms-server.demo.log"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ok() { printf '   ok: %s\n' "$*"; }
fail() { printf '   FAILED: %s\n' "$*" >&2; exit 1; }

[[ -x "$bin/kms-server" && -x "$bin/kmsctl" ]] || fail "release binaries missing: run make build"
[[ -f "$dev/softhsm/softhsm2.conf" && -f "$dev/pki/ca.pem" ]] || fail "dev environment missing: run make dev-env"
[[ -f "$dev/pki/auditor.pem" ]] || fail "no auditor certificate in $dev/pki: run make dev-pki"
[[ -f "$dev/pki/admin.pem" ]] || fail "no admin certificate in $dev/pki: run make dev-pki"
demo_start_ms=$(date +%s%3N)

backend=${BACKEND:-pkcs11}
# demo-notes.sh reads these two as well.
export KMS_DEMO_CONFIG=config/kms-server.example.toml KMS_DEMO_DB="$dev/kms.db"
device="HSM"
swtpm_pid=""
stop_swtpm() {
    [[ -n "$swtpm_pid" ]] || return 0
    swtpm_ioctl --tcp "127.0.0.1:$((swtpm_port + 1))" -s >/dev/null 2>&1 || kill "$swtpm_pid" 2>/dev/null || true
    wait "$swtpm_pid" 2>/dev/null || true
    swtpm_pid=""
}
case "$backend" in
pkcs11) ;;
tpm)
    device="TPM"
    command -v swtpm >/dev/null || fail "swtpm missing: run make deps"
    swtpm_dir="$dev/swtpm"
    swtpm_port=${SWTPM_PORT:-2321}
    mkdir -p -m 0700 "$swtpm_dir"
    # A new TPM state has new seeds: key blobs in an older kms-tpm.db could not load any more.
    [[ -e "$swtpm_dir/tpm2-00.permall" ]] || rm -f "$dev"/kms-tpm.db*
    if (exec 3<>"/dev/tcp/127.0.0.1/$swtpm_port") 2>/dev/null; then
        fail "port $swtpm_port is in use (stale swtpm? set SWTPM_PORT)"
    fi
    step "Start swtpm (TPM 2.0 simulator, state in .dev/swtpm, port $swtpm_port)"
    swtpm socket --tpm2 \
        --server "type=tcp,port=$swtpm_port,bindaddr=127.0.0.1" \
        --ctrl "type=tcp,port=$((swtpm_port + 1)),bindaddr=127.0.0.1" \
        --tpmstate "dir=$swtpm_dir" --flags not-need-init,startup-clear \
        --log "file=$dev/swtpm.log" &
    swtpm_pid=$!
    trap stop_swtpm EXIT
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$swtpm_port") 2>/dev/null && break
        kill -0 "$swtpm_pid" 2>/dev/null || fail "swtpm exited (see $dev/swtpm.log)"
        sleep 0.1
    done
    ok "swtpm pid $swtpm_pid"
    export KMS_TPM_TCTI="swtpm:host=127.0.0.1,port=$swtpm_port"
    export KMS_DEMO_CONFIG=config/kms-server.tpm.example.toml KMS_DEMO_DB="$dev/kms-tpm.db"
    ;;
*) fail "BACKEND must be pkcs11 or tpm, not $backend" ;;
esac

export SOFTHSM2_CONF="$dev/softhsm/softhsm2.conf"
export KMS_PKCS11_PIN_FILE="$dev/softhsm/user.pin"
export KMS_PKCS11_TOKEN_LABEL=kms-dev
export KMS_DATABASE_URL="sqlite:$KMS_DEMO_DB"
export KMS_LISTEN=127.0.0.1:0          # any free port; the server prints the one it got
export KMS_METRICS_LISTEN=""
export KMS_TLS_CERT="$dev/pki/server.pem" KMS_TLS_KEY="$dev/pki/server.key" KMS_TLS_CLIENT_CA="$dev/pki/ca.pem"

if [[ $backend == tpm ]]; then
    step "Start kms-server (TPM backend on swtpm, mutual TLS, SQLite metadata)"
else
    step "Start kms-server (SoftHSM token 'kms-dev', mutual TLS, SQLite metadata)"
fi
ready="$dev/kms-server.demo.ready"
rm -f "$ready"
"$bin/kms-server" --config "$KMS_DEMO_CONFIG" >"$ready" 2>"$log" &
server_pid=$!
cleanup() { kill "$server_pid" 2>/dev/null || true; stop_swtpm; }
trap cleanup EXIT
for _ in $(seq 1 100); do
    grep -q '^KMS_READY' "$ready" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; fail "kms-server exited"; }
    sleep 0.1
done
addr=$(sed -n 's/^KMS_READY listen=//p' "$ready")
[[ -n "$addr" ]] || fail "kms-server did not become ready (see $log)"
ok "listening on $addr (pid $server_pid)"

export KMSCTL_ENDPOINT="https://localhost:${addr##*:}"
export KMSCTL_CA="$dev/pki/ca.pem" KMSCTL_CERT="$dev/pki/app.pem" KMSCTL_KEY="$dev/pki/app.key"
kmsctl() { "$bin/kmsctl" "$@"; }
# Key administration as "admin" (key-admin in config/kms-policy.dev.toml); "app" (service) uses
# the keys but may not administer them (separation of duties).
admin() { KMSCTL_CERT="$dev/pki/admin.pem" KMSCTL_KEY="$dev/pki/admin.key" "$bin/kmsctl" "$@"; }
# Runs a command that must fail with the given gRPC code.
expect_refused() {
    local code=$1; shift
    local out
    if out=$("$@" 2>&1); then fail "accepted: $*"; fi
    [[ "$out" == *"$code"* ]] || fail "wanted $code, got: $out"
    ok "refused with $code: ${out#error: }"
}

step "Create a master key inside the $device"
alias="demo/notes-$(date +%s)"
key_json=$(admin --json key create --alias "$alias" --description "demo key for session notes")
key_id=$(jq -r .key_id <<<"$key_json")
admin key describe "$alias"

step "Generate a data key bound to an encryption context (site, client, note ids)"
ctx=(--context site=site-a --context client=c-1001 --context note=n-42)
dk=$(kmsctl --json datakey generate "$alias" "${ctx[@]}")
blob=$(jq -r .ciphertext_blob <<<"$dk")
plain=$(jq -r .plaintext <<<"$dk")
ok "wrapped data key: ${#blob} base64 chars, key $key_id v$(jq -r .key_version <<<"$dk")"

step "Decrypt it (the blob names its key; the context must match)"
back=$(kmsctl --json decrypt --blob "$blob" "${ctx[@]}" --acting-user dr-lee --purpose TREATMENT)
[[ $(jq -r .plaintext <<<"$back") == "$plain" ]] || fail "decrypted data key differs"
ok "same 32-byte data key returned"

step "A tampered blob is refused"
# Change one base64 character in the ciphertext part (character 60 of 116).
c=${blob:60:1}; [[ $c == A ]] && r=B || r=A
tampered="${blob:0:60}${r}${blob:61}"
expect_refused INVALID_ARGUMENT kmsctl decrypt --blob "$tampered" "${ctx[@]}"

step "A wrong encryption context is refused (the blob cannot move to another note)"
expect_refused INVALID_ARGUMENT kmsctl decrypt --blob "$blob" --context site=site-a --context client=c-1001 --context note=n-43

step "A disabled key refuses every use; enabling it restores service"
admin key disable "$alias" >/dev/null
expect_refused FAILED_PRECONDITION kmsctl decrypt --blob "$blob" "${ctx[@]}"
admin key enable "$alias" >/dev/null
kmsctl --json decrypt --blob "$blob" "${ctx[@]}" >/dev/null && ok "decrypts again after enable"

step "Rotate: a new version in the $device becomes primary; blobs of version 1 still decrypt"
admin key rotate "$alias" >/dev/null
admin key versions "$alias"
dk2=$(kmsctl --json datakey generate "$alias" "${ctx[@]}")
[[ $(jq -r .key_version <<<"$dk2") == 2 ]] || fail "new data keys are not wrapped under version 2"
ok "new data keys are wrapped under version 2"
kmsctl --json decrypt --blob "$blob" "${ctx[@]}" >/dev/null && ok "the version 1 blob still decrypts"

step "Raising the minimum decryption version retires version 1's blobs"
admin key set-min-version "$alias" 2 >/dev/null
expect_refused FAILED_PRECONDITION kmsctl decrypt --blob "$blob" "${ctx[@]}"
kmsctl --json decrypt --blob "$(jq -r .ciphertext_blob <<<"$dk2")" "${ctx[@]}" >/dev/null &&
    ok "the version 2 blob decrypts"

step "Schedule the key's deletion (30 days), then cancel it: it comes back DISABLED"
admin key schedule-deletion "$alias" >/dev/null
expect_refused FAILED_PRECONDITION kmsctl datakey generate "$alias" "${ctx[@]}"
admin key cancel-deletion "$alias" >/dev/null
[[ $(admin --json key describe "$alias" | jq -r .state) == DISABLED ]] || fail "not DISABLED"
admin key enable "$alias" >/dev/null && ok "cancelled, DISABLED, enabled again"

step "Only auditors may read the audit log"
expect_refused PERMISSION_DENIED kmsctl audit query

# The auditor's identity: SAN URI spiffe://dev.clinic/client/auditor, the one the server's
# development configuration allows to read the audit log.
auditor() { KMSCTL_CERT="$dev/pki/auditor.pem" KMSCTL_KEY="$dev/pki/auditor.key" "$bin/kmsctl" "$@"; }

step "The audit trail of this demo: every call, allowed or refused, with who and why"
auditor audit query --from "$demo_start_ms" --limit 1000
auditor audit report --client c-1001 --from "$demo_start_ms"

step "Export the chain, fetch the checkpoint-signing public key, verify offline"
export_file="$dev/audit-export.jsonl"
pubkey_file="$dev/audit-public-key.pem"
auditor audit export --out "$export_file" >/dev/null
auditor audit public-key --out "$pubkey_file" >/dev/null
ok "exported $(grep -c '"type":"event"' "$export_file") events to $export_file"
# Offline: no endpoint, no certificate, just the file and the key.
if verdict=$("$bin/kmsctl" audit verify --in "$export_file" --public-key "$pubkey_file"); then
    ok "$verdict"
else
    fail "audit verification: $verdict"
fi
tampered_file="$dev/audit-export.tampered.jsonl"
sed '0,/"acting_user":"dr-lee"/s//"acting_user":"dr-eve"/' "$export_file" >"$tampered_file"
if verdict=$("$bin/kmsctl" audit verify --in "$tampered_file" --public-key "$pubkey_file"); then
    fail "an edited export verified: $verdict"
fi
ok "an edited export is caught: $verdict"
rm -f "$tampered_file"

step "Stop kms-server with SIGTERM (graceful)"
kill -TERM "$server_pid"
wait "$server_pid" && ok "exited cleanly" || fail "kms-server exit status $?"
trap stop_swtpm EXIT

if grep -qF "$plain" "$log"; then fail "the data key appears in the server log"; fi
ok "server log ($log) holds no data key"

# Part two: session notes through notes-store, two sites (scripts/demo-notes.sh).
"$root/scripts/demo-notes.sh"
if [[ $backend == tpm ]]; then
    step "Stop swtpm"
    stop_swtpm
    trap - EXIT
    ok "swtpm stopped (its state stays in .dev/swtpm for the next run)"
fi
printf '\n\033[1mDemo finished: all steps behaved as expected.\033[0m\n'
