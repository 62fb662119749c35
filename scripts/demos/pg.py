#!/usr/bin/env python3
"""PostgreSQL clients for scripts/demo.sh's commit and replication demos. Python 3 standard
library only: a minimal client of the frontend/backend protocol (version 3, simple queries,
trust authentication), enough to know exactly when each COMMIT returned.

    pg.py sql SOCK QUERY                    one query; prints the rows, columns tab-separated
    pg.py crash-load SOCK DATADIR --clients N --crash-after A-B --out FILE
                                            N connections insert rows as fast as they can, each
                                            recording which commits returned; at a random moment
                                            between A and B seconds, every process of the cluster
                                            is frozen (SIGSTOP) and killed (SIGKILL)
    pg.py check SOCK FILE                   after the restart: which acknowledged rows survived
    pg.py repl PRIMARY STANDBY --count N    commit a row on the primary, read it at once on the
                                            standby; commit latency and stale reads

SOCK is the directory of a server's Unix socket (the port is 5432, or SOCK:PORT).
"""

import argparse
import json
import os
import random
import selectors
import signal
import socket
import statistics
import struct
import sys
import time


# ---------------------------------------------------------------- the protocol, minimally


class PgError(Exception):
    pass


def sock_path(spec):
    directory, _, port = spec.partition(":")
    return os.path.join(directory, f".s.PGSQL.{port or 5432}")


class Conn:
    """One connection; `query` sends a simple query and returns its rows (lists of str/None)."""

    def __init__(self, spec, application_name="pg.py"):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A demo must never hang: no reply in this long is an error (a lost standby, say).
        self.sock.settimeout(30)
        self.sock.connect(sock_path(spec))
        self.buf = b""
        params = b"".join(
            k + b"\0" + v + b"\0"
            for k, v in [
                (b"user", b"postgres"),
                (b"database", b"postgres"),
                (b"application_name", application_name.encode()),
            ]
        )
        body = struct.pack("!i", 196608) + params + b"\0"  # protocol 3.0
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        while True:
            kind, payload = self.message()
            if kind == b"R" and struct.unpack("!i", payload[:4])[0] != 0:
                raise PgError("the server asks for a password: the demo's clusters use trust")
            if kind == b"E":
                raise PgError(error_text(payload))
            if kind == b"Z":
                return

    def message(self):
        """The next message: (type byte, payload). Raises ConnectionError at EOF."""
        while (msg := parse_one(self)) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.buf += data
        return msg

    def send_query(self, sql):
        q = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!i", len(q) + 4) + q)

    def result(self):
        """Reads one query's replies up to ReadyForQuery; returns the rows or raises PgError."""
        rows, error = [], None
        while True:
            kind, payload = self.message()
            if kind == b"D":
                rows.append(data_row(payload))
            elif kind == b"E":
                error = error_text(payload)
            elif kind == b"Z":
                if error:
                    raise PgError(error)
                return rows

    def query(self, sql):
        self.send_query(sql)
        return self.result()

    def close(self):
        try:
            self.sock.sendall(b"X" + struct.pack("!i", 4))
        except OSError:
            pass
        self.sock.close()


def data_row(payload):
    (n,) = struct.unpack("!h", payload[:2])
    pos, row = 2, []
    for _ in range(n):
        (size,) = struct.unpack("!i", payload[pos : pos + 4])
        pos += 4
        if size < 0:
            row.append(None)
        else:
            row.append(payload[pos : pos + size].decode())
            pos += size
    return row


def error_text(payload):
    fields = {}
    for part in payload.split(b"\0"):
        if part:
            fields[part[:1]] = part[1:].decode(errors="replace")
    return f"{fields.get(b'S', 'ERROR')}: {fields.get(b'M', '?')}"


def lsn(text):
    """'16/B374D848' -> bytes."""
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


# ---------------------------------------------------------------- sql


def cmd_sql(args):
    c = Conn(args.sock)
    for row in c.query(args.query):
        print("\t".join("" if v is None else v for v in row))
    c.close()


# ---------------------------------------------------------------- crash-load


