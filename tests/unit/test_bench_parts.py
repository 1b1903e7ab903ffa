"""Checks of the benchmark's own parts (bench/), no root needed:
    .venv/bin/python -m pytest -q tests/unit/test_bench_parts.py

The generated changes are shaped as kube-proxy and HAProxy make them, the tools' outputs are
parsed, and pace.lua holds wrk to a fixed rate (real wrk against a server on 127.0.0.1).
"""
from __future__ import annotations

import http.server
import ipaddress
import os
import shutil
import socketserver
import subprocess
import sys
import threading

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "bench"))

import baselines as bl  # noqa: E402
import workloads as wl  # noqa: E402

CIDR = "198.18.7.0/24"
OLD = ["198.18.7.201", "198.18.7.202", "198.18.7.203"]
NEW = ["198.18.7.204", "198.18.7.205", "198.18.7.206"]


def specs(n: int, endpoints=OLD):
    vip, pod = ipaddress.IPv4Address("10.96.0.1"), ipaddress.IPv4Address("10.240.0.1")
    out = [bl.SvcSpec("bench", f"svc-{i}", "http", str(vip + i), 80,
                      [str(pod + 3 * i + j) for j in range(3)], 8080) for i in range(n - 1)]
    out.append(bl.SvcSpec("bench", "last", "dns", "10.97.0.1", 53, endpoints, 5353, "udp"))
    out.append(bl.SvcSpec("bench", "last", "http", "10.97.0.1", 80, endpoints, 8080))
    return out


def test_iptables_change_rewrites_kube_services_and_only_the_changed_service_chains():
    before, after = specs(50), specs(50, NEW)
    text = bl.iptables_change(after, list(zip(before[-2:], after[-2:])), CIDR)
    lines = text.splitlines()
    jumps = [line for line in lines if line.startswith("-A KUBE-SERVICES ")]
    assert len(jumps) == 52  # 49 + the last service's 2 ports + the nodeports rule
    assert "-m udp -p udp -d 10.97.0.1 --dport 53" in text
    for old, new in zip(before[-2:], after[-2:]):
        for ep in OLD:
            assert f"-X {old.sep_chain(ep)}" in lines
        for ep in NEW:
            assert f":{new.sep_chain(ep)} - [0:0]" in lines
            assert f"-j DNAT --to-destination {ep}:{new.target_port}" in text
    # an unchanged service's chains are not written again
    assert before[0].svc_chain() not in text.replace(f"-j {before[0].svc_chain()}", "")


def test_nftables_change_does_not_grow_with_n():
    small = bl.nftables_change(list(zip(specs(2)[-1:], specs(2, NEW)[-1:])), CIDR)
    big = bl.nftables_change(list(zip(specs(5000)[-1:], specs(5000, NEW)[-1:])), CIDR)
    assert small == big
    old = specs(2)[-1]
    for ep in OLD:
        assert f"delete chain ip kube-proxy {old.nft_endpoint_chain(ep)}" in small
    assert "numgen random mod 3 vmap" in small


def test_haproxy_listens_on_tcp_ports_only_one_address_per_service():
    cfg = bl.haproxy_config(specs(3), "/tmp/x.pid", "/tmp/x.sock")
    assert "bench-last-dns" not in cfg  # haproxy has no UDP
    assert f"bind {bl.haproxy_frontend(2)}:80" in cfg
    assert "stats socket /tmp/x.sock mode 600 level admin" in cfg
    change = bl.haproxy_change(list(zip(specs(3)[-2:], specs(3, NEW)[-2:])))
    assert change.count("set server bench-last-http/ep") == 3
    assert "dns" not in change


def test_tool_outputs_are_parsed():
    paced = wl.parse_paced("NMPACE requests=20000 duration_us=2000000 p50_us=120 "
                           "p99_us=950 max_us=4000 errors=0\n")
    assert (paced.rate, paced.p50_ms, paced.p99_ms) == (10000.0, 0.12, 0.95)
    udp = wl.parse_dnsperf("""
  Queries sent:         2000
  Queries completed:    2000 (100.00%)
  Queries lost:         0 (0.00%)
  Queries per second:   1999.826015

  Average Latency (s):  0.000060 (min 0.000019, max 0.000871)
""")
    assert (udp.qps, udp.mean_ms, udp.max_ms, udp.sent, udp.lost) == pytest.approx(
        (1999.826015, 0.06, 0.871, 2000, 0))
    assert wl.parse_iperf3('{"end": {"sum_received": {"bits_per_second": 9.5e9}}}') == 9.5
    with pytest.raises(RuntimeError, match="busy"):
        wl.parse_iperf3('{"start": {}, "error": "the server is busy running a test"}')


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 65536  # one write per response (flushed after each request) ...
    disable_nagle_algorithm = True  # ... sent at once: no Nagle + delayed-ACK 40 ms stalls

    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args):
        pass


@pytest.mark.skipif(not shutil.which("wrk"), reason="wrk is not installed")
def test_pace_lua_holds_wrk_to_the_fixed_rate():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Quiet)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = subprocess.run(["wrk", "-t1", "-c4", "-d2s", "-s", wl.PACE_LUA,
                              f"http://127.0.0.1:{server.server_address[1]}/", "--", "300"],
                             capture_output=True, text=True, timeout=30).stdout
    finally:
        server.shutdown()
        server.server_close()
    paced = wl.parse_paced(out)
    # unpaced, a loopback server answers thousands a second: 300 ± 15% means pacing works
    assert 255 <= paced.rate <= 345, out
    assert paced.errors == 0
