# shellcheck shell=bash
# demo: buffers (sourced by scripts/demo.sh; docs/demo-buffers.md)
#
# Clients that pipeline `POST /echo` requests and never read a reply. Their receive buffers
# fill, they advertise a zero window, and the server's replies wait in its send buffer (the
# server's socket probes the window on its persist timer). The server then stops reading those
# connections (proto's backpressure: 256 KiB unsent or 64 owed replies), so its own receive
# buffers fill, its window closes in turn, and the clients' writes block. Everything not yet
# delivered sits in kernel buffers; the server's memory stays bounded. Then the same with
# --rcvbuf/--sndbuf 64K: smaller kernel buffers, the clients block sooner.

demo_buffers() {
    need_tools python3 ss nstat
    build single-thread
    local ns conns requests body_kib
    conns=$(quick 4 2)
    body_kib=16
    requests=2048
    if can_netns; then
        make_netns NS
        ns=$NS
        say "set-up: server and clients in network namespace $NS (loopback): the counters are theirs alone"
    else
        skipped "no network namespaces here (needs root): running on this host's loopback; nstat counters include other programs"
        ns=-
    fi
    say "each client pipelines $requests requests POST /echo with a $body_kib KiB body ($((requests * body_kib)) KiB) and never reads"

    local -A out=()
    local round flags
    for round in default small; do
        flags=()
        [ "$round" = small ] && flags=(--rcvbuf 64K --sndbuf 64K)
        step "single-thread ${flags[*]:-(kernel-tuned buffers)}, $conns clients that never read"
        start_server S "$ns" single-thread --addr 127.0.0.1:0 --shutdown-timeout 1s "${flags[@]}"
        local port=${S_ADDR##*:} rss0 zero0
        rss0=$(rss_kib "$S_PID")
        zero0=$(counter "$ns" TcpExtTCPToZeroWindowAdv)
        background "$ns" python3 "$TCP" noread "$S_ADDR" --conns "$conns" \
            --body-kib "$body_kib" --requests "$requests" --hold 30 >"$TMP/noread.out"
        local client=$BG_PID deadline=$((SECONDS + 30))
        until grep -q '^summary' "$TMP/noread.out"; do
            ((SECONDS < deadline)) || die "the clients never stalled"
            sleep 0.1
        done
        local summary sent
        summary=$(cat "$TMP/noread.out")
        sent=$(kv sent_kib "$summary")
        say "the clients wrote $sent KiB each, then their writes would block (no progress for 1 s)"
        local served1 served2 queues
        served1=$(in_netns "$ns" python3 "$TCP" stats "$S_ADDR" requests)
        say "sockets (ss -tno), per connection: Recv-Q = received, not yet read by the program;"
        say "Send-Q = written by the program, not yet acknowledged; persist = probing a zero window"
        queues=$(in_netns "$ns" ss -Htno "( sport = :$port or dport = :$port )" | awk -v port="$port" '
            { split($4, l, ":"); side = (l[length(l)] == port) ? "server" : "client"
              timer = ($6 ~ /persist/) ? "persist" : "-"
              printf "    %-6s Recv-Q %8d  Send-Q %8d  timer %s\n", side, $2, $3, timer
              rq[side] += $2; sq[side] += $3; n[side]++ }
            END { printf "totals %d %d %d %d %d\n", rq["server"], sq["server"], rq["client"], sq["client"], n["server"] }')
        grep -v '^totals' <<<"$queues" | sort
        local srv_rq srv_sq cli_rq cli_sq n
        read -r _ srv_rq srv_sq cli_rq cli_sq n <<<"$(grep '^totals' <<<"$queues")"
        local zero=$(($(counter "$ns" TcpExtTCPToZeroWindowAdv) - zero0))
        say "nstat: TcpExtTCPToZeroWindowAdv +$zero (a receive buffer full: window 0 advertised)"
        if command -v tcpdump >/dev/null 2>&1; then
            say "tcpdump, two segments advertising window 0 (the answers to the persist timer's probes):"
            in_netns "$ns" timeout 3 tcpdump -i lo -nn -c 2 -l "tcp port $port and tcp[14:2] = 0" 2>/dev/null |
                cut -c1-150 | indent || true
        else
            skipped "tcpdump is not installed (apt-get install -y tcpdump): no packet trace of the zero window"
        fi
        sleep 1
        served2=$(in_netns "$ns" python3 "$TCP" stats "$S_ADDR" requests)
        local rss1 growth
        rss1=$(rss_kib "$S_PID")
        growth=$((rss1 - rss0))
        # Each reading of /stats counts itself.
        served1=$((served1 - 1)) served2=$((served2 - 2))
        say "requests served (/stats): $served1, and a second later $served2: the server has stopped reading them"
        say "server RSS: $rss0 KiB before, $rss1 KiB now (+$growth KiB for $conns connections)"
        say "kernel buffers hold $(((srv_rq + srv_sq + cli_rq + cli_sq) / 1024)) KiB for these connections:" \
            "server Recv-Q $((srv_rq / 1024)) + Send-Q $((srv_sq / 1024)), client Recv-Q $((cli_rq / 1024)) + Send-Q $((cli_sq / 1024)) KiB"
        out[$round]="clients blocked after $sent KiB each, kernel held $(((srv_rq + srv_sq + cli_rq + cli_sq) / 1024 / n)) KiB per connection (server Send-Q $((srv_sq / 1024 / n)), Recv-Q $((srv_rq / 1024 / n))), server RSS +$((growth / n)) KiB per connection"
        out[zero_$round]=$zero
        stop_pid "$client"
        stop_pid "$S_PID"
    done
    verdict "clients that never read advertised a zero window (+${out[zero_default]} TCPToZeroWindowAdv); the server's replies waited in its send queue and it stopped reading, so the clients' writes blocked too. Kernel buffers: ${out[default]}; with --rcvbuf/--sndbuf 64K: ${out[small]}"
}