def cluster_pids(datadir):
    """The postmaster (first line of postmaster.pid) and every process it forked."""
    with open(os.path.join(datadir, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after the last ')' don't.
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == postmaster:
            pids.append(int(entry))
    return pids


def wal_positions(conn):
    """(insert, write, flush) LSNs: in WAL buffers, write()n to the kernel, fsync()ed."""
    row = conn.query(
        "SELECT pg_current_wal_insert_lsn(), pg_current_wal_lsn(), pg_current_wal_flush_lsn()"
    )[0]
    return tuple(lsn(v) for v in row)


def cmd_crash_load(args):
    lo, _, hi = args.crash_after.partition("-")
    crash_at = random.uniform(float(lo), float(hi or lo))
    monitor = Conn(args.sock, "monitor")
    setting = monitor.query("SHOW synchronous_commit")[0][0]
    clients = [Conn(args.sock, f"client-{i}") for i in range(1, args.clients + 1)]
    acked = {i: 0 for i in range(1, args.clients + 1)}
    # Client i inserts (i, 1), (i, 2), ... in order, one at a time: once (i, n) is acknowledged,
    # rows 1..n of client i were all committed, so one number per client says what was acked.
    sel = selectors.DefaultSelector()
    for i, c in enumerate(clients, 1):
        c.next = 1
        c.error = None
        c.send_query(f"INSERT INTO acks VALUES ({i}, 1)")
        sel.register(c.sock, selectors.EVENT_READ, (i, c))
    start_wal = wal_positions(monitor)
    started = time.monotonic()
    deadline = started + crash_at
    crashed = None
    while sel.get_map():
        if crashed is None and time.monotonic() >= deadline:
            # The moment: where the WAL stood a round trip ago, then the whole cluster frozen at
            # once (no process of it runs between the first kill and the last) and killed.
            before = wal_positions(monitor)
            acked_at_sample = sum(acked.values())
            pids = cluster_pids(args.datadir)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            crash_elapsed = time.monotonic() - started
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            crashed = dict(
                wal=before, acked_at_sample=acked_at_sample, pids=len(pids), elapsed=crash_elapsed
            )
        # After the crash, the replies already sent are still read: those COMMITs returned.
        timeout = 5.0 if crashed else max(0.0, deadline - time.monotonic())
        events = sel.select(timeout)
        if crashed and not events:
            sys.exit("the connections stayed open 5 s after the cluster was killed")
        for key, _ in events:
            i, c = key.data
            try:
                data = c.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(c.sock)
                continue
            c.buf += data
            # ReadyForQuery after CommandComplete: the INSERT's implicit COMMIT returned.
            while (msg := parse_one(c)) is not None:
                kind, payload = msg
                if kind == b"E":
                    c.error = error_text(payload)
                elif kind == b"Z":
                    if c.error:
                        sys.exit(f"client {i}: {c.error}")
                    acked[i] = c.next
                    c.next += 1
                    if crashed is None:
                        c.send_query(f"INSERT INTO acks VALUES ({i}, {c.next})")
    seconds = crashed["elapsed"]
    total = sum(acked.values())
    insert, write, flush = crashed["wal"]
    per_commit = (insert - start_wal[0]) / max(1, crashed["acked_at_sample"])
    result = dict(
        synchronous_commit=setting,
        clients=args.clients,
        seconds=round(seconds, 3),
        acked=acked,
        acked_total=total,
        commits_per_s=round(total / seconds),
        wal_bytes_per_commit=round(per_commit),
        wal_insert=insert,
        wal_write=write,
        wal_flush=flush,
        killed=crashed["pids"],
    )
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(
        f"summary: synchronous_commit={setting} clients={args.clients} seconds={seconds:.2f} "
        f"acked={total} rate={total / seconds:.0f} wal_per_commit={per_commit:.0f} "
        f"unwritten={insert - write} unflushed={write - flush} killed={crashed['pids']}"
    )


def parse_one(c):
    """One complete message from c.buf, or None."""
    if len(c.buf) < 5:
        return None
    n = struct.unpack("!i", c.buf[1:5])[0]
    if len(c.buf) < n + 1:
        return None
    kind, payload = c.buf[:1], c.buf[5 : n + 1]
    c.buf = c.buf[n + 1 :]
    return kind, payload


# ---------------------------------------------------------------- check


def cmd_check(args):
    with open(args.file) as f:
        load = json.load(f)
    c = Conn(args.sock)
    rows = c.query("SELECT client, count(*), max(n) FROM acks GROUP BY client")
    present = {int(k): (int(n), int(m)) for k, n, m in rows}
    c.close()
    lost = beyond = 0
    for client, acked in load["acked"].items():
        n, top = present.get(int(client), (0, 0))
        # Each (client, n) was inserted once, from 1 up: n rows whose highest is n are 1..n.
        if n != top:
            sys.exit(f"client {client}: {n} rows but the highest is {top}: a gap in a client's rows")
        lost += max(0, acked - n)
        beyond += max(0, n - acked)
    unwritten = load["wal_insert"] - load["wal_write"]
    unflushed = load["wal_write"] - load["wal_flush"]
    per = max(1, load["wal_bytes_per_commit"])
    print(
        f"summary: acked={load['acked_total']} lost={lost} committed_unacked={beyond} "
        f"unwritten_bytes={unwritten} unwritten_commits={unwritten // per} "
        f"unflushed_bytes={unflushed} unflushed_commits={unflushed // per}"
    )


# ---------------------------------------------------------------- repl


def percentile(sorted_values, p):
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


REPLICATION = (
    "SELECT pg_current_wal_lsn() - replay_lsn, pg_current_wal_lsn() - flush_lsn, "
    "extract(epoch FROM write_lag) * 1000, extract(epoch FROM flush_lag) * 1000, "
    "extract(epoch FROM replay_lag) * 1000, sync_state "
    "FROM pg_stat_replication WHERE application_name = 'standby1'"
)


def cmd_repl(args):
    primary = Conn(args.primary, "writer")
    standby = Conn(args.standby, "reader")
    monitor = Conn(args.primary, "monitor")
    mode = monitor.query(
        "SELECT current_setting('synchronous_commit'), current_setting('synchronous_standby_names')"
    )[0]
    start = int(primary.query("SELECT coalesce(max(n), 0) FROM seen")[0][0])
    # The lag columns keep the last value the standby's reports gave, which may be from before
    # this run: only values that differ from these count as reported during it.
    before = monitor.query(REPLICATION)[0][2:5]
    latencies, stale, behind, samples = [], 0, [], []
    sample_every = max(1, args.count // 20)
    for k in range(1, args.count + 1):
        n = start + k
        t0 = time.perf_counter()
        primary.query(f"INSERT INTO seen VALUES ({n})")
        committed = time.perf_counter()
        latencies.append((committed - t0) * 1000)
        seen = int(standby.query("SELECT coalesce(max(n), 0) FROM seen")[0][0])
        last_stale = seen < n
        if last_stale:
            stale += 1
            behind.append(n - seen)
        # Not after the last commit: the wait for the standby to catch up follows it at once.
        if k % sample_every == 0 and k < args.count:
            samples.append(monitor.query(REPLICATION)[0])
    # Eventually consistent: how long after the last COMMIT returned the standby showed it (0:
    # at the first read).
    catchup_ms = 0.0
    if last_stale:
        while int(standby.query("SELECT coalesce(max(n), 0) FROM seen")[0][0]) < n:
            if time.perf_counter() - committed > 60:
                sys.exit("the standby did not catch up within 60 s")
            time.sleep(0.0005)
        catchup_ms = (time.perf_counter() - committed) * 1000
    for c in (primary, standby, monitor):
        c.close()
    latencies.sort()

    def largest(i):
        values = [float(r[i]) for r in samples if r[i] is not None and r[i] != before[i - 2]]
        return f"{max(values):.3f}" if values else "none"

    def lsn_diff(i):
        return max((int(r[i]) for r in samples if r[i] is not None), default=0)

    print(
        f"summary: synchronous_commit={mode[0]} standby_names={mode[1] or '-'} "
        f"sync_state={samples[-1][5] if samples else 'none'} commits={args.count} "
        f"p50_ms={percentile(latencies, 50):.3f} p99_ms={percentile(latencies, 99):.3f} "
        f"max_ms={latencies[-1]:.3f} stale={stale} "
        f"stale_behind_max={max(behind, default=0)} catchup_ms={catchup_ms:.1f} "
        f"replay_lsn_diff_max={lsn_diff(0)} flush_lsn_diff_max={lsn_diff(1)} "
        f"write_lag_ms_max={largest(2)} flush_lag_ms_max={largest(3)} "
        f"replay_lag_ms_max={largest(4)} samples={len(samples)}"
    )


# ---------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sql")
    s.add_argument("sock")
    s.add_argument("query")
    s = sub.add_parser("crash-load")
    s.add_argument("sock")
    s.add_argument("datadir")
    s.add_argument("--clients", type=int, default=4)
    s.add_argument("--crash-after", default="2-4", help="seconds, A-B: a random moment between")
    s.add_argument("--out", required=True)
    s = sub.add_parser("check")
    s.add_argument("sock")
    s.add_argument("file")
    s = sub.add_parser("repl")
    s.add_argument("primary")
    s.add_argument("standby")
    s.add_argument("--count", type=int, default=1000)
    args = p.parse_args()
    try:
        {"sql": cmd_sql, "crash-load": cmd_crash_load, "check": cmd_check, "repl": cmd_repl}[
            args.cmd
        ](args)
    except (PgError, OSError) as e:
        sys.exit(f"pg.py {args.cmd}: {e}")


if __name__ == "__main__":
    main()
