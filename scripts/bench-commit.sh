#!/usr/bin/env bash
# bench-commit.sh: acknowledged writes per second, our journal against PostgreSQL, in one run.
#
# Usage: scripts/bench-commit.sh [--rounds 3] [--duration 5] [--clients 1,50] [--workers 2]
#                                [--no-build] [--keep] [--out FILE] [PATTERN ...]
#
#   PATTERN        a server crate under crates/ (default: single-thread prefork); each runs with
#                  --commit sync and with --commit async. single-thread runs with --workers 1,
#                  every other pattern with --workers N
#   --rounds N     measure everything N times, interleaved: per round, per client count,
#                  PostgreSQL on, off, then each PATTERN sync, async, each round starting
#                  one further along that list (default 3)
#   --duration S   whole seconds per run (default 5)
#   --clients L    comma-separated client counts (default 1,50)
#   --workers N    --workers of every PATTERN but single-thread (default 2)
#   --no-build     use target/release as it is
#   --out FILE     also write the markdown table to FILE
#   --keep         keep the temp dir: runs.tsv (every run), and per run its client's output,
#                  the server's stderr and threads.txt (every thread's CPU and CPU wait)
#
# Needs PostgreSQL's server programs and pgbench (Debian: apt-get install -y postgresql; as
# root it runs the cluster as the postgres OS user), python3 and curl.
#
# What is compared: one small write acknowledged once it is durable, and the same write
# acknowledged before it is.
#   ours      loadgen -c C -r 'POST /messages hello' (closed loop, one keep-alive connection
#             per client): 201 {"seq": N} once the message is in the journal; --commit sync
#             after fdatasync covers it (group commit), --commit async after write(2) (a
#             flusher syncs every --commit-delay, 200 ms)
#   postgres  a throwaway cluster (initdb in the temp dir, a Unix socket only, every setting
#             its default) and pgbench -n -M prepared -c C -j min(C,2), one transaction each:
#             INSERT INTO messages (body) VALUES ('hello') RETURNING seq, into a table
#             (seq bigserial, body text) without an index; synchronous_commit on, or off
#             through PGOPTIONS (off: COMMIT returns before its WAL is written; the WAL writer
#             writes and flushes it within 3 x wal_writer_delay, 200 ms)
# Each run starts from an empty journal (a fresh --data-dir, a server started for the run) or
# an empty table (TRUNCATE, CHECKPOINT). Clients and servers share the machine's cores,
# unpinned, alike for both.
#
# Columns (each the median over the rounds; writes/s also shows the range):
#   writes/s       acknowledged writes per second (loadgen's 201s; pgbench's tps)
#   x PG sync      writes/s over PostgreSQL's synchronous_commit=on with as many clients in
#                  the same round (the median of the per-round ratios)
#   syncs/write    ours: fdatasyncs over records appended (/stats, journal); postgres: WAL
#                  fsyncs over transactions (pg_stat_wal.wal_sync)
#   syncs/s        those per second of the run
#   flush ms       the mean time the disk under the temp dir took per cache flush (the device
#                  half of an fdatasync) during the run, every process's flushes counted:
#                  /sys/class/block/DEV/stat, flush requests and their milliseconds
#   srv us/write   the server's CPU per write: its whole process tree (cpu_ticks in
#                  scripts/lib.sh; for postgres the postmaster, its backends, WAL writer, ...)
#   srv, client, other CPU
#                  % of one core (a 2-core machine has 200): the server, the load generator,
#                  and everything else that ran meanwhile (the machine is shared)
#   busiest threads
#                  the server's two thread names that ran most (xN: N threads of that name,
#                  summed; PostgreSQL's by process title, "backend" a client's), with the time
#                  they ran and the time they were ready to run but waited for a CPU, in % of
#                  one core: one thread near 100% of the two together is a limit; a large
#                  wait says the machine's cores are
# Everything it starts is stopped on exit (servers and the cluster, by PID), including on
# failure or Ctrl-C, and the temp dir is removed (unless --keep).
set -euo pipefail

PROG=bench-commit
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
DEMOS_DIR="$ROOT/scripts/demos"
# shellcheck source=demos/pg.sh source-path=SCRIPTDIR
source "$DEMOS_DIR/pg.sh"

ROUNDS=3
DURATION=5
CLIENTS=(1 50)
NWORKERS=2
BUILD=1
OUT=
KEEP=0
PATTERNS=()
PROFILE=release
BIN_DIR=$(bin_dir)
TMP=
PIDS=()    # pg_start records each postmaster here
RUNS=      # one line per run (row)
SAMPLER=   # the PID of sample_begin's background sample
FLUSH_STAT= # find_flush_stat

