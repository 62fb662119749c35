#!/usr/bin/env python3
"""A small tus 1.0.0 client and a plain uploader, for scripts/demo.sh upload and
scripts/upload-rss.sh. Python 3 standard library only.

    tus.py make FILE BYTES                 BYTES random bytes into FILE; prints its sha256
    tus.py tus ADDR FILE [--cut-at F]      creates an upload and sends FILE in one PATCH; with
                                           --cut-at, resets the connection after F of the file
                                           (0 < F < 1), then HEAD and a PATCH from the offset
                                           the server kept
    tus.py plain ADDR FILE [--cut-at F]    POST /upload of FILE; with --cut-at, resets the
                                           connection after F of it and sends it all again
    tus.py get ADDR PATH                   downloads PATH; prints its size and sha256
    tus.py delete ADDR PATH                tus termination: DELETE PATH

tus and plain print one line `summary: key=value ...`: size, sent (body bytes that left the
client's socket: written, less what the socket still held unsent when the connection was
reset, or for tus the offset the server kept if that is more), twice (sent - size), elapsed_s,
and for tus the offset it resumed at. `--probe-ms MS`
adds a second connection that sends GET / every MS milliseconds while the upload runs and
reports its latency (probe_p50_ms, probe_p99_ms, probe_max_ms): how long the server left
another request waiting meanwhile. `--rate-mb R` paces the body at R MB/s (10^6 bytes).

The body goes out with sendfile(2); the cut is close() with SO_LINGER 0, which discards what
the socket has not sent and sends a RST, as when a connection drops. ADDR is HOST:PORT.
"""

import argparse
import fcntl
import hashlib
import os
import socket
import statistics
import struct
import sys
import threading
import time

TUS = "Tus-Resumable: 1.0.0\r\n"
# ioctl: the bytes a TCP socket holds that it has not sent yet (linux/sockios.h).
SIOCOUTQNSD = 0x894B


