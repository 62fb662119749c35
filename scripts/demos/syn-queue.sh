# shellcheck shell=bash
# demo: syn-queue (sourced by scripts/demo.sh; docs/demo-syn-queue.md)
#
# A SYN flood in miniature, between two network namespaces: raw SYNs from spoofed addresses
# whose SYN-ACKs go nowhere, so each leaves a half-open connection (SYN-RECV) on the server.
# The SYN queue holds about --backlog of them. With net.ipv4.tcp_syncookies=0 the SYNs past
# that are dropped, and so is a real client's; with syncookies=1 the kernel answers them with
# a cookie instead, keeping no state, and the real client gets in.

demo_syn_queue() {
    need_tools python3 ss nstat ip
    build single-thread
    if ! can_netns; then
        skipped "syn-queue needs root and network namespaces: spoofed SYNs are sent only between two namespaces of its own"
        exit 77
    fi
    netns_pair
    local backlog=16 syns port=8090 cookies
    syns=$(quick 200 100)
    say "set-up: server in $SRV (10.77.0.1), raw SYNs and a real client from $CLI (10.77.0.2);"
    say "        the SYNs claim to come from 10.78.0.0/24, routed into $CLI, which drops them: no RST ever comes back"
    declare -A held=() dropped=() cookies_sent=() client=()
    for cookies in 0 1; do
        port=$((port + 1))
        step "net.ipv4.tcp_syncookies=$cookies (in $SRV only): single-thread --backlog $backlog, then $syns spoofed SYNs"
        ip netns exec "$SRV" sysctl -qw net.ipv4.tcp_syncookies="$cookies"
        start_server S "$SRV" single-thread --addr "10.77.0.1:$port" --backlog "$backlog"
        local full0 sent0 recv0 drops0
        full0=$(counter "$SRV" TcpExtTCPReqQFullDrop)
        sent0=$(counter "$SRV" TcpExtSyncookiesSent)
        recv0=$(counter "$SRV" TcpExtSyncookiesRecv)
        drops0=$(counter "$SRV" TcpExtListenDrops)
        ip netns exec "$CLI" python3 "$TCP" synflood "10.77.0.1:$port" --count "$syns" | indent
        sleep 0.3
        held[$cookies]=$(ip netns exec "$SRV" ss -Htn state syn-recv "sport = :$port" | wc -l)
        say "half-open connections on the server (ss -tn state syn-recv): ${held[$cookies]}; the first three:"
        ip netns exec "$SRV" ss -tn state syn-recv "sport = :$port" | head -4 | indent
        say "a real client connects from 10.77.0.2 (3 s timeout):"
        ip netns exec "$CLI" python3 "$TCP" clients "10.77.0.1:$port" 1 --timeout 3 >"$TMP/client.out" || true
        grep -v '^summary' "$TMP/client.out"
        client[$cookies]=$(sed -n 's/^  client 1: //p' "$TMP/client.out" | sed 's/, reply.*//')
        dropped[$cookies]=$(($(counter "$SRV" TcpExtTCPReqQFullDrop) - full0))
        cookies_sent[$cookies]=$(($(counter "$SRV" TcpExtSyncookiesSent) - sent0))
        say "nstat: TcpExtTCPReqQFullDrop +${dropped[$cookies]}, TcpExtSyncookiesSent +${cookies_sent[$cookies]}," \
            "TcpExtSyncookiesRecv +$(($(counter "$SRV" TcpExtSyncookiesRecv) - recv0))," \
            "TcpExtListenDrops +$(($(counter "$SRV" TcpExtListenDrops) - drops0))"
        stop_pid "$S_PID"
    done
    verdict "with --backlog $backlog the SYN queue held ${held[0]} half-open connections (syncookies=0) and ${held[1]} (syncookies=1) of $syns SYNs; without cookies the rest were dropped (${dropped[0]} TCPReqQFullDrop) and a real client ${client[0]}; with cookies the kernel answered ${cookies_sent[1]} SYNs statelessly and the real client ${client[1]}"
}
