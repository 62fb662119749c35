#!/usr/bin/env python3
"""Clients for the commit demo's second half: this workspace's servers, whose POST /messages
answers 201 {"seq": N} once the message is in the journal (--commit sync: fdatasync()ed;
async: write()n). Python 3 standard library only; HTTP from tcp.py.

    journal.py crash-load ADDR --pgid G --clients N --crash-after A-B --out FILE
                          N keep-alive connections POST messages one at a time, each body
                          "c<client> m<n>", recording the seq of every 201; at a random moment
                          between A and B seconds, the server's process group G is SIGKILLed
    journal.py check ADDR FILE
                          after the restart: reads every message back; which acknowledged ones
                          survived, and which present ones were never acknowledged

ADDR is HOST:PORT.
"""

import argparse
import json
import os
import random
import signal
import socket
import sys
import threading
import time

# No __pycache__ beside the scripts for importing tcp.py.
sys.dont_write_bytecode = True
from tcp import parse_addr, read_response, request  # noqa: E402


def post(sock, body):
    head = f"POST /messages HTTP/1.1\r\nHost: demo\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return read_response(sock)


def group_pids(pgid):
    """Every process in process group pgid."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after the last ')' don't.
        if int(stat.rpartition(")")[2].split()[2]) == pgid:
            pids.append(int(entry))
    return pids


def journal_stats(addr):
    """(head, durable) from /stats."""
    status, body = request(addr, "/stats", timeout=5)
    if status != 200:
        raise RuntimeError(f"/stats answered {status}")
    journal = json.loads(body)["journal"]
    return journal["head"], journal["durable"]


def cmd_crash_load(args):
    addr = parse_addr(args.addr)
    lo, _, hi = args.crash_after.partition("-")
    crash_at = random.uniform(float(lo), float(hi or lo))
    lock = threading.Lock()
    acked = {}  # seq -> body, every 201 a client read
    sent = []  # every body sent, acknowledged or not
    errors = []
    killed = threading.Event()

    def client(i):
        try:
            sock = socket.create_connection(addr, timeout=10)
        except OSError as e:
            errors.append(f"client {i}: connect: {e}")
            return
        n = 0
        while not killed.is_set():
            n += 1
            body = f"c{i} m{n}".encode()
            with lock:
                sent.append(body.decode())
            try:
                status, reply = post(sock, body)
            except (OSError, ConnectionError):
                # The kill closed the connection: this message's fate is for check to tell.
                break
            if status != 201:
                errors.append(f"client {i}: POST answered {status}: {reply[:200]!r}")
                break
            with lock:
                acked[json.loads(reply)["seq"]] = body.decode()
        sock.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(1, args.clients + 1)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(max(0.0, started + crash_at - time.monotonic()))
    # The moment: first what had been acknowledged, then where the journal stood (so that every
    # write acknowledged in sync mode is at or below `durable`), then the whole process group
    # killed in one kill(2).
    with lock:
        acked_at_sample = list(acked)
    head, durable = journal_stats(addr)
    pids = group_pids(args.pgid)
    os.killpg(args.pgid, signal.SIGKILL)
    elapsed = time.monotonic() - started
    killed.set()
    for t in threads:
        t.join(10)
    if errors:
        sys.exit("; ".join(errors))
    total = len(acked)
    # Acknowledged a moment before the kill, not yet fdatasync()ed: what a power cut or a
    # kernel crash at that moment would have lost (a kill -9 cannot: it is in the page cache).
    unsynced = sum(1 for s in acked_at_sample if s > durable)
    with open(args.out, "w") as f:
        json.dump(dict(acked=acked, sent=sent, seconds=elapsed), f)
    print(
        f"summary: seconds={elapsed:.2f} acked={total} rate={total / elapsed:.0f} "
        f"killed={len(pids)} head={head} durable={durable} unsynced_acked={unsynced}"
    )


def cmd_check(args):
    addr = parse_addr(args.addr)
    with open(args.file) as f:
        load = json.load(f)
    present = {}  # seq -> body
    after = 0
    with socket.create_connection(addr, timeout=10) as sock:
        while True:
            head = f"GET /messages?after={after}&limit=1000 HTTP/1.1\r\nHost: demo\r\n\r\n"
            sock.sendall(head.encode())
            status, body = read_response(sock)
            if status != 200:
                sys.exit(f"GET /messages answered {status}: {body[:200]!r}")
            messages = json.loads(body)["messages"]
            if not messages:
                break
            for m in messages:
                present[m["seq"]] = m["body"]
                after = m["seq"]
    lost = sum(1 for seq, body in load["acked"].items() if present.get(int(seq)) != body)
    sent = set(load["sent"])
    bodies = list(present.values())
    if len(set(bodies)) != len(bodies):
        sys.exit("a message is in the journal twice")
    strange = [b for b in bodies if b not in sent]
    if strange:
        sys.exit(f"messages nobody sent: {strange[:5]}")
    acked_bodies = set(load["acked"].values())
    unacked = sum(1 for b in bodies if b not in acked_bodies)
    print(f"summary: acked={len(load['acked'])} present={len(present)} lost={lost} unacked_present={unacked}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("crash-load")
    s.add_argument("addr")
    s.add_argument("--pgid", type=int, required=True)
    s.add_argument("--clients", type=int, default=4)
    s.add_argument("--crash-after", default="1-2")
    s.add_argument("--out", required=True)
    s = sub.add_parser("check")
    s.add_argument("addr")
    s.add_argument("file")
    args = p.parse_args()
    {"crash-load": cmd_crash_load, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    main()