def parse_addr(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


class HttpError(Exception):
    pass


def connect(addr):
    s = socket.create_connection(addr, timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_reply(sock, method="GET"):
    """One reply on a keep-alive connection: (status, headers with lower-case names, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise HttpError("the server closed the connection before its reply")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = 0 if method == "HEAD" or status in (204, 304) else int(headers.get("content-length", 0))
    while len(body) < n:
        data = sock.recv(65536)
        if not data:
            raise HttpError("the server closed the connection mid-reply")
        body += data
    return status, headers, body[:n]


def request(sock, method, path, headers="", body=b""):
    head = f"{method} {path} HTTP/1.1\r\nHost: demo\r\n{headers}"
    if body or method in ("POST", "PATCH"):
        head += f"Content-Length: {len(body)}\r\n"
    sock.sendall(head.encode() + b"\r\n" + body)
    return read_reply(sock, method)


def send_body(sock, path, start, end, cut, rate=0):
    """Sends bytes [start, end) of the file at PATH, at most `rate` bytes a second if given.
    With `cut`, stops once the body has sent `cut` bytes and resets the connection: returns
    the bytes that left the socket."""
    stop = min(end, start + cut) if cut is not None else end
    piece = 1 << 20 if rate else stop - start
    t0 = time.monotonic()
    with open(path, "rb") as f:
        offset = start
        while offset < stop:
            offset += sock.sendfile(f, offset, min(piece, stop - offset))
            if rate:
                time.sleep(max(0.0, t0 + (offset - start) / rate - time.monotonic()))
    if cut is None:
        return stop - start
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    unsent = struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0" * 4))[0]
    sock.close()
    return stop - start - unsent


def check(status, headers, body, want, doing):
    if status != want:
        raise HttpError(f"{doing}: {status} (expected {want}) {body.decode(errors='replace').strip()}")
    return headers


# ---------------------------------------------------------------- probe


class Probe:
    """GET / on its own keep-alive connection every `every` seconds until stopped."""

    def __init__(self, addr, every_ms):
        self.addr, self.every, self.times = addr, every_ms / 1000, []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.error = None

    def run(self):
        try:
            with connect(self.addr) as s:
                while not self.stopped.is_set():
                    t0 = time.perf_counter()
                    status, _, _ = request(s, "GET", "/")
                    self.times.append(time.perf_counter() - t0)
                    if status != 200:
                        raise HttpError(f"GET /: {status}")
                    self.stopped.wait(self.every)
        except (OSError, HttpError) as e:
            self.error = e

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopped.set()
        self.thread.join()
        if self.error:
            raise HttpError(f"probe: {self.error}")
        t = sorted(self.times) or [0.0]
        p99 = t[min(len(t) - 1, int(len(t) * 0.99))]
        return (
            f"probes={len(self.times)} probe_p50_ms={statistics.median(t) * 1e3:.2f} "
            f"probe_p99_ms={p99 * 1e3:.2f} probe_max_ms={t[-1] * 1e3:.2f}"
        )


# ---------------------------------------------------------------- commands


def cmd_make(args):
    h = hashlib.sha256()
    left = args.bytes
    with open(args.file, "wb") as f:
        while left:
            block = os.urandom(min(left, 1 << 20))
            f.write(block)
            h.update(block)
            left -= len(block)
    print(f"sha256={h.hexdigest()}")


def cut_bytes(args, size):
    if args.cut_at is None:
        return None
    if not 0 < args.cut_at < 1:
        raise HttpError("--cut-at: a fraction between 0 and 1")
    return int(size * args.cut_at)


def cmd_tus(args):
    addr = parse_addr(args.addr)
    size = os.path.getsize(args.file)
    cut = cut_bytes(args, size)
    probe = Probe(addr, args.probe_ms).start() if args.probe_ms else None
    t0 = time.perf_counter()
    with connect(addr) as s:
        h = check(*request(s, "POST", "/files/", f"{TUS}Upload-Length: {size}\r\n"), 201, "POST /files/")
    url = h["location"]
    # One PATCH for the whole file.
    status, h, body, sent = patch(addr, url, 0, size, args.file, cut, args.rate_mb * 1e6)
    resumed_at, retries, cut_s = None, 0, 0.0
    if cut is None:
        check(status, h, body, 204, "PATCH")
    else:
        cut_s = time.perf_counter() - t0
        # Resume: ask where the server is, then send the rest from there. The cut PATCH may
        # still hold the upload for a moment (423), or may have kept more meanwhile (409).
        deadline = time.monotonic() + 30
        offset = head_offset(addr, url)
        while True:
            resumed_at = offset
            status, h, body, n = patch(addr, url, offset, size, args.file, None, args.rate_mb * 1e6)
            if status == 204:
                # What the server kept left this socket, even the bytes that left between the
                # count and the reset (on loopback some can).
                sent = max(sent, resumed_at) + n
                break
            retries += 1
            if time.monotonic() > deadline or status not in (409, 423):
                check(status, h, body, 204, f"PATCH at offset {offset}")
            time.sleep(0.02)
            offset = int(h["upload-offset"]) if status == 409 else head_offset(addr, url)
    elapsed = time.perf_counter() - t0
    kept = head_offset(addr, url)
    if kept != size:
        raise HttpError(f"the upload ended at {kept} of {size} bytes")
    extra = f"cut_after={cut} cut_s={cut_s:.2f} resumed_at={resumed_at} retries={retries}"
    summary(f"url={url}", size, sent, elapsed, extra if cut is not None else "", probe)


def patch(addr, url, offset, size, path, cut, rate):
    """PATCH bytes [offset, size) of PATH on a connection of its own, `Expect: 100-continue`:
    a refusal (409, 423) comes before any of the body is sent. Returns (status, headers, body,
    body bytes sent); status None if the connection was cut."""
    with connect(addr) as s:
        s.sendall(
            f"PATCH {url} HTTP/1.1\r\nHost: demo\r\n{TUS}Content-Type: application/offset+octet-stream\r\n"
            f"Upload-Offset: {offset}\r\nContent-Length: {size - offset}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        status, h, body = read_reply(s)
        if status != 100:
            return status, h, body, 0
        n = send_body(s, path, offset, size, cut, rate)
        if cut is not None:
            return None, {}, b"", n
        return (*read_reply(s), n)


def head_offset(addr, url):
    with connect(addr) as s:
        return int(check(*request(s, "HEAD", url, TUS), 200, "HEAD")["upload-offset"])


def cmd_plain(args):
    addr = parse_addr(args.addr)
    size = os.path.getsize(args.file)
    cut = cut_bytes(args, size)
    probe = Probe(addr, args.probe_ms).start() if args.probe_ms else None
    head = f"POST /upload HTTP/1.1\r\nHost: demo\r\nContent-Length: {size}\r\n\r\n".encode()
    t0 = time.perf_counter()
    sent, cut_s = 0, 0.0
    if cut is not None:
        s = connect(addr)
        s.sendall(head)
        sent += send_body(s, args.file, 0, size, cut, args.rate_mb * 1e6)
        cut_s = time.perf_counter() - t0
    # Nothing was kept: all of it again.
    with connect(addr) as s:
        s.sendall(head)
        sent += send_body(s, args.file, 0, size, None, args.rate_mb * 1e6)
        status, h, body = read_reply(s)
        check(status, h, body, 200, "POST /upload")
    elapsed = time.perf_counter() - t0
    reply = body.decode().strip()
    extra = f"cut_after={cut} cut_s={cut_s:.2f}" if cut is not None else ""
    summary(f"reply={reply.replace(' ', '')}", size, sent, elapsed, extra, probe)


def summary(first, size, sent, elapsed, extra, probe):
    """Prints the one `summary:` line of an upload (the probe stopped and reported)."""
    words = [
        "summary:", first, f"size={size}", f"sent={sent}", f"twice={sent - size}",
        f"elapsed_s={elapsed:.2f}", f"mb_per_s={size / elapsed / 1e6:.1f}", extra,
        probe.stop() if probe else "",
    ]
    print(" ".join(w for w in words if w))


def cmd_get(args):
    h = hashlib.sha256()
    n = 0
    with connect(parse_addr(args.addr)) as s:
        s.sendall(f"GET {args.path} HTTP/1.1\r\nHost: demo\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = s.recv(1 << 16)
            if not data:
                raise HttpError("closed before the reply's head")
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        if status != 200:
            raise HttpError(f"GET {args.path}: {status}")
        length = int(next(v for k, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
                          if k.strip().lower() == b"content-length"))
        # The body is hashed as it arrives, never held whole.
        while True:
            h.update(rest)
            n += len(rest)
            if n >= length:
                break
            rest = s.recv(1 << 20)
            if not rest:
                raise HttpError(f"GET {args.path}: closed after {n} of {length} bytes")
    print(f"bytes={n} sha256={h.hexdigest()}")


def cmd_delete(args):
    with connect(parse_addr(args.addr)) as s:
        check(*request(s, "DELETE", args.path, TUS), 204, f"DELETE {args.path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("make")
    c.add_argument("file")
    c.add_argument("bytes", type=int)
    for name in ("tus", "plain"):
        c = sub.add_parser(name)
        c.add_argument("addr")
        c.add_argument("file")
        c.add_argument("--cut-at", type=float)
        c.add_argument("--probe-ms", type=float, default=0)
        c.add_argument("--rate-mb", type=float, default=0)
    c = sub.add_parser("get")
    c.add_argument("addr")
    c.add_argument("path")
    c = sub.add_parser("delete")
    c.add_argument("addr")
    c.add_argument("path")
    args = p.parse_args()
    try:
        sys.exit(globals()["cmd_" + args.cmd](args) or 0)
    except (OSError, HttpError) as e:
        print(f"tus.py {args.cmd}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
