# shellcheck shell=bash
# demo: herd (sourced by scripts/demo.sh; docs/demo-herd.md)
#
# multi-acceptor: 4 worker threads, each with its own epoll, all waiting on one listening
# socket. Connections arrive one at a time, with a pause between them so every worker is
# asleep when the next comes. Without --exclusive, each connection wakes every worker (the
# thundering herd); with --exclusive (EPOLLEXCLUSIVE) the kernel wakes one. The wake-ups are
# counted where the kernel makes them: each worker thread's voluntary context switches (from
# /proc, in /stats) and, if perf is allowed, the sched:sched_wakeup tracepoint for the worker
# threads. Not epoll returns: epoll re-checks readiness before returning, so most workers woken
# for a connection another already took go back to sleep inside the kernel, unseen by the program.

demo_herd() {
    need_tools python3
    build multi-acceptor
    local n perf_ok=0
    n=$(quick 300 150)
    if command -v perf >/dev/null 2>&1 && perf stat -a -e sched:sched_wakeup -x, -o /dev/null -- true >/dev/null 2>&1; then
        perf_ok=1
    else
        skipped "perf stat -a -e sched:sched_wakeup is not available here (install linux-perf, run as root): counting context switches only"
    fi
    local -A per_conn=() wakeups=() wasted=() csw=() accepted=()
    private_netns
    local mode flags
    for mode in shared exclusive; do
        flags=()
        [ "$mode" = exclusive ] && flags=(--exclusive)
        step "multi-acceptor --workers 4${flags[*]:+ ${flags[*]}}: $n connections, one after another, 2 ms apart"
        start_server S "$PRIV" multi-acceptor --addr 127.0.0.1:0 --workers 4 "${flags[@]}"
        local run=(python3 "$TCP" spread "$S_ADDR" "$n" --gap-ms 2 --field voluntary_csw --field accepted --field wasted_wakeups)
        [ "$PRIV" != - ] && run=(ip netns exec "$PRIV" "${run[@]}")
        if ((perf_ok)); then
            # The tracepoint's pid field is the task woken: the workers' thread ids.
            local t filter="" tries=0
            # Threads name themselves as they start: wait for all four.
            while (($(grep -l '^worker' /proc/"$S_PID"/task/*/comm 2>/dev/null | wc -l) < 4)) && ((tries++ < 100)); do
                sleep 0.05
            done
            for t in /proc/"$S_PID"/task/*; do
                if grep -q '^worker' "$t/comm"; then filter+="${filter:+ || }pid == ${t##*/}"; fi
            done
            perf stat -a -e sched:sched_wakeup --filter "$filter" -x, -o "$TMP/perf.out" -- "${run[@]}" >"$TMP/spread.out"
            wakeups[$mode]=$(awk -F, '/sched:sched_wakeup/ {print $1}' "$TMP/perf.out")
        else
            "${run[@]}" >"$TMP/spread.out"
        fi
        local c a w
        c=$(sed -n 's/^voluntary_csw: //p' "$TMP/spread.out")
        a=$(sed -n 's/^accepted: //p' "$TMP/spread.out")
        w=$(sed -n 's/^wasted_wakeups: //p' "$TMP/spread.out")
        say "  per worker (0..3), during the $n connections:"
        say "    voluntary context switches: $c"
        say "    connections accepted:       $a"
        say "    wasted_wakeups (accept() found nothing): $w"
        accepted[$mode]=$a
        csw[$mode]=$(awk '{for (i = 1; i <= NF; i++) s += $i} END {print s}' <<<"$c")
        wasted[$mode]=$(awk '{for (i = 1; i <= NF; i++) s += $i} END {print s}' <<<"$w")
        per_conn[$mode]=$(awk -v s="${csw[$mode]}" -v n="$n" 'BEGIN {printf "%.1f", s / n}')
        say "  total: ${csw[$mode]} context switches, ${per_conn[$mode]} per connection"
        if ((perf_ok)); then
            say "  perf: ${wakeups[$mode]} sched:sched_wakeup events for the worker threads," \
                "$(awk -v s="${wakeups[$mode]}" -v n="$n" 'BEGIN {printf "%.1f", s / n}') per connection"
        fi
        stop_pid "$S_PID"
    done
    local perf_text=""
    ((perf_ok)) && perf_text=" (perf: ${wakeups[shared]} vs ${wakeups[exclusive]} sched_wakeup events)"
    verdict "each new connection cost ${per_conn[shared]} worker context switches without --exclusive (the herd: all 4 woken) and ${per_conn[exclusive]} with EPOLLEXCLUSIVE$perf_text, which gave the connections to the workers as ${accepted[exclusive]// /, }; accept() saw only ${wasted[shared]} wasted wake-ups, because epoll puts most woken losers back to sleep before returning"
}
