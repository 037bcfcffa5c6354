#!/usr/bin/env bash
# Placeholder: the real bench script is written separately.
echo "scripts/bench.sh: not yet" >&2
exit 1
