# shellcheck shell=bash
# demo: cow (sourced by scripts/demo.sh; docs/demo-cow.md)
#
# Redis's BGSAVE with single-thread's demo data set (--dataset-mb): POST /snapshot forks a
# child that writes the data set to a file while the parent goes on serving and rewriting it
# (POST /dataset/touch). fork() copies page tables, not data: the two processes share every
# page until one writes to it, and the kernel then copies that page. /proc/PID/smaps_rollup
# shows the sharing shrink (Shared_Dirty) and the copies grow (Private_Dirty) with the
# parent's writes; the file shows the data exactly as it was at the fork.

demo_cow() {
    need_tools python3
    build single-thread
    local mb delay
    mb=$(quick 256 64)
    delay=$(quick 12ms 30ms)
    local snap="$TMP/dump.snapshot"
    step "single-thread --dataset-mb $mb --snapshot-delay $delay (the child sleeps $delay per MiB written, to be watched)"
    start_server S - single-thread --addr 127.0.0.1:0 --dataset-mb "$mb" --snapshot-path "$snap" --snapshot-delay "$delay"
    local a=$S_ADDR
    say "GET /dataset: $(python3 "$TCP" get "$a" /dataset)"
    local before
    before=$(python3 "$TCP" get "$a" "/dataset/touch?mb=$mb" --method POST)
    say "POST /dataset/touch?mb=$mb (every page, no fork yet): $before"
    say "memory (MiB, /proc/PID/smaps_rollup):"
    say "    $(smaps_header)"
    say "    $(smaps_line parent "$S_PID")"

    step "POST /snapshot: fork; the child writes the data set to a file"
    local reply child fork_us generation
    reply=$(python3 "$TCP" get "$a" /snapshot --method POST)
    say "  $reply"
    child=$(jfield child_pid "$reply")
    fork_us=$(jfield fork_us "$reply")
    generation=$(jfield generation "$reply")
    say "fork() took $fork_us us for $mb MiB: it copied the page tables, not the pages"
    say "    $(smaps_header)"
    say "    $(smaps_line parent "$S_PID")"
    say "    $(smaps_line child "$child")"
    local first_parent first_child
    first_parent=$(smaps_private "$S_PID")
    first_child=$(smaps_private "$child")

    step "the parent keeps serving and rewrites a quarter of the data set at a time, while the child writes"
    local quarter=$((mb / 4)) touch=""
    for _ in 1 2 3; do
        touch=$(python3 "$TCP" get "$a" "/dataset/touch?mb=$quarter" --method POST)
        say "POST /dataset/touch?mb=$quarter: $touch"
        say "    $(smaps_header)"
        say "    $(smaps_line parent "$S_PID")"
        say "    $(smaps_line child "$child")"
    done
    local last_parent last_child pss
    last_parent=$(smaps_private "$S_PID")
    last_child=$(smaps_private "$child")
    pss=$(cat "/proc/$S_PID/smaps_rollup" "/proc/$child/smaps_rollup" 2>/dev/null | awk '/^Pss:/ {s += $2} END {printf "%.0f", s / 1024}')
    say "the two processes' Pss add up to $pss MiB of memory for a $mb MiB data set: the shared pages once, the copies twice"
    local hello_ms
    hello_ms=$(kv median_ms "$(python3 "$TCP" nagle "$a" 1)")
    say "GET / meanwhile: answered in $hello_ms ms"
    local state deadline=$((SECONDS + 60))
    until state=$(python3 "$TCP" get "$a" /snapshot) && grep -q '"state":"\(done\|failed\)"' <<<"$state"; do
        ((SECONDS < deadline)) || die "the snapshot never finished: $state"
        sleep 0.2
    done
    say "GET /snapshot: $state"
    local reaped="reaped (no zombie left)"
    if [ -e "/proc/$child" ]; then reaped="NOT reaped: $(awk '/^State/ {print $2, $3}' "/proc/$child/status")"; fi
    say "child $child: $reaped"

    step "the snapshot file: each page carries the generation it was written at"
    local check now
    check=$(python3 "$TCP" check-snapshot "$snap")
    say "  ${check#summary: }"
    now=$(python3 "$TCP" get "$a" /dataset)
    say "  the parent's data set now: $now"
    stop_pid "$S_PID"
    local touch_before touch_during
    touch_before=$(jfield took_us "$before")
    touch_during=$(jfield took_us "$touch")
    verdict "fork() of a $mb MiB process took $fork_us us; as the parent rewrote 3/4 of the data set, its Private_Dirty grew from $first_parent to $last_parent MiB and the child's from $first_child to $last_child MiB (each page written is copied once; together they used $pss MiB for the $mb MiB data set); rewriting cost $((touch_before * 1000 / mb / 1024)) ns per KiB before the fork vs $((touch_during * 1000 / quarter / 1024)) ns while shared (a page fault and copy per page); the file holds the data as of the fork ($(kv generations "$check") as generation:pages, fork at generation $generation, torn pages $(kv torn "$check")); the child was $reaped"
}

smaps_header() { printf '%-7s %8s %8s %13s %14s' process Rss Pss Shared_Dirty Private_Dirty; }

# One process's line of smaps_rollup figures, in MiB.
smaps_line() {
    awk -v who="$1" '
        /^Rss:/ {r = $2} /^Pss:/ {p = $2} /^Shared_Dirty:/ {s = $2} /^Private_Dirty:/ {d = $2}
        END {printf "%-7s %8.1f %8.1f %13.1f %14.1f", who, r / 1024, p / 1024, s / 1024, d / 1024}' "/proc/$2/smaps_rollup" 2>/dev/null ||
        printf '%-7s (gone)' "$1"
}

smaps_private() { awk '/^Private_Dirty:/ {printf "%.0f", $2 / 1024}' "/proc/$1/smaps_rollup" 2>/dev/null || echo "?"; }
