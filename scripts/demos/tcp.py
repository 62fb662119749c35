#!/usr/bin/env python3
"""Socket helpers for scripts/demo.sh: clients that misbehave on purpose, raw SYNs, and small
readers of /stats and JSON. Python 3 standard library only.

    tcp.py clients ADDR N [--timeout S]     N clients connect at once; each one's connect time
    tcp.py conns ADDR N [--gap-ms G]        N short connections one after another, GET / each
    tcp.py spread ADDR N [--gap-ms G] --field F...
                                            `conns`, and per worker the change in /stats field F
    tcp.py nagle ADDR N [--nodelay 0|1] [--path P] [--split]
                                            N keep-alive requests; latency per request
    tcp.py noread ADDR --conns C --body-kib K --requests R --hold S
                                            pipelined POST /echo, never reading a reply
    tcp.py synflood IP:PORT --count N --src-net A.B.C
                                            raw SYNs from spoofed sources, never ACKed
    tcp.py overflow IP:PORT --iface IF --src-net A.B.C
                                            raw handshakes that overflow a paused accept queue
    tcp.py get ADDR PATH [--method M]       one request; prints the body
    tcp.py stats ADDR FIELD                 FIELD of each /stats worker, space-separated
    tcp.py json FILE KEY[.KEY...]           a value from a JSON document
    tcp.py check-snapshot FILE              a single-thread snapshot: pages per generation

ADDR is HOST:PORT. Raw sockets (synflood, overflow) need root (CAP_NET_RAW).
"""

import argparse
import json
import os
import random
import socket
import statistics
import struct
import sys
import threading
import time


