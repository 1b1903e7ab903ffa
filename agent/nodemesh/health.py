"""Active health checks: is each backend answering on the port it serves?

One background thread runs one asyncio event loop; every target is a task on it, so a thousand
backends cost a thousand sockets in flight at worst, never a thousand threads. The loop, its
thread and asyncio itself (2.7 MiB of RSS imported) start with the first target: an agent
whose services have no health checks never pays for them. The daemon hands
over the complete set of targets (`set_targets`) whenever desired state changes, reads verdicts
with `healthy()` / `unhealthy_keys()`, and is told through `on_change()` when a verdict flips,
so it can recompute the selection set.

Per target:
  * a check starts every `interval_seconds` (start to start, plus up to 10 % random jitter so
    thousands of checks do not fire in lockstep); a check never overlaps the next one;
  * `tcp` connects and closes; `http` sends `GET path` and reads only the status line
    (2xx/3xx healthy); `timeout_seconds` bounds the whole exchange;
  * a healthy target turns unhealthy after `unhealthy_threshold` consecutive failures, an
    unhealthy one healthy after `healthy_threshold` consecutive successes.

Probe sockets are closed with an RST (SO_LINGER 0), as HAProxy does: the node initiates every
close, so an orderly FIN would leave one TIME_WAIT socket per check for 60 s (1,000 backends at
1 s = 60,000 sockets).
"""
from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import random
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Set, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram

from . import __version__, threadname
from .model import HEALTH_CHECK_TYPES, HealthCheck

if TYPE_CHECKING:  # imported where a check runs: see the module's docstring
    import asyncio

log = logging.getLogger(__name__)

JITTER_FRACTION = 0.1  # each interval is stretched by a random 0..10 %
MAX_STATUS_LINE = 1024  # bytes; a longer first line is not HTTP we understand
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0)
RESULTS = ("success", "failure", "timeout")
_NO_TASK = (None, None, None)
STOP_JOIN_SECONDS = 2.0

# Errors that say this node is short of resources, not that the backend is down: such a check
# is skipped rather than counted against the backend.
_LOCAL_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ERRNO_TEXT = {
    errno.ECONNREFUSED: "refused",
    errno.ECONNRESET: "reset",
    errno.ECONNABORTED: "aborted",
    errno.EPIPE: "reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EADDRNOTAVAIL: "address not available",
    errno.EADDRINUSE: "no free local port",
}


@dataclass(frozen=True, order=True)
class TargetKey:
    """One thing to check: a backend of a service, at the port to probe.

    `port` is HealthCheck.port when set, else the backend's target port; the caller computes it.
    """

    namespace: str
    service: str
    address: str
    port: int


@dataclass(frozen=True)
class Outcome:
    result: str  # success | failure | timeout | skipped (a local problem, not the backend's)
    error: Optional[str]
    duration: float


class TargetState:
    """The verdict of one target and the counters that lead to it. Pure: no I/O, no clock.

    A new target is `unknown` until its first verdict: the first success makes it healthy (one
    success is enough at start, as in Envoy, so a new backend is not held out for
    healthy_threshold intervals); `unhealthy_threshold` consecutive failures make it unhealthy.
    While unknown it counts as healthy when `initially_healthy` (see HealthChecker).
    """

    __slots__ = ("check", "initially_healthy", "state", "consecutive_successes",
                 "consecutive_failures", "last_error", "last_check_unix", "last_check_clock",
                 "last_duration")

    def __init__(self, check: HealthCheck, initially_healthy: bool = True):
        self.check = check
        self.initially_healthy = initially_healthy
        self.state = "unknown"
        self.consecutive_successes = 0
        self.consecutive_failures = 0
        self.last_error: Optional[str] = None
        self.last_check_unix: Optional[float] = None
        self.last_check_clock: Optional[float] = None
        self.last_duration: Optional[float] = None

    @property
    def healthy(self) -> bool:
        if self.state == "unknown":
            return self.initially_healthy
        return self.state == "healthy"

    def record(self, success: bool) -> bool:
        """Count one check; True when the healthy/unhealthy verdict (`healthy`) flipped."""
        before = self.healthy
        if success:
            self.consecutive_successes += 1
            self.consecutive_failures = 0
            if self.state == "unknown" or (
                    self.state == "unhealthy"
                    and self.consecutive_successes >= self.check.healthy_threshold):
                self.state = "healthy"
        else:
            self.consecutive_failures += 1
            self.consecutive_successes = 0
            if self.state != "unhealthy" and \
                    self.consecutive_failures >= self.check.unhealthy_threshold:
                self.state = "unhealthy"
        return self.healthy != before


