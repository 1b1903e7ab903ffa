"""A small transparent proxy, as a mesh sidecar would be: the tests' stand-in for Envoy.

    python tests/mesh_proxy.py --listen 127.0.0.1:15001 --listen [::1]:15001 --uid 1337

It accepts connections the datapath redirected to it, asks each for its original destination
with getsockopt(SO_ORIGINAL_DST) (IPv4) or getsockopt(IP6T_SO_ORIGINAL_DST) (IPv6), connects
there as --uid (whose connects are balanced, not redirected back), and relays bytes both ways
until both sides are done. One JSON line per connection on stdout: {"client", "original"} or
{"client", "error"}. Prints "ready" once it listens.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same number
_print_lock = threading.Lock()


def original_dst(conn: socket.socket):
    """(host, port) the client connected to before the redirect."""
    if conn.family == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, = struct.unpack("!H", raw[2:4])
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    port, = struct.unpack("!H", raw[2:4])
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)  # pass the half-close on
    except OSError:
        pass


def _say(record: dict) -> None:
    with _print_lock:
        print(json.dumps(record), flush=True)


def handle(conn: socket.socket, client) -> None:
    try:
        host, port = original_dst(conn)
    except OSError as e:
        _say({"client": list(client[:2]), "error": e.strerror})
        conn.close()
        return
    _say({"client": list(client[:2]), "original": [host, port]})
    try:
        up = socket.create_connection((host, port), timeout=5)
    except OSError:
        conn.close()
        return
    up.settimeout(None)
    t = threading.Thread(target=_pump, args=(up, conn), daemon=True)
    t.start()
    _pump(conn, up)
    t.join(timeout=30)
    conn.close()
    up.close()


def serve(lsock: socket.socket) -> None:
    while True:
        conn, client = lsock.accept()
        threading.Thread(target=handle, args=(conn, client), daemon=True).start()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", action="append", required=True)
    ap.add_argument("--uid", type=int)
    args = ap.parse_args()
    socks = []
    for text in args.listen:
        host, _, port = text.rpartition(":")
        host = host.strip("[]")
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
        s.listen(512)
        socks.append(s)
    if args.uid is not None:
        os.setgroups([])
        os.setgid(args.uid)
        os.setuid(args.uid)
    for s in socks[1:]:
        threading.Thread(target=serve, args=(s,), daemon=True).start()
    print("ready", flush=True)
    serve(socks[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
