#!/usr/bin/env python3
"""The anatomy demo's client and report (scripts/demos/anatomy.sh; docs/demo-anatomy.md).

  anatomy.py client ADDR          sends GET /, GET /work?us=2000 and a 1 MB POST /echo, each on
                                  a new connection, and prints one JSON line per request with the
                                  client's own timestamps (wall clock, seconds)
  anatomy.py report CLIENT TRACE [PACKETS]
                                  merges the client's lines, the server's --trace lines and
                                  tcpdump's text (`tcpdump -tt -nn`), prints each request's
                                  timeline, and a last line `summary: ...` for the verdict

Standard library only.
"""

import json
import os
import socket
import sys
import time

REQUESTS = [
    ("GET", "/", b""),
    ("GET", "/work?us=2000", b""),
    ("POST", "/echo", None),  # 1 MB, made below
]


def read_response(sock):
    """Reads one response framed by Content-Length; returns (first byte time, done time, size)."""
    buf = b""
    first = None
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise SystemExit("anatomy: the server closed before replying")
        if first is None:
            first = time.time()
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    got = len(body)
    while got < length:
        data = sock.recv(1 << 20)
        if not data:
            raise SystemExit("anatomy: the reply was cut short")
        got += len(data)
    return first, time.time(), len(head) + 4 + length


def client(addr):
    host, port = addr.rsplit(":", 1)
    body_1mb = os.urandom(1_000_000)
    for method, target, body in REQUESTS:
        if body is None:
            body = body_1mb
        request = (
            f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + body
        t_connect = time.time()
        sock = socket.create_connection((host, int(port)))
        t_connected = time.time()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local_port = sock.getsockname()[1]
        sock.sendall(request)
        t_sent = time.time()
        t_first, t_done, size = read_response(sock)
        sock.close()
        print(json.dumps({
            "method": method, "target": target, "port": local_port,
            "bytes_in": len(request), "bytes_out": size,
            "connect": t_connect, "connected": t_connected, "sent": t_sent,
            "first_reply_byte": t_first, "done": t_done,
        }), flush=True)
        time.sleep(0.05)


def packets_by_port(path, server_port):
    """{client port: [(time, direction, flags, length)]} from tcpdump -tt -nn text."""
    by_port = {}
    if not path or not os.path.exists(path):
        return by_port
    with open(path) as f:
        for line in f:
            # 1764512345.123456 IP 127.0.0.1.54321 > 127.0.0.1.8080: Flags [S], seq ..., length 0
            parts = line.split()
            if len(parts) < 5 or parts[1] != "IP":
                continue
            try:
                t = float(parts[0])
            except ValueError:
                continue
            src, dst = parts[2], parts[4].rstrip(":")
            sport, dport = int(src.rsplit(".", 1)[1]), int(dst.rsplit(".", 1)[1])
            flags = line.split("Flags [", 1)[1].split("]", 1)[0] if "Flags [" in line else ""
            length = int(line.rsplit("length ", 1)[1].split()[0]) if "length " in line else 0
            if dport == server_port:
                by_port.setdefault(sport, []).append((t, "in", flags, length))
            elif sport == server_port:
                by_port.setdefault(dport, []).append((t, "out", flags, length))
    return by_port


def report(client_path, trace_path, packets_path):
    clients = [json.loads(l) for l in open(client_path) if l.strip()]
    traces = [json.loads(l) for l in open(trace_path) if l.startswith('{"trace"')]
    server_port = None
    for l in open(trace_path):
        if "listening on http://" in l:
            server_port = int(l.split("listening on http://", 1)[1].split()[0].rsplit(":", 1)[1])
    packets = packets_by_port(packets_path, server_port)
    summary = []
    for c in clients:
        # The server's line for this request: the same method and target, in order.
        t = next((t for t in traces if t["method"] == c["method"] and t["target"] == c["target"]), None)
        if t is None:
            raise SystemExit(f"anatomy: no --trace line for {c['method']} {c['target']}")
        traces.remove(t)
        zero = c["connect"]
        events = [
            (c["connect"], "client", "connect() called"),
            (c["connected"], "client", "connected (handshake done)"),
            (t["accepted"], "server", "connection taken on by the loop"),
            (c["sent"], "client", "request written (t0: the client has sent it)"),
            (t["first_byte"], "server", "first byte of the request read"),
            (t["parsed"], "server", "head parsed (t1)"),
            (t["received"], "server", "whole request in, handed to the app"),
            (t["handled"], "server", "the app's reply filed"),
            (t["written"], "server", "reply fully written to the socket (t50)"),
            (c["first_reply_byte"], "client", "first byte of the reply"),
            (c["done"], "client", "whole reply read (t51)"),
        ]
        pk = packets.get(c["port"], [])
        data_in = [p for p in pk if p[1] == "in" and p[3] > 0]
        data_out = [p for p in pk if p[1] == "out" and p[3] > 0]
        syn = [p for p in pk if p[1] == "in" and p[2] == "S"]
        if syn:
            events.append((syn[0][0], "wire", "SYN"))
        if data_in:
            events.append((data_in[0][0], "wire", f"first request segment ({data_in[0][3]} bytes)"))
            if len(data_in) > 1:
                events.append((data_in[-1][0], "wire",
                               f"last request segment ({len(data_in)} segments captured, "
                               f"{sum(p[3] for p in data_in)} bytes)"))
        if data_out:
            events.append((data_out[0][0], "wire", f"first reply segment ({data_out[0][3]} bytes)"))
            if len(data_out) > 1:
                events.append((data_out[-1][0], "wire",
                               f"last reply segment ({len(data_out)} segments captured, "
                               f"{sum(p[3] for p in data_out)} bytes)"))
        events.sort(key=lambda e: e[0])
        print(f"\n  {c['method']} {c['target']}: {c['bytes_in']} bytes in, {c['bytes_out']} out "
              f"(connection {t['conn']} of the server's trace)")
        for at, who, what in events:
            print(f"    {1000 * (at - zero):9.3f} ms  {who:6}  {what}")
        us = lambda a, b: 1e6 * (b - a)  # noqa: E731
        parts = {
            "connecting": us(c["connect"], c["connected"]),
            "receiving the request": us(c["connected"], t["received"]),
            "the app's work": us(t["received"], t["handled"]),
            "sending the reply": us(t["handled"], c["done"]),
        }
        total = us(c["connect"], c["done"])
        parse = us(t["first_byte"], t["parsed"])
        print("    where the time went: " + ", ".join(f"{k} {v:.0f} µs" for k, v in parts.items())
              + f" (parsing the head: {parse:.0f} µs); total {total:.0f} µs")
        biggest = max(parts, key=parts.get)
        summary.append(f"{c['method']} {c['target']} took {total / 1000:.2f} ms, most of it "
                       f"{biggest} ({100 * parts[biggest] / total:.0f}%), the head's parse "
                       f"{parse:.0f} µs")
    print("\nsummary: " + "; ".join(summary))
    print(f"packets={'yes' if packets else 'no'}")


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "client":
        client(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "report":
        report(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
