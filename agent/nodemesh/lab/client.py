"""A measuring client for the lab: makes connections or sends datagrams and reports JSON.

    python -m nodemesh.lab.client tcp --target 198.19.7.10:80 --count 300
    python -m nodemesh.lab.client udp --target 198.19.7.10:53 --count 100 [--connected]

Output: {"ok": n, "failed": n, "backends": {"b1": n, ...}, "errors": {"ECONNREFUSED": n},
         "peer_mismatch": n, "source_mismatch": n, "seconds": s}
`peer_mismatch` counts TCP/connected-UDP sockets whose getpeername() was not the target;
`source_mismatch` counts UDP replies whose source address was not the target.
Every loop is bounded: by --count and by --max-seconds (default 60). With --stop-file the
client runs until that file exists (still within --max-seconds): load during a change.
"""
from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import socket
import sys
import threading
import time


def _target(text: str):
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


def _same(peer, target) -> bool:
    host, port = peer[0], peer[1]
    try:
        a = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        b = socket.inet_pton(socket.AF_INET6 if ":" in target[0] else socket.AF_INET, target[0])
    except OSError:
        return False
    return a == b and port == target[1]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.failed = 0
        self.backends = collections.Counter()
        self.errors = collections.Counter()
        self.peer_mismatch = 0
        self.source_mismatch = 0

    def success(self, name: str):
        with self.lock:
            self.ok += 1
            self.backends[name] += 1

    def failure(self, err: BaseException):
        code = getattr(err, "errno", None)
        name = errno.errorcode.get(code, type(err).__name__) if code else type(err).__name__
        with self.lock:
            self.failed += 1
            self.errors[name] += 1


def tcp_once(family, target, timeout: float, tally: Tally, path: str = "/") -> None:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(target)
        if not _same(s.getpeername(), target):
            with tally.lock:
                tally.peer_mismatch += 1
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: nodemesh\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
            raise OSError(errno.EPROTO, f"bad response {head[:40]!r}")
        tally.success(body.decode().strip() or "?")
    except OSError as e:
        tally.failure(e)
    finally:
        s.close()


def udp_once(family, target, timeout: float, connected: bool, tally: Tally,
             sock=None) -> None:
    s = sock or socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        if connected and sock is None:
            s.connect(target)
            if not _same(s.getpeername(), target):
                with tally.lock:
                    tally.peer_mismatch += 1
        if connected:
            s.send(b"ping")
        else:
            s.sendto(b"ping", target)
        data, source = s.recvfrom(65535)
        if not _same(source, target):
            with tally.lock:
                tally.source_mismatch += 1
        tally.success(data.decode().strip() or "?")
    except OSError as e:
        tally.failure(e)
    finally:
        if sock is None:
            s.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="lab client")
    ap.add_argument("mode", choices=["tcp", "udp"])
    ap.add_argument("--target", required=True, metavar="ADDR:PORT")
    ap.add_argument("--count", type=int, default=100, help="operations at most")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=2.0, help="per operation, seconds")
    ap.add_argument("--connected", action="store_true", help="UDP: connect() first")
    ap.add_argument("--reuse-socket", action="store_true",
                    help="UDP: one socket for all datagrams (a long-lived client)")
    ap.add_argument("--interval", type=float, default=0.0, help="pause between operations")
    ap.add_argument("--path", default="/", help="TCP: the HTTP path to GET (its body names "
                    "the backend)")
    ap.add_argument("--stop-file", help="run until this file exists (bounded by --max-seconds)")
    ap.add_argument("--max-seconds", type=float, default=60.0)
    args = ap.parse_args(argv)

    family, target = _target(args.target)
    tally = Tally()
    started = time.monotonic()
    deadline = started + args.max_seconds
    issued = [0]
    lock = threading.Lock()
    shared = None
    if args.mode == "udp" and args.reuse_socket:
        shared = socket.socket(family, socket.SOCK_DGRAM)
        if args.connected:
            shared.connect(target)

    def more() -> bool:
        if time.monotonic() >= deadline:
            return False
        if args.stop_file and os.path.exists(args.stop_file):
            return False
        with lock:
            if issued[0] >= args.count:
                return False
            issued[0] += 1
            return True

    def worker():
        while more():
            if args.mode == "tcp":
                tcp_once(family, target, args.timeout, tally, args.path)
            else:
                udp_once(family, target, args.timeout, args.connected, tally, shared)
            if args.interval:
                time.sleep(args.interval)

    threads = [threading.Thread(target=worker) for _ in range(max(1, args.concurrency))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    json.dump({"ok": tally.ok, "failed": tally.failed, "backends": dict(tally.backends),
               "errors": dict(tally.errors), "peer_mismatch": tally.peer_mismatch,
               "source_mismatch": tally.source_mismatch,
               "seconds": round(time.monotonic() - started, 3)}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
