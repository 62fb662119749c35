#!/usr/bin/env bash
# upload-rss.sh: a server's memory while one big upload streams through it.
#
# Usage: scripts/upload-rss.sh [--size 1G] [--workers 2] [--commit sync] [--rate-mb 0]
#                              [--probe-ms 10] [--no-build] [--out FILE] [--keep] [PATTERN ...]
#
#   PATTERN         a pattern crate (default: every one); its release build is run
#   --size S        the upload, in bytes or with K, M or G (powers of 2) (default 1G)
#   --workers N     the servers' --workers (default 2)
#   --commit C      the servers' --commit: sync (their default: the PATCH's 204 waits for an
#                   fdatasync of what it wrote) or async (no fdatasync; the kernel writes back)
#   --rate-mb R     the client sends at most R MB/s (default 0: as fast as the server takes it)
#   --probe-ms MS   GET / on a second connection every MS ms during the upload (default 10)
#   --no-build      skip `cargo build --release -p PATTERN...`
#   --out FILE      also write the markdown table to FILE
#   --keep          keep the temp dir (the servers' stderr); uploads are deleted all the same
#
# For each pattern in turn: the server alone on 127.0.0.1 (its own --data-dir in a temp dir), a
# warm-up (a 1 MiB upload and a GET /), then one tus upload of S
# bytes in a single PATCH (scripts/demos/tus.py: sendfile from a sparse file, so the client
# reads no disk), no rate limit. Columns:
#   RSS idle    VmRSS after the warm-up (KiB; prefork: its processes summed)
#   peak        VmHWM, the kernel's high-water mark of RSS, reset just before the upload
#               (/proc/PID/clear_refs 5) and read after it: the most the upload ever took
#   after       VmRSS once the upload was answered
#   MB/s        S / the time from POST /files/ to the PATCH's 204 (10^6 bytes; with --commit
#               sync that time includes the fdatasync)
#   GET / p50, p99, max  the probe's latency meanwhile: how long the server left a small request
#               waiting while it took the upload's bytes (on an event loop's thread, when the
#               probe's connection shares it)
# Each upload is deleted afterwards (tus termination: DELETE /files/ID), then the server's
# data dir; the source file goes with the temp dir. Everything it starts is stopped on exit.
set -euo pipefail

PROG=upload-rss
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PROFILE=release
BIN_DIR=$(bin_dir)
WORKERS=2
COMMIT=sync
RATE_MB=0
SIZE=1G
PROBE_MS=10
BUILD=1
OUT=
KEEP=0
PATTERNS=()
TMP=
TUSPY="$ROOT/scripts/demos/tus.py"

parse_args() {
    while (($#)); do
        case $1 in
            --size) SIZE=${2:?}; shift ;;
            --workers) WORKERS=${2:?}; shift ;;
            --commit) COMMIT=${2:?}; shift ;;
            --rate-mb) RATE_MB=${2:?}; shift ;;
            --probe-ms) PROBE_MS=${2:?}; shift ;;
            --no-build) BUILD=0 ;;
            --out) OUT=${2:?}; shift ;;
            --keep) KEEP=1 ;;
            -h | --help) usage; exit 0 ;;
            -*) usage >&2; die "unknown option $1" ;;
            *) PATTERNS+=("$1") ;;
        esac
        shift
    done
    ((${#PATTERNS[@]})) || mapfile -t PATTERNS < <(all_patterns)
    whole --workers "$WORKERS"
    number --probe-ms "$PROBE_MS"
    number --rate-mb "$RATE_MB"
    [[ $COMMIT == sync || $COMMIT == async ]] || die "--commit: sync or async, not $COMMIT"
    SERVER_ARGS=(--commit "$COMMIT")
    BYTES=$(bytes "$SIZE")
}

# bytes S: S in bytes (K, M and G are powers of 2).
bytes() {
    local n=${1%[KkMmGg]} unit=${1##*[0-9]}
    whole --size "$n"
    case $unit in
        '') echo "$n" ;;
        K | k) echo $((n << 10)) ;;
        M | m) echo $((n << 20)) ;;
        G | g) echo $((n << 30)) ;;
        *) die "--size: not a size: $1" ;;
    esac
}

