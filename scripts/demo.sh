#!/usr/bin/env bash
# demo.sh: the kernel's side of serving, made visible one demo at a time.
#
# Usage: scripts/demo.sh                   list the demos
#        scripts/demo.sh [--quick] NAME    run one (--quick: fewer clients, shorter runs)
#        scripts/demo.sh [--quick] all     run them all, one after another
#
# Each demo starts what it needs (this workspace's servers, built with cargo; network
# namespaces; helper clients from scripts/demos/tcp.py), prints what it did and what it saw as
# numbers, and ends with one line starting "verdict:" that says what the numbers mean. A step
# this machine does not allow (no root, no network namespaces, a missing tool) is skipped with a
# line starting "skipped:". On exit, however it exits, everything it started is removed:
# processes (by PID), network namespaces and their veths, sysctls set inside them, temp files.
# Exit code 77 means the demo could not run at all here (a required tool is missing).
#
# Environment: DEMO_PROFILE=release|debug   which build of the servers to run (default release)
#              DEMO_NO_BUILD=1              use the binaries already built, do not run cargo
#              DEMO_NO_NETNS=1              act as if network namespaces were not allowed (to try the
#                                           fallbacks a machine without root takes)
#
# Pages: docs/demo-NAME.md explains each demo and shows a real run.
set -euo pipefail

PROG=demo
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
DEMOS_DIR="$ROOT/scripts/demos"
# shellcheck disable=SC2034 # used by the demos
TCP="$DEMOS_DIR/tcp.py"

# name and one line each, in the order they are listed and run
DEMO_LIST=(
    "backlog    the accept queue: --backlog 2 with accept() paused; overflows, SYN retries, tcp_abort_on_overflow"
    "syn-queue  half-open connections from spoofed SYNs: SYN-RECV capped at the backlog; syncookies on and off"
    "buffers    a client that never reads: zero window, a blocked sender, the server's backpressure, --rcvbuf/--sndbuf"
    "nagle      a request in two writes with and without TCP_NODELAY; the server's --no-nodelay on a two-part reply"
    "reuseport  1000 connections over 4 SO_REUSEPORT listeners (the kernel's hash) next to the dispatcher's round-robin"
    "herd       multi-acceptor with and without --exclusive: the kernel's wake-ups per connection"
    "cow        Redis's BGSAVE: fork a child to write a snapshot while the parent writes; copy-on-write in smaps"
    "workers    one pattern at 1, 2, 4, 8, 32 and 128 workers under the same load: where more stop helping"
    "commit     PostgreSQL's synchronous_commit on and off: a crash at a random moment; acknowledged COMMITs lost"
    "replication a primary and a streaming standby: synchronous (remote_apply) vs asynchronous; commit latency, stale reads"
    "anatomy    one request's timeline from the client, the server's --trace and tcpdump: t0, t1, t50, t51"
)

QUICK=0
PROFILE=${DEMO_PROFILE:-release}
TMP=
declare -a NETNS=()      # every network namespace we made, deleted on exit (processes: LIVE)
PRIV_COUNT=0

# ---------------------------------------------------------------- output

say() { printf '%s\n' "$*"; }
step() { printf '\n== %s\n' "$*"; }
skipped() { printf 'skipped: %s\n' "$*"; }
verdict() { printf '\nverdict: %s\n' "$*"; }
# Indents a command's output under the step that ran it.
indent() { sed 's/^/    /'; }

# kv NAME TEXT: VALUE from NAME=VALUE in TEXT (the helpers' summary lines).
kv() { grep -o "\b$1=[^ ]*" <<<"$2" | head -1 | cut -d= -f2-; }

# `quick A B`: A normally, B with --quick.
quick() { if ((QUICK)); then printf '%s' "$2"; else printf '%s' "$1"; fi; }

# ---------------------------------------------------------------- requirements

# Exits 77 ("cannot run here") unless every tool is on the PATH.
need_tools() {
    local t missing=()
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    if ((${#missing[@]})); then
        skipped "this demo needs ${missing[*]} (Debian: apt-get install -y $(apt_packages "${missing[@]}"))"
        exit 77
    fi
}

apt_packages() {
    local t
    for t in "$@"; do
        case $t in
            ip | ss | tc | nstat) printf 'iproute2 ' ;;
            python3) printf 'python3 ' ;;
            perf) printf 'linux-perf ' ;;
            *) printf '%s ' "$t" ;;
        esac
    done
}

# Can we make network namespaces (root, and a kernel and container that allow it)?
can_netns() {
    [ "${DEMO_NO_NETNS:-0}" = 1 ] && return 1
    [ "$(id -u)" = 0 ] || return 1
    local probe="demo-$$-probe"
    ip netns add "$probe" 2>/dev/null || return 1
    ip netns del "$probe" 2>/dev/null || true
}

# Builds the servers a demo runs, then sets BIN to their directory.
build() {
    BIN=$(bin_dir)
    local p
    if [ "${DEMO_NO_BUILD:-0}" != 1 ]; then
        local flags=(--quiet)
        for p in "$@"; do flags+=(-p "$p"); done
        cargo_build "${flags[@]}" || die "cargo build failed"
    fi
    for p in "$@"; do
        [ -x "$BIN/$p" ] || die "no $BIN/$p (build it: cargo build --release -p $p)"
    done
}

# ---------------------------------------------------------------- processes

