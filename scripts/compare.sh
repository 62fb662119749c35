#!/usr/bin/env bash
# compare.sh: every pattern under the same workloads, with loadgen; tables and charts.
#
# Usage: scripts/compare.sh [options] [PATTERN ...]
#
#   PATTERN                a server crate under crates/ (default: every crate that builds a
#                          binary, except loadgen); each runs with --workers N on 127.0.0.1:0
#   --quick                short runs: 0.5 s warm-up + 2 s measured, 1000 idle connections
#                          (about 2.5 minutes for 9 patterns, once built)
#   --duration SECS        seconds measured per run (default 10; 2 with --quick)
#   --warmup SECS          seconds of warm-up per run, not counted (default 2; 0.5 with --quick)
#   --workers N            the servers' --workers (default: the number of cores)
#   --workloads LIST       comma-separated, from: hello,pipelined,churn,mix,idle (default: all)
#   --connections N        connections of the hello, pipelined and mix runs (default 50)
#   --mix-rate R           requests/s of the open-loop mix run (default 2000)
#   --idle N               idle connections of the idle run (default 5000; 1000 with --quick)
#   --loadgen-threads N    loadgen -t (default 1)
#   --server-cpus LIST     pin each server with taskset -c LIST (e.g. 1)
#   --loadgen-cpus LIST    pin loadgen with taskset -c LIST (e.g. 0)
#   --server-cpu-max Q/P   cap each server at Q µs of CPU per P µs (e.g. 50000/100000: half a
#                          core) in a cgroup made for it: cgroup v2 cpu.max, or v1
#                          cpu.cfs_quota_us where the v2 cpu controller is not available
#   --with-nginx           add nginx (worker_processes = --workers) as a reference; it answers
#                          "Hello, World!" to every path, so it sits out the mix
#   --vs-wrk ROUNDS        instead of the above: loadgen against wrk, both -t1 -c50 pinned to
#                          core 0 against one nginx worker pinned to core 1, alternating
#                          ROUNDS times; prints and saves a table (needs nginx and wrk)
#   --gen-cpu-max Q/P      with --vs-wrk: cap each generator alike (a cgroup, as above), so
#                          that the generators, not nginx, limit the rate
#   --profile P            cargo profile of the binaries: release (default) or dev
#   --no-build             use the binaries already built
#   --out DIR              where results go (default: results/YYYYMMDD-HHMMSS)
#
# Workloads (loadgen flags; every run adds --warmup, --duration and --json):
#   hello      -c 50                        keep-alive GET /, closed loop
#   pipelined  -c 50 --pipeline 16          16 requests in flight per connection
#   churn      -c 20 --close client         a new connection per request
#   mix        -c 50 --rate 2000 -r 99:GET / -r '1:GET /work?us=5000'
#                                           open loop: how 1% of 5 ms requests delay the rest
#   idle       -c 10 --idle 5000            keep-alive hello next to 5000 idle connections
#
# Writes DIR/runs/PATTERN--WORKLOAD.json (the pattern, the workload, the server's CPU seconds
# over the run: utime+stime of its whole process tree and of the children it reaped, from /proc,
# the same as bench-hello.sh's: cpu_ticks in scripts/lib.sh; and loadgen's JSON),
# DIR/setup.md, then `loadgen report DIR`: DIR/summary.md and SVG charts. Each server is
# started fresh for each workload and stopped with SIGTERM after it. Everything it starts is
# stopped on exit, including on failure or Ctrl-C.
set -euo pipefail

PROG=compare
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ALL_WORKLOADS=(hello pipelined churn mix idle)

QUICK=0
DURATION=
WARMUP=
WORKERS=$(nproc)
WORKLOADS=("${ALL_WORKLOADS[@]}")
CONNS=50
MIX_RATE=2000
IDLE=
LG_THREADS=1
SERVER_CPUS=
LOADGEN_CPUS=
CPU_MAX=
GEN_CPU_MAX=
WITH_NGINX=0
VS_WRK=0
PROFILE=release
BUILD=1
OUT=
PATTERNS=()

CGROUP=              # the cgroup directory we made, if any
CGROUP_KIND=         # v2 or v1
TMP=

