"""A worker process that decodes and parses Kubernetes list pages, on the machine's other CPU.

    decoder = PageDecoder(on_crash=log_it)
    with decoder.session():                       # the child runs while a session is open
        pending = decoder.submit("service", body)  # None: decode in this process instead
        page = pending.result()                    # a DecodedPage, or DecoderCrashed

Why a process: a big first list (100,000 Services and as many EndpointSlices) is decoding
JSON and parsing it into the source's records, pure Python under one GIL. A child process
does that for the pages it is given (the same functions: parse_service, parse_slice) and
hands back a DecodedPage, pickled: the records (model.Service / Backend) unpickle in about a
quarter of the time it takes to decode and parse them. The source gives the child a page
only when it has fewer than two pages in hand and parses the others itself, so both CPUs
work and neither waits for the other.

Supervision: a child that dies, or does not answer within RESULT_TIMEOUT_SECONDS, is logged
and counted (on_crash), its pages fail with DecoderCrashed (the source parses them itself:
it still holds their text), and the next page starts a new child. After MAX_CRASHES the
decoder stops starting children and every page is parsed in the source's process. The child
lives only while a session is open (while lists run): an idle agent holds no second process.
"""
from __future__ import annotations

import collections
import fcntl
import gc
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Deque, Dict, Iterator, NamedTuple, Optional, Tuple, Union

log = logging.getLogger(__name__)

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; the fcntl module has it from 3.10
_HEADER = struct.Struct("<QB")  # page length, kind code
_LENGTH = struct.Struct("<Q")
KINDS = ("service", "endpointslice")


class Decoded(NamedTuple):
    """One list item, decoded and parsed: what _ClusterState.list_page needs of it."""
    key: Tuple[str, str]
    version: Union[int, str, None]
    parsed: Any  # ParsedService or None (service), ParsedSlice (endpointslice)


class DecodedPage(NamedTuple):
    """A list page as the worker hands it back."""
    metadata: Dict[str, Any]
    items: Tuple[Decoded, ...]
    skipped: Tuple[str, ...]
    invalid: Tuple[str, ...]


class DecoderCrashed(Exception):
    """The worker died or stopped answering before it returned this page."""


def decode_page(kind: str, body: bytes) -> DecodedPage:
    """What the worker does with one page; the same as the source does in its own process."""
    from .kubernetes import (
        Translation,
        _list_items,
        object_key,
        object_version,
        parse_service,
        parse_slice,
    )
    parse = parse_service if kind == "service" else parse_slice
    notes, fields = Translation(), {}  # type: ignore[var-annotated]
    items = tuple(Decoded(object_key(obj), object_version(obj), parse(obj, notes))
                  for obj in _list_items(body.decode("utf-8"), fields))
    metadata = fields.get("metadata")
    return DecodedPage(metadata if isinstance(metadata, dict) else {}, items,
                       tuple(notes.skipped), tuple(notes.invalid))


class _Pending:
    """A page given to the worker; its DecodedPage once the worker answers."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._page: Optional[DecodedPage] = None
        self._error: Optional[BaseException] = None

    def done(self) -> bool:
        return self._done.is_set()

    def _set(self, page: Optional[DecodedPage], error: Optional[BaseException]) -> None:
        self._page, self._error = page, error
        self._done.set()


class _Worker:
    """One child process, its feeding thread and its reading thread."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.pending: Deque[_Pending] = collections.deque()
        self.outbox: "collections.deque[Optional[bytes]]" = collections.deque()
        self.wakeup = threading.Condition()
        self.closing = False
        self.failed: Optional[str] = None