# start_server VAR NETNS BINARY ARGS...: starts a server (in network namespace NETNS, or here if
# NETNS is -), waits for its "listening on" line, and sets VAR_PID and VAR_ADDR.
start_server() {
    local var=$1 ns=$2 bin=$3
    shift 3
    local err="$TMP/$var.stderr" pid
    # Each server its own journal directory, removed with $TMP.
    set -- --data-dir "$TMP/$var.data" "$@"
    if [ "$ns" = - ]; then
        "$BIN/$bin" "$@" 2>"$err" &
    else
        # `ip netns exec` execs the command: $! is the server itself.
        ip netns exec "$ns" "$BIN/$bin" "$@" 2>"$err" &
    fi
    pid=$!
    LIVE[$pid]=server
    if ! wait_started "$pid" "$err" 20; then
        cat "$err" >&2
        die "$bin did not start"
    fi
    printf -v "${var}_PID" '%s' "$pid"
    printf -v "${var}_ADDR" '%s' "$STARTED_ADDR"
}

# background NETNS CMD...: runs an external command in the background (in network namespace
# NETNS, or here if NETNS is -), tracked for clean-up; sets BG_PID to the command's own PID.
background() {
    local ns=$1
    shift
    if [ "$ns" = - ]; then
        "$@" &
    else
        ip netns exec "$ns" "$@" &
    fi
    BG_PID=$!
    LIVE[$BG_PID]=client
}

# A process's resident memory in KiB.
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# Voluntary + involuntary context switches over all threads of a process.
ctx_switches() {
    cat /proc/"$1"/task/*/status 2>/dev/null |
        awk '/^(voluntary|nonvoluntary)_ctxt_switches:/ {n += $2} END {print n + 0}'
}

# ---------------------------------------------------------------- network namespaces

# make_netns VAR: a fresh network namespace with loopback up; its name in VAR.
make_netns() {
    local name="demo-$$-$1"
    ip netns add "$name"
    NETNS+=("$name")
    ip -n "$name" link set lo up
    printf -v "$1" '%s' "$name"
}

# private_netns: a namespace of its own for a demo that only needs loopback, so that its many
# short connections neither meet the host's TIME_WAIT sockets nor leave theirs to others; its
# name in PRIV, or - (with a note) where namespaces are not allowed.
private_netns() {
    if can_netns; then
        make_netns "PRIV$((++PRIV_COUNT))"
        local var="PRIV$PRIV_COUNT"
        PRIV=${!var}
        # Short connections by the thousand: every local port, and TIME_WAIT ports reused.
        ip netns exec "$PRIV" sysctl -qw net.ipv4.ip_local_port_range="1024 65535" net.ipv4.tcp_tw_reuse=1
    else
        skipped "no network namespaces here (needs root): running on this host's loopback, shared with other programs"
        PRIV=-
    fi
}

# netns_pair: namespaces SRV (10.77.0.1) and CLI (10.77.0.2) joined by a veth, and a route in SRV
# for 10.78.0.0/24 (spoofed client addresses) through CLI, which does not forward: packets to
# them vanish there without a reply, as they would for a forged source on the internet.
netns_pair() {
    make_netns SRV
    make_netns CLI
    VETH_SRV="dv$$s"
    VETH_CLI="dv$$c"
    ip link add "$VETH_SRV" netns "$SRV" type veth peer name "$VETH_CLI" netns "$CLI"
    ip -n "$SRV" addr add 10.77.0.1/24 dev "$VETH_SRV"
    ip -n "$CLI" addr add 10.77.0.2/24 dev "$VETH_CLI"
    ip -n "$SRV" link set "$VETH_SRV" up
    ip -n "$CLI" link set "$VETH_CLI" up
    ip -n "$SRV" route add 10.78.0.0/24 via 10.77.0.2
}

# in_netns NS CMD...: runs CMD in NS, or here if NS is -.
in_netns() {
    local ns=$1
    shift
    if [ "$ns" = - ]; then "$@"; else ip netns exec "$ns" "$@"; fi
}

# counter NS NAME: a kernel SNMP counter (nstat's name, e.g. TcpExtListenOverflows) in NS.
counter() {
    in_netns "$1" nstat -asz "$2" 2>/dev/null | awk -v n="$2" '$1 == n {print $2; found = 1} END {if (!found) print 0}'
}

# ---------------------------------------------------------------- clean-up

cleanup() {
    local rc=$? ns
    trap - EXIT INT TERM
    set +e # remove everything even if one step fails
    stop_all
    for ns in "${NETNS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    [ -n "$TMP" ] && rm -rf "$TMP"
    exit "$rc"
}

# ---------------------------------------------------------------- main

list() {
    say "usage: scripts/demo.sh [--quick] NAME|all"
    say
    local line
    for line in "${DEMO_LIST[@]}"; do say "  $line"; done
    say
    say "Each prints what it measured and a verdict line; docs/demo-NAME.md explains it."
}

run_one() {
    local name=$1
    [ -f "$DEMOS_DIR/$name.sh" ] || die "no demo '$name' (scripts/demo.sh lists them)"
    # shellcheck source=/dev/null
    source "$DEMOS_DIR/$name.sh"
    say "# demo: $name$( ((QUICK)) && printf ' (quick)')"
    "demo_${name//-/_}"
}

main() {
    while (($#)); do
        case $1 in
            --quick) QUICK=1 ;;
            -h | --help) list; exit 0 ;;
            -*) die "unknown option $1" ;;
            *) break ;;
        esac
        shift
    done
    if (($# == 0)); then
        list
        exit 0
    fi
    if [ "$1" = all ]; then
        local line rc=0 flags=()
        ((QUICK)) && flags+=(--quick)
        for line in "${DEMO_LIST[@]}"; do
            "${BASH_SOURCE[0]}" "${flags[@]}" "${line%% *}" || rc=$?
        done
        exit "$rc"
    fi
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/demo.XXXXXX")
    on_exit cleanup
    run_one "$1"
}

main "$@"
