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
#
# Then the same crash against this workspace's servers (single-thread, prefork), --commit sync
# and async: clients POST messages (scripts/demos/journal.py), the server's process group is
# SIGKILLed, restarted on the same journal, and the acknowledged messages counted. Their async
# acknowledges after write(2), so a kill loses nothing; only what a power cut would lose
# (acknowledged, not yet fdatasync()ed) differs, read from /stats a moment before the kill.

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
    verdict "$rounds crash(es) per mode (SIGKILL of every process of the cluster); synchronous_commit=on: $(words "${rates[on]}") commits/s, lost ${lost[on]} of ${acked[on]} acknowledged COMMITs; off: $(words "${rates[off]}") commits/s, $off; an OS crash or power cut would also lose the WAL written but not yet fsync()ed, which with off was ~$(words "${unflushed[off]}") commits a moment before each kill (with on: $(words "${unflushed[on]}")); $OUR_VERDICT"
}

# words "A B C": "A, B, C" (one number per round).
words() { local w=$1; w=${w% }; printf '%s' "${w// /, }"; }

# The same crash against this workspace's own servers, each with --commit sync and async:
# clients POST messages, remembering the seq of every 201; at a random moment the server's whole
# process group is SIGKILLed (one kill(2): a prefork master and its workers at once); restarted
# on the same --data-dir, the acknowledged messages are counted. Sets OUR_VERDICT.
commit_our_servers() {
    local patterns=(single-thread prefork) clients=4 rounds window
    rounds=$(quick 2 1)
    window=$(quick 1-2 0.5-1)
    build "${patterns[@]}"
    local mode pattern round dir load check t0 recovery_ms recovered
    local -A acked=() lost=() rates=() unsynced=()
    for mode in sync async; do
        step "our servers, --commit $mode: $clients clients POST /messages \"c<client> m<n>\" one at a time, as fast as they can, each recording the seq of every 201; at a random moment in ${window}s the server's process group is SIGKILLed; $rounds round(s) per server"
        acked[$mode]=0 lost[$mode]=0
        for pattern in "${patterns[@]}"; do
            for round in $(seq "$rounds"); do
                dir="$TMP/$pattern-$mode-$round"
                our_start "$pattern" "$dir" --commit "$mode"
                load=$(python3 "$DEMOS_DIR/journal.py" crash-load "$OUR_ADDR" --pgid "$OUR_PID" \
                    --clients "$clients" --crash-after "$window" --out "$dir/load.json")
                reap "$OUR_PID" 10
                t0=$EPOCHREALTIME
                our_start "$pattern" "$dir" --commit "$mode"
                recovery_ms=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.0f", (b - a) * 1000}')
                # "PATTERN: journal DIR: N records, seq A..=B in S segment(s); clean" (or what
                # recovery cut): from after the directory.
                recovered=$(grep -m1 -o 'journal .*' "$dir/stderr" || true)
                recovered=${recovered#*/data: }
                check=$(python3 "$DEMOS_DIR/journal.py" check "$OUR_ADDR" "$dir/load.json")
                stop_pid "$OUR_PID"
                say "$pattern round $round: killed its process group ($(kv killed "$load") process(es)) after $(kv seconds "$load") s, $(kv acked "$load") writes acknowledged ($(kv rate "$load")/s)"
                say "    restarted in $recovery_ms ms (journal: $recovered): acknowledged but lost: $(kv lost "$check"); written but never acknowledged (in flight at the kill): $(kv unacked_present "$check")"
                say "    journal a moment before the kill: head $(kv head "$load"), durable (fdatasync()ed) $(kv durable "$load"); acknowledged then and not yet fdatasync()ed: $(kv unsynced_acked "$load")"
                acked[$mode]=$((acked[$mode] + $(kv acked "$load")))
                lost[$mode]=$((lost[$mode] + $(kv lost "$check")))
                rates[$mode]+="$(kv rate "$load") "
                unsynced[$mode]+="$(kv unsynced_acked "$load") "
            done
        done
    done
    local why
    if ((lost[sync] + lost[async] == 0)); then
        why="a kill loses nothing that reached write(2): the page cache outlives the process, and an async write is acknowledged only after its write(2)"
    else
        why="LOST acknowledged writes: a bug, since the journal acknowledges a write only after its write(2) (async) or fdatasync (sync)"
    fi
    OUR_VERDICT="our servers ($(words "${patterns[*]} "); SIGKILL of the whole process group): --commit sync: $(words "${rates[sync]}") writes/s, lost ${lost[sync]} of ${acked[sync]} acknowledged; --commit async: $(words "${rates[async]}") writes/s, lost ${lost[async]} of ${acked[async]}: $why; a power cut or kernel crash would also lose what was acknowledged and not yet fdatasync()ed, with async $(words "${unsynced[async]}") writes a moment before each kill (at most --commit-delay's worth, 200 ms), with sync $(words "${unsynced[sync]}")"
}

# our_start PATTERN DIR ARGS...: PATTERN serving on 127.0.0.1:0 with its journal in DIR/data,
# as the leader of a process group of its own (setsid execs: the PID is the server's, and a
# prefork server's workers are in its group); waits for its start-up line. Sets OUR_PID and
# OUR_ADDR; its stderr is in DIR/stderr.
our_start() {
    local pattern=$1 dir=$2
    shift 2
    mkdir -p "$dir"
    local workers=()
    [ "$pattern" = prefork ] && workers=(--workers 2)
    background - setsid "$BIN/$pattern" --addr 127.0.0.1:0 "${workers[@]}" --data-dir "$dir/data" "$@" 2>"$dir/stderr"
    OUR_PID=$BG_PID
    # Out of bash's job table: the SIGKILL on purpose prints no "Killed" line.
    disown "$OUR_PID"
    if ! wait_started "$OUR_PID" "$dir/stderr" 20; then
        cat "$dir/stderr" >&2
        die "$pattern did not start"
    fi
    OUR_ADDR=$STARTED_ADDR
    [ "$(ps -o pgid= -p "$OUR_PID" | tr -d ' ')" = "$OUR_PID" ] || die "$pattern is not a process group leader"
}
