#!/usr/bin/env python3
"""slowloris.py: N connections that each send a request line, then one header line every
--interval seconds, never finishing the head; what the server does to each, and when.

Usage: scripts/slowloris.py HOST PORT --conns N --out FILE [--ready FILE] [--interval S]

Opens the N connections at once (non-blocking, one thread, selectors). Each sends
`GET / HTTP/1.1` on connecting (its first byte), then `Host:` and `X-Slow-K:` lines, one per
--interval from its first byte, until the server answers or closes, or this script stops.
Writes FILE --ready once every connection has sent its first byte or failed to connect (or
after --ready-within seconds). Runs until SIGTERM or SIGINT (or --max-seconds), then writes
--out: per connection, its first byte, and the server's first reply byte and close, in
seconds since the script started; the status of each reply; and the totals. Stdlib only.
"""

import argparse
import errno
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time

STOP = False


def on_signal(_sig, _frame):
    global STOP
    STOP = True


class Slow:
    __slots__ = ("sock", "first", "next_line", "lines", "reply", "reply_at", "closed_at",
                 "end", "connected")

    def __init__(self, sock):
        self.sock = sock
        self.first = None  # when the request line went out
        self.next_line = None
        self.lines = 0
        self.reply = b""
        self.reply_at = None  # the server's first byte
        self.closed_at = None
        self.end = None  # "connect" (failed), "closed" (FIN), "reset", or None: still open
        self.connected = False


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ready")
    ap.add_argument("--ready-within", type=float, default=10.0)
    ap.add_argument("--max-seconds", type=float, default=600.0)
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    t0 = time.monotonic()
    sel = selectors.DefaultSelector()
    conns = []
    for _ in range(args.conns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        c = Slow(s)
        conns.append(c)
        err = s.connect_ex((args.host, args.port))
        if err not in (0, errno.EINPROGRESS):
            c.end, c.closed_at = "connect", time.monotonic() - t0
            s.close()
            continue
        sel.register(s, selectors.EVENT_WRITE, c)

    ready_written = args.ready is None

    def send(c, data, now):
        """Sends a line; false if the connection is gone."""
        try:
            c.sock.send(data)
        except BlockingIOError:
            return True  # the server reads nothing and its buffer is full: skip a line
        except OSError:
            finish(c, "reset", now)
            return False
        return True

    def finish(c, how, now):
        if c.end is None:
            c.end, c.closed_at = how, now
            sel.unregister(c.sock)
            c.sock.close()

    while not STOP:
        now = time.monotonic() - t0
        if now > args.max_seconds:
            break
        if not ready_written:
            pending = sum(1 for c in conns if c.first is None and c.end is None)
            if pending == 0 or now > args.ready_within:
                with open(args.ready, "w") as f:
                    f.write(f"{now:.3f}\n")
                ready_written = True
        # Sleep until the next line falls due (at most 100 ms, to notice a signal).
        due = [c.next_line for c in conns if c.end is None and c.next_line is not None]
        wait = min([0.1] + [max(0.0, d - now) for d in due])
        for key, mask in sel.select(timeout=wait):
            c = key.data
            now = time.monotonic() - t0
            if not c.connected and mask & selectors.EVENT_WRITE:
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(c, "connect", now)
                    continue
                c.connected = True
                sel.modify(c.sock, selectors.EVENT_READ, c)
                c.first, c.next_line = now, now + args.interval
                send(c, b"GET / HTTP/1.1\r\n", now)
                continue
            if mask & selectors.EVENT_READ:
                try:
                    data = c.sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    finish(c, "reset", now)
                    continue
                if not data:
                    finish(c, "closed", now)
                    continue
                if c.reply_at is None:
                    c.reply_at = now
                c.reply = (c.reply + data)[:64]
        now = time.monotonic() - t0
        for c in conns:
            if c.end is None and c.next_line is not None and c.next_line <= now:
                c.lines += 1
                line = b"Host: slowloris\r\n" if c.lines == 1 else b"X-Slow-%d: y\r\n" % c.lines
                if send(c, line, now):
                    c.next_line += args.interval

    stopped = time.monotonic() - t0
    out = {"conns": args.conns, "interval_s": args.interval, "stopped_s": round(stopped, 3),
           "connections": []}
    for c in conns:
        status = None
        if c.reply.startswith(b"HTTP/1."):
            try:
                status = int(c.reply.split(b" ", 2)[1])
            except (IndexError, ValueError):
                status = None
        out["connections"].append({
            "first_byte_s": None if c.first is None else round(c.first, 4),
            "reply_s": None if c.reply_at is None else round(c.reply_at, 4),
            "status": status,
            "end": c.end,
            "end_s": None if c.closed_at is None else round(c.closed_at, 4),
            "lines": c.lines,
        })
        if c.end is None:
            c.sock.close()
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
