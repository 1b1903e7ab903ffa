"""Active health checks against real servers on loopback (no root).

The servers run on one asyncio loop in a thread the test starts: one that accepts, an HTTP one
whose status can be switched while it runs, one that accepts and never answers, one that resets,
and a bound port with nothing listening (refused). Waits poll with a deadline.
"""
from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Callable, Dict, List

import pytest
from prometheus_client import CollectorRegistry

from nodemesh import health
from nodemesh.health import (
    DURATION_BUCKETS,
    HealthChecker,
    TargetKey,
    TargetState,
    http_request,
    status_line_error,
)
from nodemesh.model import HealthCheck


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


family_params = [pytest.param("127.0.0.1", id="ipv4"),
                 pytest.param("::1", id="ipv6", marks=pytest.mark.skipif(
                     not ipv6_loopback_works(), reason="no IPv6 loopback"))]


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               poll: float = 0.005):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(poll)


# -- servers ------------------------------------------------------------------------------------
class ServerLoop:
    """One asyncio loop in a thread, hosting every test server."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-servers",
                                       daemon=True)
        self.thread.start()
        self.servers: List[asyncio.AbstractServer] = []

    def serve(self, handler, host: str) -> int:
        async def start():
            server = await asyncio.start_server(handler, host, 0, backlog=4096)
            self.servers.append(server)
            return server.sockets[0].getsockname()[1]
        return asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)

    def close(self):
        async def stop():
            for server in self.servers:
                server.close()
            # Connections still open (a silent server's) end here, while the loop runs.
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class AcceptServer:
    """Accepts and counts connections."""

    def __init__(self, loop: ServerLoop, host: str):
        self.connections = 0
        self.port = loop.serve(self.handle, host)

    async def handle(self, reader, writer):
        self.connections += 1
        writer.transport.abort()


class HttpServer:
    """Answers every request with `status`, which the test may switch at any time."""

    def __init__(self, loop: ServerLoop, host: str, status: int = 200):
        self.status = status
        self.requests: List[bytes] = []
        self.responses: Counter = Counter()  # status -> responses sent
        self.arrivals: List[float] = []
        self.port = loop.serve(self.handle, host)

    async def handle(self, reader, writer):
        self.arrivals.append(time.monotonic())
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            status = self.status
            self.responses[status] += 1
            writer.write(f"HTTP/1.1 {status} Test\r\nContent-Length: 2\r\n"
                         "Connection: close\r\n\r\nok".encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


class QuickServer(asyncio.Protocol):
    """The load test's server: answers 200 as soon as the request is in, with as little Python
    per connection as asyncio allows, so that it is not what limits the test."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def connection_made(self, transport):
        self.transport = transport
        self.received = b""

    def data_received(self, data):
        self.received += data
        if b"\r\n\r\n" in self.received:
            self.transport.write(self.RESPONSE)
            self.transport.close()


class SilentServer:
    """Accepts and never answers; tracks how many connections are open at once."""

    def __init__(self, loop: ServerLoop, host: str):
        self.opened: List[float] = []
        self.open_now = 0
        self.most_open = 0
        self.port = loop.serve(self.handle, host)

    async def handle(self, reader, writer):
        self.opened.append(time.monotonic())
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while await reader.read(4096):
                pass  # hold the connection until the checker gives up
        except ConnectionError:
            pass
        finally:
            self.open_now -= 1
            writer.close()


