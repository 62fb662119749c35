# shellcheck shell=bash
# demo: backlog (sourced by scripts/demo.sh; docs/demo-backlog.md)
#
# A server listening with --backlog 2 stops calling accept() (SIGSTOP: the kernel still
# completes handshakes into the accept queue). Clients arrive: the queue takes backlog + 1 of
# them, the kernel drops the SYNs of the rest (ListenOverflows, ListenDrops), and those clients
# wait for their SYN retransmissions (1 s, then 3 s after the first) however soon the server
# resumes. Then, with raw handshakes, what tcp_abort_on_overflow=1 changes: the ACK that finds
# the queue full is answered with a reset instead of being dropped.

demo_backlog() {
    need_tools python3 ss nstat ip
    build single-thread
    local clients pause ns addr
    clients=$(quick 8 6)
    pause=1.5

    if can_netns; then
        netns_pair
        ns=$SRV
        addr=10.77.0.1:8080
        say "set-up: server in network namespace $SRV (10.77.0.1), clients in $CLI (10.77.0.2), joined by a veth;"
        say "        the kernel counters below are that namespace's alone"
    else
        skipped "no network namespaces here (needs root): running on this host's loopback, whose counters other programs share"
        SRV=- CLI=- ns=-
        addr=127.0.0.1:0
    fi

    step "1. single-thread --backlog 2, accepting paused with SIGSTOP"
    start_server S "$ns" single-thread --addr "$addr" --backlog 2
    addr=$S_ADDR
    kill -STOP "$S_PID"
    say "server pid $S_PID on $addr, stopped: the kernel still answers SYNs and queues connections"
    say "ss -ltn (listening socket: Recv-Q = connections waiting for accept(), Send-Q = the backlog):"
    in_netns "$ns" ss -ltn "sport = :${addr##*:}" | indent
    local over0 drop0
    over0=$(counter "$ns" TcpExtListenOverflows)
    drop0=$(counter "$ns" TcpExtListenDrops)

    step "2. $clients clients connect at once; the server resumes after $pause s"
    background "$CLI" python3 "$TCP" clients "$addr" "$clients" --timeout 15 >"$TMP/clients.out"
    local clients_pid=$BG_PID
    sleep "$pause"
    say "after $pause s, ss -ltn:"
    in_netns "$ns" ss -ltn "sport = :${addr##*:}" | indent
    local queued
    queued=$(in_netns "$ns" ss -Hltn "sport = :${addr##*:}" | awk '{print $2; exit}')
    say "client sockets by state (ss -tan on the client side):"
    in_netns "$CLI" ss -tan "dport = :${addr##*:}" | awk 'NR > 1 {n[$1]++} END {for (s in n) printf "%s %d\n", s, n[s]}' | sort | indent
    local over1 drop1
    over1=$(counter "$ns" TcpExtListenOverflows)
    drop1=$(counter "$ns" TcpExtListenDrops)
    say "nstat: TcpExtListenOverflows +$((over1 - over0)), TcpExtListenDrops +$((drop1 - drop0)) (each dropped SYN, retries included)"
    kill -CONT "$S_PID"
    say "server resumed (SIGCONT); the clients, in order of finishing:"
    wait "$clients_pid" || true
    grep -v '^summary' "$TMP/clients.out"
    local linear
    if linear=$(in_netns "$CLI" sysctl -n net.ipv4.tcp_syn_linear_timeouts 2>/dev/null); then
        say "a dropped SYN is retried after 1 s, then every second $linear times (net.ipv4.tcp_syn_linear_timeouts=$linear), then doubling;"
    else
        say "a dropped SYN is retried after 1 s, 3 s, 7 s... (doubling);"
    fi
    say "the client learns nothing of the server resuming: it waits for its next retry"
    local summary fast slow min_slow
    summary=$(grep '^summary' "$TMP/clients.out")
    fast=$(kv fast "$summary")
    slow=$(kv slow "$summary")
    min_slow=$(kv min_slow_connect_ms "$summary")
    stop_pid "$S_PID"

    local abort_result=""
    step "3. tcp_abort_on_overflow: what happens to an ACK that finds the accept queue full"
    if [ "$ns" = - ]; then
        skipped "needs a network namespace pair (raw handshakes from spoofed addresses, and a sysctl set only in the server's namespace)"
    else
        local setting result
        for setting in 0 1; do
            ip netns exec "$SRV" sysctl -qw net.ipv4.tcp_abort_on_overflow="$setting"
            start_server A "$SRV" single-thread --addr 10.77.0.1:8081 --backlog 2
            kill -STOP "$A_PID"
            say "net.ipv4.tcp_abort_on_overflow=$setting (in $SRV only), a new server stopped with --backlog 2:"
            if ip netns exec "$CLI" python3 "$TCP" overflow 10.77.0.1:8081 --iface "$VETH_CLI" >"$TMP/overflow.out" 2>&1; then
                grep -v '^result' "$TMP/overflow.out" | indent
                result=$(sed -n 's/^result: //p' "$TMP/overflow.out")
            else
                indent <"$TMP/overflow.out"
                skipped "raw handshakes failed (see above)"
                result=unknown
            fi
            abort_result+="${abort_result:+, }$setting: $result"
            stop_pid "$A_PID"
        done
    fi

    local why="Linux admits backlog + 1"
    ((queued > 3)) && why="Linux admits backlog + 1, and handshakes completing at the same moment on two CPUs can pass that check together"
    verdict "the accept queue held $queued connections for --backlog 2 ($why) while accept() was paused, and $fast clients connected at once; the other $slow clients' SYNs were dropped ($((over1 - over0)) ListenOverflows) and they connected only after ${min_slow} ms or more, on a SYN retransmission, though the server resumed after about ${pause} s${abort_result:+; tcp_abort_on_overflow $abort_result}"
}
