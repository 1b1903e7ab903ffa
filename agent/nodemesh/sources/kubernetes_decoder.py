"""A worker process that decodes and parses Kubernetes list pages, on the machine's other CPU.

    decoder = PageDecoder(on_crash=log_it)
    with decoder.session():                       # the child runs while a session is open
        pending = decoder.submit("service", body)  # None: decode in this process instead
        page = pending.result()                    # a DecodedPage, or DecoderCrashed

Why a process: a big first list (100,000 Services and as many EndpointSlices) is decoding
JSON and parsing it into the source's records, pure Python under one GIL. A child process
does that for the pages it is given (the same functions: parse_service, parse_slice) and
hands back a DecodedPage, pickled: one row of plain values per item (no model objects, whose
unpickling is a Python call each), from which the agent's process builds each Service and
Backend once, in about a sixth of the time it takes to decode and parse them. The source
keeps at most two pages in the child. While it has nothing else to do (the slices list) it
parses the other pages itself, so both CPUs parse; while its process has the core's rounds
to run (the services list, streamed) it waits for the child's answers instead, and the
child parses every page.

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
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Deque, Dict, Iterator, NamedTuple, Optional, Tuple, Union

from .. import threadname

log = logging.getLogger(__name__)

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; the fcntl module has it from 3.10
_HEADER = struct.Struct("<QB")  # page length, kind code
_LENGTH = struct.Struct("<Q")
KINDS = ("service", "endpointslice")


class DecodedPage(NamedTuple):
    """A list page as the worker hands it back: one row of plain values per item
    (kubernetes.service_row / slice_row), which the agent's process unpickles without a
    Python call per object and turns into the source's records once (_ClusterState.list_page)."""
    metadata: Dict[str, Any]
    items: Tuple[Tuple[Any, ...], ...]
    skipped: Tuple[str, ...]
    invalid: Tuple[str, ...]


class DecoderCrashed(Exception):
    """The worker died or stopped answering before it returned this page."""


def decode_page(kind: str, body: bytes) -> DecodedPage:
    """What the worker does with one page: parsed as the source parses a page in its own
    process (_ClusterState.list_page: the same functions, so the same errors and notes),
    each item handed over as a row. The items are decoded one at a time, as in the source's
    process: with one json.loads a page instead, the worker took ~40 % more CPU at 100,000
    Services (bench/results/controlplane.md, "The decoding worker ... (branch wk8)")."""
    from .kubernetes import (
        Translation,
        _key_and_version,
        _list_items,
        _parse_service_at,
        _parse_slice_at,
        service_row,
        slice_row,
    )
    notes, fields = Translation(), {}  # type: ignore[var-annotated]
    items = []
    for obj in _list_items(body.decode("utf-8"), fields):
        key, version = _key_and_version(obj)
        items.append(service_row(key, version, _parse_service_at(obj, key[0], notes))
                     if kind == "service" else
                     slice_row(key, _parse_slice_at(obj, key, version, notes)))
    metadata = fields.get("metadata")
    return DecodedPage(metadata if isinstance(metadata, dict) else {}, tuple(items),
                       tuple(notes.skipped), tuple(notes.invalid))


class _Pending:
    """A page given to the worker; its DecodedPage once the worker answers."""

    def __init__(self, decoder: "PageDecoder", worker: "_Worker") -> None:
        self._decoder, self._worker = decoder, worker
        self._blob: Optional[bytes] = None
        self._error: Optional[BaseException] = None
        self._done = False

    def done(self) -> bool:
        """Whether the answer is in (reads what the worker has written, without waiting)."""
        if not self._done:
            self._decoder._pump(self._worker, wait=0.0)
        return self._done

    def _set(self, blob: Optional[bytes], error: Optional[BaseException]) -> None:
        self._blob, self._error, self._done = blob, error, True


