"""Byte-exact TCP workloads over loopback, run inside the hooked cgroup so that both ends of
every connection are local sockets the accelerator may join (tests/datapath/test_accel.py).

    python tests/accel_check.py SCENARIO [--pause-file F]

Prints one JSON object: {"ok": bool, "bytes": n, ...details}. With --pause-file, the
`leave` scenario prints "midway" after the first half and waits for F to exist before
sending the rest (the test changes the datapath in between). Every loop is bounded, and every
socket has a timeout, so a datapath bug shows up as a failure, not a hang.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import socket
import sys
import threading
import time

TIMEOUT = 20.0
MB = 1 << 20


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(512)
    return s, s.getsockname()


def pair():
    """A connected (client, server) pair over 127.0.0.1."""
    ls, addr = listener()
    c = socket.create_connection(addr, timeout=TIMEOUT)
    srv, _ = ls.accept()
    srv.settimeout(TIMEOUT)
    ls.close()
    return c, srv


def recv_exact(s, n: int) -> bytes:
    """n bytes, or fewer at EOF or after TIMEOUT without data (what arrived is the result)."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = s.recv(min(n - len(buf), MB))
        except socket.timeout:
            break
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_all(s) -> bytes:
    buf = bytearray()
    while True:
        chunk = s.recv(MB)
        if not chunk:
            return bytes(buf)
        buf += chunk


def send_blocks(s, data: bytes, block: int) -> None:
    for i in range(0, len(data), block):
        s.sendall(data[i:i + block])


def threaded(fn, *args):
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # reported, never lost in a thread
            out["error"] = repr(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# -- scenarios ------------------------------------------------------------------------------

def sha_both_ways(size: int = 64 * MB) -> dict:
    """size bytes each way at once, SHA-256 compared on both sides."""
    c, srv = pair()
    up, down = pattern(1, size), pattern(2, size)
    t1, o1 = threaded(lambda: (send_blocks(c, up, 256 * 1024), c.shutdown(socket.SHUT_WR)))
    t2, o2 = threaded(lambda: (send_blocks(srv, down, 256 * 1024),
                               srv.shutdown(socket.SHUT_WR)))
    t3, got_up = threaded(recv_all, srv)
    got_down = recv_all(c)
    for t in (t1, t2, t3):
        t.join(TIMEOUT)
    c.close()
    srv.close()
    errors = [o.get("error") for o in (o1, o2, got_up) if o.get("error")]
    ok = (not errors and hashlib.sha256(got_up.get("value", b"")).digest()
          == hashlib.sha256(up).digest() and hashlib.sha256(got_down).digest()
          == hashlib.sha256(down).digest())
    return {"ok": ok, "bytes": 2 * size, "errors": errors,
            "received": [len(got_up.get("value", b"")), len(got_down)]}


def request_response(n: int = 2000) -> dict:
    """n small requests on one connection, each answered before the next is sent."""
    c, srv = pair()
    rng = random.Random(3)

    def server():
        for _ in range(n):
            head = recv_exact(srv, 4)
            size = int.from_bytes(head, "big")
            body = recv_exact(srv, size)
            reply = hashlib.sha256(body).digest() + body[::-1]
            srv.sendall(len(reply).to_bytes(4, "big") + reply)
    t, out = threaded(server)
    bad = 0
    total = 0
    for _ in range(n):
        body = rng.randbytes(rng.randint(1, 512))
        c.sendall(len(body).to_bytes(4, "big") + body)
        size = int.from_bytes(recv_exact(c, 4), "big")
        reply = recv_exact(c, size)
        total += len(body) + len(reply) + 8
        if reply != hashlib.sha256(body).digest() + body[::-1]:
            bad += 1
    t.join(TIMEOUT)
    c.close()
    srv.close()
    return {"ok": bad == 0 and "error" not in out, "bytes": total, "bad": bad,
            "error": out.get("error")}


def concurrent_churn(conns: int = 200, rounds: int = 3) -> dict:
    """conns connections open at once, each echoing a random payload; then all are closed and
    opened again, rounds times."""
    async def main():
        bad = 0
        total = 0

        async def echo(reader, writer):
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()
        server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]

        async def client(i, r):
            payload = pattern(1000 * r + i, 1 + (i * 7919) % (256 * 1024))
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            got = await reader.read(-1)
            writer.close()
            return payload == got, 2 * len(payload)
        for r in range(rounds):
            results = await asyncio.wait_for(
                asyncio.gather(*(client(i, r) for i in range(conns))), TIMEOUT)
            bad += sum(1 for ok, _ in results if not ok)
            total += sum(n for _, n in results)
        server.close()
        await server.wait_closed()
        return bad, total
    bad, total = asyncio.run(main())
    return {"ok": bad == 0, "bytes": total, "bad": bad, "connections": conns * rounds}


