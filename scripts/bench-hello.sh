#!/usr/bin/env bash
# bench-hello.sh: our hello-world servers side by side with nginx, on this 2-core machine.
#
# Usage: scripts/bench-hello.sh [--duration 10] [--conns 50] [--strace-duration 3] [--rounds 1]
#                               [--no-build] [--keep] [--out FILE] [PATTERN ...]
#
#   PATTERN             a crate under crates/ whose binary target/release/PATTERN serves
#                       "Hello, World!" on --addr (default: single-thread); run with --workers 1
#   --duration N        seconds of the main wrk run per target (default 10)
#   --conns N           wrk keep-alive connections (default 50)
#   --strace-duration N seconds of the second run, under strace -c (default 3)
#   --rounds N          measure every target N times, interleaved (nginx, PATTERN..., nginx,
#                       ...); each round's ratios are to that round's nginx (default 1)
#   --no-build          skip `cargo build --release -p PATTERN...`
#   --out FILE          also write the markdown table to FILE
#   --keep              keep the temp dir (configs, wrk and strace outputs, server stderr)
#
# Needs: apt-get install -y nginx wrk strace   (and taskset, from util-linux)
#
# Each target (nginx first, then each PATTERN) runs alone on 127.0.0.1, pinned to core 1; wrk
# (-t1) is pinned to core 0. On 2 cores wrk usually saturates before the server (README.md,
# "Compare them"; docs/benchmarks.md, "The machine, and how to read any number on this page"),
# so the column to compare is the server's CPU per request, not req/s:
#   req/s, requests  from wrk
#   srv CPU          server CPU time over the run (utime+stime of its whole process tree and of
#                    the children it reaped, /proc/PID/stat: cpu_ticks in scripts/lib.sh, the
#                    same as compare.sh's), as % of one core; wrk CPU likewise, for wrk itself
#   other CPU        what all other processes used meanwhile (/proc/stat; % of one core, out
#                    of 200): this machine is shared, and their load lands on our two cores
#   CPU us/req       server CPU time / requests; ratio = that / nginx's, from this same run
#   syscalls/req     from a second, shorter run with `strace -c -f` attached to the server:
#                    calls / requests wrk completed in that run (strace slows the server a lot;
#                    only the counts mean something)
# Everything it starts is stopped on exit, including on failure or Ctrl-C.
set -euo pipefail

DURATION=10
CONNS=50
STRACE_DURATION=3
ROUNDS=1
BUILD=1
OUT=
KEEP=0
PATTERNS=()

PROG=bench-hello
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PROFILE=release
BIN_DIR=$(bin_dir)
WORKERS=1
LAUNCH=(taskset -c 1) # taskset execs the server, so $! is the server itself
TMP=
ROWS= # "round target numbers..." per measurement, made into the table at the end

