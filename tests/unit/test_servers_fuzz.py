"""Issue 14: the metrics port and the admin socket fuzzed with malformed and oversized HTTP,
and the admin API's methods. Each example is sent to the real servers (in a subprocess with
a stub agent, as in test_servers_abuse); after every example both still answer, the process
is alive, and no descriptor leaks."""
import socket
import threading
import time

import pytest
from fuzzing import FUZZ
from helpers import TIME_SCALE
from hypothesis import given, settings
from hypothesis import strategies as st
from test_servers_abuse import Servers, scrape, wait_for

from nodemesh import api, serving

# A 70 kB example (a long header) makes hypothesis warn about its repr: harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"CONNECT",
           b"TRACE", b"BREW", b"get", b"", b"G\x00T", b"\xff\xfe"]
PATHS = [b"/metrics", b"/healthz", b"/readyz", b"/v1/status", b"/v1/services", b"/",
         b"*", b"//", b"/%00", b"/%", b"/../../etc/passwd", b"/v1/status?x=" + b"a" * 5000,
         b"http://x/metrics", b"/\xff", b""]
VERSIONS = [b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1", b"HTTP/1.1.1",
            b"XTTP/1.1", b"", b"HTTP/99999999999999999999.0"]
HEADERS = st.lists(st.one_of(
    st.sampled_from([b"Host: x", b"Content-Length: -1", b"Content-Length: 99999999999",
                     b"Content-Length: abc", b"Transfer-Encoding: chunked", b"Expect: 100-continue",
                     b"Connection: keep-alive", b": novalue", b"NoColon", b" folded: line",
                     b"X: " + b"y" * 70000, b"\x00: \x00"]),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b)), max_size=6)
ENDINGS = [b"\r\n\r\n", b"\n\n", b"\r\n", b"", b"\r\n\r\nbody", b"\n\r\n"]

requests = st.one_of(
    st.builds(lambda m, p, v, h, e, sep: m + b" " + p + b" " + v + sep + sep.join(h) + e,
              st.sampled_from(METHODS), st.sampled_from(PATHS), st.sampled_from(VERSIONS),
              HEADERS, st.sampled_from(ENDINGS), st.sampled_from([b"\r\n", b"\n", b"\r"])),
    st.binary(max_size=300),
    st.sampled_from([b"\r\n\r\n", b"GET / HTTP/1.0\r\n" + b"X: y\r\n" * 20000 + b"\r\n",
                     b"A" * (serving.MAX_HEAD + 10), b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc"]),
)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    s = Servers(tmp_path_factory.mktemp("fuzz"), "start")
    s.baseline = s.fds()
    try:
        yield s
    finally:
        s.stop()


def send(family, addr, data: bytes) -> bytes:
    """Send a request, half-close, read what comes back (bounded by the server's timeouts)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(serving.HEAD_TIMEOUT + serving.REQUEST_TIMEOUT + 5 * TIME_SCALE)
        s.connect(addr)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while len(reply) < 1 << 20 and (chunk := s.recv(65536)):
                reply += chunk
        except OSError:
            reply = b""  # dropped (oversized head, say) before we finished: fine
        return reply


@settings(FUZZ, max_examples=150, deadline=None)  # a hang shows as the socket timeout
@given(request=requests)
def test_malformed_http_never_takes_the_metrics_port_or_admin_socket_down(servers, request):
    for family, addr in ((socket.AF_INET, servers.addr), (socket.AF_UNIX, servers.admin)):
        # Any answer (HTTP/0.9 gets a bare body, garbage a 400) or a dropped connection:
        # what matters is that the server lives and answers the next client.
        send(family, addr, request)
        assert servers.proc.poll() is None
    assert scrape(servers, "/healthz") == (200, "ok\n")
    assert api.get(servers.admin, "/v1/status", timeout=5 * TIME_SCALE) == {"ok": True}


def test_after_the_fuzzing_no_descriptor_is_left_open(servers):
    # Runs after the fuzz test on the same servers (module scope, file order).
    assert wait_for(lambda: servers.fds() <= servers.baseline, serving.HEAD_TIMEOUT + 5), \
        f"{servers.fds()} descriptors open, {servers.baseline} before the fuzzing"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_the_admin_api_refuses_every_method_that_would_change_state(servers, method):
    assert not api.CHANGES_STATE  # none exists: changes come from the config or Kubernetes
    reply = send(socket.AF_UNIX, servers.admin,
                 f"{method} /v1/status HTTP/1.0\r\nContent-Length: 0\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.0 405 ") and b"read-only" in reply, reply[:200]


def test_50_concurrent_scrapers_and_10_slow_readers_all_get_whole_answers(servers):
    slow = []
    try:
        for _ in range(10):  # ask, then never read: each holds a worker until REQUEST_TIMEOUT
            s = socket.create_connection(servers.addr, timeout=5)
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            slow.append(s)
        results, errors = [], []

        def scraper():
            try:
                for _ in range(3):
                    results.append(scrape(servers))
            except Exception as e:  # noqa: BLE001 - counted and shown
                errors.append(repr(e))

        threads = [threading.Thread(target=scraper) for _ in range(50)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60 * TIME_SCALE)
        assert not errors, errors[:3]
        assert len(results) == 150
        assert all(code == 200 and "nodemesh_http_connections_rejected_total" in text
                   for code, text in results)
        assert time.monotonic() - started < 60 * TIME_SCALE  # not a speed bound: no hang
    finally:
        for s in slow:
            s.close()
