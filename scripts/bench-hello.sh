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
# Each target (nginx first, then each PATTERN) runs alone on a free loopback port, pinned to
# core 1; wrk (-t1) is pinned to core 0. On 2 cores wrk usually saturates before the server
# (see the design notes, "Measuring on a 2-core machine"), so the column to compare is the server's
# CPU per request, not req/s:
#   req/s, requests  from wrk
#   srv CPU          server CPU time (utime+stime of its whole process tree, /proc/PID/stat)
#                    over the run, as % of one core; wrk CPU likewise, for wrk itself
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

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench-hello.XXXXXX")
HZ=$(getconf CLK_TCK)
declare -A LIVE=()   # pid -> what it is, for every process we started and have not reaped
ROWS="$TMP/rows.tsv" # "round target numbers..." per measurement, made into the table at the end

log() { printf '%s\n' "$*" >&2; }
die() { log "bench-hello: $*"; exit 1; }

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

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
    local n
    for n in "$DURATION" "$CONNS" "$STRACE_DURATION" "$ROUNDS"; do
        [[ $n =~ ^[1-9][0-9]*$ ]] || die "not a positive integer: $n"
    done
}

# ---------------------------------------------------------------- process bookkeeping

# Stop everything still running: strace first (SIGINT makes it detach from the server), then
# wrk, then the servers; SIGKILL whatever ignores that for 3 s.
cleanup() {
    set +e # stop everything even if one step fails
    local pid
    for pid in "${!LIVE[@]}"; do [[ ${LIVE[$pid]} == strace ]] && alive "$pid" && kill -INT "$pid"; done
    for pid in "${!LIVE[@]}"; do [[ ${LIVE[$pid]} == wrk ]] && alive "$pid" && kill -TERM "$pid"; done
    for pid in "${!LIVE[@]}"; do [[ ${LIVE[$pid]} == server ]] && stop_server "$pid"; done
    for pid in "${!LIVE[@]}"; do reap "$pid" 3; done
    if ((KEEP)); then log "raw outputs kept in $TMP"; else rm -rf "$TMP"; fi
}

# alive PID: PID is still a running child of this script. Bash reaps exited children on its
# own, so a bare `kill PID` later could hit an unrelated process that reused the number.
alive() {
    local stat f
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -ra f <<<"${stat##*) }" # comm (field 2) may hold spaces: split after its ')'
    [[ ${f[0]} != Z && ${f[1]} == "$$" ]]
}

# reap PID SECONDS: wait for our child PID to exit, SIGKILL it after SECONDS.
reap() {
    local pid=$1 tries=$(($2 * 10))
    while alive "$pid" && ((tries-- > 0)); do sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid"; fi
    wait "$pid" 2>/dev/null || true
    unset "LIVE[$pid]"
}

# PID and all its descendants (a prefork server is a process tree).
proc_tree() {
    local child
    echo "$1"
    for child in $(pgrep -P "$1" || true); do proc_tree "$child"; done
}

stop_server() {
    local pid=$1
    # shellcheck disable=SC2046 # one pid per word
    if alive "$pid"; then kill -TERM $(proc_tree "$pid") 2>/dev/null || true; fi
    reap "$pid" 3
}

# utime+stime in clock ticks, summed over a process tree. /proc/PID/stat covers all threads;
# field 2 (comm) may hold spaces, so split after its closing paren: then utime is word 12.
cpu_ticks() {
    local pid stat f total=0
    for pid in $(proc_tree "$1"); do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        read -ra f <<<"${stat##*) }"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# Ticks all cores spent busy since boot: user nice system irq softirq steal, from /proc/stat.
# (guest time is already inside user.)
busy_ticks() { awk 'NR == 1 { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

# CPU seconds (user+sys) of this shell's reaped children, from the `times` builtin. It must run
# in this shell, not in $(...): a subshell starts with its own, empty children account.
children_cpu_to() {
    times >"$1"
    awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] } print t }' "$1" >"$1.s"
}

# ---------------------------------------------------------------- servers

