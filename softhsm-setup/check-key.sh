#!/usr/bin/env bash
# Show a key on a SoftHSM token and check it cannot leave the token.
#
#   softhsm-setup/check-key.sh <token-label> [<key-label>]
#
# Without <key-label>, lists every object on the token. With it, prints that key's
# object(s) and exits 0 only if each is "sensitive, always sensitive, never
# extractable"; 1 if not, 3 if no object has that label, 2 on usage or login errors.
# Key values that pkcs11-tool would print (non-sensitive keys) are redacted.
#
# Environment:
#   SOFTHSM2_CONF          default .dev/softhsm/softhsm2.conf if that file exists
#   PKCS11_MODULE          else $KMS_PKCS11_MODULE, else /usr/lib/softhsm/libsofthsm2.so
#   KMS_PKCS11_PIN         user PIN, or
#   KMS_PKCS11_PIN_FILE    file holding it; default <dir of SOFTHSM2_CONF>/user.pin
# The PIN reaches pkcs11-tool through its environment (--pin env:NAME), never argv.
set -euo pipefail

PKCS11_MODULE=${PKCS11_MODULE:-${KMS_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}}

die() { echo "check-key: $*" >&2; exit 2; }

(($# == 1 || $# == 2)) || { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
token_label=$1
key_label=${2:-}

command -v pkcs11-tool >/dev/null || die "pkcs11-tool not found (apt-get install opensc)"
if [[ -z "${SOFTHSM2_CONF:-}" && -f .dev/softhsm/softhsm2.conf ]]; then
    SOFTHSM2_CONF=$PWD/.dev/softhsm/softhsm2.conf
fi
[[ -n "${SOFTHSM2_CONF:-}" ]] || die "SOFTHSM2_CONF is not set"
[[ -r "$SOFTHSM2_CONF" ]] || die "cannot read SOFTHSM2_CONF=$SOFTHSM2_CONF"
export SOFTHSM2_CONF

if [[ -z "${KMS_PKCS11_PIN:-}" ]]; then
    pin_file=${KMS_PKCS11_PIN_FILE:-$(dirname -- "$SOFTHSM2_CONF")/user.pin}
    [[ -r "$pin_file" ]] || die "no PIN: set KMS_PKCS11_PIN or KMS_PKCS11_PIN_FILE (tried $pin_file)"
    IFS= read -r KMS_PKCS11_PIN <"$pin_file" || [[ -n "$KMS_PKCS11_PIN" ]] || die "empty PIN file $pin_file"
fi
export KMS_PKCS11_PIN

err=$(mktemp)
trap 'rm -f -- "$err"' EXIT
if ! objects=$(pkcs11-tool --module "$PKCS11_MODULE" --token-label "$token_label" \
    --login --pin env:KMS_PKCS11_PIN --list-objects 2>"$err"); then
    cat -- "$err" >&2
    die "pkcs11-tool failed for token '$token_label'"
fi
# pkcs11-tool prints the key bytes of non-sensitive keys: keep them out of logs.
objects=$(printf '%s\n' "$objects" | sed 's/^\([[:space:]]*VALUE:[[:space:]]*\).*/\1<redacted by check-key.sh>/')

echo "token '$token_label' ($SOFTHSM2_CONF)"
if [[ -z "$key_label" ]]; then
    printf '%s\n' "$objects"
    exit 0
fi

# pkcs11-tool prints one block per object: a header line at column 0, then indented
# attribute lines. Keep the blocks whose label is exactly $key_label.
blocks=$(printf '%s\n' "$objects" | awk -v want="$key_label" '
    function flush() { if (block != "" && match_) printf "%s\n", block; block = ""; match_ = 0 }
    /^[^ \t]/ { flush(); block = $0; next }
    {
        block = block "\n" $0
        line = $0
        if (sub(/^[ \t]*label:[ \t]*/, "", line)) {
            sub(/[ \t]+$/, "", line)
            if (line == want) match_ = 1
        }
    }
    END { flush() }')

if [[ -z "$blocks" ]]; then
    echo "no object labelled '$key_label' on token '$token_label'" >&2
    exit 3
fi
printf '%s\n' "$blocks"

status=0
while IFS= read -r access; do
    for want in "sensitive" "always sensitive" "never extractable"; do
        if [[ ", ${access}," != *", ${want},"* ]]; then
            echo "FAIL: '$key_label' is not '$want' (Access: $access)" >&2
            status=1
        fi
    done
done < <(printf '%s\n' "$blocks" | sed -n 's/^[[:space:]]*Access:[[:space:]]*//p')
if ! printf '%s\n' "$blocks" | grep -q '^[[:space:]]*Access:'; then
    echo "FAIL: no Access line for '$key_label'" >&2
    status=1
fi
((status == 0)) && echo "OK: '$key_label' is sensitive, always sensitive, never extractable"
exit "$status"
