# shellcheck shell=bash
# demo: replication (sourced by scripts/demo.sh; docs/demo-replication.md)
#
# A primary and a streaming standby (pg_basebackup -R), each a throwaway cluster of its own. A
# writer commits a row on the primary, and a reader at once asks the standby for it. Asynchronous
# (synchronous_standby_names empty) the COMMIT returns once the primary's own WAL is flushed and
# the standby catches up later: the reader often finds the row missing (a stale read), and
# pg_stat_replication shows how far behind the standby is. Synchronous with remote_apply the
# COMMIT returns only after the standby has replayed it: every read sees the write, and every
# commit waits for the round trip. Then, where network namespaces and tc allow, the same with
# the standby behind a slow link (TCP between two namespaces, netem's delay or tbf's rate limit).

# shellcheck source=scripts/demos/pg.sh
source "$DEMOS_DIR/pg.sh"

demo_replication() {
    pg_need
    [ -x "$PGBIN/pg_basebackup" ] || {
        skipped "this demo needs pg_basebackup (Debian: apt-get install -y postgresql)"
        exit 77
    }
    local count delay_ms rate
    count=$(quick 1000 300)
    delay_ms=25
    rate=256kbit
    # The primary also takes replication over TCP from the slow link's namespace (10.77.0.0/24),
    # used only by the last step; it listens on no TCP address until then.
    pg_init P "wal_keep_size = 256MB"
    echo "host replication all 10.77.0.0/24 trust" >>"$TMP/pg-P/data/pg_hba.conf"
    pg_start P -
    pg_sql P "CREATE TABLE seen (n int PRIMARY KEY)" >/dev/null

    step "a standby: pg_basebackup -R from the primary, started with its own socket"
    local s="$TMP/pg-S"
    mkdir -p "$s/sock"
    [ "$(id -u)" = 0 ] && chown -R postgres: "$s"
    as_pg "$PGBIN/pg_basebackup" -d "host=$TMP/pg-P/sock port=5432 user=postgres application_name=standby1" \
        -D "$s/data" -R -X stream -c fast >"$s/basebackup.log" 2>&1 || {
        cat "$s/basebackup.log" >&2
        die "pg_basebackup failed"
    }
    # The copy has the primary's postgresql.conf; the standby's own socket goes after it.
    echo "unix_socket_directories = '$s/sock'" >>"$s/data/postgresql.conf"
    say "standby.signal and primary_conninfo (postgresql.auto.conf) written by -R:"
    grep -o "host=[^ ]* port=[^ ]* application_name=[^ ]*" "$s/data/postgresql.auto.conf" | tr -d "'" | sed "s|$TMP|\$TMP|g" | indent
    pg_start S -
    wait_streaming
    say "PostgreSQL $PG_VERSION: $(pg_sql P "SELECT application_name || ' ' || state || ', ' || sync_state FROM pg_stat_replication")"

    local -A line=()
    step "asynchronous: synchronous_standby_names = '', synchronous_commit = on; $count commits, each read at once on the standby"
    set_mode async
    line[async]=$(python3 "$PG" repl "$TMP/pg-P/sock" "$s/sock" --count "$count")
    report "${line[async]}" "$count"

    step "synchronous: synchronous_standby_names = 'standby1', synchronous_commit = remote_apply; the same"
    set_mode sync
    line[sync]=$(python3 "$PG" repl "$TMP/pg-P/sock" "$s/sock" --count "$count")
    report "${line[sync]}" "$count"

    slow_link "$(quick 300 200)" "$(quick 200 40)"

    pg_stop S
    pg_stop P
    local a=${line[async]} y=${line[sync]}
    verdict "over local sockets, asynchronous: $(kv stale "$a") of $count reads on the standby right after COMMIT returned were stale (up to $(kv stale_behind_max "$a") commits and $(kv replay_lsn_diff_max "$a") bytes of WAL behind, replay_lag up to $(ms "$(kv replay_lag_ms_max "$a")")), commit p50 $(kv p50_ms "$a") ms, p99 $(kv p99_ms "$a") ms; synchronous (remote_apply): $(kv stale "$y") stale, commit p50 $(kv p50_ms "$y") ms, p99 $(kv p99_ms "$y") ms ($(ratio "$(kv p50_ms "$y")" "$(kv p50_ms "$a")") the asynchronous p50)${SLOW}"
}

# set_mode async|sync: the primary's replication settings, reloaded (no restart), and waited
# for until pg_stat_replication shows the standby in that state.
set_mode() {
    local names='' commit=on want=async
    if [ "$1" = sync ]; then names=standby1 commit=remote_apply want=sync; fi
    pg_sql P "ALTER SYSTEM SET synchronous_standby_names = '$names'" >/dev/null
    pg_sql P "ALTER SYSTEM SET synchronous_commit = '$commit'" >/dev/null
    pg_sql P "SELECT pg_reload_conf()" >/dev/null
    local deadline=$((SECONDS + 30)) state
    until state=$(pg_sql P "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'") &&
        [ "$state" = "$want" ]; do
        ((SECONDS < deadline)) || die "the standby's sync_state stayed '$state', not $want"
        sleep 0.05
    done
    # Each mode starts with the standby caught up, not behind on the last one's backlog.
    local behind
    until behind=$(pg_sql P "SELECT pg_current_wal_lsn() - replay_lsn FROM pg_stat_replication WHERE application_name = 'standby1'") &&
        [ "$behind" = 0 ]; do
        ((SECONDS < deadline)) || die "the standby did not catch up ($behind bytes behind)"
        sleep 0.05
    done
}

