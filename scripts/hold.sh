#!/usr/bin/env bash
# hold.sh: what holding waiting clients costs each pattern: memory and threads per held long
# poll, SSE subscriber or idle keep-alive connection, and how fast one message reaches all of
# them.
#
# Usage: scripts/hold.sh [options] [PATTERN ...]
#
#   PATTERN              a server crate under crates/ (default: every crate that builds a binary,
#                        except loadgen and process-per-connection), or nginx (--mode idle only;
#                        in the default set there). process-per-connection runs only when named:
#                        a process of 3 threads per client, --max-children bounded by what
#                        kernel.pid_max leaves (about 9,000 here); the sampler reads every
#                        process, so its samples come slower
#                        prefork runs twice: --mode event --workers 2, and --mode blocking
#                        --workers --blocking-workers; nginx twice: 1 worker and --workers
#   --mode M             long-poll (default): clients loop GET /messages?after=A&wait=30s;
#                        sse: clients hold GET /events?type=message;
#                        idle: each client sends one GET / on a keep-alive connection, reads
#                        the reply, then sends nothing for --duration (loadgen -c 0 --idle N
#                        --idle-request); the servers get --idle-timeout past the run
#   --clients N          clients held (default 5000; 200 with --quick)
#   --duration S         seconds of publishing, or of holding with --mode idle (default 10;
#                        3 with --quick)
#   --rate R             messages per second (default 1)
#   --workers N          the servers' --workers (default: the number of cores)
#   --blocking-workers N prefork --mode blocking's --workers (default 4)
#   --commit C           the servers' --commit: async (default: the POST's own fsync stays out of
#                        the delivery latency) or sync
#   --timeout S          loadgen's --timeout (default 5; 2 with --quick): how long it waits for
#                        more clients to subscribe, for a POST's reply, and for deliveries after
#                        the last POST
#   --no-nginx           leave nginx out of --mode idle's default set
#   --quick              a small smoke run
#   --profile P          cargo profile of the binaries: release (default) or dev
#   --no-build           use the binaries already built
#   --out DIR            where results go (default: results/hold-YYYYMMDD-HHMMSS)
#
# For each pattern in turn: start it (on 127.0.0.1:0, --max-conns above the client count for
# each worker, thread-per-connection's --max-threads above the client count, its journal in
# a fresh directory), read its memory idle, then run `loadgen --long-poll N` (or
# `--subscribe N`) at --rate messages/s, reading the server's memory every 0.25 s while the
# clients are held, and stop it. Memory is PSS (/proc/PID/smaps_rollup) summed over the
# server's process tree, so a prefork's shared pages count once; threads are summed likewise;
# "held" is the connections the server has accepted (socket descriptors in its processes,
# less those it had idle, loadgen's one publishing connection included). Each is the peak of
# the samples; per client is (PSS held - PSS idle) / held (left out under 100 held: noise).
# Delivery latency is from the POST's send to a client's receipt; "last" is per message,
# until the last client had it. loadgen runs on one thread, and its own time to read each
# reply is in those latencies (docs/benchmarks.md). Server CPU per message: the CPU of its
# process tree (cpu_ticks, lib.sh) from the last sample before publishing began to the last
# sample, over the messages published: the fan-out, and for long polls each client's next
# poll.
#
# --mode idle reports instead, per server: connections held and answered, PSS idle and held,
# bytes per connection, threads, and the kernel stacks PSS leaves out: 16 KiB (x86_64's
# THREAD_SIZE) per thread the connections added, and the machine's KernelStack
# (/proc/meminfo) held less idle, which other work on the machine moves too.
#
# Writes DIR/table.md (the table, with the command and the machine) and DIR/runs/NAME.json
# (loadgen's JSON and the samples). Everything it starts is stopped on exit, including on
# failure or Ctrl-C.
set -euo pipefail