# A port that nothing listens on, below the ephemeral range so wrk's own sockets never hold it.
pick_port() {
    local port tries=100
    while ((tries--)); do
        port=$((20000 + RANDOM % 12000))
        ss -Htln "sport = :$port" | grep -q . || { echo "$port"; return; }
    done
    die "no free port found"
}

# wait_listening PID PORT: until PORT accepts connections; fails if PID died or 10 s passed.
wait_listening() {
    local pid=$1 port=$2 tries=100
    while ((tries--)); do
        alive "$pid" || return 1
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# One plain request; the target must answer 200 "Hello, World!" or it is not worth measuring.
check_hello() {
    local reply
    reply=$(curl -s -m 2 -i "http://127.0.0.1:$1/" | tr -d '\r') || true
    [[ $reply == "HTTP/1.1 200"* && $reply == *$'\n\nHello, World!' ]] && return 0
    log "unexpected reply from port $1:"$'\n'"$reply"
    return 1
}

write_nginx_conf() {
    local port=$1 dir=$2
    mkdir -p "$dir/tmp"
    # master_process off: one process serves everything, so its /proc/PID/stat is the worker's.
    # Every path points into $dir, so nginx runs as root without touching /etc or /var.
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 65s;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    server {
        listen 127.0.0.1:$port;
        location / {
            default_type text/plain;
            return 200 "Hello, World!";
        }
    }
}
EOF
}

# start_server TARGET PORT: start it pinned to core 1, leave its pid in SERVER_PID.
start_server() {
    local target=$1 port=$2 dir="$TMP/$1"
    mkdir -p "$dir"
    if [[ $target == nginx ]]; then
        write_nginx_conf "$port" "$dir"
        # -e: the log nginx writes before it has read error_log from the config.
        taskset -c 1 nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" 2>"$dir/stderr" &
    else
        taskset -c 1 "$ROOT/target/release/$target" --addr "127.0.0.1:$port" --workers 1 \
            2>"$dir/stderr" >/dev/null &
    fi
    # taskset execs the server, so $! is the server itself.
    SERVER_PID=$!
    LIVE[$SERVER_PID]=server
    if ! wait_listening "$SERVER_PID" "$port"; then
        log "$target did not start listening on 127.0.0.1:$port; its stderr:"
        cat "$dir/stderr" "$dir/error.log" >&2 2>/dev/null || true
        stop_server "$SERVER_PID"
        return 1
    fi
}

# ---------------------------------------------------------------- measuring

# run_wrk SECONDS PORT FILE: wrk on core 0, in the background so a trapped Ctrl-C is handled
# at once; its own CPU seconds land in FILE.cpu.
run_wrk() {
    local seconds=$1 port=$2 file=$3 pid rc=0
    children_cpu_to "$file.t0"
    taskset -c 0 wrk -t1 -c"$CONNS" -d"${seconds}s" --latency "http://127.0.0.1:$port/" >"$file" 2>&1 &
    pid=$!
    LIVE[$pid]=wrk
    wait "$pid" || rc=$?
    unset "LIVE[$pid]"
    children_cpu_to "$file.t1"
    awk '{ print $1 - t0 }' t0="$(cat "$file.t0.s")" "$file.t1.s" >"$file.cpu"
    ((rc == 0)) || { cat "$file" >&2; log "wrk exited with $rc"; return 1; }
}

# wrk_requests FILE: total requests completed ("1853291 requests in 10.10s, ...").
wrk_requests() { awk '/ requests in / { print $1 }' "$1"; }
wrk_rps() { awk '/^Requests\/sec:/ { print $2 }' "$1"; }

# wrk counts a non-200 reply or a broken connection as a request too: say so loudly.
wrk_warnings() {
    grep -E 'Socket errors|Non-2xx' "$1" | sed "s/^ */  warning ($2): /" >&2 || true
}

