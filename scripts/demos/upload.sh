# shellcheck shell=bash
# demo: upload (sourced by scripts/demo.sh; docs/upload.md)
#
# One big file over a thin link, and the connection drops at 40%. Uploaded with tus (one PATCH
# for the whole file), the server has kept every byte that arrived: the client asks where it
# stands (HEAD) and sends the rest from there. Uploaded as one plain POST /upload, nothing was
# kept: it goes again from zero. The server runs in one network namespace, the client in
# another, joined by a veth whose client side goes through tc's token bucket (tbf); the client
# (scripts/demos/tus.py) counts the body bytes that left its socket, and the veth's tx_bytes
# counter confirms them (with the TCP/IP headers). Without namespaces: the host's loopback, no
# rate limit.

demo_upload() {
    need_tools python3
    build single-thread
    local size rate=100mbit cut=0.4 tuspy="$DEMOS_DIR/tus.py"
    size=$(quick 200000000 20000000)
    local srv_ns=- cli_ns=- ip=127.0.0.1 link="the host's loopback, no rate limit" short=loopback
    if ! can_netns; then
        skipped "no network namespaces here (needs root): client and server on this host's loopback, no rate limit"
    elif ! command -v tc >/dev/null 2>&1; then
        skipped "no tc here (Debian: apt-get install -y iproute2): client and server on this host's loopback, no rate limit"
    else
        netns_pair
        # burst: a few 64 KiB GSO segments (less stalls them); latency: 50 ms of queue at most.
        if tc -n "$CLI" qdisc add dev "$VETH_CLI" root tbf rate "$rate" burst 256kb latency 50ms 2>"$TMP/tc.err"; then
            srv_ns=$SRV cli_ns=$CLI ip=10.77.0.1 short="a $rate link (tc tbf)"
            link="server in $SRV (10.77.0.1), client in $CLI (10.77.0.2); the client's side of the veth: tc tbf rate $rate"
        else
            skipped "tc tbf does not work here ($(head -1 "$TMP/tc.err")): client and server on this host's loopback, no rate limit"
        fi
    fi
    say "set-up: $link"
    local sha
    sha=$(kv sha256 "$(python3 "$tuspy" make "$TMP/file" "$size")")
    say "the file: $(mb "$size") of random bytes, sha256 ${sha:0:16}..."
    start_server S "$srv_ns" single-thread --addr "$ip:0"
    say "single-thread on $S_ADDR, --data-dir \$TMP/S.data: uploads in \$TMP/S.data/uploads"

    local -A line=() wire=()
    local how
    for how in tus plain; do
        if [ "$how" = tus ]; then
            step "tus: POST /files/, then one PATCH for the whole file; the connection reset at $(percent "$cut"); HEAD; a PATCH from the offset the server kept"
        else
            step "plain: POST /upload of the whole file; the connection reset at $(percent "$cut"); the whole file again"
        fi
        local tx0
        tx0=$(tx_bytes "$cli_ns")
        line[$how]=$(in_netns "$cli_ns" python3 "$tuspy" "$how" "$S_ADDR" "$TMP/file" --cut-at "$cut")
        wire[$how]=-
        [ "$tx0" = - ] || wire[$how]=$(($(tx_bytes "$cli_ns") - tx0))
        report "$how" "${line[$how]}" "${wire[$how]}"
    done

    step "the tus upload, downloaded (GET $(kv url "${line[tus]}")) and hashed"
    local got
    got=$(in_netns "$cli_ns" python3 "$tuspy" get "$S_ADDR" "$(kv url "${line[tus]}")")
    say "$(mb "$(kv bytes "$got")"), sha256 ${got##*sha256=}"
    [ "$(kv sha256 "$got")" = "$sha" ] || die "the download's sha256 differs from the file's ($sha)"
    local plain_sha
    plain_sha=$(grep -o '"sha256":"[0-9a-f]*"' <<<"${line[plain]}" | cut -d'"' -f4)
    [ "$plain_sha" = "$sha" ] || die "POST /upload saw sha256 $plain_sha, the file has $sha"
    say "both match the file's (POST /upload's reply carries the sha256 the server computed: it matches too)"
    stop_pid "$S_PID"

    local t=${line[tus]} p=${line[plain]}
    verdict "cut at $(percent "$cut") over $short, tus sent $(mb "$(kv sent "$t")") for a $(mb "$size") file ($(mb "$(kv twice "$t")") twice; resumed at offset $(grouped "$(kv resumed_at "$t")")) in $(kv elapsed_s "$t") s, plain sent $(mb "$(kv sent "$p")") ($(mb "$(kv twice "$p")") twice) in $(kv elapsed_s "$p") s; the tus download's sha256 matches"
}

# report HOW SUMMARY TX: one upload's numbers, in words; TX the veth's count, or -.
report() {
    local how=$1 r=$2 tx=$3
    if [ "$how" = tus ]; then
        say "the cut: after $(mb "$(kv cut_after "$r")") written, $(kv cut_s "$r") s in; the server had kept $(grouped "$(kv resumed_at "$r")") bytes (HEAD's Upload-Offset)$(retries "$(kv retries "$r")")"
    else
        say "the cut: after $(mb "$(kv cut_after "$r")") written, $(kv cut_s "$r") s in; the server kept nothing; its reply to the second: $(kv reply "$r")"
    fi
    say "$how: $(mb "$(kv size "$r")") file, $(mb "$(kv sent "$r")") sent ($(mb "$(kv twice "$r")") twice) in $(kv elapsed_s "$r") s"
    if [ "$tx" != - ]; then
        say "the client's veth sent $(mb "$tx") in all, $(awk -v t="$tx" -v s="$(kv sent "$r")" 'BEGIN {printf "%.1f%%", 100 * (t - s) / s}') more than the client counted (tx_bytes: the heads, TCP/IP headers, ACKs)"
    fi
}

retries() { if (($1)); then printf '; %d PATCH(es) refused (423 or 409) before the resume' "$1"; fi; }

# tx_bytes NS: bytes the client's veth has sent, or - on the loopback (shared with the server).
tx_bytes() {
    if [ "$1" = - ]; then
        echo -
    else
        ip netns exec "$1" cat "/sys/class/net/$VETH_CLI/statistics/tx_bytes"
    fi
}

# mb BYTES: "12.3 MB" (10^6 bytes), or "0 bytes".
mb() {
    if [ "$1" = 0 ]; then printf '0 bytes'; else awk -v b="$1" 'BEGIN {printf "%.1f MB", b / 1e6}'; fi
}

# grouped N: 80003072 -> 80,003,072.
grouped() { sed ':a;s/\B[0-9]\{3\}\>/,&/;ta' <<<"$1"; }

percent() { awk -v f="$1" 'BEGIN {printf "%d%%", f * 100}'; }