class _Worker:
    """One child process, the pages it holds (oldest first) and its answers read so far."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.pending: Deque[_Pending] = collections.deque()
        self.received = bytearray()
        self.unsent = bytearray()  # what the pipe to the child could not take yet
        self.failed: Optional[str] = None


class PageDecoder:
    """The source's decoding worker (see the module docstring).

    No thread of its own: the thread that lists writes the pages and reads the answers
    (the pipes hold two pages and their answers, so neither side waits for the other). A
    thread that woke for each answer would take the GIL from the source's thread, and under
    load every such handoff waits for the OS to schedule the other thread."""

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
        """Give the worker a page; None if there is no worker to give it to (too many
        crashes, or no child could be started). Returns at once unless the pipe is full
        (a page bigger than the pipe)."""
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
        pending = _Pending(self, worker)
        worker.pending.append(pending)
        worker.unsent += _HEADER.pack(len(body), KINDS.index(kind))
        worker.unsent += body
        if not self._send(worker):  # the child is gone: reading its end says how
            self._pump(worker, wait=5.0, until=pending)
        return pending

    def result(self, pending: _Pending) -> DecodedPage:
        """The page, once decoded; DecoderCrashed if the worker died or did not answer."""
        worker = pending._worker
        if not pending._done:
            self._pump(worker, wait=self.RESULT_TIMEOUT_SECONDS, until=pending)
        if not pending._done:
            self._fail(worker, f"no answer in {self.RESULT_TIMEOUT_SECONDS:.0f} s")
            worker.process.kill()
            self._pump(worker, wait=5.0, until=pending)  # its end fails what it held
            if not pending._done:
                raise DecoderCrashed(str(worker.failed))
        if pending._error is not None:
            raise pending._error
        assert pending._blob is not None
        try:
            answer = pickle.loads(pending._blob)
        except Exception as error:  # noqa: BLE001 - a torn answer is a crash like any other
            self._fail(worker, f"unreadable answer from the decoding worker: {error}")
            worker.process.kill()
            self._reap(worker)
            raise DecoderCrashed(str(worker.failed)) from error
        if isinstance(answer, DecodedPage):
            return answer
        raise ValueError(str(answer))  # the page itself could not be decoded

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
        assert process.stdout is not None and process.stdin is not None
        os.set_blocking(process.stdout.fileno(), False)
        os.set_blocking(process.stdin.fileno(), False)
        log.debug("kubernetes: decoding worker started (pid %d)", process.pid)
        return _Worker(process)

    @staticmethod
    def _send(worker: _Worker) -> bool:
        """Write what the pipe takes now, without waiting (a page can be bigger than the
        pipe: the rest goes when the child has read some); False if the child is gone."""
        stdin = worker.process.stdin
        assert stdin is not None
        while worker.unsent:
            try:
                written = os.write(stdin.fileno(), worker.unsent)
            except BlockingIOError:
                return True
            except (OSError, ValueError):
                worker.unsent.clear()
                return False
            del worker.unsent[:written]
        return True

    def _pump(self, worker: _Worker, wait: float, until: Optional[_Pending] = None) -> None:
        """Read the answers the worker has written, waiting up to `wait` seconds for
        `until`'s (or for anything, without `until`); on the child's end, fail what it held."""
        stdout = worker.process.stdout
        assert stdout is not None
        fd = stdout.fileno()
        deadline = time.monotonic() + wait
        while worker.pending:
            if worker.unsent and not self._send(worker):
                worker.process.kill()  # it cannot take its pages: end it, and fail them
            try:
                chunk = os.read(fd, 1 << 22)
            except BlockingIOError:
                chunk = None
            except OSError:
                chunk = b""
            if chunk:
                worker.received += chunk
                self._answers(worker)
                continue
            if chunk == b"":  # end of the pipe: the child has ended
                self._ended(worker)
                return
            if until is None or until._done:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            stdin = worker.process.stdin
            select.select([fd], [stdin] if worker.unsent and stdin is not None else [], [],
                          remaining)

    @staticmethod
    def _answers(worker: _Worker) -> None:
        """Hand every complete answer received to its page, in order."""
        data, at = worker.received, 0
        while len(data) - at >= _LENGTH.size:
            size = _LENGTH.unpack_from(data, at)[0]
            if len(data) - at - _LENGTH.size < size:
                break
            if worker.pending:
                worker.pending.popleft()._set(
                    bytes(data[at + _LENGTH.size:at + _LENGTH.size + size]), None)
            at += _LENGTH.size + size
        del data[:at]

    def _ended(self, worker: _Worker) -> None:
        code = self._reap(worker)
        left = list(worker.pending)
        worker.pending.clear()
        why = f"the decoding worker (pid {worker.process.pid}) exited with " + (
            f"signal {-code}" if code is not None and code < 0 else f"status {code}") + (
            f" with {len(left)} page(s) in hand" if left else "")
        self._fail(worker, why)
        for pending in left:
            pending._set(None, DecoderCrashed(worker.failed or why))

    @staticmethod
    def _reap(worker: _Worker) -> Optional[int]:
        try:
            return worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

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

    @staticmethod
    def _close(worker: _Worker) -> None:
        """End of input: the child finishes what it holds (nobody waits for it) and exits;
        a thread reaps it, so that no zombie is left."""
        try:
            if worker.process.stdin is not None:
                worker.process.stdin.close()
        except (OSError, ValueError):
            pass
        if worker.pending:  # abandoned pages (the list failed): no need to finish them
            worker.process.kill()
        threadname.Thread(target=PageDecoder._reap_and_close, args=(worker,), daemon=True,
                         name="kubernetes-decoder-reap").start()

    @staticmethod
    def _reap_and_close(worker: _Worker) -> None:
        worker.process.wait()
        if worker.process.stdout is not None:
            worker.process.stdout.close()


PIPE_BYTES = 8 << 20  # two pages of 500 EndpointSlices (about 1 MiB each) and their answers


def _widen(pipe: Any) -> None:
    """Make the pipe hold a page or two, so that a page goes in a write or two instead of
    sixteen (64 KiB, the default). Beyond /proc/sys/fs/pipe-max-size (1 MiB by default) only
    with CAP_SYS_RESOURCE; else that size, or the default. Whatever the pipe does not take
    is written later (PageDecoder._send)."""
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
