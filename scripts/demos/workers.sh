# shellcheck shell=bash
# demo: workers (sourced by scripts/demo.sh; docs/demo-workers.md)
#
# How many is too many: thread-per-connection (Apache's worker MPM) with a pool of 1, 2, 4, 8,
# 32 and 128 threads (--workers N --max-threads N), under the same load: 64 clients, each
# request a new connection, half of them `GET /work?us=500` (0.5 ms of CPU), half
# `GET /block?ms=5` (5 ms waiting, as for a database). Past the pool size, connections wait in
# the accept queue. On 2 cores, threads help while some of them are waiting; once the CPU is
# busy, more threads add only context switches, memory and queueing.

demo_workers() {
    need_tools python3
    build thread-per-connection loadgen
    local duration warmup counts
    duration=$(quick 3s 1s)
    warmup=$(quick 500ms 200ms)
    counts=(1 2 4 8 32 128)
    local cores
    cores=$(nproc 2>/dev/null || echo "?")
    local ns_note=""
    if can_netns; then ns_note=" (each run in a network namespace of its own)"; fi
    can_netns || skipped "no network namespaces here (needs root): running on this host's loopback, shared with other programs"
    say "load (loadgen, the same for every run): 64 connections, a new one per request, for $duration after $warmup of warm-up$ns_note;"
    say "  50% GET /work?us=500 (CPU), 50% GET /block?ms=5 (waiting); this machine has $cores cores"
    say "  average per request: 0.25 ms of CPU (plus the connection's own), 2.5 ms waiting"
    say
    say "  CPU columns: % of one core (the machine has $((cores * 100))%), during the run"
    printf '    %7s %8s %8s %8s %11s %8s %7s %8s %7s\n' workers "req/s" "p50 ms" "p99 ms" "csw/request" "us/req" server loadgen others
    local w best_rps=0 best_n="" rows=""
    for w in "${counts[@]}"; do
        # A fresh namespace per run: a run leaves thousands of TIME_WAIT sockets behind.
        private_netns >/dev/null
        start_server S "$PRIV" thread-per-connection --addr 127.0.0.1:0 --workers "$w" --max-threads "$w"
        local csw0 cpu0 csw1 cpu1
        local busy0 busy1
        csw0=$(ctx_switches "$S_PID")
        cpu0=$(cpu_ticks "$S_PID")
        busy0=$(busy_ticks)
        local t0=$EPOCHREALTIME t1
        in_netns "$PRIV" "$BIN/loadgen" -c 64 -d "$duration" --warmup "$warmup" --close client --json \
            -r '1:GET /work?us=500' -r '1:GET /block?ms=5' "http://$S_ADDR/" >"$TMP/load.json" 2>"$TMP/load.err" ||
            { cat "$TMP/load.err" >&2; die "loadgen failed"; }
        csw1=$(ctx_switches "$S_PID")
        cpu1=$(cpu_ticks "$S_PID")
        busy1=$(busy_ticks)
        t1=$EPOCHREALTIME
        stop_pid "$S_PID"
        # loadgen counts requests after the warm-up; the counters here include it, so the
        # ratios use all replies loadgen saw (all_responses).
        local row
        row=$(python3 - "$TMP/load.json" "$w" "$((csw1 - csw0))" "$((cpu1 - cpu0))" "$HZ" "$((busy1 - busy0))" "$t0" "$t1" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
w, csw, ticks, hz, busy_ticks = (int(x) for x in sys.argv[2:7])
wall = float(sys.argv[8]) - float(sys.argv[7])
n = max(d["all_responses"], 1)
lat = d["latency_us"]
errors = ",".join(f"{k}:{v}" for k, v in d["errors"].items() if v) or "0"
busy = 100 * busy_ticks / hz / wall
server = 100 * ticks / hz / wall
loadgen = 100 * d["loadgen_cpu_s"] / max(d["duration_s"], 1e-9)
others = max(busy - server - loadgen, 0)
print(f"{w} {d['requests_per_s']:.0f} {lat['p50'] / 1000:.1f} {lat['p99'] / 1000:.1f} "
      f"{csw / n:.1f} {ticks * 1e6 / hz / n:.0f} {server:.0f}% {loadgen:.0f}% {others:.0f}% {busy:.0f} {errors}")
EOF
        )
        local n rps p50 p99 cpr cpu server loadgen others errors
        read -r n rps p50 p99 cpr cpu server loadgen others _ errors <<<"$row"
        printf '    %7s %8s %8s %8s %11s %8s %7s %8s %7s%s\n' "$n" "$rps" "$p50" "$p99" "$cpr" "$cpu" "$server" "$loadgen" "$others" \
            "$([ "$errors" != 0 ] && printf '  (errors %s)' "$errors")"
        rows+="$row"$'\n'
        if ((rps > best_rps)); then best_rps=$rps best_n=$w; fi
    done
    say
    say "req/s: replies per second; p50/p99: latency from loadgen (connect included); csw/request: the"
    say "server's context switches (all threads, /proc/PID/task/*/status) per reply; us/req: its CPU time (utime+stime)"
    say "per reply; server, loadgen: their CPU use; others: the rest of the machine's (/proc/stat; it is shared)"
    say "a rule of thumb for a pool: cores x (1 + wait / CPU) = $cores x (1 + 2.5 / 0.25) = $((cores * 11)) threads, less the CPU the connections and the load generator take"
    # The knee: the fewest workers that reach 90% of the best throughput.
    local knee knee_rps knee_busy
    read -r knee knee_rps knee_busy <<<"$(awk -v best="$best_rps" '$2 * 10 >= best * 9 {print $1, $2, $10; exit}' <<<"$rows")"
    local knee_idle=$(((cores * 100 - knee_busy) / cores))%
    local after
    after=$(awk -v k="$knee" '$1 > k {printf "%s%s: %s req/s, p99 %s ms", sep, $1, $2, $4; sep = "; "}' <<<"$rows")
    local why="the CPUs were busy, so more threads only wait their turn for one"
    ((${knee_idle%\%} >= 10)) && why="the CPUs still had ${knee_idle} idle, so the limit was elsewhere (64 requests in flight at most, the load generator)"
    # On a shared machine the scheduler shares the CPUs per thread, not per process.
    local others_best note=""
    others_best=$(awk -v n="$best_n" '$1 == n {print $9 + 0}' <<<"$rows")
    if ((others_best >= 50)); then
        note="; other programs used ${others_best}% of a core at the best run, and the scheduler shares the CPUs per thread, so a server with more threads also takes more of a busy machine"
    fi
    if [ -z "$after" ]; then
        verdict "more workers still helped up to ${counts[-1]} on $cores cores ($best_rps req/s, the CPUs ${knee_idle} idle)$note"
    else
        verdict "more workers stopped helping at about $knee on $cores cores: $knee workers reached $knee_rps req/s, within 10% of the best ($best_rps at $best_n), with the CPUs ${knee_idle} idle; beyond it ($after) $why$note"
    fi
}
