"""A backend for the lab: answers TCP with an HTTP response naming itself, UDP likewise.

    python -m nodemesh.lab.server --name b1 --tcp 198.18.7.11:8080 --udp 198.18.7.11:5353

Prints "ready" once every socket listens. TCP: reads the request head (or waits up to 1 s),
answers `HTTP/1.1 200` with body "<name>\n" and closes, so curl, wrk and the lab client all
work. With --hold, keeps the connection open and answers every line with the name (long-lived
connections for tests). UDP: answers each datagram with "<name>" from the address it came to.
"""
from __future__ import annotations

import argparse
import socket
import sys
import threading


def _split(hostport: str):
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, host, int(port)


def serve_tcp(sock: socket.socket, body: bytes, hold: bool) -> None:
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(body), body))

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1.0 if not hold else 60.0)
            try:
                if hold:
                    f = conn.makefile("rb")
                    for _ in f:
                        conn.sendall(body)
                    return
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(response)
            except OSError:
                pass

    while True:
        conn, _ = sock.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def serve_udp(sock: socket.socket, body: bytes) -> None:
    while True:
        _, peer = sock.recvfrom(65535)
        try:
            sock.sendto(body, peer)
        except OSError:
            pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--tcp", action="append", default=[], metavar="ADDR:PORT")
    ap.add_argument("--udp", action="append", default=[], metavar="ADDR:PORT")
    ap.add_argument("--hold", action="store_true", help="keep TCP connections open")
    args = ap.parse_args(argv)
    body = args.name.encode()
    threads = []
    for spec in args.tcp:
        family, host, port = _split(spec)
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(1024)
        threads.append(threading.Thread(target=serve_tcp, args=(s, body + b"\n", args.hold),
                                        daemon=True))
    for spec in args.udp:
        family, host, port = _split(spec)
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((host, port))
        threads.append(threading.Thread(target=serve_udp, args=(s, body), daemon=True))
    for t in threads:
        t.start()
    print("ready", flush=True)
    sys.stdout.close()
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