parse_args() {
    while (($#)); do
        case $1 in
            --quick) QUICK=1 ;;
            --duration) DURATION=${2:?--duration needs a value}; number "$1" "$2"; shift ;;
            --warmup) WARMUP=${2:?--warmup needs a value}; number "$1" "$2"; shift ;;
            --workers) WORKERS=${2:?--workers needs a value}; whole "$1" "$2"; shift ;;
            --workloads)
                IFS=, read -ra WORKLOADS <<<"${2:?--workloads needs a value}"
                local w
                for w in "${WORKLOADS[@]}"; do
                    [[ " ${ALL_WORKLOADS[*]} " == *" $w "* ]] || die "--workloads: unknown workload $w (known: ${ALL_WORKLOADS[*]})"
                done
                shift
                ;;
            --connections) CONNS=${2:?}; whole "$1" "$2"; shift ;;
            --mix-rate) MIX_RATE=${2:?}; whole "$1" "$2"; shift ;;
            --idle) IDLE=${2:?}; whole "$1" "$2"; shift ;;
            --loadgen-threads) LG_THREADS=${2:?}; whole "$1" "$2"; shift ;;
            --server-cpus) SERVER_CPUS=${2:?}; shift ;;
            --loadgen-cpus) LOADGEN_CPUS=${2:?}; shift ;;
            --server-cpu-max)
                CPU_MAX=${2:?}
                [[ $CPU_MAX =~ ^[1-9][0-9]*/[1-9][0-9]*$ ]] || die "--server-cpu-max: expected QUOTA/PERIOD in µs, e.g. 50000/100000"
                shift
                ;;
            --gen-cpu-max)
                GEN_CPU_MAX=${2:?}
                [[ $GEN_CPU_MAX =~ ^[1-9][0-9]*/[1-9][0-9]*$ ]] || die "--gen-cpu-max: expected QUOTA/PERIOD in µs, e.g. 25000/100000"
                shift
                ;;
            --with-nginx) WITH_NGINX=1 ;;
            --vs-wrk) VS_WRK=${2:?}; whole "$1" "$2"; shift ;;
            --profile)
                PROFILE=${2:?}
                [[ $PROFILE == release || $PROFILE == dev ]] || die "--profile: release or dev"
                shift
                ;;
            --no-build) BUILD=0 ;;
            --out) OUT=${2:?}; shift ;;
            -h | --help) usage; exit 0 ;;
            -*) die "unknown option $1 (see --help)" ;;
            *) PATTERNS+=("$1") ;;
        esac
        shift
    done
    if ((QUICK)); then
        : "${DURATION:=2}" "${WARMUP:=0.5}" "${IDLE:=1000}"
    else
        : "${DURATION:=10}" "${WARMUP:=2}" "${IDLE:=5000}"
    fi
    ((${#PATTERNS[@]})) || mapfile -t PATTERNS < <(all_patterns)
    ((${#PATTERNS[@]} || VS_WRK)) || die "no pattern crates found under crates/"
    check_patterns "${PATTERNS[@]}"
    [[ -n $OUT ]] || OUT=$ROOT/results/$(date +%Y%m%d-%H%M%S)
}

# ---------------------------------------------------------------- processes

cleanup() {
    set +e # stop everything even if one step fails
    stop_all
    remove_cgroup
    [[ -n $TMP ]] && rm -rf "$TMP"
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# ---------------------------------------------------------------- cgroup cap

# make_cgroup Q/P: a cgroup capped at Q µs of CPU per P µs; sets CGROUP, or leaves it empty
# with a message.
make_cgroup() {
    local quota=${1%/*} period=${1#*/} dir
    if [[ -f /sys/fs/cgroup/cgroup.controllers ]] && grep -qw cpu /sys/fs/cgroup/cgroup.controllers; then
        dir=/sys/fs/cgroup/compare-$$
        if { grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control || echo +cpu >/sys/fs/cgroup/cgroup.subtree_control; } 2>/dev/null &&
            mkdir "$dir" 2>/dev/null; then
            if echo "$quota $period" >"$dir/cpu.max" 2>/dev/null; then
                CGROUP=$dir CGROUP_KIND=v2
                return
            fi
            rmdir "$dir" 2>/dev/null || true
        fi
    elif [[ -d /sys/fs/cgroup/cpu && -f /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]]; then
        # cgroup v1 (a hybrid host whose v2 hierarchy has no cpu controller).
        dir=/sys/fs/cgroup/cpu/compare-$$
        if mkdir "$dir" 2>/dev/null; then
            if echo "$period" >"$dir/cpu.cfs_period_us" 2>/dev/null &&
                echo "$quota" >"$dir/cpu.cfs_quota_us" 2>/dev/null; then
                CGROUP=$dir CGROUP_KIND=v1
                return
            fi
            rmdir "$dir" 2>/dev/null || true
        fi
    fi
    log "warning: CPU cap $1 skipped: no writable cgroup with a cpu controller"
    log "         (needs root and cgroup v2 with cpu in /sys/fs/cgroup/cgroup.controllers, or v1's /sys/fs/cgroup/cpu)"
}

remove_cgroup() {
    [[ -n $CGROUP && -d $CGROUP ]] || return 0
    local tries=30
    # A cgroup can go only once its last process has exited.
    until rmdir "$CGROUP" 2>/dev/null; do
        ((tries-- > 0)) || { log "warning: could not remove $CGROUP"; return 0; }
        sleep 0.1
    done
}

# ---------------------------------------------------------------- servers

# launcher [CPUS]: a prefix (in LAUNCH) that runs a command pinned to CPUS and inside the
# cgroup, if any. The child shell joins the cgroup and then execs, so the command and every
# thread and process it makes start inside.
launcher() {
    LAUNCH=()
    if [[ -n $CGROUP ]]; then
        # shellcheck disable=SC2016 # expanded by the child shell
        LAUNCH=(bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$CGROUP")
    fi
    if [[ -n ${1:-} ]]; then LAUNCH+=(taskset -c "$1"); fi
}

# ---------------------------------------------------------------- runs

# The loadgen flags of a workload.
workload_args() {
    case $1 in
        hello) echo "-c $CONNS" ;;
        pipelined) echo "-c $CONNS --pipeline 16" ;;
        churn) echo "-c 20 --close client" ;;
        mix) echo "-c $CONNS --rate $MIX_RATE" ;; # plus the two -r flags, see run_loadgen
        idle) echo "-c 10 --idle $IDLE" ;;
    esac
}

# run_loadgen WORKLOAD ADDR FILE: the measured run; loadgen's JSON lands in FILE.
run_loadgen() {
    local workload=$1 addr=$2 file=$3 rc=0 pin=() args
    read -ra args <<<"$(workload_args "$workload")"
    [[ $workload == mix ]] && args+=(-r '99:GET /' -r '1:GET /work?us=5000')
    [[ -n $LOADGEN_CPUS ]] && pin=(taskset -c "$LOADGEN_CPUS")
    run_client "$file" "$file.err" "${pin[@]}" "$BIN_DIR/loadgen" -t "$LG_THREADS" "${args[@]}" \
        --warmup "${WARMUP}s" --duration "${DURATION}s" --timeout 2s --json "http://$addr/" || rc=$?
    if ((rc != 0)); then
        log "  loadgen failed ($rc): $(cat "$file.err")"
        return 1
    fi
}

# bench TARGET WORKLOAD: one fresh server, one loadgen run, one runs/*.json file.
bench() {
    local target=$1 workload=$2 dir="$TMP/$1-$2" raw t0 t1 load0 cpu_s pid
    launcher "$SERVER_CPUS"
    if ! start_target "$target" "$dir"; then
        log "  skipped $target/$workload: the server did not start"
        return
    fi
    pid=$SERVER_PID
    raw="$dir/loadgen.json"
    load0=$(loadavg)
    t0=$(cpu_ticks "$pid")
    if ! run_loadgen "$workload" "$SERVER_ADDR" "$raw"; then
        stop_pid "$pid"
        return
    fi
    t1=$(cpu_ticks "$pid")
    if ! alive "$pid"; then
        log "  $target died during $workload; its stderr:"
        sed 's/^/    /' "$dir/stderr" >&2
        reap "$pid" 0
        return
    fi
    stop_pid "$pid"
    cpu_s=$(awk -v t=$((t1 - t0)) -v hz="$HZ" 'BEGIN { printf "%.3f", t / hz }')
    printf '{"pattern":"%s","workload":"%s","server_cpu_s":%s,"loadavg":"%s","loadgen":%s}\n' \
        "$target" "$workload" "$cpu_s" "$load0" "$(cat "$raw")" >"$OUT/runs/$target--$workload.json"
    local rps p99 errors all
    rps=$(jfield requests_per_s "$(<"$raw")")
    all=$(jfield all_responses "$(<"$raw")")
    errors=$(grep -o '"errors":{[^}]*}' "$raw" | grep -o ':[0-9]*' | tr -d : | awk '{ s += $1 } END { print s + 0 }')
    p99=$(grep -o '"latency_us":{[^}]*' "$raw" | grep -o '"p99":[0-9.]*' | cut -d: -f2)
    awk -v w="$workload" -v rps="$rps" -v p99="$p99" -v cpu="$cpu_s" -v all="$all" -v e="$errors" 'BEGIN {
        us = (all > 0) ? sprintf("%.2f", cpu * 1e6 / all) : "n/a"
        printf "  %-10s %10.0f req/s   p99 %8.2f ms   server %6s us/req   errors %d\n", w, rps, p99 / 1000, us, e
    }' >&2
}

compare_main() {
    build_with_loadgen
    local targets=("${PATTERNS[@]}")
    if ((WITH_NGINX)); then
        if command -v nginx >/dev/null && command -v ss >/dev/null; then
            targets=(nginx "${targets[@]}")
        else
            log "skipping nginx: nginx or ss not installed (apt-get install -y nginx iproute2)"
        fi
    fi
    ((${#targets[@]})) || die "nothing to measure"
    [[ -n $CPU_MAX ]] && make_cgroup "$CPU_MAX"

    mkdir -p "$OUT/runs"
    write_setup "${targets[@]}"
    log "== ${#targets[@]} targets x ${#WORKLOADS[@]} workloads, ${WARMUP}s warm-up + ${DURATION}s each; results in $OUT"
    local target workload
    for target in "${targets[@]}"; do
        log "== $target (load average $(loadavg))"
        for workload in "${WORKLOADS[@]}"; do
            if [[ $target == nginx && $workload == mix ]]; then continue; fi
            bench "$target" "$workload"
        done
    done
    printf '\nLoad average after the runs: %s\n' "$(loadavg)" >>"$OUT/setup.md"
    ls "$OUT"/runs/*.json >/dev/null 2>&1 || die "nothing was measured"
    log "== $BIN_DIR/loadgen report $OUT"
    "$BIN_DIR/loadgen" report "$OUT" >/dev/null
    echo
    sed -n '/^## Requests per second/,/^## Every run/{/^## Every run/d;p}' "$OUT/summary.md"
    echo "Full table and charts: $OUT/summary.md"
}

write_setup() {
    local cpu kernel commit pin cap
    cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
    kernel=$(uname -r)
    commit=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
    pin="server ${SERVER_CPUS:-unpinned}, loadgen ${LOADGEN_CPUS:-unpinned}"
    cap=${CPU_MAX:+$CPU_MAX µs per period ($CGROUP_KIND cgroup)}
    [[ -n $CPU_MAX && -z $CGROUP ]] && cap="requested $CPU_MAX, but no writable cgroup: uncapped"
    cat >"$OUT/setup.md" <<EOF
# Pattern comparison, $(date -u '+%Y-%m-%d %H:%M UTC')

- Machine: $(nproc) cores ($cpu), Linux $kernel; shared with other work, so compare within
  this run only. Load average at the start: $(loadavg).
- Commit $commit, \`--profile $PROFILE\`; servers with \`--workers $WORKERS\`; CPUs: $pin;
  CPU cap: ${cap:-none}.
- Each run: a fresh server, ${WARMUP}s of warm-up, then ${DURATION}s measured, loadgen -t $LG_THREADS.
- Targets: $*.

| workload | loadgen flags |
|---|---|
EOF
    local w
    for w in "${WORKLOADS[@]}"; do
        local extra=
        [[ $w == mix ]] && extra=" -r '99:GET /' -r '1:GET /work?us=5000'"
        # shellcheck disable=SC2016 # literal backquotes
        printf '| %s | `%s%s` |\n' "$w" "$(workload_args "$w")" "$extra" >>"$OUT/setup.md"
    done
    echo >>"$OUT/setup.md"
}

# ---------------------------------------------------------------- loadgen against wrk

# One nginx worker on core 1; wrk and loadgen take turns on core 0, same flags, same nginx.
vs_wrk_main() {
    local tool
    for tool in nginx wrk taskset ss; do
        command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y nginx wrk)"
    done
    BIN_DIR=$(bin_dir)
    if ((BUILD)); then cargo_build -p loadgen >&2; fi
    local dir="$TMP/nginx" round secs=${DURATION} table="$TMP/vs-wrk.tsv"
    WORKERS=1 CGROUP=
    launcher 1
    start_target nginx "$dir" || die "nginx did not start"
    local cap="uncapped"
    if [[ -n $GEN_CPU_MAX ]]; then
        # After nginx started: only the generators go into this cgroup.
        make_cgroup "$GEN_CPU_MAX"
        [[ -n $CGROUP ]] && cap="each capped at $GEN_CPU_MAX µs of CPU per period ($CGROUP_KIND cgroup)"
    fi
    log "== nginx (1 worker) on core 1 at $SERVER_ADDR; wrk and loadgen -t1 -c50 on core 0 ($cap), ${secs}s each, $VS_WRK rounds"
    : >"$table"
    for ((round = 1; round <= VS_WRK; round++)); do
        vs_wrk_run wrk "$round" "$secs" "$table"
        vs_wrk_run loadgen "$round" "$secs" "$table"
    done
    stop_pid "$SERVER_PID"
    mkdir -p "$OUT"
    {
        echo "nginx 1 worker pinned to core 1; each generator -t1 -c50 -d${secs}s pinned to core 0, $cap; alternating ($(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r))"
        echo
        echo "| round | generator | req/s | generator CPU | generator µs/req | load average before |"
        echo "|---:|---|---:|---:|---:|---|"
        awk -F'\t' '{ printf "| %s | %s | %s | %s%% | %s | %s |\n", $1, $2, $3, $4, $5, $6 }' "$table"
        echo
        awk -F'\t' '{ n[$2]++; r[$2] += $3; u[$2] += $5 }
            END { printf "Mean: wrk %.0f req/s, %.2f µs/req; loadgen %.0f req/s, %.2f µs/req; loadgen/wrk rate %.3f\n",
                  r["wrk"] / n["wrk"], u["wrk"] / n["wrk"], r["loadgen"] / n["loadgen"], u["loadgen"] / n["loadgen"],
                  (r["loadgen"] / n["loadgen"]) / (r["wrk"] / n["wrk"]) }' "$table"
    } | tee "$OUT/vs-wrk.md"
}

# vs_wrk_run TOOL ROUND SECS TABLE: one pinned run; appends "round tool rps cpu% us/req load".
vs_wrk_run() {
    local tool=$1 round=$2 secs=$3 table=$4 out="$TMP/$1-$2.out" load cmd cpu rps n
    load=$(loadavg)
    launcher 0
    if [[ $tool == wrk ]]; then
        cmd=(wrk -t1 -c50 -d"${secs}s" "http://$SERVER_ADDR/")
    else
        cmd=("$BIN_DIR/loadgen" -t1 -c50 -d"${secs}s" --json "http://$SERVER_ADDR/")
    fi
    run_client "$out" "$out" "${LAUNCH[@]}" "${cmd[@]}" || die "$tool failed: $(cat "$out")"
    cpu=$CLIENT_CPU
    if [[ $tool == wrk ]]; then
        rps=$(wrk_rps "$out")
        n=$(wrk_requests "$out")
    else
        rps=$(jfield requests_per_s "$(<"$out")")
        n=$(jfield all_responses "$(<"$out")") # like wrk's count: every reply of the run
    fi
    awk -v r="$round" -v t="$tool" -v rps="$rps" -v n="$n" -v cpu="$cpu" -v s="$secs" -v l="$load" \
        'BEGIN { printf "%s\t%s\t%.0f\t%.0f\t%.2f\t%s\n", r, t, rps, 100 * cpu / s, 1e6 * cpu / n, l }' >>"$table"
    tail -n1 "$table" | awk -F'\t' '{ printf "  round %s %-8s %8s req/s  CPU %s%%  %s us/req  (load %s)\n", $1, $2, $3, $4, $5, $6 }' >&2
}

main() {
    parse_args "$@"
    on_exit cleanup
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/compare.XXXXXX")
    if ((VS_WRK)); then vs_wrk_main; else compare_main; fi
}

main "$@"
