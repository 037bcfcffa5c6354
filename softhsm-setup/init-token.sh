#!/usr/bin/env bash
# Create (once) a private SoftHSM token directory and a token with a given label.
#
#   softhsm-setup/init-token.sh --dir <dir> --label <label> [--pin-file F] [--so-pin-file F]
#
# Idempotent: writes <dir>/softhsm2.conf, creates <dir>/tokens, and initialises a
# token only if none with <label> exists yet. If the token exists, the user PIN is
# checked against it (a stale token with another PIN fails later as CKR_PIN_INCORRECT).
#
# PINs are never taken from the command line. Sources, first match wins:
#   user PIN: --pin-file F, $KMS_PKCS11_PIN, $KMS_PKCS11_PIN_FILE, <dir>/user.pin
#   SO PIN:   --so-pin-file F, $KMS_PKCS11_SO_PIN, $KMS_PKCS11_SO_PIN_FILE, <dir>/so.pin
# If none of them gives a PIN, a random one is generated into <dir>/user.pin or
# <dir>/so.pin (mode 0600). PINs are never printed.
#
# Module: $PKCS11_MODULE, else $KMS_PKCS11_MODULE, else /usr/lib/softhsm/libsofthsm2.so.
# On success stdout carries only `export ...` lines and `#` comments, so
#   eval "$(softhsm-setup/init-token.sh --dir .dev/softhsm --label kms-dev)"
# works. Progress goes to stderr.
set -euo pipefail

PKCS11_MODULE=${PKCS11_MODULE:-${KMS_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}}

log() { echo "init-token: $*" >&2; }
die() { log "error: $*"; exit 1; }
usage() {
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

dir="" label="" pin_file="" so_pin_file=""
while (($#)); do
    case "$1" in
        --dir) dir=${2:?--dir needs a value}; shift 2 ;;
        --label) label=${2:?--label needs a value}; shift 2 ;;
        --pin-file) pin_file=${2:?--pin-file needs a value}; shift 2 ;;
        --so-pin-file) so_pin_file=${2:?--so-pin-file needs a value}; shift 2 ;;
        --pin | --so-pin | --pin=* | --so-pin=*)
            die "PINs are not accepted on the command line; use KMS_PKCS11_PIN / KMS_PKCS11_SO_PIN or --pin-file / --so-pin-file" ;;
        -h | --help) usage ;;
        *) log "unknown argument: $1"; usage ;;
    esac