class HealthChecker:
    """Runs active health checks for a changing set of targets on one background thread.

    `initially_healthy` decides how a target counts before its first verdict. The default, True,
    keeps a new backend in the selection set until a check says otherwise: health checks are an
    addition to readiness (Kubernetes already gates endpoints on readiness probes, the file
    source's operator listed the backend on purpose), so holding back every new backend for an
    interval would slow every rollout and scale-up, and an agent restart (which starts every
    target as unknown) would otherwise empty each service until its first checks complete -
    exactly the black hole health checks exist to avoid. The cost: a new backend that is in fact
    down takes connections for up to interval x unhealthy_threshold. Envoy's choice (False:
    unhealthy until the first check passes) suits a proxy that has no other readiness signal.

    `clock` times the checks (durations, age of the last check); the schedule runs on the event
    loop's own monotonic clock. `rng` draws the jitter (seed it in tests).
    `max_concurrent_checks` bounds the sockets in flight at once.

    Thread-safety: every public method may be called from any thread. `on_change` is called on
    the checker's thread with no lock held, with each target whose verdict flipped; keep it cheap
    (set an event, wake the reconciler): checks wait while it runs.
    """

    def __init__(self, registry: CollectorRegistry, on_change: Callable[[TargetKey], None],
                 clock: Callable[[], float] = time.monotonic, *,
                 initially_healthy: bool = True, rng: Optional[random.Random] = None,
                 max_concurrent_checks: int = 1024):
        self._on_change = on_change
        self._clock = clock
        self._initially_healthy = initially_healthy
        self._rng = rng or random.Random()
        # Bounds sockets in flight (each is a file descriptor) when many targets are due at once.
        self._max_concurrent = max_concurrent_checks
        self._lock = threading.Lock()  # guards _targets and every TargetState in it
        self._targets: Dict[TargetKey, TargetState] = {}
        self._by_service: Dict[Tuple[str, str], Set[TargetKey]] = {}
        # Owned by the checker thread: the task checking each key, and the state it checks.
        self._tasks: Dict[TargetKey, Tuple[TargetState, HealthCheck, asyncio.Task]] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stop_requested: Optional[asyncio.Future] = None
        self._semaphore: Optional[asyncio.Semaphore] = None  # made on the loop's thread
        self._started = False
        self._stopped = False
        self._last_skip_logged = float("-inf")

        self._durations = Histogram(
            "nodemesh_health_check_duration_seconds",
            "Time an active health check took, from connect to verdict (timeouts included)",
            ["type"], buckets=DURATION_BUCKETS, registry=registry)
        self._checks = Counter(
            "nodemesh_health_checks", "Active health checks by result", ["result"],
            registry=registry)
        # Children made once: every series exists at 0 before the first check, and the hot
        # path skips the label lookup.
        self._duration_of = {kind: self._durations.labels(kind) for kind in HEALTH_CHECK_TYPES}
        self._count_of = {result: self._checks.labels(result) for result in RESULTS}

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Checks may run from now on; the loop and its thread start with the first target."""
        with self._lock:
            if self._started or self._stopped:
                raise RuntimeError("a HealthChecker starts once")
            self._started = True
        self._resync(None)

    def _loop_locked(self) -> Tuple[Optional[asyncio.AbstractEventLoop], bool]:
        """The checker's loop (None before start, after stop, or while there is no target),
        started here with the first target; and whether it was started just now. Called with
        self._lock held."""
        if not self._started or self._stopped:
            return None, False
        if self._loop is not None:
            return self._loop, False
        if not self._targets:
            return None, False
        import asyncio
        self._loop = asyncio.new_event_loop()
        self._stop_requested = self._loop.create_future()
        self._thread = threadname.Thread(target=self._run_loop, name="health-checks",
                                        daemon=True)
        # Started under the lock, so a stop() never finds a thread it cannot join yet; the
        # thread takes the lock only in its first _sync_tasks, after start() returned.
        self._thread.start()
        return self._loop, True

    def stop(self) -> None:
        """Cancel every check (in flight or waiting) and end the thread. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            loop, thread, stop_requested = self._loop, self._thread, self._stop_requested
        if loop is None or thread is None:
            return  # never started
        try:
            loop.call_soon_threadsafe(
                lambda: stop_requested.done() or stop_requested.set_result(None))
        except RuntimeError:
            pass  # the loop is already closed
        if threading.current_thread() is not thread:  # on_change may call stop()
            thread.join(STOP_JOIN_SECONDS)
            if thread.is_alive():
                log.warning("health-check thread did not stop within %.0f s", STOP_JOIN_SECONDS)

    # -- targets and verdicts (any thread) ----------------------------------------------------
    def set_targets(self, targets: Mapping[TargetKey, HealthCheck]) -> None:
        """Replace the set of targets. Kept targets keep their state and schedule (a changed
        HealthCheck is adopted and restarts that target's schedule), new ones start unknown,
        removed ones are dropped and their check cancelled."""
        with self._lock:
            for key in [k for k in self._targets if k not in targets]:
                del self._targets[key]
            self._put(targets)
            self._by_service = {}
            for key in self._targets:
                self._by_service.setdefault((key.namespace, key.service), set()).add(key)
        self._resync(None)

    def set_service_targets(self, service: Tuple[str, str],
                            targets: Mapping[TargetKey, HealthCheck]) -> None:
        """Replace one service's targets, as set_targets does for all: the other services'
        targets are not looked at, so a change costs what the service has."""
        with self._lock:
            old = self._by_service.pop(service, set())
            for key in old - targets.keys():
                self._targets.pop(key, None)
            self._put(targets)
            if targets:
                self._by_service[service] = set(targets)
        self._resync(old | set(targets))

    def _put(self, targets: Mapping[TargetKey, HealthCheck]) -> None:
        for key, check in targets.items():
            state = self._targets.get(key)
            if state is None:
                self._targets[key] = TargetState(check, self._initially_healthy)
            elif state.check != check:
                state.check = check

    def _resync(self, keys: Optional[Set[TargetKey]]) -> None:
        with self._lock:
            loop, new = self._loop_locked()
        if loop is not None:
            try:
                # A loop started just now has no task yet: it syncs every target.
                loop.call_soon_threadsafe(self._sync_tasks, None if new else keys)
            except RuntimeError:
                pass  # stopping

    def healthy(self, key: TargetKey) -> bool:
        """Whether the target takes new connections. True for a key that is not a target:
        nothing is known against it."""
        with self._lock:
            state = self._targets.get(key)
            return True if state is None else state.healthy

    def unhealthy_keys(self) -> Set[TargetKey]:
        if not self._targets:  # no service has health checks (the core asks each change)
            return set()
        with self._lock:
            return {key for key, state in self._targets.items() if not state.healthy}

    def snapshot(self) -> List[dict]:
        """Every target's state, for the admin API; sorted by key."""
        now = self._clock()
        with self._lock:
            items = sorted(self._targets.items())
            return [{
                "namespace": key.namespace,
                "service": key.service,
                "address": key.address,
                "port": key.port,
                "type": state.check.type,
                "state": state.state,
                "healthy": state.healthy,
                "consecutive_successes": state.consecutive_successes,
                "consecutive_failures": state.consecutive_failures,
                "last_error": state.last_error,
                "last_check": state.last_check_unix,  # Unix time
                "last_check_age_seconds": None if state.last_check_clock is None
                else max(0.0, now - state.last_check_clock),
                "last_duration_seconds": state.last_duration,
            } for key, state in items]

    # -- the checker thread -----------------------------------------------------------------
    def _run_loop(self) -> None:
        import asyncio
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        import asyncio
        await self._stop_requested
        tasks = [task for _, _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a task that swallowed its cancellation must not hold up stop().
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            if pending:
                log.warning("%d health checks did not stop when cancelled", len(pending))

    def _sync_tasks(self, keys: Optional[Set[TargetKey]] = None) -> None:
        """Make the running tasks match the targets (all, or just `keys`): one task per
        target state and check."""
        if self._stop_requested.done():
            return
        with self._lock:
            if keys is None:
                keys = set(self._targets) | set(self._tasks)
            wanted = {k: self._targets[k] for k in keys if k in self._targets}
            checks = {key: state.check for key, state in wanted.items()}
        for key in keys:
            running = self._tasks.get(key)
            if running is None:
                continue
            state, check, task = running
            if wanted.get(key) is not state or checks[key] != check:
                task.cancel()
                del self._tasks[key]
        for key, state in wanted.items():
            if key not in self._tasks:
                task = self._loop.create_task(self._check_forever(key, state, checks[key]))
                self._tasks[key] = (state, checks[key], task)

    def next_delay(self, interval: float) -> float:
        """Seconds from one check's start to the next: the interval plus 0..10 % jitter."""
        return max(interval, 0.001) * (1.0 + self._rng.uniform(0.0, JITTER_FRACTION))

    def next_start(self, key: TargetKey, started: float, interval: float) -> float:
        """When (event-loop time) the check of `key` after the one that started at `started`
        starts: start to start, so the time a check takes does not push the schedule back."""
        return started + self.next_delay(interval)

    async def _check_forever(self, key: TargetKey, state: TargetState,
                             check: HealthCheck) -> None:
        import asyncio
        loop = asyncio.get_running_loop()
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self._max_concurrent)
        # New targets (often thousands at agent start) spread their first check over a tenth
        # of the interval rather than all connecting at once.
        await asyncio.sleep(self._rng.uniform(0.0, JITTER_FRACTION * check.interval_seconds))
        # Cancellation ends this loop; the test of being current also ends it when a
        # cancellation was swallowed (asyncio.wait_for before 3.12 can lose one that races the
        # inner result), so a removed target is never probed forever.
        while self._tasks.get(key, _NO_TASK)[2] is asyncio.current_task():
            started = loop.time()
            try:
                async with self._semaphore:
                    outcome = await self._probe(key, check)
                self._record(key, state, check, outcome)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end this target's checks silently
                log.exception("health check of %s failed unexpectedly", _describe(key))
            await asyncio.sleep(max(0.0, self.next_start(key, started, check.interval_seconds)
                                    - loop.time()))

    def _record(self, key: TargetKey, state: TargetState, check: HealthCheck,
                outcome: Outcome) -> None:
        if outcome.result == "skipped":
            # Once every 10 s at most: when the node runs out of sockets, every target says so.
            now = time.monotonic()
            if now - self._last_skip_logged >= 10:
                self._last_skip_logged = now
                log.warning("health check of %s skipped (it counts neither way): %s",
                            _describe(key), outcome.error)
            return
        self._count_of[outcome.result].inc()
        self._duration_of[check.type].observe(outcome.duration)
        with self._lock:
            if self._targets.get(key) is not state:
                return  # removed while the check ran
            flipped = state.record(outcome.result == "success")
            state.last_error = outcome.error
            state.last_check_unix = time.time()
            state.last_check_clock = self._clock()
            state.last_duration = outcome.duration
            verdict, failures, successes = state.state, state.consecutive_failures, \
                state.consecutive_successes
        if not flipped:
            return
        if verdict == "unhealthy":
            log.warning("%s is unhealthy after %d consecutive failed checks (last: %s)",
                        _describe(key), failures, outcome.error)
        else:
            log.info("%s is healthy after %d consecutive successful checks", _describe(key),
                     successes)
        try:
            self._on_change(key)
        except Exception:
            log.exception("health on_change callback failed")

    async def _probe(self, key: TargetKey, check: HealthCheck) -> Outcome:
        """One check, never raising: the result, the classified error, and its duration."""
        import asyncio
        phase = ["connect"]  # where a timeout struck, for the error text
        started = self._clock()
        # asyncio.timeout (3.11+) keeps a cancellation that races the timeout; wait_for before
        # 3.12 can swallow it.
        timeout = getattr(asyncio, "timeout", None)
        try:
            if check.type == "http":
                coro = _http_check(key, check, phase)
            else:
                coro = _tcp_check(key)
            if timeout is not None:
                async with timeout(check.timeout_seconds):
                    error = await coro
            else:
                error = await asyncio.wait_for(coro, check.timeout_seconds)
            result = "success" if error is None else "failure"
        except asyncio.TimeoutError:
            result = "timeout"
            error = f"timeout after {check.timeout_seconds:g}s ({phase[0]})"
        except OSError as e:
            if e.errno in _LOCAL_ERRNOS:
                result, error = "skipped", f"local: {e.strerror or e}"
            elif e.errno == errno.ETIMEDOUT:  # the kernel gave up on SYN retries first
                result, error = "timeout", "timeout (connect, kernel retries exhausted)"
            else:
                result, error = "failure", _os_error_text(e)
        return Outcome(result, error, max(0.0, self._clock() - started))


