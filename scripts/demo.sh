#!/usr/bin/env bash
# Placeholder: the real demo script is written separately.
echo "scripts/demo.sh: not yet" >&2
exit 1
