#!/usr/bin/env bash
# Builds one pattern in release mode and runs it with the given flags.
#   scripts/run.sh single-thread --addr 127.0.0.1:8080 --offload
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: scripts/run.sh PATTERN [FLAGS...]   (patterns: $(ls crates | grep -vE '^(proto|runtime|blackbox|loadgen|demos)$' | tr '\n' ' '))" >&2
    exit 2
fi
pattern=$1
shift
cargo build --release --quiet -p "$pattern"
exec "target/release/$pattern" "$@"
