"""A client that holds TCP connections open, driven line by line on stdin (for root tests).

    open N     open N connections to --target, each says a line and reads the backend's name;
               prints one JSON list: {"ok": true, "backend": "b1"} or {"ok": false,
               "error": "ECONNREFUSED", "ms": 0.1}
    connect N  like open, without saying or reading anything (any server; "backend" is "")
    close K    closes the K oldest held connections; prints {"closed": K}
    refused H:P  a new socket connects to H:P, which must fail; the socket is kept unclosed as
               the spare; prints {"ok": false, "error": ...} (or {"ok": true} if it connected)
    again H:P  the spare connects again, now to H:P, says a line and reads the name, and is held
               on success; prints an open-style record
    sendto N   N unconnected UDP datagrams to --target; prints the open-style list (no reply
               is awaited: "ok" means sendto() succeeded)
    churn N    N connections one after another, each closed once the name is read; prints
               {"b1": n, ...}
    exit
Bounded: every socket has a 5 s timeout, and the process exits when stdin closes.
"""
import errno
import json
import socket
import struct
import sys
import time


def main() -> int:
    host, _, port = sys.argv[1].rpartition(":")
    held = []
    spare = None
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd in ("open", "connect"):
            out = []
            for _ in range(int(arg[0])):
                s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                s.settimeout(5)
                started = time.perf_counter()
                try:
                    s.connect((host.strip("[]"), int(port)))
                    name = ""
                    if cmd == "open":
                        s.sendall(b"x\n")
                        name = s.recv(64).decode().strip()
                    held.append(s)
                    out.append({"ok": True, "backend": name})
                except OSError as e:
                    ms = (time.perf_counter() - started) * 1000
                    s.close()
                    out.append({"ok": False, "ms": ms,
                                "error": errno.errorcode.get(e.errno or 0, type(e).__name__)})
            print(json.dumps(out), flush=True)
        elif cmd == "sendto":
            out = []
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                               socket.SOCK_DGRAM) as u:
                for _ in range(int(arg[0])):
                    started = time.perf_counter()
                    try:
                        u.sendto(b"x", (host.strip("[]"), int(port)))
                        out.append({"ok": True})
                    except OSError as e:
                        out.append({"ok": False, "ms": (time.perf_counter() - started) * 1000,
                                    "error": errno.errorcode.get(e.errno or 0, "?")})
            print(json.dumps(out), flush=True)
        elif cmd == "churn":
            seen: dict = {}
            for _ in range(int(arg[0])):
                with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                    s.settimeout(5)
                    s.connect((host.strip("[]"), int(port)))
                    s.sendall(b"x\n")
                    name = s.recv(64).decode().strip()
                    seen[name] = seen.get(name, 0) + 1
            print(json.dumps(seen), flush=True)
        elif cmd == "close":
            k = int(arg[0])
            for s in held[:k]:
                s.close()
            held = held[k:]
            print(json.dumps({"closed": k}), flush=True)
        elif cmd in ("refused", "again"):
            h, _, p = arg[0].rpartition(":")
            if cmd == "refused":
                if spare is not None:
                    spare.close()
                spare = socket.socket(socket.AF_INET6 if ":" in h else socket.AF_INET)
                # Blocking, bounded by the kernel: a failed blocking connect() leaves the
                # socket unconnected and ready to connect again (a non-blocking one leaves it
                # "connecting", and the next connect() only resets it with ECONNABORTED).
                bound = struct.pack("ll", 5, 0)
                spare.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
                spare.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
            try:
                spare.connect((h.strip("[]"), int(p)))
                rec = {"ok": True, "backend": ""}
                if cmd == "again":
                    spare.sendall(b"x\n")
                    rec["backend"] = spare.recv(64).decode().strip()
                    held.append(spare)
                    spare = None
            except OSError as e:
                rec = {"ok": False, "error": errno.errorcode.get(e.errno or 0, type(e).__name__)}
            print(json.dumps(rec), flush=True)
        elif cmd == "exit":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