parse_args() {
    while (($#)); do
        case $1 in
            --duration) DURATION=${2:?}; shift ;;
            --conns) CONNS=${2:?}; shift ;;
            --strace-duration) STRACE_DURATION=${2:?}; shift ;;
            --rounds) ROUNDS=${2:?}; shift ;;
            --no-build) BUILD=0 ;;
            --out) OUT=${2:?}; shift ;;
            --keep) KEEP=1 ;;
            -h | --help) usage; exit 0 ;;
            -*) usage >&2; die "unknown option $1" ;;
            *) PATTERNS+=("$1") ;;
        esac
        shift
    done
    ((${#PATTERNS[@]})) || PATTERNS=(single-thread)
    whole --duration "$DURATION"
    whole --conns "$CONNS"
    whole --strace-duration "$STRACE_DURATION"
    whole --rounds "$ROUNDS"
}

# ---------------------------------------------------------------- processes

cleanup() {
    set +e # stop everything even if one step fails
    stop_all
    [[ -n $TMP ]] || return 0
    if ((KEEP)); then log "raw outputs kept in $TMP"; else rm -rf "$TMP"; fi
}

# One plain request; the target must answer 200 "Hello, World!" or it is not worth measuring.
check_hello() {
    local reply
    reply=$(curl -s -m 2 -i "http://$1/" | tr -d '\r') || true
    [[ $reply == "HTTP/1.1 200"* && $reply == *$'\n\nHello, World!' ]] && return 0
    log "unexpected reply from $1:"$'\n'"$reply"
    return 1
}

# ---------------------------------------------------------------- measuring

# run_wrk SECONDS ADDR FILE: wrk on core 0, its output in FILE; its own CPU seconds in CLIENT_CPU.
run_wrk() {
    local seconds=$1 addr=$2 file=$3 rc=0
    run_client "$file" "$file" taskset -c 0 wrk -t1 -c"$CONNS" -d"${seconds}s" --latency "http://$addr/" || rc=$?
    ((rc == 0)) || { cat "$file" >&2; log "wrk exited with $rc"; return 1; }
}

# wrk counts a non-200 reply or a broken connection as a request too: say so loudly.
wrk_warnings() {
    grep -E 'Socket errors|Non-2xx' "$1" | sed "s/^ */  warning ($2): /" >&2 || true
}

# measure_cpu TARGET PID ADDR: the main run; sets CPU_ROW to
# "rps requests srv% wrk% other% us/req", or to nothing if the server died.
measure_cpu() {
    local target=$1 pid=$2 addr=$3 file="$TMP/$1/wrk.txt" t0 t1 s0 s1 b0 b1 requests
    s0=$(date +%s.%N); t0=$(cpu_ticks "$pid"); b0=$(busy_ticks)
    run_wrk "$DURATION" "$addr" "$file"
    t1=$(cpu_ticks "$pid"); s1=$(date +%s.%N); b1=$(busy_ticks)
    CPU_ROW=
    alive "$pid" || return 0
    wrk_warnings "$file" "$target"
    requests=$(wrk_requests "$file")
    ((${requests:-0} > 0)) || die "$target: wrk completed no request"
    CPU_ROW=$(awk -v rps="$(wrk_rps "$file")" -v n="$requests" -v ticks=$((t1 - t0)) -v hz="$HZ" \
        -v s0="$s0" -v s1="$s1" -v wrk_cpu="$CLIENT_CPU" -v busy=$((b1 - b0)) 'BEGIN {
            cpu = ticks / hz; wall = s1 - s0; other = busy / hz - cpu - wrk_cpu
            if (other < 0) other = 0 # tick rounding
            printf "%.0f %d %.0f%% %.0f%% %.0f%% %.2f\n", rps, n, 100 * cpu / wall, 100 * wrk_cpu / wall,
                100 * other / wall, 1e6 * cpu / n
        }')
}

# strace_summary FILE: "read write epoll_wait total" call counts from an `strace -c` table,
# whose rows are "% time  seconds  usecs/call  calls  [errors]  syscall" (calls is always $4).
strace_summary() {
    awk '
        $NF ~ /^(read|readv|recv|recvfrom|recvmsg|recvmmsg)$/ { r += $4 }
        $NF ~ /^(write|writev|send|sendto|sendmsg|sendmmsg|sendfile|sendfile64)$/ { w += $4 }
        $NF ~ /^epoll_(p?wait|pwait2)$/ { e += $4 }
        $NF == "total" { t = $4 }
        END { printf "%d %d %d %d\n", r, w, e, t }' "$1"
}

# measure_syscalls TARGET PID ADDR: the strace run; sets SYS_ROW to "read write epoll total",
# each per request.
measure_syscalls() {
    local target=$1 pid=$2 addr=$3 dir="$TMP/$1" spid p args=() tries=50 requests r w e t
    SYS_ROW="n/a n/a n/a n/a"
    for p in $(proc_tree "$pid"); do args+=(-p "$p"); done
    strace -c -f -o "$dir/strace.txt" "${args[@]}" 2>"$dir/strace.err" &
    spid=$!
    LIVE[$spid]=strace
    # Don't start wrk before strace is attached, or its counts would miss requests.
    until grep -Eq '^TracerPid:[[:space:]]*[1-9]' "/proc/$pid/status"; do
        if ! alive "$spid" || ((tries-- == 0)); then
            log "  strace could not attach to $target: $(cat "$dir/strace.err")"
            reap "$spid" 1
            return
        fi
        sleep 0.1
    done
    run_wrk "$STRACE_DURATION" "$addr" "$dir/wrk-strace.txt"
    # strace -c prints its table when it detaches; background jobs of a script start with
    # SIGINT ignored, but strace installs its own handler, so SIGINT still works.
    if alive "$spid"; then kill -INT "$spid"; fi
    reap "$spid" 10
    requests=$(wrk_requests "$dir/wrk-strace.txt")
    if ! ((${requests:-0} > 0)) || ! grep -q total "$dir/strace.txt"; then
        log "  no strace summary for $target: $(cat "$dir/strace.err")"
        return
    fi
    read -r r w e t < <(strace_summary "$dir/strace.txt")
    SYS_ROW=$(awk -v n="$requests" -v r="$r" -v w="$w" -v e="$e" -v t="$t" \
        'BEGIN { printf "%.2f %.2f %.2f %.2f\n", r / n, w / n, e / n, t / n }')
}

# bench TARGET ROUND: start, measure, stop; appends a row to $ROWS.
# (The measuring functions set globals instead of printing: run inside $(...), the processes
# they start would be invisible to the cleanup trap.)
bench() {
    local target=$1 round=$2
    log "== $target on core 1, wrk -t1 -c$CONNS on core 0, round $round/$ROUNDS"
    start_target "$target" "$TMP/$target" || { log "  skipped $target: it did not start"; return; }
    log "  listening on $SERVER_ADDR"
    if ! check_hello "$SERVER_ADDR"; then
        log "  skipped $target: wrong reply"
        stop_pid "$SERVER_PID"
        return
    fi
    measure_cpu "$target" "$SERVER_PID" "$SERVER_ADDR"
    if [[ -z $CPU_ROW ]]; then
        log "  skipped $target: it died during the run; its stderr:"
        cat "$TMP/$target/stderr" >&2
        stop_pid "$SERVER_PID"
        return
    fi
    log "  ${DURATION}s run: req/s requests srv-cpu wrk-cpu other-cpu us/req = $CPU_ROW"
    measure_syscalls "$target" "$SERVER_PID" "$SERVER_ADDR"
    if ! alive "$SERVER_PID"; then
        log "  $target died during the strace run"
        SYS_ROW="n/a n/a n/a n/a"
    fi
    log "  ${STRACE_DURATION}s strace run: read write epoll_wait total per request = $SYS_ROW"
    stop_pid "$SERVER_PID"
    printf '%s %s %s %s\n' "$round" "$target" "$CPU_ROW" "$SYS_ROW" >>"$ROWS"
}

# ---------------------------------------------------------------- reporting

# Other load on this shared machine skews everything; measure all cores' busy % over 1 s.
warn_if_busy() {
    local b0 busy
    b0=$(busy_ticks)
    sleep 1
    busy=$((100 * ($(busy_ticks) - b0) / HZ / $(nproc)))
    log "machine busy before the runs: ${busy}% of all cores"
    ((busy < 10)) || log "warning: the machine is busy; numbers will be noisy"
}

print_table() {
    echo "wrk -t1 -c$CONNS -d${DURATION}s on core 0, server on core 1 ($(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r)); syscalls from a ${STRACE_DURATION}s run under strace -c -f"
    echo
    echo "| target | req/s | srv CPU | wrk CPU | other CPU | CPU us/req | vs nginx | read/req | write/req | epoll_wait/req | syscalls/req |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    # Two passes over $ROWS: first each round's nginx CPU us/req, then the table.
    awk -v rounds="$ROUNDS" '
        NR == FNR { if ($2 == "nginx") base[$1] = $8; next }
        {
            label = (rounds > 1) ? $2 " #" $1 : $2
            ratio = (base[$1] > 0) ? sprintf("%.2fx", $8 / base[$1]) : "n/a"
            printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
                label, $3, $5, $6, $7, $8, ratio, $9, $10, $11, $12
        }' "$ROWS" "$ROWS"
}

main() {
    parse_args "$@"
    on_exit cleanup
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench-hello.XXXXXX")
    ROWS="$TMP/rows.tsv"
    local tool
    for tool in nginx wrk strace taskset curl ss; do
        command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y nginx wrk strace)"
    done
    # shellcheck disable=SC2119 # no package beyond the patterns
    if ((BUILD)); then build_patterns; fi
    keep_built_patterns
    : >"$ROWS"
    warn_if_busy
    local round target
    for ((round = 1; round <= ROUNDS; round++)); do
        for target in nginx "${PATTERNS[@]}"; do bench "$target" "$round"; done
    done
    [[ -s $ROWS ]] || die "nothing was measured"
    echo
    if [[ -n $OUT ]]; then print_table | tee "$OUT"; else print_table; fi
}

main "$@"
