# shellcheck shell=bash
# demo: nagle (sourced by scripts/demo.sh; docs/demo-nagle.md)
#
# Nagle's algorithm holds a small segment back while an earlier one is unacknowledged; the peer
# delays its ACK (up to ~40 ms on Linux) hoping to piggyback it on a reply. A message written in
# two small writes waits for that delayed ACK. First the client's side: a request written in two
# writes, with and without TCP_NODELAY. Then the server's: single-thread's demo route
# GET /split replies in two writes (head, then body a loop turn later), under --nodelay (the
# default) and --no-nodelay; GET /, a reply in one write, for comparison.

demo_nagle() {
    need_tools python3
    build single-thread
    local n
    n=$(quick 50 20)
    local -A median=()

    step "1. the client: GET / written in two writes (request line, then headers), $n requests on one connection"
    start_server S - single-thread --addr 127.0.0.1:0
    local nodelay line
    for nodelay in 0 1; do
        line=$(python3 "$TCP" nagle "$S_ADDR" "$n" --split --nodelay "$nodelay")
        median[client$nodelay]=$(kv median_ms "$line")
        say "  client TCP_NODELAY=$nodelay: ${line#summary: }"
    done
    stop_pid "$S_PID"

    step "2. the server: a reply in two writes (GET /split) and in one (GET /), client with TCP_NODELAY"
    local flag path
    for flag in --nodelay --no-nodelay; do
        start_server S - single-thread --addr 127.0.0.1:0 "$flag"
        for path in /split /; do
            line=$(python3 "$TCP" nagle "$S_ADDR" "$n" --path "$path" --nodelay 1)
            median[$flag$path]=$(kv median_ms "$line")
            say "  server $flag, GET $path: ${line#summary: }"
        done
        stop_pid "$S_PID"
    done

    verdict "a request in two writes took ${median[client0]} ms (median) with Nagle on at the client and ${median[client1]} ms with TCP_NODELAY: the second write waited for the server's delayed ACK; a reply in two writes took ${median[--no-nodelay/split]} ms from a server with --no-nodelay and ${median[--nodelay/split]} ms with --nodelay, while a reply in one write took ${median[--no-nodelay/]} vs ${median[--nodelay/]} ms"
}
