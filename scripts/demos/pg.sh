# shellcheck shell=bash
# Throwaway PostgreSQL clusters for the commit and replication demos (sourced by them).
#
# Each cluster lives in $TMP/pg-NAME (data/, sock/, log) and listens on a Unix socket in sock/
# only (listen_addresses=''), so it can meet no other PostgreSQL on this machine. As root the
# servers run as the postgres OS user (initdb refuses root); otherwise as whoever runs the demo.
# Each postmaster is started directly (no pg_ctl), so its PID is in PIDS and demo.sh's clean-up
# stops it whatever happens; its own processes exit when it does. $TMP goes with the rest.
#
# Environment: PG_BINDIR=DIR   PostgreSQL's programs (default: the newest /usr/lib/postgresql/*/bin,
#                              else pg_config --bindir, else where `postgres` is on the PATH)

PG="$DEMOS_DIR/pg.py"

# pg_need: finds PostgreSQL's programs (PGBIN) and the user to run them as (AS_PG), or exits 77.
pg_need() {
    need_tools python3
    local d
    PGBIN=
    # Debian keeps them out of PATH, one directory per major version; the newest wins.
    for d in ${PG_BINDIR:-} $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV) \
        "$(pg_config --bindir 2>/dev/null)" "$(dirname "$(command -v postgres 2>/dev/null || echo .)")"; do
        if [ -x "$d/postgres" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_isready" ]; then
            PGBIN=$d
            break
        fi
    done
    if [ -z "$PGBIN" ]; then
        skipped "this demo needs PostgreSQL's server programs (Debian: apt-get install -y postgresql)"
        exit 77
    fi
    AS_PG=()
    if [ "$(id -u)" = 0 ]; then
        if ! id postgres >/dev/null 2>&1; then
            skipped "running as root, and there is no postgres OS user to run the clusters as (initdb refuses root)"
            exit 77
        fi
        # setpriv execs (su and runuser fork): the PID we start is the postmaster's own.
        AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
        chmod 711 "$TMP" # the postgres user must reach its directories inside
    fi
    # shellcheck disable=SC2034 # used by the demos
    PG_VERSION=$("$PGBIN/postgres" --version | awk '{print $3}')
}

# as_pg CMD...: runs CMD as the clusters' user, from a directory that user can read.
as_pg() { (cd "$TMP" && "${AS_PG[@]}" "$@"); }

# pg_init NAME [SETTING...]: a new cluster in $TMP/pg-NAME; each SETTING ('key = value') goes
# into its postgresql.conf.
pg_init() {
    local name=$1 dir="$TMP/pg-$1"
    shift
    mkdir -p "$dir/sock"
    [ "$(id -u)" = 0 ] && chown -R postgres: "$dir"
    # -N: no fsync of the new files; a throwaway cluster has nothing to lose yet.
    as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres --auth=trust -N -E UTF8 --locale=C \
        >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        die "initdb failed"
    }
    {
        printf '%s\n' "listen_addresses = ''" "unix_socket_directories = '$dir/sock'" "port = 5432"
        local s
        for s in "$@"; do printf '%s\n' "$s"; done
    } >>"$dir/data/postgresql.conf"
}

# pg_start NAME NETNS [POSTGRES-ARG...]: starts cluster NAME (in network namespace NETNS, or
# here if -) and waits until it accepts connections; its PID in PG_PID_<NAME>.
pg_start() {
    local name=$1 ns=$2 dir="$TMP/pg-$1"
    shift 2
    local netns=()
    [ "$ns" = - ] || netns=(ip netns exec "$ns")
    (cd "$TMP" && exec "${netns[@]}" "${AS_PG[@]}" "$PGBIN/postgres" -D "$dir/data" "$@") >>"$dir/log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    # Out of bash's job table: a postmaster killed on purpose gets no "Killed" line. It is still
    # our child, and pg_wait_exit sees it gone.
    disown "$pid"
    printf -v "PG_PID_$name" '%s' "$pid"
    local deadline=$((SECONDS + 60))
    until "$PGBIN/pg_isready" -q -h "$dir/sock" -p 5432; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS > deadline)); then
            tail -20 "$dir/log" >&2
            die "PostgreSQL ($name) did not start"
        fi
        sleep 0.05
    done
}

# pg_stop NAME: a fast shutdown (SIGINT: sessions end, a checkpoint, exit), waited for.
pg_stop() {
    local var="PG_PID_$1"
    local pid=${!var}
    kill -INT "$pid" 2>/dev/null || return 0
    pg_wait_exit "$pid"
}

# pg_wait_exit PID: waits (30 s at most) until the postmaster PID has exited, and reaps it.
pg_wait_exit() {
    local deadline=$((SECONDS + 30))
    while kill -0 "$1" 2>/dev/null; do
        # A killed postmaster is a zombie until reaped: kill -0 still succeeds on it.
        [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ] && break
        ((SECONDS < deadline)) || die "PostgreSQL (pid $1) did not exit"
        sleep 0.05
    done
    wait "$1" 2>/dev/null || true
}

# pg_sql NAME QUERY: runs QUERY on cluster NAME; prints the rows, tab-separated.
pg_sql() { python3 "$PG" sql "$TMP/pg-$1/sock" "$2"; }
