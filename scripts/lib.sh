# shellcheck shell=bash
# shellcheck disable=SC2034,SC2153 # results for, and settings from, the sourcing script
# lib.sh: what bench-hello.sh, compare.sh and demo.sh (with scripts/demos/*.sh) share. Sourced
# after `set -euo pipefail`, never run.
#
# The sourcing script sets PROG (its name, for messages) and, for the functions that use them,
# TMP (its temp directory), PROFILE (cargo profile: release, dev or debug, or a custom one),
# BIN_DIR (from bin_dir), WORKERS, LAUNCH (a command prefix for servers: taskset, a cgroup),
# SERVER_ARGS (more flags for our servers), PATTERNS (pattern crates), NGINX_KEEPALIVE
# (nginx's keepalive_timeout, default 65s) and NGINX_CONNECTIONS (its worker_connections,
# default 16000). This file sets ROOT,
# HZ and LIVE, and the results named in each function's comment (SERVER_PID, SERVER_ADDR,
# STARTED_ADDR, CLIENT_CPU).
#
# Server CPU, the one meaning every script here gives it (cpu_ticks): the utime+stime of the
# server's whole process tree from /proc/PID/stat: every thread of the server and of every
# descendant still running, plus the cutime+cstime of each of them, that is the CPU of the
# children they have already reaped. Those count because a child's work is the server's work:
# a prefork worker that exited and was replaced during the run, a snapshot child. Read just
# before and just after a client's run, and divided by every reply that client counted in that
# run, it is "server CPU per request" (docs/benchmarks.md).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HZ=$(getconf CLK_TCK)
declare -A LIVE=() # pid -> server, client or strace: every process we started and have not reaped
LAUNCH=()          # start_target runs servers as "${LAUNCH[@]}" SERVER ...
SERVER_ARGS=()     # ... and gives our servers these flags after the common ones

# ---------------------------------------------------------------- messages and arguments

log() { printf '%s\n' "$*" >&2; }
die() { log "$PROG: $*"; exit 1; }

# The script's header comment, from line 2 to `set -euo pipefail`.
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