cleanup() {
    set +e # stop everything even if one step fails
    stop_all
    [[ -n $TMP ]] || return 0
    rm -f "$TMP/file" "$TMP/small"
    rm -rf "$TMP"/*/data
    if ((KEEP)); then log "stderr of each server kept in $TMP"; else rm -rf "$TMP"; fi
}

# kib FIELD PID: a /proc/PID/status field (VmRSS, VmHWM) in KiB, summed over PID's process tree.
kib() {
    local p sum=0 v
    for p in $(proc_tree "$2"); do
        v=$(awk -v f="$1:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null) || v=0
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
}

# reset_hwm PID: VmHWM back to the current RSS, for PID's whole process tree.
reset_hwm() {
    local p
    for p in $(proc_tree "$1"); do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || true; done
}

# measure TARGET: one row of the table, appended to $ROWS.
measure() {
    local target=$1 dir="$TMP/$1" line idle peak after url
    log "== $target (--workers $WORKERS --commit $COMMIT)"
    start_target "$target" "$dir" || { log "  skipped $target: it did not start"; return; }
    # Warm-up: what a first request allocates (buffers, pools, lazily started threads) is idle.
    python3 "$TUSPY" tus "$SERVER_ADDR" "$TMP/small" >/dev/null || die "$target: the warm-up upload failed"
    curl -fsS -o /dev/null "http://$SERVER_ADDR/" || die "$target: GET / failed"
    idle=$(kib VmRSS "$SERVER_PID")
    reset_hwm "$SERVER_PID"
    line=$(python3 "$TUSPY" tus "$SERVER_ADDR" "$TMP/file" --probe-ms "$PROBE_MS" --rate-mb "$RATE_MB") ||
        die "$target: the upload failed (its stderr: $dir/stderr)"
    peak=$(kib VmHWM "$SERVER_PID")
    after=$(kib VmRSS "$SERVER_PID")
    log "  $line"
    url=$(grep -o 'url=[^ ]*' <<<"$line" | cut -d= -f2)
    python3 "$TUSPY" delete "$SERVER_ADDR" "$url" || log "  $target: DELETE $url failed"
    stop_pid "$SERVER_PID"
    rm -rf "$dir/data"
    printf '%s %s %s %s %s %s %s %s\n' "$target" "$idle" "$peak" "$after" "$(field mb_per_s "$line")" \
        "$(field probe_p50_ms "$line")" "$(field probe_p99_ms "$line")" "$(field probe_max_ms "$line")" >>"$ROWS"
}

rate() { if [[ $RATE_MB != 0 ]]; then printf ' at %s MB/s' "$RATE_MB"; fi; }

field() { grep -o "\b$1=[^ ]*" <<<"$2" | cut -d= -f2; }

print_table() {
    echo "one tus PATCH of $(awk -v b="$BYTES" 'BEGIN {printf "%.2f GiB", b / 2^30}') on 127.0.0.1$(rate), --workers $WORKERS --commit $COMMIT, GET / every $PROBE_MS ms meanwhile ($(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r))"
    echo
    echo "| server | RSS idle | peak during (VmHWM) | after | peak - idle | MB/s | GET / p50 | p99 | max |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk '{ printf "| %s | %.1f MiB | %.1f MiB | %.1f MiB | %+d KiB | %s | %s ms | %s ms | %s ms |\n",
               $1, $2 / 1024, $3 / 1024, $4 / 1024, $3 - $2, $5, $6, $7, $8 }' "$ROWS"
}

main() {
    parse_args "$@"
    on_exit cleanup
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/upload-rss.XXXXXX")
    ROWS="$TMP/rows"
    command -v python3 >/dev/null || die "python3 not found"
    command -v curl >/dev/null || die "curl not found (apt-get install -y curl)"
    # shellcheck disable=SC2119 # no package beyond the patterns
    if ((BUILD)); then build_patterns; fi
    keep_built_patterns
    ((${#PATTERNS[@]})) || die "no pattern to measure"
    # Sparse: the client's sendfile reads zeros from no disk; the server writes every byte.
    truncate -s "$BYTES" "$TMP/file"
    truncate -s 1M "$TMP/small"
    : >"$ROWS"
    local target
    for target in "${PATTERNS[@]}"; do measure "$target"; done
    [[ -s $ROWS ]] || die "nothing was measured"
    echo
    if [[ -n $OUT ]]; then print_table | tee "$OUT"; else print_table; fi
}

main "$@"
