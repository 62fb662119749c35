# shellcheck shell=bash
# demo: anatomy (sourced by scripts/demo.sh; docs/demo-anatomy.md)
#
# The notes' timeline of one request: t0 the client has sent it, t1 the server has parsed it,
# t50 the server has written its reply, t51 the client has it. single-thread runs with --trace
# (one JSON line per request on stderr: accepted, first byte, head parsed, whole request in,
# reply filed, reply written); a client sends GET /, GET /work?us=2000 and a 1 MB POST /echo,
# each on a new connection, noting its own times; tcpdump notes the wire's. All three clocks
# are the same wall clock, so one timeline shows where each request's time went.

demo_anatomy() {
    need_tools python3
    build single-thread
    private_netns
    local ns=$PRIV

    step "1. single-thread --trace, and tcpdump on the loopback"
    start_server S "$ns" single-thread --addr 127.0.0.1:0 --trace
    local port=${S_ADDR##*:} packets=
    if command -v tcpdump >/dev/null 2>&1; then
        background "$ns" tcpdump -i lo -B 16384 -nn -tt -U -w "$TMP/anatomy.pcap" "tcp port $port" 2>"$TMP/tcpdump.err"
        local tcpdump_pid=$BG_PID deadline=$((SECONDS + 5))
        # tcpdump says "listening on lo" once it captures.
        until grep -q "listening on" "$TMP/tcpdump.err" 2>/dev/null || ((SECONDS > deadline)); do sleep 0.05; done
        say "  tcpdump is capturing port $port"
    else
        skipped "tcpdump is not installed (apt-get install -y tcpdump): no packet times in the timeline"
    fi

    step "2. the client: GET /, GET /work?us=2000, POST /echo of 1 MB, one connection each"
    in_netns "$ns" python3 "$DEMOS_DIR/anatomy.py" client "$S_ADDR" >"$TMP/client.jsonl"
    say "  $(wc -l <"$TMP/client.jsonl") requests answered"
    if [ -n "${tcpdump_pid:-}" ]; then
        kill -INT "$tcpdump_pid" 2>/dev/null || true
        reap "$tcpdump_pid" 5
        tcpdump -r "$TMP/anatomy.pcap" -nn -tt 2>/dev/null >"$TMP/packets.txt" || true
        packets="$TMP/packets.txt"
    fi
    stop_pid "$S_PID"

    step "3. each request's timeline (ms since the client called connect)"
    local report
    report=$(python3 "$DEMOS_DIR/anatomy.py" report "$TMP/client.jsonl" "$TMP/S.stderr" ${packets:+"$packets"})
    grep -v '^summary: \|^packets=' <<<"$report"
    say
    say "  one server line, as --trace writes it:"
    grep -m1 '^{"trace"' "$TMP/S.stderr" | indent

    verdict "$(sed -n 's/^summary: //p' <<<"$report")"
}
