#!/usr/bin/env bash
# Install the Debian packages the KMS needs to build, test and run locally.
#
# Idempotent and fast: asks dpkg which packages are missing and only then runs
# `apt-get update` + `apt-get install`. Uses sudo when not run as root.
#
#   scripts/install-deps.sh           install whatever is missing
#   scripts/install-deps.sh --check   only report; exit 1 if something is missing
set -euo pipefail

PACKAGES=(
    softhsm2             # PKCS#11 token for master keys (libsofthsm2.so, softhsm2-util)
    opensc               # pkcs11-tool, to inspect tokens by hand
    swtpm                # software TPM 2.0
    swtpm-tools          # swtpm_ioctl etc.
    tpm2-tools           # tpm2_* commands, for debugging
    libtss2-dev          # tss-esapi links against tpm2-tss
    libtss2-tcti-swtpm0  # TCTI "swtpm:host=..,port=.."
    pkg-config           # tss-esapi-sys finds libtss2 through pkg-config
    protobuf-compiler    # protoc, for tonic-prost-build
    jq                   # JSON in scripts/demo.sh
    sqlite3              # scripts/demo-notes.sh shows the notes database's ciphertext
    postgresql           # server binaries for scripts/with-postgres.sh's throwaway cluster
    clang                # bindgen (tss-esapi-sys)
    libclang-dev         # bindgen (tss-esapi-sys)
)

check_only=false
case "${1:-}" in
    --check) check_only=true ;;
    "") ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "installed" ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    echo "install-deps: all ${#PACKAGES[@]} Debian packages present"
    exit 0
fi

echo "install-deps: missing: ${missing[*]}"
if $check_only; then
    exit 1
fi

if ((EUID == 0)); then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "install-deps: not root and sudo not found; install these as root: ${missing[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-deps: installed ${missing[*]}"
