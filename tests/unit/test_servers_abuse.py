"""The metrics port and the admin socket under abuse (issue 7 items 6 and 12), without root.

The servers run in a subprocess with a stub agent and a low RLIMIT_NOFILE, so that its
descriptors can be counted in /proc and running out of them is realistic: idle clients past
the connection cap, a client trickling its request, a client that never reads its response,
200 clients holding the admin socket, and a full listen backlog."""
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from helpers import TIME_SCALE
from prometheus_client.parser import text_string_to_metric_families

from nodemesh import api, metrics

HEAD_TIMEOUT = 1.0
REQUEST_TIMEOUT = 2.0
NOFILE = 512  # the server's soft limit: fewer than the idle clients the tests open

SERVER = r"""
import resource, sys
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from nodemesh import api, metrics, serving

admin_path, mode, head_timeout, request_timeout, nofile = sys.argv[1:]
serving.HEAD_TIMEOUT, serving.REQUEST_TIMEOUT = float(head_timeout), float(request_timeout)
resource.setrlimit(resource.RLIMIT_NOFILE,
                   (int(nofile), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


class Big:
    def collect(self):  # ~10 MB: more than the socket buffers hold for a client not reading
        g = GaugeMetricFamily("big", "filler", labels=["i"])
        for i in range(100000):
            g.add_metric([f"{i:0>80}"], i)
        yield g


class NoDatapath:
    def render_large(self):  # the kernel's per-service families: none without a datapath
        return b""


class Agent:
    ready = True
    registry = CollectorRegistry()
    datapath_metrics = NoDatapath()

    def status(self):
        return {"ok": True}

    def services_view(self):
        return []


agent = Agent()
if "big" in mode:
    agent.registry.register(Big())
servers = [metrics.MetricsServer(agent, agent.registry, "127.0.0.1:0"),
           api.AdminServer(agent, admin_path)]
if "start" in mode:
    for s in servers:
        s.start()
print(servers[0].address, flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


class Servers:
    def __init__(self, tmp_path, mode):
        self.admin = str(tmp_path / "agent.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, self.admin, mode, str(HEAD_TIMEOUT),
             str(REQUEST_TIMEOUT), str(NOFILE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        host, _, port = self.proc.stdout.readline().strip().rpartition(":")
        assert port, "the server script failed to start"
        self.addr = (host, int(port))

    def url(self, path):
        return f"http://{self.addr[0]}:{self.addr[1]}{path}"

    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _servers(tmp_path, mode):
    s = Servers(tmp_path, mode)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def servers(tmp_path):
    yield from _servers(tmp_path, "start")


@pytest.fixture
def big_servers(tmp_path):
    yield from _servers(tmp_path, "start big")


@pytest.fixture
def listening_servers(tmp_path):
    """Bound and listening, but not accepting: an agent busy elsewhere."""
    yield from _servers(tmp_path, "listen")


class Clients:
    """Sockets the test holds open; all closed at the end, even on failure."""

    def __init__(self):
        self.socks = []

    def open(self, family, addr, n):
        # A server that does not keep up makes connects fail or crawl: within a bound, what
        # the tests check comes after.
        deadline = time.monotonic() + 10 * TIME_SCALE
        for _ in range(n):
            if time.monotonic() > deadline:
                return
            s = socket.socket(family, socket.SOCK_STREAM)
            self.socks.append(s)
            s.settimeout(1)
            try:
                s.connect(addr)
            except OSError:
                pass

    def close(self):
        for s in self.socks:
            s.close()


@pytest.fixture
def clients():
    c = Clients()
    try:
        yield c
    finally:
        c.close()


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout * TIME_SCALE
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def scrape(servers, path="/metrics"):
    with urllib.request.urlopen(servers.url(path), timeout=5 * TIME_SCALE) as r:
        return r.status, r.read().decode()


def rejected(text, server):
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "nodemesh_http_connections_rejected_total" and \
                    s.labels == {"server": server}:
                return s.value
    return None


def test_idle_connections_past_the_cap_cost_no_thread_and_a_scrape_still_answers(servers, clients):
    baseline = servers.fds()
    clients.open(socket.AF_INET, servers.addr, NOFILE + 100)

    status, text = scrape(servers)
    assert status == 200
    assert rejected(text, "metrics") >= NOFILE + 100 - metrics.MAX_CONNECTIONS
    assert scrape(servers, "/healthz") == (200, "ok\n")
    assert scrape(servers, "/readyz") == (200, "ready\n")
    assert servers.fds() <= baseline + metrics.MAX_CONNECTIONS + 2
    # The idle clients still hold their ends; the server drops its own after HEAD_TIMEOUT.
    assert wait_for(lambda: servers.fds() <= baseline + 1, HEAD_TIMEOUT + 5), \
        f"{servers.fds()} descriptors open, {baseline} before the idle clients"
    assert scrape(servers)[0] == 200


def test_a_client_trickling_its_request_head_is_dropped_at_the_head_timeout(servers):
    with socket.create_connection(servers.addr, timeout=2) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        started = time.monotonic()
        closed = False
        # Each header resets any per-read timeout; only a bound on the whole head ends this.
        while not closed and time.monotonic() - started < (HEAD_TIMEOUT + 4) * TIME_SCALE:
            time.sleep(0.2)
            try:
                s.sendall(b"X-Slow: 1\r\n")
                closed = bool(select.select([s], [], [], 0)[0]) and s.recv(1) == b""
            except (ConnectionResetError, BrokenPipeError):
                closed = True
        assert closed, "the server still waits for a head trickled in for seconds"


def test_a_client_that_does_not_read_its_response_is_dropped_at_the_request_timeout(big_servers):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        s.settimeout(10 * TIME_SCALE)
        s.connect(big_servers.addr)
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        time.sleep(REQUEST_TIMEOUT + 3)
        got = len(head.split(b"\r\n\r\n", 1)[1])
        try:
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
        except ConnectionResetError:
            pass
        assert got < length, "the server waited for the client to read the whole response"
    finally:
        s.close()


def test_200_clients_holding_the_admin_socket_neither_block_status_nor_use_a_descriptor_each(
        servers, clients):
    baseline = servers.fds()
    clients.open(socket.AF_UNIX, servers.admin, 200)
    assert api.get(servers.admin, "/v1/status", timeout=5 * TIME_SCALE) == {"ok": True}
    assert servers.fds() <= baseline + api.MAX_CONNECTIONS + 2
    status, text = scrape(servers)
    assert rejected(text, "admin") >= 200 - api.MAX_CONNECTIONS


def test_the_admin_backlog_queues_200_clients_while_the_agent_accepts_none(listening_servers):
    socks = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.setblocking(False)  # a full backlog fails at once with EAGAIN
            s.connect(listening_servers.admin)
    finally:
        for s in socks:
            s.close()


# --- the client: api.get ------------------------------------------------------------------

def _serve_one_status_after(listener, delay, listen_late=False):
    """After `delay`, accepts until a client sends a request and answers it; the connections
    that fill the backlog are closed, which is what frees room for the waiting client."""
    def run():
        time.sleep(delay)
        if listen_late:
            listener.listen(8)
        deadline = time.monotonic() + 5 * TIME_SCALE
        while time.monotonic() < deadline:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(0.2)
                try:
                    if conn.recv(4096).startswith(b"GET "):
                        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\n"
                                     b'{"ok": true}')
                        return
                except socket.timeout:
                    pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_status_waits_for_room_in_a_full_backlog_instead_of_failing_with_eagain(tmp_path):
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fillers = []
    try:
        listener.bind(path)
        listener.listen(0)
        listener.settimeout(5 * TIME_SCALE)
        with pytest.raises(BlockingIOError):
            for _ in range(16):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                fillers.append(s)
                s.setblocking(False)
                s.connect(path)
        t = _serve_one_status_after(listener, 0.3)
        assert api.get(path, "/v1/status", timeout=5 * TIME_SCALE) == {"ok": True}
        t.join()
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_status_waits_for_an_agent_that_has_bound_but_not_yet_listens(tmp_path):
    path = str(tmp_path / "starting.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.settimeout(5 * TIME_SCALE)
        t = _serve_one_status_after(listener, 0.1, listen_late=True)
        assert api.get(path, "/v1/status", timeout=5 * TIME_SCALE) == {"ok": True}
        t.join()
    finally:
        listener.close()


def test_a_stale_socket_is_still_reported_as_no_agent_listening(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, as after a SIGKILL
    started = time.monotonic()
    with pytest.raises(api.AdminUnavailable, match="no agent is listening"):
        api.get(path, "/v1/status", timeout=30)
    assert time.monotonic() - started < 5, "waited for a listener that will never come"


# --- still serving as before --------------------------------------------------------------

def test_a_head_split_anywhere_across_reads_is_answered(servers):
    request = b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n"
    for cut in (len(request) - 1, len(request) - 2, len(request) - 3, 5):
        with socket.create_connection(servers.addr, timeout=5 * TIME_SCALE) as s:
            s.sendall(request[:cut])
            time.sleep(0.05)
            s.sendall(request[cut:])
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.0 200 ") and reply.endswith(b"\r\n\r\nok\n"), cut


def test_metrics_are_served_on_an_ipv6_address():
    from prometheus_client import CollectorRegistry

    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")

    class Agent:
        ready = False

    try:
        server = metrics.MetricsServer(Agent(), CollectorRegistry(), "[::1]:0")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    server.start()
    try:
        assert server.address.startswith("[::1]:")
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://{server.address}/readyz", timeout=5 * TIME_SCALE)
        assert not_ready.value.code == 503
    finally:
        server.stop()


def test_a_scrape_that_takes_longer_to_render_than_the_request_timeout_is_written_whole(
        monkeypatch):
    """At 100,000 services on a loaded node, rendering /metrics takes seconds; the time to write
    the response is counted from its first byte, so a slow render does not cut the body off
    (the client saw http.client.IncompleteRead). The server's clock is made to jump past the
    request timeout while the body renders, so no real time is spent and no wall clock decides
    the outcome."""
    import http.client
    import types

    from prometheus_client import CollectorRegistry

    from nodemesh import serving

    jumped = [0.0]
    monkeypatch.setattr(serving, "time", types.SimpleNamespace(
        monotonic=lambda: time.monotonic() + jumped[0]))
    body = b"#" + b"x" * (16 << 20) + b"\n"  # 16 MiB: more than loopback's socket buffers hold

    class SlowToRender:
        def render_large(self):
            jumped[0] += 2 * serving.REQUEST_TIMEOUT  # rendering "took" twice the timeout
            return body

    class Agent:
        ready = True
        datapath_metrics = SlowToRender()

    server = metrics.MetricsServer(Agent(), CollectorRegistry(), "127.0.0.1:0")
    server.start()
    host, port = server.server.socket.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60 * TIME_SCALE)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        assert response.read().endswith(body)  # IncompleteRead when the write was cut off
    finally:
        conn.close()
        server.stop()
