# shellcheck shell=bash
# demo: reuseport (sourced by scripts/demo.sh; docs/demo-reuseport.md)
#
# 1000 short connections, one after another, to the reuseport server with 4 workers (four
# listening sockets on one port; the kernel hashes each connection's 4-tuple to pick one), and
# the same to the dispatcher with 4 workers (one acceptor deals connections round-robin).
# /stats shows how many each worker accepted.

demo_reuseport() {
    need_tools python3 ss
    build reuseport dispatcher
    local n
    n=$(quick 1000 400)
    local -A col=()
    local server
    private_netns
    for server in reuseport dispatcher; do
        step "$server --workers 4: $n connections, one GET / each, one after another"
        start_server S "$PRIV" "$server" --addr 127.0.0.1:0 --workers 4
        if [ "$server" = reuseport ]; then
            say "ss -ltn: four listening sockets on one port, each with its own accept queue:"
            in_netns "$PRIV" ss -ltn "sport = :${S_ADDR##*:}" | indent
        fi
        in_netns "$PRIV" python3 "$TCP" spread "$S_ADDR" "$n" --field accepted >"$TMP/spread.out"
        grep '^summary' "$TMP/spread.out" | sed 's/^summary: /  /'
        col[$server]=$(sed -n 's/^accepted: //p' "$TMP/spread.out")
        stop_pid "$S_PID"
    done

    step "accepted per worker"
    local r d i
    read -ra r <<<"${col[reuseport]}"
    read -ra d <<<"${col[dispatcher]}"
    printf '    %-8s %-28s %s\n' worker "reuseport (kernel hash)" "dispatcher (round-robin)"
    for i in 0 1 2 3; do
        printf '    %-8s %-28s %s\n' "$i" "${r[$i]}" "${d[$i]}"
    done
    local stats
    stats=$(printf '%s\n' "${r[@]}" | awk -v n="$n" '
        { x[NR] = $1; s += $1; if (min == "" || $1 < min) min = $1; if ($1 > max) max = $1 }
        END { m = s / NR; for (i in x) v += (x[i] - m) ^ 2
              printf "%d %d %.1f %.1f", min, max, sqrt(v / NR), sqrt(n * 0.25 * 0.75) }')
    local min max sd expect
    read -r min max sd expect <<<"$stats"
    say "reuseport: from $min to $max per worker, standard deviation $sd; independent random picks would give about $expect"
    verdict "the kernel's hash spread $n connections over 4 SO_REUSEPORT listeners as ${col[reuseport]// /, } (sd $sd; independent random picks would give about $expect), while the dispatcher's round-robin gave exactly ${col[dispatcher]// /, }"
}