def _describe(key: TargetKey) -> str:
    host = f"[{key.address}]" if ":" in key.address else key.address
    return f"{key.namespace}/{key.service} backend {host}:{key.port}"


def _os_error_text(e: OSError) -> str:
    if e.errno in _ERRNO_TEXT:
        return _ERRNO_TEXT[e.errno]
    if e.errno is not None:
        return (e.strerror or errno.errorcode.get(e.errno, str(e.errno))).lower()
    return str(e) or type(e).__name__


@functools.lru_cache(maxsize=16384)  # parsed once per target, not once per check
def _sockaddr(address: str, port: int) -> Tuple[int, tuple]:
    """Family and numeric socket address: no resolver call, so no executor thread (asyncio
    resolves anything it cannot parse in a thread pool, e.g. an IPv6 zone like fe80::1%eth0)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return socket.AF_INET, (str(ip), port)
    scope = getattr(ip, "scope_id", None)
    scope_index = 0
    if scope:
        scope_index = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
        ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return socket.AF_INET6, (str(ip), port, 0, scope_index)


async def _connect(key: TargetKey) -> socket.socket:
    import asyncio
    family, addr = _sockaddr(key.address, key.port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        # Abortive close: no TIME_WAIT left on the node per check (see the module docstring).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await asyncio.get_running_loop().sock_connect(sock, addr)
        return sock
    except BaseException:
        sock.close()
        raise


async def _tcp_check(key: TargetKey) -> Optional[str]:
    sock = await _connect(key)
    sock.close()
    return None


def http_request(key: TargetKey, path: str) -> bytes:
    """The check's request. Host is the backend's authority (RFC 9110 7.2), as kubelet sends."""
    address = key.address.split("%", 1)[0]  # an IPv6 zone means nothing to the server
    host = f"[{address}]" if ":" in address else address
    if key.port != 80:
        host += f":{key.port}"
    # Quote what cannot stand in a request line (spaces, CR/LF, non-ASCII); keep '%' so paths
    # that are already encoded pass unchanged.
    target = urllib.parse.quote(path or "/", safe="/?#[]@!$&'()*+,;=:%-._~")
    return (f"GET {target} HTTP/1.1\r\nHost: {host}\r\n"
            f"User-Agent: nodemesh-health-check/{__version__}\r\nAccept: */*\r\n"
            "Connection: close\r\n\r\n").encode("ascii")


async def _http_check(key: TargetKey, check: HealthCheck, phase: List[str]) -> Optional[str]:
    import asyncio
    # Plain socket calls rather than asyncio streams: no transport, protocol, reader and writer
    # to build for each check.
    sock = await _connect(key)
    try:
        loop = asyncio.get_running_loop()
        phase[0] = "awaiting response"
        await loop.sock_sendall(sock, http_request(key, check.path))
        received = b""
        while b"\n" not in received:
            if len(received) >= MAX_STATUS_LINE:
                return f"status line longer than {MAX_STATUS_LINE} bytes"
            chunk = await loop.sock_recv(sock, MAX_STATUS_LINE - len(received))
            if not chunk:
                return "closed before the status line"
            received += chunk
        return status_line_error(received.split(b"\n", 1)[0])
    finally:
        sock.close()  # an RST (SO_LINGER 0): we read only the status line


def status_line_error(line: bytes) -> Optional[str]:
    """None for a 2xx/3xx status line, else why it fails."""
    text = line.decode("latin-1").strip()
    parts = text.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not \
            (len(parts[1]) == 3 and parts[1].isdigit()):
        return f"not an HTTP response: {text[:60]!r}"
    status = int(parts[1])
    if 200 <= status < 400:
        return None
    return f"http status {status}"
