"""Checks of the benchmark's own parts (bench/), no root needed:
    .venv/bin/python -m pytest -q tests/unit/test_bench_parts.py

The generated changes are shaped as kube-proxy and HAProxy make them, the tools' outputs are
parsed, pace.lua holds wrk to a fixed rate (real wrk against a server on 127.0.0.1), and the
parts of run.py's variants that need no kernel: nodemesh-tc's NodePorts, nodemesh+policy's
rule set, a failed workload's report, the quick mode's defaults.
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
import run  # noqa: E402
import variants as vr  # noqa: E402
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


def bare(cls, name=None):
    """A variant with its records and none of its netns, datapath or servers."""
    v = object.__new__(cls)
    if name:
        v.name = name
    v.new_records()
    return v


def test_the_tc_variant_gives_nodeports_to_the_measured_service_only():
    v = bare(vr.NodemeshTc)
    services = v.services(specs(4))
    last = services[-1]
    assert last.name == "last"
    assert {p.name: p.node_port for p in last.ports} == {"dns": vr.NODE_PORTS["dns"],
                                                       "http": vr.NODE_PORTS["http"]}
    assert last.external_traffic_policy == "Cluster"  # kube-proxy's default: SNAT
    assert all(p.node_port is None for s in services[:-1] for p in s.ports)
    assert v.target("http") == (vr.EXT_NODE, vr.NODE_PORTS["http"])
    # the socket variants have no NodePorts at all
    assert all(p.node_port is None for s in bare(vr.Nodemesh).services(specs(4))
               for p in s.ports)


def policy_services(n):
    from nodemesh.model import Backend, Service, ServicePort
    return [Service(f"svc-{i}", "bench", str(ipaddress.IPv4Address("10.96.0.1") + i),
                    (ServicePort(80, 8080, "TCP", "http"),) if i < n - 1 else
                    (ServicePort(53, 5353, "UDP", "dns"), ServicePort(80, 8080, "TCP", "http")),
                    (Backend("198.18.7.201"),)) for i in range(n)]


@pytest.mark.parametrize("n, targets", [(1, 1), (300, 200)])
def test_policy_variant_loads_10000_rules_that_admit_the_client_and_deny_others(n, targets):
    from nodemesh.datapath import maps as m
    from nodemesh.datapath.loader import cgroup2_root
    from nodemesh.policy import decide

    cgroups = [os.path.join(cgroup2_root(), "bench", f"wl-{i}") for i in range(1000)]
    services = policy_services(n)
    mesh = vr.policy_mesh(services, cgroups)
    assert len(mesh.policies) == vr.POLICY_RULES == 10000
    assert len(mesh.workloads) == 1000
    named = {p.service for p in mesh.policies}
    assert len(named) == targets and services[-1].name in named  # the last min(N, 200)
    keys = [w.key for w in mesh.workloads]
    for port in (53, 80):  # the client (workload 0) reaches every port of the measured one
        assert decide(mesh.policies, "bench", services[-1].name, port, keys[0])[0] == \
            m.VERDICT_ALLOW
    verdicts = [decide(mesh.policies, "bench", services[-1].name, 80, k)[0] for k in keys[1:40]]
    assert m.VERDICT_DENY in verdicts  # the rules bite: others are refused


class _Failing(vr.Variant):
    name = "nodemesh+sockmap"


def test_a_failed_workload_is_reported_failed_with_its_reason_and_the_run_goes_on():
    good, bad = bare(vr.Direct), bare(_Failing)
    bench = object.__new__(run.Bench)
    bench.variants = {"direct": good, bad.name: bad}
    bench.requests = {}
    rounds = {"n": 0}

    def run_workload(v, n, workload, seconds, counted=True):
        if v is bad and rounds["n"] > 0:
            raise RuntimeError("iperf3 failed (1): unable to write to stream socket: Cannot "
                               "allocate memory")
        v.add("bulk1", n, 9.0)
        v.add("bulk8", n, 9.5)
    bench.run_workload = run_workload
    for rounds["n"] in range(3):
        for v in bench.active(10, "bulk"):
            bench.attempt(v, 10, "bulk", 1)
    assert bench.active(10, "bulk") == [good]
    assert "round 2" in bad.failed[(10, "bulk")]
    assert "Cannot allocate memory" in bad.failed[(10, "bulk")]
    assert bad.values("bulk1", 10) == []  # its one good round is not published alone
    assert good.values("bulk1", 10) == [9.0, 9.0, 9.0]
    table = "\n".join(run.per_n_table(bench, 10, "bulk", [("1 stream", "bulk1", run.f2, True)]))
    assert f"| {bad.name} | failed (see Not run)" in table
    assert "| direct | 9.00 (9.00–9.00) | 1.00×" in table
    assert run.ratio_summary(bench, [10], "bulk1", "bulk")[2] == "| 10 | 1.00× | failed |"


def test_quick_mode_runs_every_variant_at_both_sizes_within_its_budget():
    args = run.parse(["--quick"])
    assert args.variants == list(vr.VARIANTS)  # the nine, the three new ones included
    assert {"nodemesh-tc", "nodemesh+sockmap", "nodemesh+policy"} <= set(args.variants)
    assert args.sizes == [1, 10000] and args.sizes_of["conn"] == [1, 10000]
    assert args.reps >= 5
    # measuring only: set-up and programming take about 2 more minutes (README, Performance)
    assert run.estimate(args) < 8 * 60
    assert run.parse(["--quick", "--workloads", "conn,bulk"]).workloads == ["conn", "bulk"]


def test_haproxy_at_100000_services_is_not_run_for_lack_of_file_descriptors(monkeypatch):
    v = bare(vr.Haproxy)
    v.proc = None
    monkeypatch.setattr(vr.resource, "getrlimit", lambda _: (1024, 20000))
    with pytest.raises(vr.NotRun, match="hard RLIMIT_NOFILE here is 20,000"):
        v.program(100000, specs(2))


def test_the_hooks_a_half_made_variant_recorded_are_removed_at_the_end(monkeypatch, tmp_path):
    monkeypatch.setattr(vr, "STATE_DIR", str(tmp_path / "state"))
    cgroup = tmp_path / "cg-nodemesh-tc"
    (cgroup / "wl-0" / "pod").mkdir(parents=True)
    vr.record_private_hooks("nmbtest", str(cgroup), str(tmp_path / "no-such-pins"))
    vr.forget_private_hooks("nmbtest")  # run.py's last step, whatever happened before
    assert not cgroup.exists()
    assert os.listdir(tmp_path / "state") == []