def half_close() -> dict:
    """The client sends and shuts down its write side; the server keeps sending 8 MB after
    it saw EOF, and the client still reads all of it."""
    c, srv = pair()
    req, resp = pattern(4, 3 * MB + 17), pattern(5, 8 * MB + 3)

    def server():
        got = recv_all(srv)  # until the client's FIN
        send_blocks(srv, resp, 65536)
        srv.shutdown(socket.SHUT_WR)
        return got
    t, out = threaded(server)
    send_blocks(c, req, 100_000)
    c.shutdown(socket.SHUT_WR)
    got = recv_all(c)
    t.join(TIMEOUT)
    c.close()
    srv.close()
    ok = out.get("value") == req and got == resp
    return {"ok": ok, "bytes": len(req) + len(resp), "error": out.get("error"),
            "received": [len(out.get("value") or b""), len(got)]}


SIZES = (1, 2, 3, 7, 64, 1000, 1460, 4096, 16384, 65535, 65536, 100_000, 262_144, MB)


def write_sizes() -> dict:
    """One write of each size from 1 B to 1 MB, read back exactly, in both directions."""
    c, srv = pair()
    bad = []
    total = 0
    for i, size in enumerate(SIZES):
        for j, (a, b) in enumerate(((c, srv), (srv, c))):
            data = pattern(100 + 2 * i + j, size)
            t, out = threaded(recv_exact, b, size)
            a.sendall(data)
            t.join(TIMEOUT)
            total += size
            if out.get("value") != data:
                bad.append(size)
    c.close()
    srv.close()
    return {"ok": not bad, "bytes": total, "bad_sizes": bad}


def peer_closes_mid_stream() -> dict:
    """The server reads 1 MB of an endless stream, then closes: the client's writes fail
    (EPIPE/ECONNRESET) instead of hanging, and what the server read is the exact prefix.
    Then the other way: the server sends 2.5 MB and closes; the client reads exactly that."""
    c, srv = pair()
    stream = pattern(6, 16 * MB)
    t, out = threaded(recv_exact, srv, MB)
    err = None
    try:
        for i in range(0, len(stream), 65536):
            c.sendall(stream[i:i + 65536])
            if i == 2 * MB:
                t.join(TIMEOUT)
                srv.close()
    except OSError as e:
        err = e.errno
    t.join(TIMEOUT)
    c.close()
    first = out.get("value") == stream[:MB] and err is not None
    c2, srv2 = pair()
    data = pattern(7, 5 * MB // 2)
    t2, out2 = threaded(lambda: (srv2.sendall(data), srv2.close()))
    got = recv_all(c2)
    t2.join(TIMEOUT)
    c2.close()
    second = got == data
    return {"ok": first and second, "bytes": MB + len(data), "write_error": err,
            "first": first, "second": second}


def recv_slowly(s, n: int) -> bytes:
    """Like recv_exact, but a reader that keeps up at about 32 MB/s (64 KB per 2 ms): the
    receive queue holds unread bytes whenever the sender is ahead."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = s.recv(min(n - len(buf), 65536))
        except socket.timeout:
            break
        if not chunk:
            break
        before = len(buf)
        buf += chunk
        if len(buf) // 65536 != before // 65536:
            time.sleep(0.002)
    return bytes(buf)


def leave_mid_stream(pause_file: str) -> dict:
    """32 MB each way to readers that lag behind; after the first half is sent, print
    "midway" and wait for pause_file (meanwhile the test takes the sockets out of the
    sockhash, or removes the datapath) before sending the rest."""
    c, srv = pair()
    for s in (c, srv):
        s.settimeout(3.0)  # a lost byte shows as a short read after 3 s without data
    up, down = pattern(8, 32 * MB), pattern(9, 32 * MB)
    half = len(up) // 2
    t1, got_up = threaded(recv_slowly, srv, len(up))
    t2, got_down = threaded(recv_slowly, c, len(down))
    t3, _ = threaded(send_blocks, srv, down[:half], 65536)
    send_blocks(c, up[:half], 65536)
    t3.join(TIMEOUT)
    print("midway", flush=True)
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(pause_file) and time.monotonic() < deadline:
        time.sleep(0.02)
    send_blocks(c, up[half:], 65536)
    send_blocks(srv, down[half:], 65536)
    t1.join(TIMEOUT)
    t2.join(TIMEOUT)
    c.close()
    srv.close()
    ok = got_up.get("value") == up and got_down.get("value") == down

    def first_difference(got, want):
        got = got or b""
        return next((i for i in range(0, min(len(got), len(want)), 4096)
                     if got[i:i + 4096] != want[i:i + 4096]), None)
    return {"ok": ok, "bytes": 2 * len(up),
            "first_difference": [first_difference(got_up.get("value"), up),
                                 first_difference(got_down.get("value"), down)],
            "received": [len(got_up.get("value") or b""), len(got_down.get("value") or b"")]}


SCENARIOS = {"sha": sha_both_ways, "reqresp": request_response, "churn": concurrent_churn,
             "halfclose": half_close, "sizes": write_sizes, "peerclose": peer_closes_mid_stream}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=[*SCENARIOS, "leave"])
    ap.add_argument("--pause-file")
    args = ap.parse_args()
    started = time.monotonic()
    if args.scenario == "leave":
        result = leave_mid_stream(args.pause_file)
    else:
        result = SCENARIOS[args.scenario]()
    result["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
