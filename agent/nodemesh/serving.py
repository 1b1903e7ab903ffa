"""HTTP serving that idle and slow clients cannot exhaust: the metrics port and the admin socket.

One thread watches every connection with a selector and reads the request heads; only a
complete head takes one of a few worker threads. So an idle connection costs a descriptor and
no thread, and:
- a connection whose head is not complete HEAD_TIMEOUT seconds after accept is dropped;
- a response not written within REQUEST_TIMEOUT seconds of its first byte is abandoned (a
  client not reading). The time the handler takes to build the response is not counted: a
  scrape of 100,000 services on a loaded node takes seconds to render, and a deadline that
  started at the request cut such a body off after its first megabytes (the client saw an
  IncompleteRead);
- at most max_connections are open. One more displaces the oldest connection still sending its
  head, so clients holding idle connections cannot lock out a scrape; when every connection is
  being answered, the new one is closed. Both count in
  nodemesh_http_connections_rejected_total{server}.
"""
from __future__ import annotations

import collections
import errno
import io
import logging
import queue
import selectors
import socket
import threading
import time
import weakref
from http.server import BaseHTTPRequestHandler
from typing import Optional

from prometheus_client import CollectorRegistry, Counter

from . import threadname

log = logging.getLogger(__name__)

HEAD_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0
MAX_HEAD = 64 * 1024
WORKERS = 4
BACKLOG = socket.SOMAXCONN  # the kernel caps it at net.core.somaxconn
ACCEPT_PAUSE = 0.5  # out of descriptors: retrying at once would spin on the readable listener

_rejected: "weakref.WeakKeyDictionary[CollectorRegistry, Counter]" = weakref.WeakKeyDictionary()


def _rejected_counter(registry: CollectorRegistry, server: str):
    # Both servers count into the agent's one registry, which takes each name only once.
    if registry not in _rejected:
        _rejected[registry] = Counter(
            "nodemesh_http_connections_rejected",
            "Connections closed unanswered because the server had its maximum open",
            ["server"], registry=registry)
    return _rejected[registry].labels(server)


class Handler(BaseHTTPRequestHandler):
    """Answers one request whose head the event loop has read; request is (socket, head,
    seconds the response may take to write, from its first byte)."""

    def setup(self):
        self.connection, head, write_seconds = self.request
        self.rfile = io.BytesIO(head)
        self.wfile = _Writer(self.connection, write_seconds)


class _Writer(io.RawIOBase):
    def __init__(self, sock: socket.socket, write_seconds: float):
        self._sock, self._seconds = sock, write_seconds
        self._deadline: Optional[float] = None  # set by the first write

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        # The deadline starts with the response's first byte, after the handler built it, so
        # only the client's reading is timed. sendall's timeout bounds the whole call, so a
        # client reading a byte at a time is dropped at the deadline too.
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._seconds
        self._sock.settimeout(max(self._deadline - now, 0.001))
        self._sock.sendall(data)
        return len(data)


class _Head:
    __slots__ = ("data", "deadline", "addr")

    def __init__(self, addr, deadline: float):
        self.data, self.deadline, self.addr = bytearray(), deadline, addr


class Server:
    """Serves `handler` (a Handler subclass) on the listening socket `sock`."""

    def __init__(self, sock: socket.socket, handler, name: str, registry: CollectorRegistry,
                 max_connections: int):
        sock.setblocking(False)
        self.socket, self.name = sock, name
        self._handler, self._max = handler, max_connections
        self._head_timeout, self._request_timeout = HEAD_TIMEOUT, REQUEST_TIMEOUT
        self._rejected = _rejected_counter(registry, name)
        self._heads: "collections.OrderedDict[socket.socket, _Head]" = collections.OrderedDict()
        self._busy = 0  # connections handed to workers
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._loop = threadname.Thread(target=self._serve, name=name, daemon=True)
        self._workers = [threadname.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(WORKERS)]

    def start(self) -> None:
        for t in [self._loop, *self._workers]:
            t.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake_w.send(b"x")
        if self._loop.is_alive():
            self._loop.join(5)
        for _ in self._workers:
            self._jobs.put(None)
        for conn in list(self._heads):
            self._drop(conn)
        self._sel.close()
        self.socket.close()
        self._wake_r.close()
        self._wake_w.close()

    def _serve(self) -> None:
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._sel.register(self.socket, selectors.EVENT_READ)
        resume = None  # when to accept again after running out of descriptors
        while not self._stopping:
            now = time.monotonic()
            if resume is not None and now >= resume:
                self._sel.register(self.socket, selectors.EVENT_READ)
                resume = None
            while self._heads:
                conn, head = next(iter(self._heads.items()))
                if head.deadline > now:
                    break
                log.debug("%s: dropped a client that sent no request in %ss", self.name,
                          self._head_timeout)
                self._drop(conn)
            wake = [resume] if resume is not None else []
            if self._heads:
                wake.append(next(iter(self._heads.values())).deadline)
            for key, _ in self._sel.select(max(min(wake) - now, 0) if wake else None):
                if key.fileobj is self.socket:
                    if not self._accept():
                        self._sel.unregister(self.socket)
                        resume = time.monotonic() + ACCEPT_PAUSE
                elif key.fileobj is self._wake_r:
                    self._wake_r.recv(64)
                else:
                    self._read(key.fileobj)

    def _accept(self) -> bool:
        """Accepts what is queued; False when out of descriptors."""
        for _ in range(64):  # then read heads too, even under a flood of connects
            try:
                conn, addr = self.socket.accept()
            except BlockingIOError:
                return True
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    log.warning("%s: out of file descriptors; not accepting for %ss", self.name,
                                ACCEPT_PAUSE)
                    return False
                continue  # ECONNABORTED and the like: that client is gone
            with self._lock:
                full = len(self._heads) + self._busy >= self._max
            if full:
                self._rejected.inc()
                if not self._heads:
                    conn.close()
                    continue
                self._drop(next(iter(self._heads)))
            conn.setblocking(False)
            self._heads[conn] = _Head(addr, time.monotonic() + self._head_timeout)
            self._sel.register(conn, selectors.EVENT_READ)
        return True

    def _read(self, conn: socket.socket) -> None:
        head = self._heads.get(conn)
        if head is None:
            return  # dropped earlier in this round
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        start = max(len(head.data) - 2, 0)  # the blank line may straddle two reads
        head.data += data
        if head.data.find(b"\n\n", start) >= 0 or head.data.find(b"\n\r\n", start) >= 0:
            del self._heads[conn]
            self._sel.unregister(conn)
            with self._lock:
                self._busy += 1
            self._jobs.put((conn, bytes(head.data), head.addr))
        elif len(head.data) > MAX_HEAD:
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        del self._heads[conn]
        self._sel.unregister(conn)
        conn.close()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            conn, head, addr = job
            try:
                self._handler((conn, head, self._request_timeout), addr, self)
            except OSError as e:
                log.debug("%s: %s", self.name, e)  # the client went away
            except Exception:
                log.exception("%s: answering a request failed", self.name)
            finally:
                conn.close()
                with self._lock:
                    self._busy -= 1