# pg.sh speaks the demos' language for what it cannot do.
skipped() { log "$PROG: cannot run: $*"; }
need_tools() {
    local t
    for t in "$@"; do command -v "$t" >/dev/null || die "$t not found"; done
}

parse_args() {
    while (($#)); do
        case $1 in
            --rounds) ROUNDS=${2:?}; whole "$1" "$2"; shift ;;
            --duration) DURATION=${2:?}; whole "$1" "$2"; shift ;;
            --clients)
                IFS=, read -ra CLIENTS <<<"${2:?}"
                local c
                for c in "${CLIENTS[@]}"; do whole --clients "$c"; done
                shift
                ;;
            --workers) NWORKERS=${2:?}; whole "$1" "$2"; shift ;;
            --no-build) BUILD=0 ;;
            --out) OUT=${2:?}; shift ;;
            --keep) KEEP=1 ;;
            -h | --help) usage; exit 0 ;;
            -*) usage >&2; die "unknown option $1" ;;
            *) PATTERNS+=("$1") ;;
        esac
        shift
    done
    ((${#PATTERNS[@]})) || PATTERNS=(single-thread prefork)
}

cleanup() {
    local pid
    set +e # stop everything even if one step fails
    stop_all
    # The postmasters (pg.sh starts them outside LIVE): SIGINT is a fast shutdown; reap
    # SIGKILLs the cluster's whole process tree if it takes longer.
    for pid in "${PIDS[@]}"; do
        if alive "$pid"; then kill -INT "$pid" 2>/dev/null; fi
        reap "$pid" 20
    done
    [[ -n $TMP ]] || return 0
    if ((KEEP)); then log "raw outputs kept in $TMP"; else rm -rf "$TMP"; fi
}

# ---------------------------------------------------------------- the machine

# The block device under $TMP (its /sys/class/block/NAME/stat), if it has one: FLUSH_STAT.
find_flush_stat() {
    local dev
    dev=$(df -P "$TMP" | awk 'NR == 2 { print $1 }')
    dev=$(readlink -f "$dev" 2>/dev/null) || true
    FLUSH_STAT=/sys/class/block/${dev##*/}/stat
    # Fields 16 and 17 (Linux 5.5+): flush requests completed, milliseconds spent on them.
    [[ -r $FLUSH_STAT && $(wc -w <"$FLUSH_STAT") -ge 17 ]] || FLUSH_STAT=
}

# flushes: "FLUSHES MS" of the device so far (0 0 without one).
flushes() {
    if [[ -n $FLUSH_STAT ]]; then awk '{ print $16, $17 }' "$FLUSH_STAT"; else echo "0 0"; fi
}

# ---------------------------------------------------------------- measuring

# threads PID: "TID RUN_NS WAIT_NS NAME" for every thread of PID's process tree: the time it
# ran and the time it was runnable but waited for a CPU (schedstat). NAME is the thread's
# comm; PostgreSQL's processes are all "postgres", so theirs comes from the title each sets
# (cmdline): walwriter, checkpointer, ..., and "backend" for a client's. One ps, then bash's
# own reads: fast enough to catch 50 backends before they exit.
threads() {
    local -A kids=()
    local pid ppid todo=("$1") task title name run wait
    while read -r pid ppid; do kids[$ppid]+="$pid "; done < <(ps -e -o pid=,ppid=)
    while ((${#todo[@]})); do
        pid=${todo[0]}
        todo=("${todo[@]:1}")
        # shellcheck disable=SC2206 # one pid per word
        todo+=(${kids[$pid]:-})
        title=
        read -r name <"/proc/$pid/comm" 2>/dev/null || continue
        if [[ $name == postgres ]]; then
            read -r -d '' title <"/proc/$pid/cmdline" 2>/dev/null || true
            case $title in
                *"[local]"*) title=backend ;;
                "postgres: "*) title=${title#postgres: } title=${title%% *} ;;
                *) title=postmaster ;;
            esac
        fi
        for task in /proc/"$pid"/task/*; do
            read -r run wait _ <"$task/schedstat" 2>/dev/null || continue
            [[ -n $title ]] && name=$title || read -r name <"$task/comm" 2>/dev/null || continue
            echo "${task##*/} $run $wait ${name// /\~}"
        done
    done
}

# sample_begin PID, sample_end PID DIR: around a client's run. They set S0/S1 (wall clock),
# T0/T1 (the server's CPU ticks), B0/B1 (the machine's busy ticks), F0/F1 and FMS0/FMS1 (the
# device's cache flushes and their milliseconds), and BUSIEST: the two thread
# names of the server that ran most, "name [xN] R% (wait W%)": N threads of that name
# (summed), R their CPU, W their time waiting for a CPU, in % of one core from S0 to a sample
# taken 0.3 s before the client's end (PostgreSQL's backends are gone soon after pgbench is;
# a thread not there at S0 started from 0). DIR/threads.txt gets every name, busiest first.
sample_begin() {
    read -r F0 FMS0 < <(flushes)
    S0=$EPOCHREALTIME T0=$(cpu_ticks "$1") B0=$(busy_ticks)
    threads "$1" >"$TMP/threads.0"
    local at
    at=$(awk -v d="$DURATION" 'BEGIN { print d - 0.3 }')
    (sleep "$at" && echo "$EPOCHREALTIME" >"$TMP/threads.t" && threads "$1" >"$TMP/threads.1") &
    SAMPLER=$!
    LIVE[$SAMPLER]=client
}
sample_end() {
    S1=$EPOCHREALTIME T1=$(cpu_ticks "$1") B1=$(busy_ticks)
    read -r F1 FMS1 < <(flushes)
    reap "$SAMPLER" 5
    awk -v wall="$(awk -v a="$S0" -v b="$(<"$TMP/threads.t")" 'BEGIN { print b - a }')" '
        NR == FNR { run[$1] = $2; wait[$1] = $3; next }
        { n[$4]++; r[$4] += $2 - run[$1]; w[$4] += $3 - wait[$1] }
        END {
            for (k in n) printf "%d %s%s~%.0f%%~(wait~%.0f%%)\n", r[k], k, (n[k] > 1 ? "~x" n[k] : ""),
                r[k] / wall / 1e7, w[k] / wall / 1e7
        }' "$TMP/threads.0" "$TMP/threads.1" | sort -rn | cut -d' ' -f2 >"$2/threads.txt"
    BUSIEST=$(head -2 "$2/threads.txt" | paste -sd,)
}

# cpu_row WRITES: "srv_us_per_write srv% client% other%" over the last sample, with the
# client's CPU seconds in CLIENT_CPU (run_client).
cpu_row() {
    awk -v t=$((T1 - T0)) -v b=$((B1 - B0)) -v s0="$S0" -v s1="$S1" -v client="$CLIENT_CPU" \
        -v n="$1" -v hz="$HZ" 'BEGIN {
            cpu = t / hz; wall = s1 - s0; other = b / hz - cpu - client
            if (other < 0) other = 0 # tick rounding
            printf "%.1f %.0f %.0f %.0f\n", 1e6 * cpu / (n > 0 ? n : 1), 100 * cpu / wall,
                100 * client / wall, 100 * other / wall
        }'
}

# row ROUND CLIENTS TARGET RATE WRITES SYNCS: appends one run to $RUNS, "round clients target
# writes/s syncs/write syncs/s flush_ms srv_us srv% client% other% busiest" (spaces in names
# as ~; flush_ms is - without a device to read, or without a flush in the run).
row() {
    local syncs flush=-
    syncs=$(awk -v n="$5" -v f="$6" -v d="$DURATION" 'BEGIN { printf "%.4f %.0f", f / n, f / d }')
    if ((F1 > F0)); then flush=$(awk -v n=$((F1 - F0)) -v ms=$((FMS1 - FMS0)) 'BEGIN { printf "%.3f", ms / n }'); fi
    printf '%s %s %s %s %s %s %s %s\n' "$1" "$2" "${3// /\~}" "$4" "$syncs" "$flush" "$(cpu_row "$5")" "$BUSIEST" >>"$RUNS"
    log "  $4 writes/s; syncs/write syncs/s: $syncs; device flush: $flush ms; busiest threads: ${BUSIEST//\~/ }"
}

# journal_counts ADDR: "appends fdatasyncs" from the server's /stats.
journal_counts() {
    local stats
    stats=$(curl -sf -m 5 "http://$1/stats") || return 1
    echo "$(jfield appends "$stats") $(jfield fdatasyncs "$stats")"
}

# measure_ours ROUND CLIENTS PATTERN MODE: one run against a server started for it.
measure_ours() {
    local round=$1 clients=$2 pattern=$3 mode=$4 target="$3 --commit $4"
    local dir="$TMP/run-$round-$clients-$pattern-$mode" out counts a0 f0 a1 f1
    log "== round $round/$ROUNDS, $clients client(s): $target"
    WORKERS=$NWORKERS
    [[ $pattern == single-thread ]] && WORKERS=1
    SERVER_ARGS=(--commit "$mode" --max-conns $((clients + 100)))
    start_target "$pattern" "$dir" || { log "  skipped: it did not start"; return; }
    counts=$(journal_counts "$SERVER_ADDR") || die "$target: no /stats"
    read -r a0 f0 <<<"$counts"
    out="$dir/loadgen.json"
    sample_begin "$SERVER_PID"
    run_client "$out" "$dir/loadgen.err" "$BIN_DIR/loadgen" -c "$clients" -d "${DURATION}s" --json \
        -r 'POST /messages hello' "http://$SERVER_ADDR/" || { cat "$dir/loadgen.err" >&2; die "loadgen failed"; }
    sample_end "$SERVER_PID" "$dir"
    counts=$(journal_counts "$SERVER_ADDR") || die "$target: no /stats after the run"
    read -r a1 f1 <<<"$counts"
    stop_pid "$SERVER_PID"
    local json requests created
    json=$(<"$out")
    requests=$(jfield requests "$json") created=$(jfield 201 "$json")
    [[ ${created:-0} == "$requests" ]] || log "  warning: $requests replies, ${created:-0} of them 201"
    ((${created:-0} > 0 && a1 > a0)) || die "$target: no write acknowledged"
    # Per record appended: a few more than loadgen counted (those in flight when it stopped).
    row "$round" "$clients" "$target" "$(jfield requests_per_s "$json")" $((a1 - a0)) $((f1 - f0))
    rm -rf "$dir/data"
}

# pg_value QUERY: the first value the benchmark cluster answers.
pg_value() { pg_sql B "$1" | head -1; }

# measure_pg ROUND CLIENTS MODE: one pgbench run, synchronous_commit=MODE (on or off).
measure_pg() {
    local round=$1 clients=$2 mode=$3 target="postgres synchronous_commit=$3"
    local dir="$TMP/run-$round-$clients-pg-$mode" w0 w1 n
    log "== round $round/$ROUNDS, $clients client(s): $target"
    mkdir -p "$dir"
    pg_sql B "TRUNCATE messages" >/dev/null
    pg_sql B "CHECKPOINT" >/dev/null
    w0=$(pg_value "SELECT wal_sync FROM pg_stat_wal")
    sample_begin "$PG_PID_B"
    PGOPTIONS="-c synchronous_commit=$mode" run_client "$dir/pgbench.out" "$dir/pgbench.err" \
        "$PGBIN/pgbench" -n -M prepared -f "$TMP/insert.sql" -c "$clients" -j $((clients < 2 ? clients : 2)) \
        -T "$DURATION" -h "$TMP/pg-B/sock" -p 5432 -U postgres postgres ||
        { cat "$dir/pgbench.err" >&2; die "pgbench failed"; }
    sample_end "$PG_PID_B" "$dir"
    # A backend adds its counts to pg_stat_wal as it exits: wait until pgbench's have.
    local deadline=$((SECONDS + 10))
    until [[ $(pg_value "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'") == 1 ]]; do
        ((SECONDS < deadline)) || die "pgbench's backends are still there 10 s after it ended"
        sleep 0.05
    done
    # The backends that exited since sample_end: their CPU is in the postmaster's reaped
    # children's now, which sample_end may have seen neither way.
    T1=$(cpu_ticks "$PG_PID_B")
    w1=$(pg_value "SELECT wal_sync FROM pg_stat_wal")
    n=$(awk '/^number of transactions actually processed:/ { split($NF, a, "/"); print a[1]; exit }' "$dir/pgbench.out")
    ((${n:-0} > 0)) || { cat "$dir/pgbench.out" >&2; die "$target: no transaction"; }
    row "$round" "$clients" "$target" "$(awk '/^tps = / { printf "%.0f", $3; exit }' "$dir/pgbench.out")" \
        "$n" $((w1 - w0))
}

# ---------------------------------------------------------------- reporting

print_table() {
    local fs
    fs=$(df -PT "$TMP" | awk 'NR == 2 { print $2 }')
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), $(nproc) cores, $fs, PostgreSQL $PG_VERSION;" \
        "$ROUNDS round(s) of ${DURATION}s per cell, loadgen/pgbench unpinned next to the server"
    echo
    echo "| clients | target | writes/s (range) | x PG sync | syncs/write | syncs/s | flush ms | srv us/write | srv CPU | client CPU | other CPU | busiest threads |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    # Pass 1: PostgreSQL on's rate per round and client count. Pass 2: every run, grouped by
    # (clients, target) in the order first seen; the medians at the end (for the busiest
    # threads, the median run's by writes/s).
    awk '
        function sort(list, v,   n, i, j, t) {
            n = split(list, v, " ")
            for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
            return n
        }
        function median(list,   n, v) {
            n = sort(list, v)
            return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
        }
        function range(list,   n, v) {
            n = sort(list, v)
            return (n > 1) ? sprintf(" (%d-%d)", v[1], v[n]) : ""
        }
        NR == FNR { if ($3 == "postgres~synchronous_commit=on") base[$1 " " $2] = $4; next }
        {
            k = $2 SUBSEP $3
            if (!(k in seen)) { seen[k] = 1; order[++rows] = k }
            rate[k] = rate[k] " " $4
            b = base[$1 " " $2]
            if (b > 0) ratio[k] = ratio[k] " " $4 / b
            for (i = 5; i <= 11; i++) col[k, i] = col[k, i] " " ($i == "-" ? "" : $i)
            busiest[k, $4] = $12
        }
        END {
            for (r = 1; r <= rows; r++) {
                k = order[r]; split(k, kk, SUBSEP)
                name = kk[2]; gsub("~", " ", name)
                n = sort(rate[k], v); mid = v[int((n + 1) / 2)]
                who = busiest[k, mid]; gsub("~", " ", who)
                flush = (split(col[k, 7], f, " ") > 0) ? sprintf("%.2f", median(col[k, 7])) : "n/a"
                printf "| %s | %s | %.0f%s | %s | %.4f | %.0f | %s | %.1f | %.0f%% | %.0f%% | %.0f%% | %s |\n",
                    kk[1], name, median(rate[k]), range(rate[k]),
                    (k in ratio) ? sprintf("%.2fx", median(ratio[k])) : "n/a",
                    median(col[k, 5]), median(col[k, 6]), flush, median(col[k, 8]), median(col[k, 9]),
                    median(col[k, 10]), median(col[k, 11]), who
            }
        }' "$RUNS" "$RUNS"
}

main() {
    parse_args "$@"
    on_exit cleanup
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench-commit.XXXXXX")
    RUNS="$TMP/runs.tsv"
    need_tools curl python3
    pg_need
    [[ -x $PGBIN/pgbench ]] || die "no pgbench in $PGBIN (Debian: apt-get install -y postgresql-contrib)"
    if ((BUILD)); then build_patterns loadgen; fi
    keep_built_patterns
    [[ -x $BIN_DIR/loadgen ]] || die "no $BIN_DIR/loadgen"
    ((${#PATTERNS[@]})) || die "no pattern to measure"

    find_flush_stat
    [[ -n $FLUSH_STAT ]] || log "no block device statistics for $TMP: no flush column"
    local most=0 c
    for c in "${CLIENTS[@]}"; do ((c > most)) && most=$c; done
    pg_init B "max_connections = $((most + 20))"
    pg_start B -
    pg_sql B "CREATE TABLE messages (seq bigserial, body text)" >/dev/null
    echo "INSERT INTO messages (body) VALUES ('hello') RETURNING seq;" >"$TMP/insert.sql"
    : >"$RUNS"

    # Every target, in the order of the first round; each later round starts one further on,
    # so that none always runs first, or right after the same other one.
    local targets=("pg on" "pg off") round clients pattern mode i t
    for pattern in "${PATTERNS[@]}"; do targets+=("$pattern sync" "$pattern async"); done
    for ((round = 1; round <= ROUNDS; round++)); do
        for clients in "${CLIENTS[@]}"; do
            for ((i = 0; i < ${#targets[@]}; i++)); do
                t=${targets[(i + round - 1) % ${#targets[@]}]}
                read -r pattern mode <<<"$t"
                if [[ $pattern == pg ]]; then
                    measure_pg "$round" "$clients" "$mode"
                else
                    measure_ours "$round" "$clients" "$pattern" "$mode"
                fi
            done
        done
    done
    echo
    if [[ -n $OUT ]]; then print_table | tee "$OUT"; else print_table; fi
}

main "$@"
