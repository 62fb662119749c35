#!/usr/bin/env bash
# Builds one pattern in release mode and runs it with the given flags, from the workspace root.
#   scripts/run.sh single-thread --addr 127.0.0.1:8080 --offload
set -euo pipefail
PROG=run
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PROFILE=release
if [ $# -lt 1 ]; then
    echo "usage: scripts/run.sh PATTERN [FLAGS...]   (patterns: $(all_patterns | tr '\n' ' '))" >&2
    exit 2
fi
pattern=$1
shift
cargo_build --quiet -p "$pattern"
cd "$ROOT"
exec "$(bin_dir)/$pattern" "$@"