def parse_addr(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------- HTTP, minimally


def read_response(sock, head_only=False):
    """Reads one HTTP/1.1 reply (Content-Length or chunked). Returns (status, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the reply's head")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if head_only:
        return status, rest
    if b"content-length" in headers:
        n = int(headers[b"content-length"])
        while len(rest) < n:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed mid-body")
            rest += data
        return status, rest[:n]
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed mid-body")
            rest += data
        return status, dechunk(rest)
    while True:
        data = sock.recv(65536)
        if not data:
            return status, rest
        rest += data


def dechunk(data):
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out += data[:size]
        data = data[size + 2 :]


def request(addr, path, method="GET", body=b"", timeout=10):
    with socket.create_connection(addr, timeout=timeout) as s:
        head = f"{method} {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n"
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
        s.sendall(head.encode() + b"\r\n" + body)
        return read_response(s)


def cmd_get(args):
    status, body = request(parse_addr(args.addr), args.path, args.method)
    sys.stdout.write(body.decode(errors="replace"))
    if not body.endswith(b"\n"):
        print()
    return 0 if status < 400 else 1


def cmd_stats(args):
    _, body = request(parse_addr(args.addr), "/stats")
    stats = json.loads(body)
    print(" ".join(str(w.get(args.field, "-")) for w in stats["workers"]))


def cmd_json(args):
    with open(args.file) as f:
        value = json.load(f)
    for key in args.path.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key]
    print(value)


# ---------------------------------------------------------------- ordinary clients


def cmd_clients(args):
    """N clients connect at the same moment, then each sends GET / and reads the reply."""
    addr = parse_addr(args.addr)
    barrier = threading.Barrier(args.n)
    results = [None] * args.n

    def client(i):
        barrier.wait()
        start = time.perf_counter()
        ms = lambda: (time.perf_counter() - start) * 1000  # noqa: E731
        s = socket.socket()
        s.settimeout(args.timeout)
        try:
            s.connect(addr)
            connected = ms()
            s.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
            status, _ = read_response(s)
            results[i] = (connected, ms(), f"HTTP {status}")
        except socket.timeout:
            results[i] = (None, ms(), "timed out")
        except ConnectionResetError:
            results[i] = (None, ms(), "connection reset by the server (RST)")
        except OSError as e:
            results[i] = (None, ms(), e.strerror or str(e))
        finally:
            s.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    order = sorted(range(args.n), key=lambda i: results[i][1])
    for rank, i in enumerate(order):
        connected, total, what = results[i]
        if connected is None:
            print(f"  client {rank + 1}: {what} after {total:.0f} ms")
        else:
            print(f"  client {rank + 1}: connected after {connected:.1f} ms, reply after {total:.1f} ms ({what})")
    ok = [r for r in results if r[0] is not None]
    print(
        f"summary: clients={args.n} connected={len(ok)} "
        f"fast={sum(1 for r in ok if r[0] < 200)} slow={sum(1 for r in ok if r[0] >= 200)} "
        f"failed={args.n - len(ok)} "
        f"reset={sum(1 for r in results if r[2].startswith('connection reset'))} "
        f"max_connect_ms={max((r[0] for r in ok), default=0):.0f} "
        f"min_slow_connect_ms={min((r[0] for r in ok if r[0] >= 200), default=0):.0f}"
    )


def cmd_conns(args):
    """N short connections one after another, one GET / each; the client closes first."""
    addr = parse_addr(args.addr)
    failed = 0
    start = time.perf_counter()
    for _ in range(args.n):
        try:
            with socket.create_connection(addr, timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n")
                status, _ = read_response(s)
                failed += status != 200
        except OSError:
            failed += 1
        if args.gap_ms:
            time.sleep(args.gap_ms / 1000)
    took = time.perf_counter() - start
    print(f"summary: connections={args.n} failed={failed} seconds={took:.2f}")
    return 1 if failed else 0


def cmd_spread(args):
    """`conns` with /stats read before and after on one keep-alive connection of its own, so
    that the difference per worker counts exactly the N connections: prints one line per
    field, the per-worker differences."""
    addr = parse_addr(args.addr)
    asker = socket.create_connection(addr, timeout=10)

    def stats():
        asker.sendall(b"GET /stats HTTP/1.1\r\nHost: demo\r\n\r\n")
        return json.loads(read_response(asker)[1])["workers"]

    # Wait until every worker thread has started (and so reports its context switches).
    deadline = time.monotonic() + 10
    before = stats()
    while not all("voluntary_csw" in w for w in before) and time.monotonic() < deadline:
        time.sleep(0.05)
        before = stats()
    if cmd_conns(args):
        return 1
    after = stats()
    for field in args.field:
        print(f"{field}: " + " ".join(str(a.get(field, 0) - b.get(field, 0)) for a, b in zip(after, before)))


def cmd_nagle(args):
    """N requests on one keep-alive connection; with --split the request leaves in two writes
    (the head's first line, then the rest), as a client that writes a header at a time does."""
    addr = parse_addr(args.addr)
    s = socket.create_connection(addr, timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, args.nodelay)
    first = f"GET {args.path} HTTP/1.1\r\n".encode()
    rest = b"Host: demo\r\n\r\n"
    times = []
    for _ in range(args.n):
        start = time.perf_counter()
        if args.split:
            s.send(first)
            s.send(rest)
        else:
            s.sendall(first + rest)
        status, body = read_response(s)
        times.append((time.perf_counter() - start) * 1000)
        if status != 200:
            print(f"unexpected reply: HTTP {status} {body!r}", file=sys.stderr)
            return 1
    s.close()
    times.sort()
    print(
        f"summary: requests={args.n} median_ms={statistics.median(times):.3f} "
        f"p90_ms={times[int(len(times) * 0.9) - 1]:.3f} min_ms={times[0]:.3f} max_ms={times[-1]:.3f}"
    )


def cmd_noread(args):
    """C connections each pipeline R requests `POST /echo` with a K KiB body and never read a
    reply. Writes until the socket will take no more for a second, reports, then holds on."""
    addr = parse_addr(args.addr)
    body = os.urandom(1024) * args.body_kib
    req = f"POST /echo HTTP/1.1\r\nHost: demo\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    payload = req * args.requests
    socks, sent = [], []
    for _ in range(args.conns):
        s = socket.create_connection(addr, timeout=10)
        if args.rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
        s.setblocking(False)
        socks.append(s)
        sent.append(0)
    last_progress = time.monotonic()
    while time.monotonic() - last_progress < 1.0:
        progress = False
        for i, s in enumerate(socks):
            if sent[i] == len(payload):
                continue
            try:
                n = s.send(payload[sent[i] : sent[i] + (1 << 20)])
                sent[i] += n
                progress = progress or n > 0
            except BlockingIOError:
                pass
        if progress:
            last_progress = time.monotonic()
        else:
            time.sleep(0.02)
    total = len(payload)
    print(
        f"summary: conns={args.conns} offered_kib={total // 1024} "
        f"sent_kib={min(sent) // 1024}..{max(sent) // 1024} "
        f"blocked={sum(1 for n in sent if n < total)}",
        flush=True,
    )
    time.sleep(args.hold)
    for s in socks:
        s.close()


# ---------------------------------------------------------------- raw TCP


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


SYN, RST, ACK = 0x02, 0x04, 0x10


def tcp_packet(src, dst, sport, dport, seq, ack, flags):
    """An IPv4 packet holding one TCP segment without data (MSS option on SYNs)."""
    options = struct.pack("!BBH", 2, 4, 1460) if flags & SYN else b""
    offset = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, 64240, 0, 0) + options
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    # The kernel fills in the IP checksum and total length (IP_HDRINCL).
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.randrange(65536), 0, 64, 6, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )
    return ip + tcp