PROG=hold
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MODE=long-poll
CLIENTS=
DURATION=
RATE=1
WORKERS=$(nproc)
BLOCKING_WORKERS=4
COMMIT=async
TIMEOUT=
QUICK=0
PROFILE=release
BUILD=1
OUT=
PATTERNS=()
NGINX=    # nginx runs too (--mode idle): 1, or 0 with --no-nginx
TMP=
ARGS=("$@")

parse_args() {
    while (($#)); do
        case $1 in
            --mode)
                MODE=${2:?--mode needs a value}
                [[ $MODE == long-poll || $MODE == sse || $MODE == idle ]] ||
                    die "--mode: long-poll, sse or idle"
                shift
                ;;
            --clients) CLIENTS=${2:?--clients needs a value}; whole "$1" "$2"; shift ;;
            --duration) DURATION=${2:?--duration needs a value}; whole "$1" "$2"; shift ;;
            --rate) RATE=${2:?--rate needs a value}; number "$1" "$2"; shift ;;
            --workers) WORKERS=${2:?--workers needs a value}; whole "$1" "$2"; shift ;;
            --blocking-workers) BLOCKING_WORKERS=${2:?}; whole "$1" "$2"; shift ;;
            --commit)
                COMMIT=${2:?--commit needs a value}
                [[ $COMMIT == async || $COMMIT == sync ]] || die "--commit: async or sync"
                shift
                ;;
            --timeout) TIMEOUT=${2:?--timeout needs a value}; whole "$1" "$2"; shift ;;
            --quick) QUICK=1 ;;
            --profile)
                PROFILE=${2:?}
                [[ $PROFILE == release || $PROFILE == dev ]] || die "--profile: release or dev"
                shift
                ;;
            --no-build) BUILD=0 ;;
            --no-nginx) NGINX=0 ;;
            --out) OUT=${2:?}; shift ;;
            -h | --help) usage; exit 0 ;;
            -*) die "unknown option $1 (see --help)" ;;
            nginx) NGINX=1 ;;
            *) PATTERNS+=("$1") ;;
        esac
        shift
    done
    if ((QUICK)); then
        : "${CLIENTS:=200}" "${DURATION:=3}" "${TIMEOUT:=2}"
    else
        : "${CLIENTS:=5000}" "${DURATION:=10}" "${TIMEOUT:=5}"
    fi
    if [[ $MODE != idle && $NGINX == 1 ]]; then
        die "nginx: --mode idle only (it answers every path with the hello)"
    fi
    if ((${#PATTERNS[@]} == 0)) && [[ $NGINX != 1 ]]; then
        # A process per client: 15,000 idle clients would be 45,000 tasks, past pid_max.
        mapfile -t PATTERNS < <(all_patterns | grep -vx process-per-connection)
        log "process-per-connection left out (a process per client): name it to run it"
        if [[ $MODE == idle && $NGINX != 0 ]]; then NGINX=1; fi
    fi
    if [[ $NGINX == 1 ]] && ! command -v nginx >/dev/null; then
        log "skipping nginx: not installed (apt-get install -y nginx-light)"
        NGINX=0
    fi
    check_patterns "${PATTERNS[@]}"
    [[ -n $OUT ]] || OUT=$ROOT/results/hold-$(date +%Y%m%d-%H%M%S)
}

# ---------------------------------------------------------------- measuring

# tree_sample PID: "PSS_KIB THREADS SOCKETS KSTACK_KIB" now: the first three summed over PID's
# process tree; the last the whole machine's kernel stacks (/proc/meminfo), where a thread's
# 16 KiB kernel stack shows, which no process's PSS counts (in the JSON only: other work on
# the machine moves it by megabytes). A few forks per sample, however many processes the tree
# has (process-per-connection has one per client): each kind of file is read by one cat, and a
# process gone meanwhile is skipped.
tree_sample() {
    local pids pss threads sockets kstack
    mapfile -t pids < <(proc_tree "$1")
    kstack=$(awk '/^KernelStack:/ { print $2; exit }' /proc/meminfo)
    pss=$(cd /proc && cat "${pids[@]/%//smaps_rollup}" 2>/dev/null |
        awk '/^Pss:/ { s += $2 } END { print s + 0 }')
    threads=$(cd /proc && cat "${pids[@]/%//status}" 2>/dev/null |
        awk '/^Threads:/ { s += $2 } END { print s + 0 }')
    sockets=$(cd /proc && find "${pids[@]/%//fd}" -lname 'socket:*' 2>/dev/null | wc -l)
    echo "$pss $threads $sockets $kstack"
}

# The runs: "NAME BINARY WORKERS FLAGS..." per line.
runs() {
    local p
    for p in "${PATTERNS[@]}"; do
        case $p in
            prefork)
                echo "prefork prefork 2 --mode event"
                echo "prefork-blocking prefork $BLOCKING_WORKERS --mode blocking"
                ;;
            thread-per-connection) echo "$p $p $WORKERS --max-threads $((CLIENTS + 100))" ;;
            *) echo "$p $p $WORKERS" ;;
        esac
    done
    if [[ $NGINX == 1 ]]; then
        echo "nginx-1 nginx 1"
        ((WORKERS > 1)) && echo "nginx-$WORKERS nginx $WORKERS"
    fi
    return 0
}