number() { [[ $2 =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$1: not a number: $2"; }
whole() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1: not a positive whole number: $2"; }

# on_exit FUNC: FUNC runs however the script ends; Ctrl-C and SIGTERM end it with 130 and 143.
on_exit() {
    # shellcheck disable=SC2064 # FUNC is expanded now, on purpose
    trap "$1" EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# The usual exit handler (on_exit stop_and_clean): stop everything started, remove $TMP.
stop_and_clean() {
    set +e # stop everything even if one step fails
    stop_all
    [[ -z ${TMP:-} ]] || rm -rf "$TMP"
}

# check_patterns NAME...: dies unless each is a crate under crates/.
check_patterns() {
    local p
    for p in "$@"; do
        [[ -d $ROOT/crates/$p ]] || die "no crate crates/$p"
    done
}

# ---------------------------------------------------------------- processes

# alive PID: PID is still a running child of this script. Bash reaps exited children on its
# own, so a bare `kill PID` later could hit an unrelated process that reused the number.
alive() {
    local stat f
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -ra f <<<"${stat##*) }" # comm (field 2) may hold spaces: split after its ')'
    [[ ${f[0]} != Z && ${f[1]} == "$$" ]]
}

# PID and all its descendants (a prefork server is a process tree), parents first. One `ps` for
# the whole table, whatever the tree's size: process-per-connection's has a child per client.
proc_tree() {
    ps -e -o pid=,ppid= | awk -v root="$1" '
        { kids[$2] = kids[$2] " " $1 }
        END {
            queue[1] = root; head = 1; tail = 1
            while (head <= tail) {
                p = queue[head++]; print p
                n = split(kids[p], c, " ")
                for (i = 1; i <= n; i++) queue[++tail] = c[i]
            }
        }'
}

# reap PID SECONDS: wait for our child PID to exit; SIGKILL it and its tree after SECONDS.
reap() {
    local pid=$1 tries=$(($2 * 10))
    while alive "$pid" && ((tries-- > 0)); do sleep 0.1; done
    # shellcheck disable=SC2046 # one pid per word
    if alive "$pid"; then kill -KILL $(proc_tree "$pid") 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
    unset "LIVE[$pid]"
}

# stop_pid PID [SECONDS]: SIGTERM to PID alone (a supervisor stops its own workers; a server
# drains), SIGCONT first in case it was stopped; reap it, SIGKILL after SECONDS (default 5).
stop_pid() {
    local pid=$1
    if alive "$pid"; then
        kill -CONT "$pid" 2>/dev/null || true
        kill -TERM "$pid" 2>/dev/null || true
    fi
    reap "$pid" "${2:-5}"
}

# stop_all: everything in LIVE. strace first (SIGINT makes it detach from the server), then the
# clients, then the servers; SIGKILL whatever ignores that.
stop_all() {
    local pid
    for pid in "${!LIVE[@]}"; do
        if [[ ${LIVE[$pid]} == strace ]] && alive "$pid"; then kill -INT "$pid" 2>/dev/null || true; fi
    done
    for pid in "${!LIVE[@]}"; do
        if [[ ${LIVE[$pid]} == client ]] && alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    for pid in "${!LIVE[@]}"; do
        if [[ ${LIVE[$pid]} == server ]]; then stop_pid "$pid"; fi
    done
    for pid in "${!LIVE[@]}"; do reap "$pid" 3; done
}

# cpu_ticks PID: server CPU (see the top of this file) in clock ticks, so far. Each process's
# /proc/PID/stat covers all its threads; field 2 (comm) may hold spaces, so split after its
# closing paren: then utime, stime, cutime and cstime are words 12 to 15. A child still
# running counts by its own fields, one reaped by its parent's c-fields: never both.
cpu_ticks() {
    local pid stat f total=0
    for pid in $(proc_tree "$1"); do
        { read -r stat <"/proc/$pid/stat"; } 2>/dev/null || continue # a builtin: no fork per process
        read -ra f <<<"${stat##*) }"
        total=$((total + f[11] + f[12] + f[13] + f[14]))
    done
    echo "$total"
}

# Ticks all cores spent busy since boot: user nice system irq softirq steal, from /proc/stat
# (guest time is already inside user). What other programs used is this less ours.
busy_ticks() { awk 'NR == 1 { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

# children_cpu: CHILDREN_CPU_MS, the CPU milliseconds (user+sys) of this shell's reaped
# children, from the `times` builtin. It must run in this shell, not in $(...) (a subshell
# starts with an empty account of its own), and it forks nothing, so it adds nothing to it.
children_cpu() {
    local line t ms=0 m s
    times >"$TMP/.times"
    { read -r _ && read -r line; } <"$TMP/.times" # line 2: children's "user sys", e.g. 0m1.250s
    for t in $line; do
        m=${t%%m*} s=${t#*m} s=${s%s}
        ms=$((ms + (m * 60 + 10#${s%[.,]*}) * 1000 + 10#${s#*[.,]}))
    done
    CHILDREN_CPU_MS=$ms
}

# ---------------------------------------------------------------- building

# Where cargo leaves the binaries of $PROFILE.
bin_dir() {
    local target=${CARGO_TARGET_DIR:-$ROOT/target}
    case $PROFILE in
        dev | debug) echo "$target/debug" ;;
        *) echo "$target/$PROFILE" ;;
    esac
}

# cargo_build ARGS...: `cargo build` of $PROFILE in the workspace, with ARGS (-p PKG...).
cargo_build() {
    local profile=$PROFILE
    [[ $profile == debug ]] && profile=dev # its directory is debug, its name dev
    (cd "$ROOT" && "${CARGO:-cargo}" build --profile "$profile" "$@")
}

# build_patterns [PKG...]: the PKGs and every one of PATTERNS in one cargo call; if that fails,
# the PKGs alone (they must build), then each pattern alone, keeping in PATTERNS those that build.
build_patterns() {
    local p ok=() args=()
    for p in "$@" "${PATTERNS[@]}"; do args+=(-p "$p"); done
    log "== cargo build --profile $PROFILE ${args[*]}"
    if cargo_build "${args[@]}" >&2; then return; fi
    if (($#)); then
        args=()
        for p in "$@"; do args+=(-p "$p"); done
        cargo_build "${args[@]}" >&2 || die "$* does not build"
    fi
    for p in "${PATTERNS[@]}"; do
        if cargo_build -p "$p" >"$TMP/build-$p.log" 2>&1; then
            ok+=("$p")
        else
            log "skipping $p: cargo build -p $p failed (last lines below)"
            tail -n 5 "$TMP/build-$p.log" | sed 's/^/    /' >&2
        fi
    done
    PATTERNS=("${ok[@]}")
}

# keep_built_patterns: drop from PATTERNS, with a message, each one that has no binary in BIN_DIR.
keep_built_patterns() {
    local p ok=()
    for p in "${PATTERNS[@]}"; do
        if [[ -x $BIN_DIR/$p ]]; then ok+=("$p"); else log "skipping $p: no $BIN_DIR/$p"; fi
    done
    PATTERNS=("${ok[@]}")
}

# build_with_loadgen: BIN_DIR set; with BUILD, loadgen and PATTERNS built; PATTERNS left with
# those that have a binary. Dies without loadgen.
build_with_loadgen() {
    BIN_DIR=$(bin_dir)
    if ((BUILD)); then build_patterns loadgen; fi
    [[ -x $BIN_DIR/loadgen ]] || die "no $BIN_DIR/loadgen (build it, or drop --no-build)"
    keep_built_patterns
}

# run_stamp SCRIPT: "`scripts/SCRIPT ARGS...` (date; cores, kernel; commit; load average):", the
# opening of a results table (ARGS: the script's own arguments, as given).
run_stamp() {
    echo "\`scripts/$1 ${ARGS[*]}\` ($(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) cores, Linux $(uname -r);" \
        "commit $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown); load average $(cut -d' ' -f1-3 /proc/loadavg)):"
}

# for_each_run FUNC: calls FUNC with the words of each line the script's `runs` prints.
for_each_run() {
    local line run
    while read -r line; do
        read -ra run <<<"$line"
        "$1" "${run[@]}"
    done < <(runs)
}

# The pattern crates: those that build a binary (src/main.rs, src/bin/ or a [[bin]] table),
# except loadgen.
all_patterns() {
    local dir name
    for dir in "$ROOT"/crates/*/; do
        name=$(basename "$dir")
        [[ $name == loadgen ]] && continue
        if [[ -f $dir/src/main.rs || -d $dir/src/bin ]] || grep -q '^\[\[bin\]\]' "$dir/Cargo.toml" 2>/dev/null; then
            echo "$name"
        fi
    done
}

# ---------------------------------------------------------------- servers

# A port nothing listens on, below the ephemeral range so that no client's socket holds it.
# Only nginx needs one chosen for it: ours bind port 0 and say which one they got.
free_port() {
    local port tries=100
    while ((tries--)); do
        port=$((20000 + RANDOM % 12000))
        ss -Htln "sport = :$port" | grep -q . || { echo "$port"; return; }
    done
    die "no free port found"
}

# wait_port PID PORT: until 127.0.0.1:PORT accepts a connection; fails if PID died or 10 s passed.
wait_port() {
    local pid=$1 port=$2 tries=100
    while ((tries--)); do
        alive "$pid" || return 1
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# wait_started PID FILE [SECONDS]: until FILE (the server's stderr) holds our servers' start-up
# line, "<pattern> listening on http://ADDR (workers: N, pid: P)"; sets STARTED_ADDR. Fails if
# PID died or SECONDS (default 10) passed.
wait_started() {
    local pid=$1 file=$2 deadline=$((SECONDS + ${3:-10})) line
    while alive "$pid" && ((SECONDS <= deadline)); do
        line=$(grep -m1 -o 'listening on http://[^ ]*' "$file" 2>/dev/null || true)
        if [[ -n $line ]]; then
            STARTED_ADDR=${line#listening on http://}
            return 0
        fi
        sleep 0.05
    done
    return 1
}

# write_nginx_conf PORT DIR WORKERS: DIR/nginx.conf, the one nginx every script measures against:
# WORKERS worker processes answering "Hello, World!" to every path, keep-alive without limit.
# Every path points into DIR, so nginx runs as root without touching /etc or /var.
write_nginx_conf() {
    local port=$1 dir=$2 workers=$3 master=on
    ((workers == 1)) && master=off # one process serves everything: its /proc/PID/stat is the worker's
    mkdir -p "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
worker_processes $workers;
worker_rlimit_nofile 20000;
daemon off;
master_process $master;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections ${NGINX_CONNECTIONS:-16000}; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout ${NGINX_KEEPALIVE:-65s};
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

# start_target TARGET DIR: nginx (WORKERS workers, on a free port) or the pattern TARGET from
# BIN_DIR (--workers WORKERS, on port 0, then SERVER_ARGS), run through LAUNCH, with its files
# in DIR; waits until it listens. Sets SERVER_PID and SERVER_ADDR; on failure shows its stderr,
# stops it and returns 1.
start_target() {
    local target=$1 dir=$2 port
    mkdir -p "$dir"
    if [[ $target == nginx ]]; then
        port=$(free_port)
        write_nginx_conf "$port" "$dir" "$WORKERS"
        # -e: the log nginx writes before it has read error_log from the config.
        "${LAUNCH[@]}" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" 2>"$dir/stderr" >/dev/null &
    else
        local own=()
        # A process per connection forks at most --max-children (1024 by default); the scripts
        # hold thousands of connections (MAX_CHILDREN: a script's own bound).
        [[ $target == process-per-connection ]] && own=(--max-children "${MAX_CHILDREN:-6000}")
        "${LAUNCH[@]}" "$BIN_DIR/$target" --addr 127.0.0.1:0 --workers "$WORKERS" --shutdown-timeout 2s \
            --data-dir "$dir/data" "${own[@]}" "${SERVER_ARGS[@]}" 2>"$dir/stderr" >/dev/null &
    fi
    # bash -c and taskset exec, so $! is the server itself.
    SERVER_PID=$!
    LIVE[$SERVER_PID]=server
    if [[ $target == nginx ]] && wait_port "$SERVER_PID" "$port"; then
        SERVER_ADDR=127.0.0.1:$port
        return 0
    elif [[ $target != nginx ]] && wait_started "$SERVER_PID" "$dir/stderr"; then
        SERVER_ADDR=$STARTED_ADDR
        return 0
    fi
    log "  $target did not start; its stderr:"
    sed 's/^/    /' "$dir/stderr" "$dir/error.log" >&2 2>/dev/null || true
    stop_pid "$SERVER_PID"
    return 1
}

# ---------------------------------------------------------------- clients

# run_client OUT ERR CMD...: runs CMD, stdout to OUT and stderr to ERR (which may be OUT), and
# waits for it; sets CLIENT_CPU to its CPU seconds (user+sys) and returns its status. It runs
# in the background so that a trapped Ctrl-C is handled at once, and in LIVE so that the
# clean-up stops it.
run_client() {
    local out=$1 err=$2 pid rc=0 ms0
    shift 2
    children_cpu
    ms0=$CHILDREN_CPU_MS
    if [[ $err == "$out" ]]; then "$@" >"$out" 2>&1 & else "$@" >"$out" 2>"$err" & fi
    pid=$!
    LIVE[$pid]=client
    wait "$pid" || rc=$?
    unset "LIVE[$pid]"
    children_cpu
    printf -v CLIENT_CPU '%d.%03d' $(((CHILDREN_CPU_MS - ms0) / 1000)) $(((CHILDREN_CPU_MS - ms0) % 1000))
    return "$rc"
}

# jfield NAME JSON: the value of the first field NAME in JSON text (quotes removed): loadgen's
# --json line, the servers' JSON replies.
jfield() { grep -o "\"$1\":[^,}]*" <<<"$2" | head -1 | cut -d: -f2- | tr -d '"'; }

# wrk_requests FILE: the requests wrk completed ("1853291 requests in 10.10s, ..."), every
# reply counted, a non-2xx one too. wrk_rps FILE: its requests per second.
wrk_requests() { awk '/ requests in / { print $1 }' "$1"; }
wrk_rps() { awk '/^Requests\/sec:/ { print $2 }' "$1"; }