done
[[ -n "$dir" && -n "$label" ]] || usage
((${#label} <= 32)) || die "token label longer than 32 characters: $label"

command -v softhsm2-util >/dev/null || die "softhsm2-util not found (run scripts/install-deps.sh)"
[[ -r "$PKCS11_MODULE" ]] || die "PKCS#11 module not found: $PKCS11_MODULE (set PKCS11_MODULE)"

# --- directory and config --------------------------------------------------------
if [[ ! -d "$dir" ]]; then
    mkdir -p -- "$dir"
    chmod 700 -- "$dir"
fi
dir=$(cd -- "$dir" && pwd -P)
tokens="$dir/tokens"
conf="$dir/softhsm2.conf"
mkdir -p -- "$tokens"
chmod 700 -- "$tokens"

# Serialise concurrent runs on the same directory.
exec 9>"$dir/.init-token.lock"
flock 9

want_conf="# Written by softhsm-setup/init-token.sh; regenerated on every run.
directories.tokendir = $tokens
objectstore.backend = file
log.level = ERROR"
if [[ ! -f "$conf" ]] || [[ "$(cat -- "$conf")" != "$want_conf" ]]; then
    printf '%s\n' "$want_conf" >"$conf.tmp"
    mv -f -- "$conf.tmp" "$conf"
    log "wrote $conf"
fi
export SOFTHSM2_CONF="$conf"

# --- PINs --------------------------------------------------------------------------
# read_pin_file FILE VAR: first line of FILE into VAR (no trailing newline).
read_pin_file() {
    local file=$1 __line=""
    [[ -r "$file" ]] || die "cannot read PIN file: $file"
    if [[ -n "$(find "$file" -maxdepth 0 -perm /077 2>/dev/null)" ]]; then
        log "warning: $file is accessible by group/others (chmod 600 it)"
    fi
    IFS= read -r __line <"$file" || [[ -n "$__line" ]] || die "empty PIN file: $file"
    printf -v "$2" '%s' "$__line"
}

# generate_pin_file FILE: 32 random hex characters, mode 0600, written atomically.
generate_pin_file() {
    local file=$1
    (
        umask 077
        od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$file.tmp"
        mv -f -- "$file.tmp" "$file"
    )
    log "generated a random PIN into $file (mode 0600)"
}

# resolve_pin KIND FLAG_FILE ENV_VALUE ENV_FILE DEFAULT_FILE MAY_GENERATE OUT_VAR OUT_SOURCE_VAR
resolve_pin() {
    local kind=$1 flag_file=$2 env_value=$3 env_file=$4 default_file=$5 may_generate=$6
    local __pin="" __src=""
    if [[ -n "$flag_file" ]]; then
        read_pin_file "$flag_file" __pin; __src="file $flag_file"
    elif [[ -n "$env_value" ]]; then
        __pin=$env_value; __src="environment"
    elif [[ -n "$env_file" ]]; then
        read_pin_file "$env_file" __pin; __src="file $env_file"
    else
        if [[ ! -f "$default_file" ]]; then
            $may_generate || die "no $kind PIN given (--pin-file, KMS_PKCS11_PIN, KMS_PKCS11_PIN_FILE) and no $default_file"
            generate_pin_file "$default_file"
        fi
        read_pin_file "$default_file" __pin; __src="file $default_file"
    fi
    ((${#__pin} >= 4 && ${#__pin} <= 255)) || die "$kind PIN must be 4-255 characters (from $__src)"
    printf -v "$7" '%s' "$__pin"
    printf -v "$8" '%s' "$__src"
}

user_pin="" user_pin_src="" so_pin="" so_pin_src=""

# --- token -------------------------------------------------------------------------
# Number of initialised tokens whose label is exactly $label. softhsm2-util pads
# labels to 32 characters with spaces.
count_tokens() {
    local slots
    slots=$(softhsm2-util --module "$PKCS11_MODULE" --show-slots 2>&1) ||
        { printf '%s\n' "$slots" >&2; die "softhsm2-util --show-slots failed (SOFTHSM2_CONF=$conf)"; }
    printf '%s\n' "$slots" |
        sed -n 's/^[[:space:]]*Label:[[:space:]]*//p' |
        sed 's/[[:space:]]*$//' |
        grep -cxF -- "$label" || true
}

n=$(count_tokens) || exit 1
if ((n > 1)); then
    die "$n tokens labelled '$label' under $tokens; remove the stale ones (softhsm2-util --delete-token --token '$label')"
elif ((n == 1)); then
    log "token '$label' already exists; not re-initialising"
    # Never generate a PIN for an existing token: it could not match.
    resolve_pin user "$pin_file" "${KMS_PKCS11_PIN:-}" "${KMS_PKCS11_PIN_FILE:-}" \
        "$dir/user.pin" false user_pin user_pin_src
    if command -v pkcs11-tool >/dev/null; then
        # pkcs11-tool reads the PIN from the environment (--pin env:NAME), so it
        # never appears in argv.
        if ! __KMS_INIT_TOKEN_PIN="$user_pin" pkcs11-tool --module "$PKCS11_MODULE" \
            --token-label "$label" --login --pin env:__KMS_INIT_TOKEN_PIN \
            --list-objects >/dev/null 2>"$dir/.pin-check.err"; then
            sed 's/^/  /' "$dir/.pin-check.err" >&2
            rm -f -- "$dir/.pin-check.err"
            die "user PIN (from $user_pin_src) does not log in to existing token '$label'"
        fi
        rm -f -- "$dir/.pin-check.err"
        log "user PIN (from $user_pin_src) logs in to '$label'"
    else
        log "pkcs11-tool not found; user PIN not verified"
    fi
else
    resolve_pin user "$pin_file" "${KMS_PKCS11_PIN:-}" "${KMS_PKCS11_PIN_FILE:-}" \
        "$dir/user.pin" true user_pin user_pin_src
    resolve_pin SO "$so_pin_file" "${KMS_PKCS11_SO_PIN:-}" "${KMS_PKCS11_SO_PIN_FILE:-}" \
        "$dir/so.pin" true so_pin so_pin_src
    # softhsm2-util has no way to read PINs except argv (or an interactive tty), so
    # they are briefly visible in the process list here. This is a local dev/test
    # token; we never echo them. (pkcs11-tool calls above use --pin env:NAME.)
    softhsm2-util --module "$PKCS11_MODULE" --init-token --free --label "$label" \
        --so-pin "$so_pin" --pin "$user_pin" >&2
    n=$(count_tokens) || exit 1
    ((n == 1)) || die "token '$label' not visible after initialisation"
    log "initialised token '$label' (user PIN from $user_pin_src, SO PIN from $so_pin_src)"
fi
unset user_pin so_pin

# --- summary (stdout) ----------------------------------------------------------------
echo "export SOFTHSM2_CONF=$(printf '%q' "$conf")"
echo "export PKCS11_MODULE=$(printf '%q' "$PKCS11_MODULE")"
if [[ "$user_pin_src" == file\ * ]]; then
    echo "export KMS_PKCS11_PIN_FILE=$(printf '%q' "${user_pin_src#file }")"
else
    echo "# user PIN: from \$KMS_PKCS11_PIN"
fi
echo "# token label: $label   token dir: $tokens"