# Waits until the standby streams from the primary.
wait_streaming() {
    local deadline=$((SECONDS + 60)) state
    until state=$(pg_sql P "SELECT state FROM pg_stat_replication WHERE application_name = 'standby1'") &&
        [ "$state" = streaming ]; do
        ((SECONDS < deadline)) || die "the standby did not start streaming (state '$state')"
        sleep 0.05
    done
}

# report SUMMARY COUNT: one mode's numbers.
report() {
    local r=$1
    say "commit latency: p50 $(kv p50_ms "$r") ms, p99 $(kv p99_ms "$r") ms, max $(kv max_ms "$r") ms (sync_state $(kv sync_state "$r"))"
    local last="the last commit was there at the first read"
    [ "$(kv catchup_ms "$r")" = 0.0 ] || last="the last commit was there $(kv catchup_ms "$r") ms after its COMMIT returned"
    say "reads on the standby right after COMMIT returned: $(kv stale "$r") of $2 stale (up to $(kv stale_behind_max "$r") commits behind); $last"
    say "pg_stat_replication, sampled $(kv samples "$r") times right after a commit: the primary's WAL ahead of the standby's replay by up to $(kv replay_lsn_diff_max "$r") bytes, of its flush by up to $(kv flush_lsn_diff_max "$r") bytes; $(lags "$r")"
}

# lags SUMMARY: the largest lag columns reported during a run, in words.
lags() {
    local w f r
    w=$(kv write_lag_ms_max "$1") f=$(kv flush_lag_ms_max "$1") r=$(kv replay_lag_ms_max "$1")
    if [ "$w$f$r" = nonenonenone ]; then
        printf 'the standby reported no new position during the run (its lag columns kept older values)'
    else
        printf 'the largest lags the standby reported meanwhile: write %s ms, flush %s ms, replay %s ms' "$w" "$f" "$r"
    fi
}

# ms VALUE: "VALUE ms", or "none reported" for a lag column that never changed.
ms() { if [ "$1" = none ]; then printf 'none reported'; else printf '%s ms' "$1"; fi; }

# ratio A B: A / B as "N.Nx".
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.1fx", a / b; else printf "?x"}'; }

# slow_link ASYNC SYNC: the primary and the standby in two network namespaces joined by a veth, the
# standby streaming over TCP, the link slowed with tc: netem's delay each way where the kernel
# has it, else tbf's rate limit (a thin link: the WAL queues behind it). Both modes again, ASYNC
# and SYNC commits (a synchronous commit waits for the link: fewer of them). Sets
# SLOW to the verdict's part (empty where the machine can't, with a `skipped:` line).
slow_link() {
    local n_async=$1 n_sync=$2
    SLOW=
    step "a slow link: the standby in a network namespace of its own, streaming over TCP through tc"
    if ! can_netns; then
        skipped "no network namespaces here (needs root): no slow link"
        return 0
    fi
    if ! command -v tc >/dev/null 2>&1; then
        skipped "no tc here (Debian: apt-get install -y iproute2): no slow link"
        return 0
    fi
    netns_pair
    local link short
    if tc -n "$SRV" qdisc add dev "$VETH_SRV" root netem delay "${delay_ms}ms" 2>/dev/null; then
        tc -n "$CLI" qdisc add dev "$VETH_CLI" root netem delay "${delay_ms}ms"
        link="netem delay ${delay_ms} ms each way"
        short="netem, $delay_ms ms each way"
    elif tc -n "$SRV" qdisc add dev "$VETH_SRV" root tbf rate "$rate" burst 4kb limit 1mb 2>/dev/null; then
        tc -n "$CLI" qdisc add dev "$VETH_CLI" root tbf rate "$rate" burst 4kb limit 1mb
        link="tbf rate $rate each way (this kernel has no netem, so a thin link rather than a long one)"
        short="tbf, $rate"
    else
        skipped "neither netem nor tbf works in this kernel (tc qdisc add failed): no slow link"
        return 0
    fi
    say "primary in $SRV at 10.77.0.1 (and its Unix socket), standby in $CLI at 10.77.0.2; the veth between them: $link"
    pg_stop S
    pg_stop P
    pg_start P "$SRV" -c listen_addresses=10.77.0.1
    pg_start S "$CLI" -c "primary_conninfo=host=10.77.0.1 port=5432 user=postgres application_name=standby1"
    wait_streaming
    local a y
    step "asynchronous over the slow link: $n_async commits"
    set_mode async
    a=$(python3 "$PG" repl "$TMP/pg-P/sock" "$TMP/pg-S/sock" --count "$n_async")
    report "$a" "$n_async"
    step "synchronous (remote_apply) over the slow link: $n_sync commits"
    set_mode sync
    y=$(python3 "$PG" repl "$TMP/pg-P/sock" "$TMP/pg-S/sock" --count "$n_sync")
    report "$y" "$n_sync"
    SLOW="; over a slow link ($short), asynchronous: $(kv stale "$a") of $n_async stale, the standby up to $(kv replay_lsn_diff_max "$a") bytes of WAL behind and $(kv catchup_ms "$a") ms to catch up after the last commit, commit p50 $(kv p50_ms "$a") ms; synchronous: $(kv stale "$y") stale, commit p50 $(kv p50_ms "$y") ms, p99 $(kv p99_ms "$y") ms"
}