# hold NAME BINARY WORKERS FLAGS...: one fresh server, one loadgen run; appends a row to ROWS.
hold() {
    local name=$1 binary=$2 WORKERS=$3 dir="$TMP/$1" i
    shift 3
    # --max-conns above the clients (loadgen's publisher and a reconnect or two come on top),
    # for each worker: reuseport and uring split it between their workers, and the kernel's
    # hash does not spread the clients evenly; a worker at its share would leave the rest of
    # its hash in its accept queue.
    SERVER_ARGS=(--max-conns $((CLIENTS * WORKERS + 100)) --commit "$COMMIT" "$@")
    # Idle connections must outlast the run: loadgen's setup, then --duration of holding.
    local hold_s=$((DURATION + 20 * TIMEOUT + 60))
    if [[ $MODE == idle ]]; then
        SERVER_ARGS+=(--idle-timeout "${hold_s}s")
        NGINX_KEEPALIVE=${hold_s}s
        # Once fewer than 1/16 of its worker_connections are free, an nginx worker closes up
        # to 32 idle keep-alive connections at a time to make room (ngx_drain_connections):
        # keep 1/15 spare, whatever the clients.
        NGINX_CONNECTIONS=$((CLIENTS + CLIENTS / 15 + 100))
        ((NGINX_CONNECTIONS > 16000)) || NGINX_CONNECTIONS=16000
    fi
    if ! start_target "$binary" "$dir"; then
        log "  skipped $name: the server did not start"
        return
    fi
    local pid=$SERVER_PID idle peak=(0 0 0 0) s json="$dir/loadgen.json" lg rc=0
    idle=$(tree_sample "$pid")
    local url path load
    case $MODE in
        sse) load=(--subscribe "$CLIENTS" --rate "$RATE") path='/events?type=message' ;;
        long-poll) load=(--long-poll "$CLIENTS" --rate "$RATE") path=/messages ;;
        idle) load=(-c 0 --idle "$CLIENTS" --idle-request) path=/ ;;
    esac
    url="http://$SERVER_ADDR$path"
    local shown="$binary --workers $WORKERS ${SERVER_ARGS[*]}"
    [[ $binary == nginx ]] && shown="nginx: worker_processes $WORKERS, keepalive_timeout $NGINX_KEEPALIVE"
    log "== $name: $shown; loadgen ${load[*]} -d ${DURATION}s"
    # The server's CPU (ticks) against the time since loadgen started (ms), for its CPU per
    # message: from the last sample before publishing began to the last one.
    local t0=${EPOCHREALTIME/./} cpu
    cpu=("[0,$(cpu_ticks "$pid")]")
    "$BIN_DIR/loadgen" "${load[@]}" -t 1 -d "${DURATION}s" \
        --timeout "${TIMEOUT}s" --json "$url" >"$json" 2>"$dir/loadgen.err" &
    lg=$!
    LIVE[$lg]=client
    # However the server behaves, loadgen ends: subscribing stops after --timeout without
    # progress, deliveries are awaited --timeout after the last POST. This is a backstop.
    local limit=$((SECONDS + hold_s))
    while alive "$lg"; do
        if ((SECONDS > limit)); then
            log "  loadgen still running after $hold_s s: stopping it"
            kill -TERM "$lg" 2>/dev/null || true
            break
        fi
        if alive "$pid"; then
            read -ra s <<<"$(tree_sample "$pid")"
            for i in 0 1 2 3; do ((s[i] > peak[i])) && peak[i]=${s[i]}; done
            cpu+=("[$(((${EPOCHREALTIME/./} - t0) / 1000)),$(cpu_ticks "$pid")]")
        fi
        sleep 0.25
    done
    wait "$lg" || rc=$?
    unset "LIVE[$lg]"
    if ! alive "$pid"; then
        cp "$dir/stderr" "$OUT/runs/$name.stderr"
        log "  $name died while holding; its stderr is in $OUT/runs/$name.stderr"
        reap "$pid" 0
        # The panic's message, if it panicked.
        ROWS+=("$name|died|$(grep -m1 -A1 'panicked' "$dir/stderr" | tr '\n' ' ' || tail -n 1 "$dir/stderr")")
        return
    fi
    stop_pid "$pid"
    if ((rc != 0)) || [[ ! -s $json ]]; then
        log "  loadgen failed ($rc): $(cat "$dir/loadgen.err")"
        ROWS+=("$name|loadgen failed|$(head -c 200 "$dir/loadgen.err")")
        return
    fi
    read -ra s <<<"$idle"
    local samples
    samples=$(IFS=,; echo "${cpu[*]}")
    printf '{"name":"%s","server":"%s","idle":{"pss_kib":%s,"threads":%s,"sockets":%s,"kernel_stack_kib":%s},"peak":{"pss_kib":%s,"threads":%s,"sockets":%s,"kernel_stack_kib":%s},"hz":%s,"cpu_ms_ticks":[%s],"loadgen":%s}\n' \
        "$name" "$shown" "${s[0]}" "${s[1]}" "${s[2]}" "${s[3]}" \
        "${peak[0]}" "${peak[1]}" "${peak[2]}" "${peak[3]}" "$HZ" "$samples" "$(cat "$json")" >"$OUT/runs/$name.json"
    ROWS+=("$name|ok|$OUT/runs/$name.json")
    python3 - "$OUT/runs/$name.json" <<'EOF' >&2