# measure_cpu TARGET PID PORT: the main run; sets CPU_ROW to
# "rps requests srv% wrk% other% us/req", or to nothing if the server died.
measure_cpu() {
    local target=$1 pid=$2 port=$3 file="$TMP/$1/wrk.txt" t0 t1 s0 s1 b0 b1 requests
    s0=$(date +%s.%N); t0=$(cpu_ticks "$pid"); b0=$(busy_ticks)
    run_wrk "$DURATION" "$port" "$file"
    t1=$(cpu_ticks "$pid"); s1=$(date +%s.%N); b1=$(busy_ticks)
    CPU_ROW=
    alive "$pid" || return 0
    wrk_warnings "$file" "$target"
    requests=$(wrk_requests "$file")
    ((${requests:-0} > 0)) || die "$target: wrk completed no request"
    CPU_ROW=$(awk -v rps="$(wrk_rps "$file")" -v n="$requests" -v ticks=$((t1 - t0)) -v hz="$HZ" \
        -v s0="$s0" -v s1="$s1" -v wrk_cpu="$(cat "$file.cpu")" -v busy=$((b1 - b0)) 'BEGIN {
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

# measure_syscalls TARGET PID PORT: the strace run; sets SYS_ROW to "read write epoll total",
# each per request.
measure_syscalls() {
    local target=$1 pid=$2 port=$3 dir="$TMP/$1" spid p args=() tries=50 requests r w e t
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
    run_wrk "$STRACE_DURATION" "$port" "$dir/wrk-strace.txt"
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
    local target=$1 round=$2 port
    port=$(pick_port)
    log "== $target on 127.0.0.1:$port (core 1), wrk -t1 -c$CONNS on core 0, round $round/$ROUNDS"
    start_server "$target" "$port" || { log "  skipped $target: it did not start"; return; }
    if ! check_hello "$port"; then
        log "  skipped $target: wrong reply"
        stop_server "$SERVER_PID"
        return
    fi
    measure_cpu "$target" "$SERVER_PID" "$port"
    if [[ -z $CPU_ROW ]]; then
        log "  skipped $target: it died during the run; its stderr:"
        cat "$TMP/$target/stderr" >&2
        stop_server "$SERVER_PID"
        return
    fi
    log "  ${DURATION}s run: req/s requests srv-cpu wrk-cpu other-cpu us/req = $CPU_ROW"
    measure_syscalls "$target" "$SERVER_PID" "$port"
    if ! alive "$SERVER_PID"; then
        log "  $target died during the strace run"
        SYS_ROW="n/a n/a n/a n/a"
    fi
    log "  ${STRACE_DURATION}s strace run: read write epoll_wait total per request = $SYS_ROW"
    stop_server "$SERVER_PID"
    printf '%s %s %s %s\n' "$round" "$target" "$CPU_ROW" "$SYS_ROW" >>"$ROWS"
}

# ---------------------------------------------------------------- building and reporting

# Build all patterns in one cargo call; if that fails, find out which ones build and keep those.
build_patterns() {
    local p ok=() args=()
    for p in "${PATTERNS[@]}"; do args+=(-p "$p"); done
    log "== cargo build --release ${args[*]}"
    if (cd "$ROOT" && cargo build --release "${args[@]}") >&2; then return; fi
    for p in "${PATTERNS[@]}"; do
        if (cd "$ROOT" && cargo build --release -p "$p") >"$TMP/build-$p.log" 2>&1; then
            ok+=("$p")
        else
            log "skipping $p: cargo build --release -p $p failed (last lines below)"
            tail -n 5 "$TMP/build-$p.log" | sed 's/^/    /' >&2
        fi
    done
    PATTERNS=("${ok[@]}")
}

drop_missing_binaries() {
    local p ok=()
    for p in "${PATTERNS[@]}"; do
        if [[ -x $ROOT/target/release/$p ]]; then ok+=("$p"); else log "skipping $p: no target/release/$p"; fi
    done
    PATTERNS=("${ok[@]}")
}

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
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    local tool
    for tool in nginx wrk strace taskset curl ss; do
        command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y nginx wrk strace)"
    done
    if ((BUILD)); then build_patterns; fi
    drop_missing_binaries
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
