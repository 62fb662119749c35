#!/usr/bin/env bash
# slowloris.sh: what trickling request heads do to each pattern: N connections each send a
# request line, then one header line per second, never finishing; the servers run with
# --header-timeout, while an ordinary client asks for GET / 10 times a second.
#
# Usage: scripts/slowloris.sh [options] [PATTERN ...]
#
#   PATTERN              single-thread, thread-per-connection, prefork, coroutine, work-stealing
#                        (default: all of them), or any other server crate.
#                        thread-per-connection runs twice: its default --max-threads (1024),
#                        and --max-threads --bounded-threads (below --conns) as
#                        thread-per-connection-bounded; prefork twice: --mode blocking (as
#                        prefork-blocking) and --mode event, both with --workers
#   --conns N            trickling connections (default 1000; 200 with --quick)
#   --header-timeout S   the servers' --header-timeout in seconds (default 5; 2 with --quick)
#   --duration S         seconds the ordinary client runs, once every trickling connection has
#                        sent its first byte (default 30; 6 with --quick)
#   --rate R             the ordinary client's requests per second (default 10)
#   --client-timeout S   the ordinary client gives up on a request after S seconds (default 10;
#                        4 with --quick): a failure
#   --bounded-threads M  thread-per-connection-bounded's --max-threads (default --conns / 4)
#   --workers N          the servers' --workers (default: the number of cores)
#   --quick              a small smoke run
#   --profile P          cargo profile of the binaries: release (default) or dev
#   --no-build           use the binaries already built
#   --out DIR            where results go (default: results/slowloris-YYYYMMDD-HHMMSS)
#
# For each run: start the server (127.0.0.1:0, --header-timeout), start the trickling client
# (scripts/slowloris.py: the N connections opened at once, each sending `GET / HTTP/1.1` on
# connecting, then a header line every second from that first byte), wait until each has sent
# its first byte, then run the ordinary client for --duration: `loadgen -c 200 --rate R --close
# client` (a new connection per request, as a new visitor comes; open loop, so a request's
# latency counts from when it fell due, connect included, and a stalled server cannot hide
# its stall), stop the trickling client and the server. Reported per run: the trickling
# connections that got 408, when (seconds from each one's first byte to the reply's first
# byte: min, median, max, and how many at each whole second), how the others ended (closed
# without a reply, another status, still open at the end); the ordinary client's replies
# against requests due, latency p50/p99/max, and failures by kind (timeout: no reply within
# --client-timeout; connect: no connection within it).
#
# Writes DIR/table.md (the table, with the command and the machine) and DIR/runs/NAME.json
# (the trickling client's per-connection record and loadgen's JSON). Everything it starts is
# stopped on exit, including on failure or Ctrl-C.
set -euo pipefail

PROG=slowloris
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONNS=
HEADER_TIMEOUT=
DURATION=
RATE=10
CLIENT_TIMEOUT=
BOUNDED=
WORKERS=$(nproc)
QUICK=0
PROFILE=release
BUILD=1
OUT=
PATTERNS=()
TMP=
ARGS=("$@")

parse_args() {
    while (($#)); do
        case $1 in
            --conns) CONNS=${2:?--conns needs a value}; whole "$1" "$2"; shift ;;
            --header-timeout) HEADER_TIMEOUT=${2:?}; whole "$1" "$2"; shift ;;
            --duration) DURATION=${2:?--duration needs a value}; whole "$1" "$2"; shift ;;
            --rate) RATE=${2:?--rate needs a value}; number "$1" "$2"; shift ;;
            --client-timeout) CLIENT_TIMEOUT=${2:?}; whole "$1" "$2"; shift ;;
            --bounded-threads) BOUNDED=${2:?}; whole "$1" "$2"; shift ;;
            --workers) WORKERS=${2:?--workers needs a value}; whole "$1" "$2"; shift ;;
            --quick) QUICK=1 ;;
            --profile)
                PROFILE=${2:?}
                [[ $PROFILE == release || $PROFILE == dev ]] || die "--profile: release or dev"
                shift
                ;;
            --no-build) BUILD=0 ;;
            --out) OUT=${2:?}; shift ;;
            -h | --help) usage; exit 0 ;;
            -*) die "unknown option $1 (see --help)" ;;
            *) PATTERNS+=("$1") ;;
        esac
        shift
    done
    if ((QUICK)); then
        : "${CONNS:=200}" "${HEADER_TIMEOUT:=2}" "${DURATION:=6}" "${CLIENT_TIMEOUT:=4}"
    else
        : "${CONNS:=1000}" "${HEADER_TIMEOUT:=5}" "${DURATION:=30}" "${CLIENT_TIMEOUT:=10}"
    fi
    : "${BOUNDED:=$((CONNS / 4 > 0 ? CONNS / 4 : 1))}"
    ((BOUNDED < CONNS)) || die "--bounded-threads: must be below --conns ($CONNS)"
    ((${#PATTERNS[@]})) ||
        PATTERNS=(single-thread thread-per-connection prefork coroutine work-stealing)
    check_patterns "${PATTERNS[@]}"
    [[ -n $OUT ]] || OUT=$ROOT/results/slowloris-$(date +%Y%m%d-%H%M%S)
}

# The runs: "NAME BINARY FLAGS..." per line.
runs() {
    local p
    for p in "${PATTERNS[@]}"; do
        case $p in
            prefork)
                echo "prefork-blocking prefork --mode blocking"
                echo "prefork prefork --mode event"
                ;;
            thread-per-connection)
                echo "$p $p"
                echo "$p-bounded $p --max-threads $BOUNDED"
                ;;
            *) echo "$p $p" ;;
        esac
    done
}