class ResetServer:
    """Accepts, then closes with an RST before answering."""

    def __init__(self, loop: ServerLoop, host: str):
        self.port = loop.serve(self.handle, host)

    async def handle(self, reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()


class OneLineServer:
    """Reads the request, then sends `reply` (maybe nothing) and closes in order (FIN)."""

    def __init__(self, loop: ServerLoop, host: str, reply: bytes):
        self.reply = reply
        self.port = loop.serve(self.handle, host)

    async def handle(self, reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.reply)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
def servers():
    loop = ServerLoop()
    yield loop
    loop.close()


@pytest.fixture
def refused_port():
    """A port that is bound (so nobody else takes it) but not listening: connects are refused."""
    def make(host: str) -> int:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.bind((host, 0))
        held.append(sock)
        return sock.getsockname()[1]
    held: List[socket.socket] = []
    yield make
    for sock in held:
        sock.close()


class Recorder:
    """on_change that remembers what the checker reported at each flip."""

    def __init__(self):
        self.calls: List[dict] = []
        self.checker: HealthChecker = None  # type: ignore[assignment]
        self.probe: Callable[[], object] = lambda: None

    def __call__(self, key):
        # Runs on the checker's thread with no lock held: calling back in must not deadlock.
        self.calls.append({"key": key, "snapshot": self.checker.snapshot(),
                           "unhealthy": self.checker.unhealthy_keys(), "probe": self.probe()})


@pytest.fixture
def make_checker():
    made: List[HealthChecker] = []

    def make(on_change=None, registry=None, **kwargs) -> HealthChecker:
        recorder = on_change if on_change is not None else Recorder()
        checker = HealthChecker(registry or CollectorRegistry(), recorder,
                                rng=random.Random(7), **kwargs)
        if isinstance(recorder, Recorder):
            recorder.checker = checker
        made.append(checker)
        return checker
    yield make
    for checker in made:
        checker.stop()


def key(port: int, host: str = "127.0.0.1", service: str = "web") -> TargetKey:
    return TargetKey("test", service, host, port)


def state_of(checker: HealthChecker, target: TargetKey) -> dict:
    for row in checker.snapshot():
        if (row["namespace"], row["service"], row["address"], row["port"]) == \
                (target.namespace, target.service, target.address, target.port):
            return row
    raise KeyError(target)


def fast(kind: str = "tcp", **kwargs) -> HealthCheck:
    values = dict(type=kind, interval_seconds=0.05, timeout_seconds=1.0, unhealthy_threshold=2,
                  healthy_threshold=1)
    values.update(kwargs)
    return HealthCheck(**values)


# -- the verdict, as a pure state machine --------------------------------------------------------
def test_a_healthy_target_turns_unhealthy_on_exactly_the_nth_consecutive_failure():
    state = TargetState(fast(unhealthy_threshold=3))
    assert state.record(True) is False  # unknown -> healthy: counted as healthy already
    assert [state.record(False) for _ in range(3)] == [False, False, True]
    assert (state.state, state.consecutive_failures) == ("unhealthy", 3)


def test_a_success_between_failures_restarts_the_count():
    state = TargetState(fast(unhealthy_threshold=2))
    state.record(True)
    for success in (False, True, False):
        assert state.record(success) is False
    assert state.state == "healthy"
    assert state.record(False) is True


def test_an_unhealthy_target_recovers_on_exactly_the_mth_consecutive_success():
    state = TargetState(fast(unhealthy_threshold=1, healthy_threshold=3))
    state.record(True)
    state.record(False)
    assert [state.record(True) for _ in range(3)] == [False, False, True]
    assert (state.state, state.healthy) == ("healthy", True)


def test_a_new_target_is_healthy_until_judged_unless_told_otherwise():
    assert TargetState(fast(), initially_healthy=True).healthy is True
    waiting = TargetState(fast(healthy_threshold=3), initially_healthy=False)
    assert (waiting.state, waiting.healthy) == ("unknown", False)
    # At start one success is enough (as in Envoy): healthy_threshold is for recoveries.
    assert waiting.record(True) is True
    assert waiting.healthy is True


def test_a_new_target_that_fails_stays_unknown_until_the_threshold():
    state = TargetState(fast(unhealthy_threshold=2))
    assert state.record(False) is False
    assert (state.state, state.healthy) == ("unknown", True)
    assert state.record(False) is True
    assert state.state == "unhealthy"


# -- wire formats -------------------------------------------------------------------------------
@pytest.mark.parametrize("line, error", [
    (b"HTTP/1.1 200 OK\r\n", None),
    (b"HTTP/1.0 204 No Content\r\n", None),
    (b"HTTP/1.1 302 Found\r\n", None),
    (b"HTTP/1.1 399\r\n", None),  # no reason phrase is valid
    (b"HTTP/1.1 404 Not Found\r\n", "http status 404"),
    (b"HTTP/1.1 503 Service Unavailable\r\n", "http status 503"),
    (b"HTTP/1.1 101 Switching Protocols\r\n", "http status 101"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP response: 'SSH-2.0-OpenSSH_9.2'"),
    (b"HTTP/1.1 2000 OK\r\n", "not an HTTP response: 'HTTP/1.1 2000 OK'"),
])
def test_status_lines_are_judged_by_their_code(line, error):
    assert status_line_error(line) == error


def test_the_request_names_the_backend_as_host_and_asks_to_close():
    request = http_request(TargetKey("n", "s", "10.0.0.7", 8080), "/healthz?full=1")
    assert request.startswith(b"GET /healthz?full=1 HTTP/1.1\r\nHost: 10.0.0.7:8080\r\n")
    assert b"\r\nConnection: close\r\n\r\n" in request
    assert b"Host: [fd00::7]\r\n" in http_request(TargetKey("n", "s", "fd00::7", 80), "/")


def test_a_path_cannot_inject_headers_or_break_the_request_line():
    request = http_request(key(80), "/a b\r\nX-Evil: 1")
    assert request.split(b"\r\n")[0] == b"GET /a%20b%0D%0AX-Evil:%201 HTTP/1.1"


def test_jitter_stretches_each_interval_by_up_to_a_tenth_reproducibly():
    def delays(seed):
        checker = HealthChecker(CollectorRegistry(), lambda: None, rng=random.Random(seed))
        return [checker.next_delay(2.0) for _ in range(200)]
    first = delays(1)
    assert first == delays(1)
    assert all(2.0 <= d <= 2.2 for d in first)
    assert max(first) - min(first) > 0.1  # spread, not lockstep


# -- checks against real servers ----------------------------------------------------------------
@pytest.mark.parametrize("host", family_params)
def test_tcp_check_passes_on_a_listening_port_and_fails_refused_on_a_closed_one(
        servers, refused_port, make_checker, host):
    up = key(AcceptServer(servers, host).port, host)
    down = key(refused_port(host), host)
    checker = make_checker()
    checker.set_targets({up: fast(), down: fast()})
    checker.start()
    wait_until(lambda: state_of(checker, down)["state"] == "unhealthy", 5, "down is unhealthy")
    wait_until(lambda: state_of(checker, up)["consecutive_successes"] >= 2, 5, "up is checked")
    assert state_of(checker, up)["state"] == "healthy"
    assert checker.healthy(up) and not checker.healthy(down)
    assert checker.unhealthy_keys() == {down}
    assert state_of(checker, down)["last_error"] == "refused"


@pytest.mark.parametrize("host", family_params)
@pytest.mark.parametrize("status, healthy", [(200, True), (204, True), (301, True),
                                             (404, False), (500, False), (503, False)])
def test_http_check_takes_2xx_and_3xx_as_healthy_and_anything_else_not(
        servers, make_checker, host, status, healthy):
    server = HttpServer(servers, host, status)
    target = key(server.port, host)
    checker = make_checker()
    checker.set_targets({target: fast("http", unhealthy_threshold=1)})
    checker.start()
    row = wait_until(lambda: (lambda r: r if r["state"] != "unknown" else None)(
        state_of(checker, target)), 5, "a verdict")
    assert row["healthy"] is healthy
    assert row["last_error"] == (None if healthy else f"http status {status}")


@pytest.mark.parametrize("host", family_params)
def test_http_check_sends_a_get_for_the_path_with_host_and_connection_close(
        servers, make_checker, host):
    server = HttpServer(servers, host)
    target = key(server.port, host)
    checker = make_checker()
    checker.set_targets({target: fast("http", path="/ready")})
    checker.start()
    wait_until(lambda: server.requests, 5, "a request")
    authority = f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"
    lines = server.requests[0].decode().split("\r\n")
    assert lines[0] == "GET /ready HTTP/1.1"
    assert f"Host: {authority}" in lines
    assert "Connection: close" in lines


def test_a_backend_fails_over_after_exactly_n_failures_and_returns_after_m_successes(
        servers, make_checker):
    server = HttpServer(servers, "127.0.0.1")
    target = key(server.port)
    recorder = Recorder()
    recorder.probe = lambda: dict(server.responses)
    checker = make_checker(recorder)
    checker.set_targets({target: fast("http", unhealthy_threshold=3, healthy_threshold=2)})
    checker.start()
    wait_until(lambda: state_of(checker, target)["state"] == "healthy", 5, "first verdict")
    assert recorder.calls == []  # unknown -> healthy is no flip: it counted as healthy

    server.status = 503
    wait_until(lambda: recorder.calls, 5, "the flip to unhealthy")
    flip = recorder.calls[0]
    assert flip["unhealthy"] == {target}
    assert flip["snapshot"][0]["consecutive_failures"] == 3
    assert flip["probe"][503] == 3  # the third failed check, not the second or fourth

    wait_until(lambda: server.responses[503] >= 8, 5, "more failed checks")
    assert len(recorder.calls) == 1  # staying unhealthy is no flip

    server.status = 200
    wait_until(lambda: len(recorder.calls) == 2, 5, "the flip back to healthy")
    back = recorder.calls[1]
    assert back["unhealthy"] == set()
    assert back["snapshot"][0]["consecutive_successes"] == 2
    assert back["probe"][200] - flip["probe"][200] == 2

    wait_until(lambda: server.responses[200] - back["probe"][200] >= 5, 5, "more checks")
    assert len(recorder.calls) == 2
    assert checker.healthy(target)


def test_a_server_that_never_answers_is_a_timeout_not_a_failure(servers, make_checker):
    server = SilentServer(servers, "127.0.0.1")
    target = key(server.port)
    registry = CollectorRegistry()
    checker = make_checker(registry=registry)
    checker.set_targets({target: fast("http", timeout_seconds=0.1, unhealthy_threshold=1)})
    checker.start()
    row = wait_until(lambda: (lambda r: r if r["state"] == "unhealthy" else None)(
        state_of(checker, target)), 5, "a verdict")
    assert row["last_error"] == "timeout after 0.1s (awaiting response)"
    assert 0.09 <= row["last_duration_seconds"] < 0.5
    assert registry.get_sample_value("nodemesh_health_checks_total", {"result": "timeout"}) >= 1
    assert registry.get_sample_value("nodemesh_health_checks_total", {"result": "failure"}) == 0


def test_a_connection_reset_before_the_answer_is_classified_as_reset(servers, make_checker):
    target = key(ResetServer(servers, "127.0.0.1").port)
    checker = make_checker()
    checker.set_targets({target: fast("http", unhealthy_threshold=1)})
    checker.start()
    wait_until(lambda: state_of(checker, target)["state"] == "unhealthy", 5, "a verdict")
    # Linux reports the RST to a pending read as ECONNRESET.
    assert state_of(checker, target)["last_error"] == "reset"


@pytest.mark.parametrize("reply, error", [
    (b"", "closed before the status line"),
    (b"HTTP/1.1 200", "closed before the status line"),  # no end of line
    (b"HTTP/1.1 200 " + b"x" * 5000 + b"\r\n", "status line longer than 1024 bytes"),
    (b"\x16\x03\x01\x00\x05hello\n", "not an HTTP response: '\\x16\\x03\\x01\\x00\\x05hello'"),
])
def test_a_server_that_does_not_speak_http_fails_the_check_with_the_reason(
        servers, make_checker, reply, error):
    target = key(OneLineServer(servers, "127.0.0.1", reply).port)
    checker = make_checker()
    checker.set_targets({target: fast("http", unhealthy_threshold=1)})
    checker.start()
    wait_until(lambda: state_of(checker, target)["state"] == "unhealthy", 5, "a verdict")
    assert state_of(checker, target)["last_error"] == error


def test_checks_of_one_target_never_overlap_even_when_they_outlast_the_interval(
        servers, make_checker):
    server = SilentServer(servers, "127.0.0.1")
    checker = make_checker()
    checker.set_targets({key(server.port): fast("http", interval_seconds=0.02,
                                                timeout_seconds=0.1)})
    checker.start()
    wait_until(lambda: len(server.opened) >= 5, 5, "five checks")
    checker.stop()
    assert server.most_open == 1
    gaps = [b - a for a, b in zip(server.opened, server.opened[1:])]
    assert min(gaps) >= 0.09  # the next check waited for the timeout of the last


def test_checks_start_one_interval_apart_plus_at_most_a_tenth(servers, make_checker):
    """Read on the checker's own schedule (event-loop time), not on when a busy machine let
    the server see the checks: each next check is planned an interval plus 0-10 % after the
    previous check's start (before its probe ran, so not after its end), and no check starts
    before it is due."""
    server = HttpServer(servers, "127.0.0.1")
    checker = make_checker()
    interval = 0.05
    planned: List[tuple] = []  # (started, next start), in loop time
    probed: List[tuple] = []  # (probe began, probe ended), in loop time
    next_start, probe = checker.next_start, checker._probe

    def recording_next_start(key, started, interval_seconds):
        planned.append((started, next_start(key, started, interval_seconds)))
        return planned[-1][1]

    async def recording_probe(key, check):
        began = asyncio.get_running_loop().time()
        outcome = await probe(key, check)
        probed.append((began, asyncio.get_running_loop().time()))
        return outcome
    checker.next_start, checker._probe = recording_next_start, recording_probe
    checker.set_targets({key(server.port): fast("http", interval_seconds=interval)})
    checker.start()
    wait_until(lambda: len(planned) >= 8, 10, "eight checks")
    checker.stop()
    assert server.responses[200] >= 8
    for (started, due), (began, ended) in zip(planned, probed):
        # Exactly the documented jitter (1e-9: float rounding).
        assert interval - 1e-9 <= due - started <= interval * 1.1 + 1e-9
        assert started <= began < ended  # counted from the check's start, not its end
    for (_, due), (began, _) in zip(planned, probed[1:]):
        assert began >= due - 0.001  # never early (asyncio may fire a timer 1 clock tick early)


def test_set_targets_keeps_kept_targets_drops_removed_ones_and_starts_new_ones_unknown(
        servers, make_checker):
    kept_server, removed_server = HttpServer(servers, "127.0.0.1"), HttpServer(servers,
                                                                                 "127.0.0.1")
    kept, removed = key(kept_server.port, service="kept"), key(removed_server.port,
                                                               service="removed")
    added = key(HttpServer(servers, "127.0.0.1").port, service="added")
    checker = make_checker()
    checker.set_targets({kept: fast("http"), removed: fast("http")})
    checker.start()
    wait_until(lambda: state_of(checker, kept)["consecutive_successes"] >= 3, 5, "kept checked")
    wait_until(lambda: removed_server.responses[200] >= 1, 5, "removed checked")

    before = state_of(checker, kept)["consecutive_successes"]
    checker.set_targets({kept: fast("http"), added: fast("http", interval_seconds=10)})
    assert state_of(checker, kept)["consecutive_successes"] >= before  # not reset
    assert state_of(checker, added)["state"] == "unknown"
    assert checker.healthy(added)
    with pytest.raises(KeyError):
        state_of(checker, removed)
    assert checker.healthy(removed)  # no longer a target: nothing is held against it

    checks_of_removed = removed_server.responses[200]
    wait_until(lambda: state_of(checker, kept)["consecutive_successes"] >= before + 4, 5,
               "kept is still checked on its schedule")
    assert removed_server.responses[200] - checks_of_removed <= 1  # at most the one in flight
    wait_until(lambda: state_of(checker, added)["state"] == "healthy", 5, "added checked")


def test_set_targets_with_the_same_targets_does_not_probe_them_again(servers, make_checker):
    server = HttpServer(servers, "127.0.0.1")
    target = key(server.port)
    checker = make_checker()
    checker.set_targets({target: fast("http", interval_seconds=1.0)})
    checker.start()
    wait_until(lambda: server.responses[200] == 1, 5, "the first check")
    for _ in range(5):
        checker.set_targets({target: fast("http", interval_seconds=1.0)})
    time.sleep(0.3)  # bounded: well inside the 1 s interval
    assert server.responses[200] == 1


def test_a_changed_check_is_adopted_and_keeps_the_verdict(servers, refused_port,
                                                          make_checker):
    target = key(refused_port("127.0.0.1"))
    checker = make_checker()
    checker.set_targets({target: fast(unhealthy_threshold=1)})
    checker.start()
    wait_until(lambda: not checker.healthy(target), 5, "unhealthy")
    checker.set_targets({target: fast("http", unhealthy_threshold=1)})
    row = state_of(checker, target)
    assert (row["type"], row["state"]) == ("http", "unhealthy")


def test_a_new_target_is_held_out_until_its_first_success_when_initially_unhealthy(
        servers, make_checker):
    server = HttpServer(servers, "127.0.0.1")
    target = key(server.port)
    recorder = Recorder()
    checker = make_checker(recorder, initially_healthy=False)
    checker.set_targets({target: fast("http", interval_seconds=0.5, healthy_threshold=3)})
    assert not checker.healthy(target)
    assert checker.unhealthy_keys() == {target}
    checker.start()
    wait_until(lambda: checker.healthy(target), 5, "healthy after one success")
    assert server.responses[200] == 1
    assert len(recorder.calls) == 1


def test_metrics_count_checks_by_result_and_time_them_by_type(servers, refused_port):
    registry = CollectorRegistry()
    checker = HealthChecker(registry, lambda: None)
    up = key(HttpServer(servers, "127.0.0.1").port)
    down = key(refused_port("127.0.0.1"))
    checker.set_targets({up: fast("http"), down: fast()})
    try:
        checker.start()

        def value(name, labels):
            return registry.get_sample_value(name, labels) or 0
        wait_until(lambda: value("nodemesh_health_checks_total", {"result": "failure"}) >= 3,
                   5, "failures counted")
        wait_until(lambda: value("nodemesh_health_checks_total", {"result": "success"}) >= 3,
                   5, "successes counted")
    finally:
        checker.stop()
    assert value("nodemesh_health_checks_total", {"result": "timeout"}) == 0
    http_count = value("nodemesh_health_check_duration_seconds_count", {"type": "http"})
    tcp_count = value("nodemesh_health_check_duration_seconds_count", {"type": "tcp"})
    checks = sum(value("nodemesh_health_checks_total", {"result": r})
                 for r in ("success", "failure", "timeout"))
    assert http_count >= 3 and tcp_count >= 3 and http_count + tcp_count == checks
    # Loopback checks land in the smallest buckets, not at the top.
    assert value("nodemesh_health_check_duration_seconds_bucket",
                 {"type": "tcp", "le": "0.05"}) == tcp_count
    assert DURATION_BUCKETS[0] == 0.0005 and DURATION_BUCKETS[-1] == 5.0
    # Bounded label sets: nothing per backend.
    for family in registry.collect():
        if family.name.startswith("nodemesh_health"):
            for sample in family.samples:
                assert set(sample.labels) <= {"type", "result", "le"}


@pytest.fixture
def servers_in_another_process():
    """An accepting and an HTTP server in a child process, so that they take no time from the
    checker's thread (the GIL) and add no thread to this process. Yields their ports."""
    child = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        ports = child.stdout.readline().split()
        assert len(ports) == 2, "the server process did not start"
        yield tuple(int(p) for p in ports)
    finally:
        child.stdin.close()  # EOF ends it
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def test_a_thousand_targets_are_judged_by_one_thread(servers_in_another_process,
                                                             refused_port, make_checker):
    up, http = servers_in_another_process
    down = refused_port("127.0.0.1")
    targets: Dict[TargetKey, HealthCheck] = {}
    for i in range(1000):
        port, kind = [(up, "tcp"), (http, "http"), (down, "tcp")][i % 3]
        # A timeout far above any loopback answer: on a loaded machine the one thread serving
        # 1,000 sockets may see a connect complete a second late, and a timeout would then judge
        # a listening server down; the verdicts, not the speed, are what this test is about.
        targets[key(port, service=f"svc-{i}")] = fast(kind, interval_seconds=0.5,
                                                      timeout_seconds=30, unhealthy_threshold=2)
    checker = make_checker(lambda key: None)
    checker.set_targets(targets)
    threads_before = threading.active_count()
    thread_counts = []

    def judged():
        thread_counts.append(threading.active_count())
        return all(row["state"] != "unknown" for row in checker.snapshot())
    checker.start()
    # Polled gently: a snapshot of 1,000 rows takes the checker's lock and the GIL. The bound
    # only ends a hung test (a loaded CI machine, load 10 on 2 CPUs, took up to 10 s); how fast
    # one thread judges 1,000 targets is not a test's business (1-2 s on an idle 2-core machine).
    wait_until(judged, 120, "every target judged", poll=0.05)  # refused ones take two checks
    deadline = time.monotonic() + 1.0  # keep sampling while checks go on
    while time.monotonic() < deadline:
        thread_counts.append(threading.active_count())
        time.sleep(0.02)

    assert set(thread_counts) == {threads_before + 1}  # the checker's one thread, nothing more
    unhealthy = checker.unhealthy_keys()
    assert len(unhealthy) == 333 and {k.port for k in unhealthy} == {down}
    checker.stop()
    # stop() waits 2 s for the thread; cancelling 1,000 checks can take longer on a loaded
    # machine (load 18), so the end of the thread is waited for, with a bound against a hang.
    wait_until(lambda: threading.active_count() == threads_before, 30, "the thread ends")


def test_stop_is_prompt_with_checks_in_flight_and_idempotent(servers, make_checker):
    server = SilentServer(servers, "127.0.0.1")
    checker = make_checker()
    checker.set_targets({key(server.port, service=f"s{i}"): fast("http", timeout_seconds=30)
                         for i in range(200)})
    threads_before = threading.active_count()
    checker.start()
    wait_until(lambda: server.open_now == 200, 5, "200 checks in flight")
    started = time.monotonic()
    checker.stop()
    assert time.monotonic() - started < 1.0
    assert threading.active_count() == threads_before
    wait_until(lambda: server.open_now == 0, 2, "every probe socket closed")
    started = time.monotonic()
    checker.stop()
    assert time.monotonic() - started < 0.1
    checker.set_targets({})  # harmless after stop


def test_a_node_out_of_sockets_judges_no_backend(monkeypatch, make_checker):
    async def out_of_files(target):
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(health, "_connect", out_of_files)
    registry = CollectorRegistry()
    recorder = Recorder()
    checker = make_checker(recorder, registry=registry, initially_healthy=False)
    target = key(9)
    checker.set_targets({target: fast(unhealthy_threshold=1)})
    checker.start()
    time.sleep(0.3)  # bounded: about six intervals
    assert state_of(checker, target)["state"] == "unknown"
    assert recorder.calls == []
    assert registry.get_sample_value("nodemesh_health_checks_total", {"result": "failure"}) == 0


def test_a_failing_on_change_does_not_stop_the_checks(servers, refused_port, make_checker):
    server = HttpServer(servers, "127.0.0.1")
    calls = []

    def broken(key):
        calls.append(key)
        raise RuntimeError("the caller's bug")
    checker = make_checker(broken)
    down, up = key(refused_port("127.0.0.1")), key(server.port)
    checker.set_targets({down: fast(unhealthy_threshold=1), up: fast("http")})
    checker.start()
    wait_until(lambda: calls, 5, "the flip")
    seen = server.responses[200]
    wait_until(lambda: server.responses[200] >= seen + 3, 5, "checks go on")


def test_on_change_may_stop_the_checker(refused_port, make_checker):
    holder = {}
    checker = make_checker(lambda key: holder["checker"].stop())
    holder["checker"] = checker
    checker.set_targets({key(refused_port("127.0.0.1")): fast(unhealthy_threshold=1)})
    checker.start()
    wait_until(lambda: not checker._thread.is_alive(), 5, "the thread ends")


def test_stop_before_start_and_set_targets_before_start_are_fine(servers, make_checker):
    server = HttpServer(servers, "127.0.0.1")
    checker = make_checker()
    checker.set_targets({key(server.port): fast("http")})
    checker.start()  # targets given before start are checked
    wait_until(lambda: server.responses[200] >= 1, 5, "a check")
    make_checker().stop()


if __name__ == "__main__":
    # The child of servers_in_another_process: serve, print the ports, stop at stdin's EOF.
    loop = ServerLoop()

    async def quick_server():
        server = await loop.loop.create_server(QuickServer, "127.0.0.1", 0, backlog=4096)
        loop.servers.append(server)
        return server.sockets[0].getsockname()[1]
    http_port = asyncio.run_coroutine_threadsafe(quick_server(), loop.loop).result(5)
    print(AcceptServer(loop, "127.0.0.1").port, http_port, flush=True)
    sys.stdin.read()
    loop.close()


def test_no_loop_thread_or_asyncio_until_a_service_has_a_health_check():
    # A fresh interpreter: asyncio (2.7 MiB of RSS) and the checker's thread are paid only
    # once a target exists; then checks run, and stop() ends the thread.
    script = """
import sys, threading
from prometheus_client import CollectorRegistry
from nodemesh.health import HealthChecker, TargetKey
from nodemesh.model import HealthCheck
checker = HealthChecker(CollectorRegistry(), lambda key: None)
checker.start()
checker.set_targets({})
checker.set_service_targets(("ns", "svc"), {})
assert "asyncio" not in sys.modules, "asyncio imported with no target"
assert checker._thread is None, "a checker thread with no target"
target = TargetKey("ns", "svc", "127.0.0.1", 1)
checker.set_service_targets(("ns", "svc"), {target: HealthCheck(
    type="tcp", interval_seconds=0.05, timeout_seconds=0.5, unhealthy_threshold=1,
    healthy_threshold=1)})
assert checker._thread is not None and checker._thread.is_alive(), "no thread with a target"
checker.stop()
assert not checker._thread.is_alive(), "the thread outlived stop()"
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