class PageDecoder:
    """The source's decoding worker (see the module docstring)."""

    MAX_CRASHES = 3
    RESULT_TIMEOUT_SECONDS = 60.0

    def __init__(self, on_crash: Callable[[str], None]) -> None:
        self._on_crash = on_crash
        self._lock = threading.Lock()
        self._worker: Optional[_Worker] = None
        self._sessions = 0
        self.crashes = 0

    @property
    def usable(self) -> bool:
        return self.crashes < self.MAX_CRASHES

    @contextmanager
    def session(self) -> Iterator["PageDecoder"]:
        with self._lock:
            self._sessions += 1
        try:
            yield self
        finally:
            with self._lock:
                self._sessions -= 1
                worker = self._worker if self._sessions == 0 else None
                if worker is not None:
                    self._worker = None
            if worker is not None:
                self._close(worker)

    def submit(self, kind: str, body: bytes) -> Optional[_Pending]:
        """Give the worker a page (it is queued, this does not block); None if there is no
        worker to give it to (too many crashes, or no child could be started)."""
        with self._lock:
            if not self.usable:
                return None
            worker = self._worker
            if worker is None or worker.failed:
                try:
                    worker = self._worker = self._start()
                except OSError as error:
                    self._crashed(f"cannot start the decoding worker: {error}")
                    return None
            pending = _Pending()
            with worker.wakeup:
                worker.pending.append(pending)
                worker.outbox.append(_HEADER.pack(len(body), KINDS.index(kind)) + body)
                worker.wakeup.notify()
        return pending

    def result(self, pending: _Pending) -> DecodedPage:
        """The page, once decoded; DecoderCrashed if the worker died or did not answer."""
        if not pending._done.wait(self.RESULT_TIMEOUT_SECONDS):
            with self._lock:
                worker = self._worker
            if worker is not None and pending in worker.pending:
                self._fail(worker, f"no answer in {self.RESULT_TIMEOUT_SECONDS:.0f} s")
                worker.process.kill()
            if not pending._done.wait(5):
                raise DecoderCrashed("the decoding worker did not answer")
        if pending._error is not None:
            raise pending._error
        assert pending._page is not None
        return pending._page

    def stop(self) -> None:
        """End the child now (the source stops); idempotent."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            self._close(worker)

    # -- the child
    def _start(self) -> _Worker:
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        process = subprocess.Popen(
            [sys.executable, "-m", "nodemesh.sources.kubernetes_decoder"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        for pipe in (process.stdin, process.stdout):
            _widen(pipe)
        worker = _Worker(process)
        for target, name in ((self._feed, "feed"), (self._read, "read")):
            threading.Thread(target=target, args=(worker,), daemon=True,
                             name=f"kubernetes-decoder-{name}").start()
        log.debug("kubernetes: decoding worker started (pid %d)", process.pid)
        return worker

    def _feed(self, worker: _Worker) -> None:
        """Write queued pages to the child; a write blocks while the child is busy."""
        stdin = worker.process.stdin
        assert stdin is not None
        try:
            while True:
                with worker.wakeup:
                    while not worker.outbox:
                        worker.wakeup.wait()
                    frame = worker.outbox.popleft()
                if frame is None:
                    break
                stdin.write(frame)
                stdin.flush()
        except (OSError, ValueError):
            pass  # the child is gone: the reading thread reports it
        finally:
            try:
                stdin.close()  # end of input: the child exits
            except (OSError, ValueError):
                pass

    def _read(self, worker: _Worker) -> None:
        """Read answers, in the order the pages went in; report the child's end."""
        stdout = worker.process.stdout
        assert stdout is not None
        why = None
        try:
            while True:
                head = stdout.read(_LENGTH.size)
                if len(head) < _LENGTH.size:
                    break
                blob = stdout.read(_LENGTH.unpack(head)[0])
                answer = pickle.loads(blob)
                with worker.wakeup:
                    pending = worker.pending.popleft() if worker.pending else None
                if pending is None:
                    why = "the decoding worker answered a page it was not given"
                    worker.process.kill()
                    break
                if isinstance(answer, DecodedPage):
                    pending._set(answer, None)
                else:  # the page itself could not be decoded: the source reports that
                    pending._set(None, ValueError(str(answer)))
        except Exception as error:  # noqa: BLE001 - a torn answer is a crash like any other
            why = f"unreadable answer from the decoding worker: {error}"
            worker.process.kill()
        code = worker.process.wait()
        with worker.wakeup:
            left = list(worker.pending)
            worker.pending.clear()
            closing = worker.closing
        if why is None and (left or not closing or code != 0):
            why = f"the decoding worker (pid {worker.process.pid}) exited with " + (
                f"signal {-code}" if code < 0 else f"status {code}") + (
                f" with {len(left)} page(s) in hand" if left else "")
        if why is not None:
            self._fail(worker, why)
        for pending in left:
            pending._set(None, DecoderCrashed(worker.failed or "the decoding worker ended"))

    def _fail(self, worker: _Worker, why: str) -> None:
        with self._lock:
            if worker.failed:
                return
            worker.failed = why
            if self._worker is worker:
                self._worker = None
            self._crashed(why)

    def _crashed(self, why: str) -> None:
        """Under the lock."""
        self.crashes += 1
        if not self.usable:
            why += f"; after {self.crashes} crashes, lists are decoded in the agent's process"
        try:
            self._on_crash(why)
        except Exception:  # noqa: BLE001 - reporting must not break the list
            log.exception("kubernetes: the decoder's on_crash raised")

    def _close(self, worker: _Worker) -> None:
        with worker.wakeup:
            worker.closing = True
            worker.outbox.append(None)
            worker.wakeup.notify()