# attack NAME BINARY FLAGS...: one fresh server under the trickling and the ordinary client;
# appends a row to ROWS.
attack() {
    local name=$1 binary=$2 dir="$TMP/$1"
    shift 2
    SERVER_ARGS=(--header-timeout "${HEADER_TIMEOUT}s" "$@")
    if ! start_target "$binary" "$dir"; then
        ROWS+=("$name|did not start|$(tail -n 1 "$dir/stderr")")
        return
    fi
    local pid=$SERVER_PID host=${SERVER_ADDR%:*} port=${SERVER_ADDR##*:} slow rc=0
    log "== $name: $binary --workers $WORKERS ${SERVER_ARGS[*]}; $CONNS trickling connections"
    python3 "$ROOT/scripts/slowloris.py" "$host" "$port" --conns "$CONNS" \
        --out "$dir/slow.json" --ready "$dir/ready" 2>"$dir/slow.err" &
    slow=$!
    LIVE[$slow]=client
    local deadline=$((SECONDS + 20))
    while [[ ! -s $dir/ready ]] && alive "$slow" && ((SECONDS < deadline)); do sleep 0.05; done
    if [[ ! -s $dir/ready ]]; then
        log "  the trickling client did not get going: $(cat "$dir/slow.err")"
        stop_pid "$slow"
        stop_pid "$pid"
        ROWS+=("$name|trickling client failed|$(tail -n 1 "$dir/slow.err")")
        return
    fi
    # The ordinary client: a new visitor every 1/RATE s, each on a connection of its own.
    run_client "$dir/loadgen.json" "$dir/loadgen.err" "$BIN_DIR/loadgen" -c 200 --rate "$RATE" \
        --close client -d "${DURATION}s" --timeout "${CLIENT_TIMEOUT}s" --json \
        "http://$SERVER_ADDR/" || rc=$?
    stop_pid "$slow" 10
    local died=0
    alive "$pid" || died=1
    stop_pid "$pid"
    if ((died)); then
        cp "$dir/stderr" "$OUT/runs/$name.stderr"
        ROWS+=("$name|died|$(grep -m1 'panicked' "$dir/stderr" || tail -n 1 "$dir/stderr")")
        return
    fi
    if ((rc != 0)) || [[ ! -s $dir/loadgen.json ]]; then
        ROWS+=("$name|loadgen failed|$(head -c 200 "$dir/loadgen.err")")
        return
    fi
    if [[ ! -s $dir/slow.json ]]; then
        ROWS+=("$name|trickling client failed|$(tail -n 1 "$dir/slow.err")")
        return
    fi
    printf '{"name":"%s","server":"%s","ready_s":%s,"slow":%s,"ordinary":%s}\n' "$name" \
        "$binary --workers $WORKERS ${SERVER_ARGS[*]}" "$(cat "$dir/ready")" \
        "$(cat "$dir/slow.json")" "$(cat "$dir/loadgen.json")" >"$OUT/runs/$name.json"
    ROWS+=("$name|ok|$OUT/runs/$name.json")
    python3 - "$OUT/runs/$name.json" <<'EOF' >&2
import json, sys
r = json.load(open(sys.argv[1]))
c = r["slow"]["connections"]
got = [x["reply_s"] - x["first_byte_s"] for x in c if x["status"] == 408]
o = r["ordinary"]
print(f"  408: {len(got)} of {len(c)}" + (f" after {min(got):.1f}-{max(got):.1f} s" if got else "")
      + f"; ordinary client: {o['requests']} replies, p99 {o['latency_us']['p99'] / 1000:.1f} ms, "
      f"{sum(o['errors'].values())} failures")
EOF
}

# The table of every run, in markdown, from ROWS ("NAME|ok|JSON" or "NAME|PROBLEM|DETAIL").
table() {
    local rows="$TMP/rows"
    printf '%s\n' "${ROWS[@]}" >"$rows"
    python3 - "$rows" "$RATE" "$DURATION" <<'EOF'
import json, statistics, sys
from collections import Counter

rate, duration = float(sys.argv[2]), float(sys.argv[3])

def ms(us):
    return f"{us / 1000:.1f}" if us < 100_000 else f"{us / 1000:,.0f}"

print("| run | got 408 | 408 after first byte: min / median / max (s) | 408s at second: count"
      " | other ends | ordinary client: replies / due | latency p50 / p99 / max (ms) | failures |")
print("|---|---:|---:|---|---|---:|---:|---|")
for line in open(sys.argv[1]):
    name, status, rest = line.rstrip("\n").split("|", 2)
    if status != "ok":
        print(f"| {name} | – | – | – | – | – | – | {status}: {rest} |")
        continue
    r = json.load(open(rest))
    conns = r["slow"]["connections"]
    got = sorted(c["reply_s"] - c["first_byte_s"] for c in conns if c["status"] == 408)
    if got:
        when = f"{got[0]:.2f} / {statistics.median(got):.2f} / {got[-1]:.2f}"
        steps = Counter(round(t) for t in got)
        at = ", ".join(f"{s}: {n:,}" for s, n in sorted(steps.items()))
    else:
        when = at = "–"
    others = Counter()
    for c in conns:
        if c["status"] == 408:
            continue
        if c["status"] is not None:
            others[f"status {c['status']}"] += 1
        elif c["end"] is None:
            others["still open"] += 1
        elif c["end"] == "connect":
            others["connect failed"] += 1
        else:
            others[f"{c['end']} without a reply"] += 1
    other = ", ".join(f"{k} {n:,}" for k, n in others.most_common()) or "–"
    o = r["ordinary"]
    lat = o["latency_us"]
    times = f"{ms(lat['p50'])} / {ms(lat['p99'])} / {ms(lat['max'])}" if o["requests"] else "–"
    fails = ", ".join(f"{k} {v:,}" for k, v in o["errors"].items() if v) or "0"
    # Due but neither answered nor failed: still waiting (or not yet sent) when the run ended.
    waiting = round(rate * duration) - o["requests"] - sum(o["errors"].values())
    if waiting > 0:
        fails += f"; {waiting:,} still waiting at the end"
    codes = ", ".join(f"{c}: {v:,}" for c, v in o["status"].items() if c != "200")
    if codes:
        fails += f"; replies {codes}"
    print(f"| {name} | {len(got):,} of {len(conns):,} | {when} | {at} | {other}"
          f" | {o['requests']:,} / {round(rate * duration):,} | {times} | {fails} |")
EOF
}

main() {
    parse_args "$@"
    on_exit stop_and_clean
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/slowloris.XXXXXX")
    build_with_loadgen
    ((${#PATTERNS[@]})) || die "nothing to measure"
    command -v python3 >/dev/null || die "python3 not found (the trickling client, the table)"
    # The trickling connections and the ordinary client's hold a descriptor each.
    ulimit -n "$(ulimit -Hn)"
    mkdir -p "$OUT/runs"
    ROWS=()
    for_each_run attack
    {
        echo "$(run_stamp slowloris.sh)" \
            "$CONNS trickling connections (a header line per second), servers --workers $WORKERS" \
            "--header-timeout ${HEADER_TIMEOUT}s; the ordinary client: GET / at $RATE/s for ${DURATION}s," \
            "a new connection each, --timeout ${CLIENT_TIMEOUT}s."
        echo
        table
    } | tee "$OUT/table.md"
    echo "Saved: $OUT/table.md"
}

main "$@"
