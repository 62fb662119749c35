# shellcheck shell=bash
# demo: commit (sourced by scripts/demo.sh; docs/demo-commit.md)
#
# PostgreSQL's synchronous_commit: `on` answers COMMIT once the commit's WAL record is fsync()ed;
# `off` answers once it is in the WAL buffers in shared memory, and the WAL writer writes and
# flushes it later (every wal_writer_delay, here its maximum, 10 s). A crash between the answer
# and the write loses a transaction the client saw succeed. Clients insert numbered rows as fast
# as they can and remember which COMMITs returned; at a random moment every process of the
# cluster is frozen and killed (SIGSTOP, SIGKILL); after the restart (crash recovery) the
# acknowledged rows are counted. The kernel keeps what was write()n: this crash loses only what
# was still in shared memory. What an OS crash or a power cut would have lost on top (written,
# not yet fsync()ed) is read from the WAL positions a moment before the kill.

# shellcheck source=scripts/demos/pg.sh
source "$DEMOS_DIR/pg.sh"

demo_commit() {
    pg_need
    local clients rounds window
    clients=4
    rounds=$(quick 3 1)
    window=$(quick 2-4 1-2)
    pg_init C "wal_writer_delay = 10s" "wal_buffers = 64MB"
    local fs
    fs=$(df -PT "$TMP" | awk 'NR == 2 {print $2}')
    say "PostgreSQL $PG_VERSION, a throwaway cluster in $TMP ($fs), on a Unix socket only"
    say "wal_writer_delay = 10s (its maximum), wal_buffers = 64MB; fsync = on, everything else default"

    local mode round
    # Per mode: totals, and one number per round (space-separated).
    local -A acked=() lost=() rates=() losts=() unflushed=()
    for mode in on off; do
        step "synchronous_commit = $mode: $clients clients insert rows (client, 1), (client, 2), ... one COMMIT at a time, as fast as they can; at a random moment in ${window}s every process of the cluster is frozen and killed; $rounds round(s)"
        pg_start C - -c synchronous_commit="$mode"
        pg_sql C "CREATE TABLE IF NOT EXISTS acks (client int, n int)" >/dev/null
        acked[$mode]=0 lost[$mode]=0
        for round in $(seq "$rounds"); do
            # Durable before the round starts, whatever the mode: the count starts from empty.
            pg_sql C "SET synchronous_commit = on; TRUNCATE acks" >/dev/null
            local load check t0 recovery_ms
            load=$(python3 "$PG" crash-load "$TMP/pg-C/sock" "$TMP/pg-C/data" --clients "$clients" \
                --crash-after "$window" --out "$TMP/load.json")
            pg_wait_exit "$PG_PID_C"
            t0=$EPOCHREALTIME
            pg_start C - -c synchronous_commit="$mode"
            recovery_ms=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.0f", (b - a) * 1000}')
            check=$(python3 "$PG" check "$TMP/pg-C/sock" "$TMP/load.json")
            say "round $round: killed the cluster ($(kv killed "$load") processes) after $(kv seconds "$load") s, $(kv acked "$load") COMMITs acknowledged ($(kv rate "$load")/s, $(kv wal_per_commit "$load") bytes of WAL each)"
            say "    restarted (crash recovery) in $recovery_ms ms: acknowledged but lost: $(kv lost "$check"); committed but never acknowledged (in flight at the kill): $(kv committed_unacked "$check")"
            say "    WAL a moment before the kill: $(kv unwritten_bytes "$check") bytes only in shared memory (~$(kv unwritten_commits "$check") commits), $(kv unflushed_bytes "$check") bytes written but not fsync()ed (~$(kv unflushed_commits "$check") commits)"
            acked[$mode]=$((acked[$mode] + $(kv acked "$load")))
            lost[$mode]=$((lost[$mode] + $(kv lost "$check")))
            rates[$mode]+="$(kv rate "$load") "
            losts[$mode]+="$(kv lost "$check") "
            unflushed[$mode]+="$(kv unflushed_commits "$check") "
        done
        pg_stop C
    done
    commit_our_servers

    local off
    if ((lost[off] > 0)); then
        off="lost ${lost[off]} of ${acked[off]} ($(words "${losts[off]}") per crash): their COMMIT returned while their WAL was still in shared memory, which died with the processes"
    else
        off="lost none of ${acked[off]} this time: the WAL writer had write()n everything acknowledged before each kill (it writes each WAL page as soon as it fills), and what a killed process had write()n stays in the kernel's page cache"
    fi
    verdict "$rounds crash(es) per mode (SIGKILL of every process of the cluster); synchronous_commit=on: $(words "${rates[on]}") commits/s, lost ${lost[on]} of ${acked[on]} acknowledged COMMITs; off: $(words "${rates[off]}") commits/s, $off; an OS crash or power cut would also lose the WAL written but not yet fsync()ed, which with off was ~$(words "${unflushed[off]}") commits a moment before each kill (with on: $(words "${unflushed[on]}"))"
}

# words "A B C": "A, B, C" (one number per round).
words() { local w=$1; w=${w% }; printf '%s' "${w// /, }"; }

# The same crash against this workspace's own servers, `--commit sync|async`, goes here once
# their journal exists: same clients, same kill, same count of acknowledged writes lost.
commit_our_servers() {
    skipped "the same crash against this workspace's servers (--commit sync|async): they have no journal yet"
}