def raw_sender():
    return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)


def spoofed(src_net, n):
    """n distinct (address, port) pairs in src_net.0/24, from a random port up: a repeated run
    must not meet the sockets an earlier run left behind."""
    base = random.randrange(10000, 60000 - n // 250)
    return [(f"{src_net}.{1 + i % 250}", base + i // 250) for i in range(n)]


def cmd_synflood(args):
    """SYNs from spoofed sources. Their SYN-ACKs go where nobody answers, so each SYN leaves a
    half-open connection (SYN-RECV) on the server until it gives up retransmitting."""
    host, port = parse_addr(args.dst)
    s = raw_sender()
    for src, sport in spoofed(args.src_net, args.count):
        s.sendto(tcp_packet(src, host, sport, port, random.randrange(1 << 32), 0, SYN), (host, 0))
    print(f"summary: syns={args.count}")


class Sniffer:
    """TCP segments from the server to the spoofed sources, seen on the client's interface
    (they are not addressed to the client, so only a packet socket sees them)."""

    def __init__(self, iface, server):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
        self.sock.bind((iface, 0))
        self.server = socket.inet_aton(server)

    def next(self, timeout):
        """(dst, dport, seq, ack, flags) of the next segment from the server, or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                pkt = self.sock.recv(65536)
            except socket.timeout:
                return None
            if len(pkt) < 40 or pkt[9] != 6 or pkt[12:16] != self.server:
                continue
            ihl = (pkt[0] & 0x0F) * 4
            sport, dport, seq, ack, _, flags = struct.unpack("!HHIIBB", pkt[ihl : ihl + 14])
            return socket.inet_ntoa(pkt[16:20]), dport, seq, ack, flags

    def wait_for(self, dst, timeout, want):
        start = time.monotonic()
        while (left := timeout - (time.monotonic() - start)) > 0:
            seg = self.next(left)
            if seg is None:
                return None, None
            if (seg[0], seg[1]) == dst and seg[4] & want:
                return seg, time.monotonic() - start
        return None, None


def cmd_overflow(args):
    """Against a server that is not accepting (stopped) with --backlog 2, whose accept queue
    so holds 3: fill it with 2 handshakes, send 2 more SYNs while there is room, then complete
    both. The first fills the queue; the second's ACK finds it full. What does the server do
    with that ACK? Drop it (and later resend its SYN-ACK), or, with tcp_abort_on_overflow=1,
    answer with a reset."""
    host, port = parse_addr(args.dst)
    sniff = Sniffer(args.iface, host)
    send = raw_sender()
    peers = spoofed(args.src_net, 4)
    isn = {}

    def syn(peer):
        isn[peer] = random.randrange(1 << 32)
        send.sendto(tcp_packet(peer[0], host, peer[1], port, isn[peer], 0, SYN), (host, 0))
        seg, _ = sniff.wait_for(peer, 1.0, SYN)
        if seg is None or not seg[4] & ACK:
            print(f"  {peer[0]}:{peer[1]}: SYN not answered (dropped)")
            return None
        return seg[2]

    def ack(peer, server_seq):
        send.sendto(tcp_packet(peer[0], host, peer[1], port, isn[peer] + 1, server_seq + 1, ACK), (host, 0))

    for n, peer in enumerate(peers[:2], 1):
        server_seq = syn(peer)
        if server_seq is None:
            return 1
        ack(peer, server_seq)
        print(f"  handshake {n}: SYN, SYN-ACK, ACK: queued for accept()")
    seqs = [syn(p) for p in peers[2:]]
    if None in seqs:
        return 1
    print("  handshakes 3 and 4: SYN, SYN-ACK (both fit: the queue is not full yet)")
    ack(peers[2], seqs[0])
    print("  handshake 3: ACK: queued; the accept queue is now full (3 = backlog + 1)")
    ack(peers[3], seqs[1])
    seg, after = sniff.wait_for(peers[3], args.watch, RST | SYN)
    if seg is None:
        print(f"  handshake 4: ACK: no answer in {args.watch:.1f} s (the server dropped it)")
        print("result: dropped")
    elif seg[4] & RST:
        print(f"  handshake 4: ACK: answered with RST after {after * 1000:.1f} ms")
        print("result: reset")
    else:
        print(
            f"  handshake 4: ACK: dropped; the server resent its SYN-ACK {after:.1f} s later, "
            "still waiting for room"
        )
        print("result: dropped")


# ---------------------------------------------------------------- snapshot files


def cmd_check_snapshot(args):
    """Each 4 KiB page holds one repeated 8-byte word, generation << 32 | page index."""
    generations, torn, misplaced, pages = {}, 0, 0, 0
    with open(args.file, "rb") as f:
        while page := f.read(4096):
            word = page[:8]
            if len(page) < 4096 or page != word * 512:
                torn += 1
            else:
                value = struct.unpack("<Q", word)[0]
                generations[value >> 32] = generations.get(value >> 32, 0) + 1
                misplaced += (value & 0xFFFFFFFF) != pages
            pages += 1
    spread = " ".join(f"{g}:{n}" for g, n in sorted(generations.items()))
    print(f"summary: pages={pages} torn={torn} misplaced={misplaced} generations={spread}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("clients")
    c.add_argument("addr")
    c.add_argument("n", type=int)
    c.add_argument("--timeout", type=float, default=10)
    c = sub.add_parser("conns")
    c.add_argument("addr")
    c.add_argument("n", type=int)
    c.add_argument("--gap-ms", type=float, default=0)
    c = sub.add_parser("spread")
    c.add_argument("addr")
    c.add_argument("n", type=int)
    c.add_argument("--gap-ms", type=float, default=0)
    c.add_argument("--field", action="append", default=[])
    c = sub.add_parser("nagle")
    c.add_argument("addr")
    c.add_argument("n", type=int)
    c.add_argument("--nodelay", type=int, default=1)
    c.add_argument("--path", default="/")
    c.add_argument("--split", action="store_true")
    c = sub.add_parser("noread")
    c.add_argument("addr")
    c.add_argument("--conns", type=int, default=1)
    c.add_argument("--body-kib", type=int, default=256)
    c.add_argument("--requests", type=int, default=32)
    c.add_argument("--rcvbuf", type=int, default=0)
    c.add_argument("--hold", type=float, default=5)
    c = sub.add_parser("synflood")
    c.add_argument("dst")
    c.add_argument("--count", type=int, default=100)
    c.add_argument("--src-net", default="10.78.0")
    c = sub.add_parser("overflow")
    c.add_argument("dst")
    c.add_argument("--iface", required=True)
    c.add_argument("--src-net", default="10.78.0")
    c.add_argument("--watch", type=float, default=1.5)
    c = sub.add_parser("get")
    c.add_argument("addr")
    c.add_argument("path")
    c.add_argument("--method", default="GET")
    c = sub.add_parser("stats")
    c.add_argument("addr")
    c.add_argument("field")
    c = sub.add_parser("json")
    c.add_argument("file")
    c.add_argument("path")
    c = sub.add_parser("check-snapshot")
    c.add_argument("file")
    args = p.parse_args()
    handler = globals()["cmd_" + args.cmd.replace("-", "_")]
    try:
        sys.exit(handler(args) or 0)
    except PermissionError as e:
        print(f"tcp.py {args.cmd}: {e} (raw sockets need root)", file=sys.stderr)
        sys.exit(77)


if __name__ == "__main__":
    main()