import json, sys
r = json.load(open(sys.argv[1]))
g = r["loadgen"]
if "deliveries" not in g:
    held = r["peak"]["sockets"] - r["idle"]["sockets"]
    per = (r["peak"]["pss_kib"] - r["idle"]["pss_kib"]) * 1024 / max(held, 1)
    print(f"  held {held}, answered {g['idle_answered']} of {g['idle']}, PSS {r['idle']['pss_kib']} -> "
          f"{r['peak']['pss_kib']} KiB ({per:.0f} B per connection), threads {r['peak']['threads']}")
    sys.exit(0)
print(f"  held {r['peak']['sockets'] - r['idle']['sockets']}, PSS {r['idle']['pss_kib']} -> {r['peak']['pss_kib']} KiB, "
      f"threads {r['peak']['threads']}; deliveries {g['deliveries']} of {g['deliveries_expected']}, "
      f"p50 {g['latency_us']['p50'] / 1000:.2f} ms, max {g['latency_us']['max'] / 1000:.2f} ms")
EOF
}

# The table of every run, in markdown, from ROWS ("NAME|ok|JSON" or "NAME|PROBLEM|DETAIL").
table() {
    local rows="$TMP/rows"
    printf '%s\n' "${ROWS[@]}" >"$rows"
    python3 - "$rows" <<'EOF'
import json, sys

def ms(us):
    return f"{us / 1000:.1f}" if us < 100_000 else f"{us / 1000:.0f}"

def n(x):
    return f"{x:,}"

def cpu_per_message(r):
    """Server CPU ms per published message, while publishing and delivering."""
    g, samples = r["loadgen"], r["cpu_ms_ticks"]
    start = g["setup_s"] * 1000
    before = [s for s in samples if s[0] <= start]
    if not before or g["messages"]["published"] == 0:
        return "–"
    ticks = samples[-1][1] - before[-1][1]
    return f"{ticks / r['hz'] * 1000 / g['messages']['published']:.1f}"

print("| pattern | held | PSS idle → held (MiB) | per client (KiB) | threads"
      " | server CPU per message (ms) | delivery p50 / p99 / max (ms) | last client p50 / max (ms) | errors |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
for line in open(sys.argv[1]):
    name, status, rest = line.rstrip("\n").split("|", 2)
    if status != "ok":
        print(f"| {name} | – | – | – | – | – | – | – | {status}: {rest} |")
        continue
    r = json.load(open(rest))
    g, idle, peak = r["loadgen"], r["idle"], r["peak"]
    held = peak["sockets"] - idle["sockets"]
    # Over a handful of clients the difference is noise (a page here or there).
    per = f"{(peak['pss_kib'] - idle['pss_kib']) / held:.1f}" if held >= 100 else "–"
    errs = []
    if g["subscribed"] < g["subscribers"]:
        errs.append(f"{n(g['subscribed'])} of {n(g['subscribers'])} subscribed")
    m = g["messages"]
    if m["published"] < m["sent"] or m["sent"] == 0:
        bad = ", ".join(f"{k} {v}" for k, v in m["errors"].items() if v)
        errs.append(f"published {m['published']} of {m['sent']}" + (f" ({bad})" if bad else ""))
    if g["missing"]:
        errs.append(f"missing {n(g['missing'])} of {n(g['deliveries_expected'])}")
    for k in ("gaps", "duplicates"):
        if g[k]:
            errs.append(f"{k} {n(g[k])}")
    fails = ", ".join(f"{k} {n(v)}" for k, v in g["failures"].items() if v)
    if fails:
        errs.append(f"client failures: {fails}")
    codes = ", ".join(f"{c}: {n(v)}" for c, v in g["status"].items() if c != "200")
    if codes:
        errs.append(f"replies {codes}")
    lat, last = g["latency_us"], g["last_delivery_us"]
    if g["deliveries"] > 0:
        times = (f"{ms(lat['p50'])} / {ms(lat['p99'])} / {ms(lat['max'])}"
                 f" | {ms(last['p50'])} / {ms(last['max'])}")
    else:
        times = "– | –"
    print(f"| {name} | {n(held)} | {idle['pss_kib'] / 1024:.1f} → {peak['pss_kib'] / 1024:.1f}"
          f" | {per} | {n(peak['threads'])} | {cpu_per_message(r)} | {times}"
          f" | {'; '.join(errs) or '0'} |")
EOF
}

# One line on what each run did, for the table's heading.
what_ran() {
    if [[ $MODE == idle ]]; then
        echo "$CLIENTS keep-alive connections, each after one GET / and its reply, held for ${DURATION}s" \
            "(loadgen -c 0 --idle $CLIENTS --idle-request); servers --workers $WORKERS."
    else
        echo "$CLIENTS clients ($MODE), $RATE message/s for ${DURATION}s, servers --workers $WORKERS --commit $COMMIT."
    fi
}

# --mode idle's table, from ROWS as table's.
table_idle() {
    local rows="$TMP/rows"
    printf '%s\n' "${ROWS[@]}" >"$rows"
    python3 - "$rows" <<'EOF'
import json, sys

def n(x):
    return f"{x:,}"

print("| server | held | answered | PSS idle → held (MiB) | per connection (B) | threads"
      " | + kernel stacks: threads × 16 KiB (B per connection) | KernelStack idle → held (MiB) | errors |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
for line in open(sys.argv[1]):
    name, status, rest = line.rstrip("\n").split("|", 2)
    if status != "ok":
        print(f"| {name} | – | – | – | – | – | – | – | {status}: {rest} |")
        continue
    r = json.load(open(rest))
    g, idle, peak = r["loadgen"], r["idle"], r["peak"]
    held = peak["sockets"] - idle["sockets"]
    if held >= 100:
        # Over a handful of connections the difference is noise (a page here or there).
        pss = (peak["pss_kib"] - idle["pss_kib"]) * 1024 / held
        stacks = (peak["threads"] - idle["threads"]) * 16384 / held
        per, with_stacks = f"{pss:,.0f}", f"{pss + stacks:,.0f}"
    else:
        per = with_stacks = "–"
    errs = []
    if g["idle_open"] < g["idle"]:
        errs.append(f"{n(g['idle_open'])} of {n(g['idle'])} open")
    if g["idle_answered"] < g["idle"]:
        errs.append(f"{n(g['idle_answered'])} of {n(g['idle'])} answered")
    if g["idle_rejected"]:
        errs.append(f"{n(g['idle_rejected'])} non-2xx")
    if g["idle_closed"]:
        errs.append(f"{n(g['idle_closed'])} closed by the server")
    bad = ", ".join(f"{k} {n(v)}" for k, v in g["errors"].items() if v)
    if bad:
        errs.append(bad)
    print(f"| {name} | {n(held)} | {n(g['idle_answered'])}"
          f" | {idle['pss_kib'] / 1024:.1f} → {peak['pss_kib'] / 1024:.1f} | {per}"
          f" | {n(idle['threads'])} → {n(peak['threads'])} | {with_stacks}"
          f" | {idle['kernel_stack_kib'] / 1024:.0f} → {peak['kernel_stack_kib'] / 1024:.0f}"
          f" | {'; '.join(errs) or '0'} |")
EOF
}

main() {
    parse_args "$@"
    # process-per-connection: a child per client (lib.sh's start_target passes it), each of 3
    # tasks (its thread, the journal's watcher and committer), within the tasks the kernel has
    # left to give (pid_max, threads-max), less room for loadgen, these scripts and other work.
    local tasks_max tasks_now room
    tasks_max=$(($(cat /proc/sys/kernel/pid_max) < $(cat /proc/sys/kernel/threads-max) \
        ? $(cat /proc/sys/kernel/pid_max) : $(cat /proc/sys/kernel/threads-max)))
    tasks_now=$(cut -d' ' -f4 /proc/loadavg | cut -d/ -f2)
    room=$(((tasks_max - tasks_now - 2000) / 3))
    ((room >= 100)) || room=100
    MAX_CHILDREN=$((CLIENTS + 100 < room ? CLIENTS + 100 : room))
    if ((MAX_CHILDREN < CLIENTS + 100)) && [[ " ${PATTERNS[*]} " == *" process-per-connection "* ]]; then
        log "process-per-connection: --max-children $MAX_CHILDREN (3 tasks a child; $tasks_now of" \
            "the kernel's $tasks_max tasks in use): it cannot hold $CLIENTS clients"
    fi
    on_exit stop_and_clean
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/hold.XXXXXX")
    build_with_loadgen
    ((${#PATTERNS[@]})) || [[ $NGINX == 1 ]] || die "nothing to measure"
    command -v python3 >/dev/null || die "python3 not found (it formats the table)"
    # Servers and loadgen each hold a descriptor per client.
    ulimit -n "$(ulimit -Hn)"
    mkdir -p "$OUT/runs"
    ROWS=()
    for_each_run hold
    ((${#ROWS[@]})) || die "nothing was measured"
    {
        echo "$(run_stamp hold.sh)" \
            "$(what_ran)"
        echo
        if [[ $MODE == idle ]]; then table_idle; else table; fi
    } | tee "$OUT/table.md"
    echo "Saved: $OUT/table.md"
}

main "$@"