PIPE_BYTES = 8 << 20  # two pages of 500 EndpointSlices fit, with room


def _widen(pipe: Any) -> None:
    """Make the pipe hold a page or two. With the default 64 KiB, a page of 1 MiB goes
    through in 16 writes, and after each one the writing thread waits for the GIL (up to the
    5 ms switch interval) while the source's thread parses: the worker starves. Root may go
    beyond /proc/sys/fs/pipe-max-size; others get at most that, or keep the default."""
    for size in (PIPE_BYTES, 1 << 20):
        try:
            fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, size)
            return
        except OSError:
            continue


def _pickle_by_constructor() -> None:
    """Pickle the model's dataclasses as a call of their constructor with their fields in
    order: unpickled in the agent, that costs a quarter of the default way for a slotted
    dataclass (dataclasses' __setstate__ calls fields() for every object). Only classes whose
    every field is an __init__ parameter; the others keep the default."""
    import copyreg
    import dataclasses

    from .. import model

    def reducer(names: Tuple[str, ...]) -> Callable[[Any], Tuple[Any, Tuple[Any, ...]]]:
        return lambda obj: (type(obj), tuple([getattr(obj, name) for name in names]))

    for value in vars(model).values():
        if isinstance(value, type) and dataclasses.is_dataclass(value):
            fields = dataclasses.fields(value)
            if all(f.init for f in fields):
                copyreg.pickle(value, reducer(tuple(f.name for f in fields)))


def main() -> None:
    """The child: frames in on stdin (length, kind, page), pickled answers out on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent's Ctrl-C is the agent's to handle
    gc.set_threshold(100_000, 50, 100)  # pages are trees of dicts: few cycles to look for
    from . import kubernetes  # noqa: F401 - imported once, before the first page
    _pickle_by_constructor()
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = source.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return
        size, kind = _HEADER.unpack(head)
        body = source.read(size)
        if len(body) < size:
            return
        answer: Union[DecodedPage, str]
        try:
            answer = decode_page(KINDS[kind], body)
        except Exception as error:  # noqa: BLE001 - handed back, raised in the source
            answer = f"{type(error).__name__}: {error}"
        del body
        blob = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        sink.write(_LENGTH.pack(len(blob)))
        sink.write(blob)
        sink.flush()


if __name__ == "__main__":
    # Run as -m, this file is __main__: take main() from the module proper, so that what it
    # pickles names nodemesh.sources.kubernetes_decoder's classes, which the agent can load.
    from nodemesh.sources.kubernetes_decoder import main as module_main
    module_main()
