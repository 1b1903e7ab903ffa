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
import json
import os
import shutil
import socketserver
import subprocess
import sys
import threading

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "bench")
sys.path.insert(0, BENCH)

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


TC_ROW = "nodemesh-tc ≥ 0.85× direct-routed (the node forwarding untouched), every N"


def bare(cls, name=None):
    """A variant with its records and none of its netns, datapath or servers."""
    v = object.__new__(cls)
    if name:
        v.name = name
    v.new_records()
    return v


def paired_conn_bench(names, *args):
    """A Bench of bare variants whose clients name themselves, for the paired conn rounds:
    no netns, no resets, no requests counted yet."""
    bench = object.__new__(run.Bench)
    bench.args = run.parse(["--sizes", "1", "--variants", ",".join(names), "--workloads",
                            "conn", *args])
    bench.variants = {name: bare(vr.VARIANTS[name], name) for name in names}
    for v in bench.variants.values():
        v.client = lambda port, v=v: v.name
        v.resident_netns = lambda: []
    bench.requests, bench.reset = {}, lambda *vs: None
    return bench


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


def test_quick_mode_runs_every_variant_to_10000_and_the_socket_path_at_100000():
    args = run.parse(["--quick"])
    assert args.variants == list(vr.VARIANTS)  # the nine, the A/A test and direct-routed
    assert {"nodemesh-tc", "nodemesh+sockmap", "nodemesh+policy"} <= set(args.variants)
    assert args.sizes == [1, 10000, 100000] and args.sizes_of["conn"] == [1, 10000, 100000]
    assert args.only_at == {100000: ["direct", "direct-aa", "nodemesh"]}
    assert args.sizes_of["keepalive"] == [10000]  # the largest N every variant runs at
    assert args.sizes_of["change"] == [1, 10000, 100000]
    assert args.reps >= 5
    # conn: 5 rounds of 1 s alone and 12 paired rounds (nodemesh and the A/A test beside
    # direct, nodemesh-tc beside direct-routed)
    assert args.seconds_of["conn"] == 1 and args.reps_of["conn"] == 5
    assert args.pair_rounds == 8
    assert args.seconds_of["keepalive"] == 1 and args.reps_of["keepalive"] == 5
    # measuring only: set-up and programming take about 2.5 more minutes (README)
    assert run.estimate(args) < 8 * 60
    assert run.parse(["--sizes", "1", "--reps", "3"]).pair_rounds == 3
    # keep-alive: its target's variants and the paths that touch every packet
    bench = object.__new__(run.Bench)
    bench.args = args
    bench.variants = {name: bare(vr.VARIANTS[name], name) for name in args.variants}
    assert [v.name for v in bench.active(10000, "keepalive")] == [
        "direct", "nodemesh", "haproxy", "nodemesh-tc", "nodemesh+sockmap"]
    assert len(bench.active(10000, "conn")) == len(args.variants)
    assert run.parse(["--quick", "--pair-rounds", "20"]).pair_rounds == 20
    assert run.parse(["--quick", "--workloads", "conn,bulk"]).workloads == ["conn", "bulk"]


def test_haproxy_at_100000_services_gets_its_descriptors_from_prlimit(monkeypatch, tmp_path):
    """Above this process's RLIMIT_NOFILE, haproxy alone runs under `prlimit --nofile`, after
    fs.nr_open is raised if it is lower (and put back at close); only where the limit cannot
    be raised is it not run, with the reason."""
    v = bare(vr.Haproxy)
    v.nr_open_before = None
    nr_open = tmp_path / "nr_open"
    nr_open.write_text("65536\n")
    monkeypatch.setattr(vr, "NR_OPEN", str(nr_open))
    monkeypatch.setattr(vr.resource, "getrlimit", lambda _: (1024, 20000))
    tried = []
    monkeypatch.setattr(vr, "try_prefix", lambda prefix: tried.append(prefix) or "")
    need = bl.haproxy_fds(100000)
    assert v.fd_limit(need, 100000) == ["prlimit", f"--nofile={need}:{need}", "--"]
    assert tried == [vr.nofile_prefix(need)]
    assert int(nr_open.read_text()) == need and v.nr_open_before == 65536
    v.stop = lambda: None
    v.close()
    assert nr_open.read_text() == "65536"
    assert v.fd_limit(1000, 1) == []  # within the soft limit: nothing to raise
    assert f"ulimit-n {bl.haproxy_fds(2)}" in bl.haproxy_config(specs(2), "/tmp/x.pid")
    monkeypatch.setattr(vr, "try_prefix", lambda prefix: "prlimit: failed to set the NOFILE "
                        "resource limit: Operation not permitted")
    with pytest.raises(vr.NotRun, match="hard RLIMIT_NOFILE here is 20,000 and raising it "
                       "failed .*Operation not permitted.*CAP_SYS_RESOURCE"):
        v.fd_limit(need, 100000)


def test_a_load_predicted_over_the_limit_is_not_tried_and_is_reported(monkeypatch):
    # nothing measured yet, or within the limit scaled linearly: try it
    assert run.predicted_over({}, {}, 100000, 900) is None
    assert run.predicted_over({10000: 48.8}, {}, 100000, 900) is None
    # 48.8 s at 10,000 -> at least 488 s at 100,000: over a 300 s limit
    got = run.predicted_over({1000: 2.0, 10000: 48.8}, {}, 100000, 300)
    assert got is not None and got[0] == pytest.approx(488.0)
    assert "10,000 services took 48.8 s" in got[1] and "not tried" in got[1]
    # not from a load that fixed costs dominate, nor from more than ×10 below (the quick
    # mode's 1 -> 10,000 skipped every baseline on a loaded machine before this)
    assert run.predicted_over({1: 0.1}, {}, 10000, 120) is None
    assert run.predicted_over({1: 5.6}, {}, 10000, 120) is None  # nodemesh+policy's rules
    assert run.predicted_over({1000: 0.9}, {}, 10000, 5) is None
    assert run.predicted_over({1000: 20.0}, {}, 10000, 120)[0] == pytest.approx(200)
    # over the limit at a smaller N: over it at every larger N
    assert run.predicted_over({1: 0.1}, {10000: 300.0}, 100000, 300)[0] == pytest.approx(3000)
    v = bare(vr.Nftables, "nftables")
    v.load_s[10000], v.rules[10000] = 48.8, 90036
    v.program = lambda n, specs: pytest.fail("programmed although predicted over the limit")
    bench = object.__new__(run.Bench)
    bench.args = run.parse(["--full", "--load-timeout", "300"])
    bench.variants = {"nftables": v}
    bench.program(100000)
    assert "not tried" in v.not_run[100000] and v.load_over[100000] == pytest.approx(488.0)
    monkeypatch.setattr(run, "tool_versions", lambda: "tools")
    bench.rate, bench.direct_max, bench.load, bench.requests = {}, {}, {}, {}
    bench.args.commands = ["bench/run.py --full"]
    text = run.report(bench, bench.args, [], "bench/run.py --full")
    assert "| 100,000 | " in text and "> 488 s: not run" in text
    assert "- nftables, N = 100,000: programming 10,000 services took 48.8 s" in text


def test_the_full_mode_estimate_counts_programming_changes_and_set_up():
    full = run.estimate_parts(run.parse(["--full"]))
    assert set(full) == {"set-up", "programming", "measuring", "changes", "footprint"}
    # iptables-legacy and nftables at 100,000 (over 600 s and 488 s here) count once each
    # at the 900 s limit; iptables-nft's 436 s and the rest add up to under 20 minutes
    assert 2 * 900 <= full["programming"] < 2 * 900 + 20 * 60
    assert full["changes"] > 60 and full["footprint"] > 0
    assert 2.5 * 3600 < sum(full.values()) < 4.5 * 3600
    part = run.estimate_parts(run.parse(["--full", "--sizes", "100000", "--variants",
                                         "direct,nodemesh", "--workloads", "conn,change"]))
    assert sum(part.values()) < 15 * 60
    quick = run.parse(["--quick"])
    assert sum(run.estimate_parts(quick).values()) < 10 * 60


def test_placement_pins_clients_and_servers_to_their_cpus(monkeypatch):
    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)
    assert run.parse(["--quick"]).cpu_roles == {"client": "0", "server": "1"}
    assert run.parse(["--quick", "--cpus", "none"]).cpu_roles == {}
    assert run.parse(["--quick", "--cpus", "1,1"]).cpu_roles == {"client": "1", "server": "1"}
    for bad in ("0", "0,2", "a,b"):
        with pytest.raises(SystemExit):
            run.parse(["--quick", "--cpus", bad])
    monkeypatch.setattr(wl, "CPUS", {"client": "0", "server": "1"})
    assert wl.pinned("server") == ["taskset", "-c", "1"]
    started = []

    class Lab:
        processes: list = []
    monkeypatch.setattr(wl.subprocess, "Popen", lambda argv, **kw: started.append(argv))
    wl.spawn(Lab(), ["wrk", "x"], "ns1", None)
    assert started[0][-1] == "exec ip netns exec ns1 taskset -c 0 wrk x"


def two_parts(monkeypatch):
    """Part 1: direct and nodemesh at N = 1; part 2: N = 100,000 with haproxy too."""
    monkeypatch.setattr(run, "tool_versions", lambda: "tools")

    def part(argv, figures, rate):
        bench = object.__new__(run.Bench)
        bench.args = run.parse(argv)
        bench.variants = {}
        for name, (n, conn, load) in figures.items():
            v = bare(vr.VARIANTS[name], name)
            v.data["conn"][n] = conn
            v.load_s[n], v.rules[n] = load, 3
            bench.variants[name] = v
        bench.rate, bench.direct_max = ({"keepalive": rate}, {"keepalive": [2 * rate]})
        bench.load, bench.requests = {}, {}
        return bench
    one = part(["--sizes", "1", "--variants", "direct,nodemesh", "--workloads", "conn"],
               {"direct": (1, [100.0, 110.0], 0.0), "nodemesh": (1, [98.0, 99.0], 0.01)}, 500)
    two = part(["--sizes", "100000", "--variants", "direct,nodemesh,haproxy", "--workloads",
                "conn,change"], {"direct": (100000, [100.0], 0.0),
                                 "nodemesh": (100000, [97.0], 9.0),
                                 "haproxy": (100000, [40.0], 30.0)}, 700)
    two.variants["nodemesh"].data["change"][100000] = [0.03, 0.04]
    two.variants["nodemesh"].data["change_cpu"][100000] = [0.001, 0.001]
    return one, two


def test_parts_appended_end_in_one_report_of_both(monkeypatch):
    import json
    one, two = two_parts(monkeypatch)
    rec = json.loads(json.dumps(run.record(one, one.args, ["bench/run.py --sizes 1"], 2.0)))
    two.args.commands = ["bench/run.py --sizes 100000 --append r.md"]
    two.variants["nodemesh"].data["conn"][1] = [50.0]  # measured again: the new part wins
    run.merge(two, two.args, rec)
    assert two.args.sizes == [1, 100000]
    assert two.args.workloads == ["conn", "change"]
    assert list(two.variants) == ["direct", "nodemesh", "haproxy"]  # the report's order
    assert two.variants["direct"].values("conn", 1) == [100.0, 110.0]
    assert two.variants["nodemesh"].values("conn", 1) == [50.0]
    assert two.variants["nodemesh"].load_s == {1: 0.01, 100000: 9.0}
    assert two.rate["keepalive"] == 700  # this part's own rate stays
    assert two.args.commands[0] == "bench/run.py --sizes 1"
    text = run.report(two, two.args, [], two.args.commands[-1])
    assert "Parts appended into this file (--append), in order:\n\n1. date not recorded: " \
           "`bench/run.py --sizes 1`\n2. date not recorded: `bench/run.py --sizes 100000 " \
           "--append r.md`\n" in text
    assert "### N = 1: new connections/s, 2 rounds" in text
    assert "### N = 100,000: new connections/s, 1 rounds" in text
    # a variant only the earlier part ran is kept (a bare one: records, no kernel state)
    three = object.__new__(run.Bench)
    three.args = run.parse(["--sizes", "10", "--variants", "direct", "--workloads", "conn"])
    three.variants, three.rate, three.direct_max, three.load = {}, {}, {}, {}
    three.args.commands = ["third"]
    run.merge(three, three.args, rec)
    assert three.variants["nodemesh"].values("conn", 1) == [98.0, 99.0]
    assert three.rate == {"keepalive": 500}  # reused: every part paced alike


def test_the_report_says_per_target_met_or_missed_with_the_figure(monkeypatch):
    one, two = two_parts(monkeypatch)
    run.merge(two, two.args, json.loads(json.dumps(run.record(one, one.args, ["a"], 1.0))))
    rows = {line.split(" | ")[0].lstrip("| "): line
            for line in run.targets(two, two.args.sizes) if line.startswith("| ")}
    socket = rows["nodemesh ≥ 0.97× direct, new connections, every N"]
    # rounds in turn, unpaired: round by round 98/100 and 99/110 at 1, 97/100 at 100,000;
    # and 2 or 1 rounds give no 90% interval of the median: nothing to judge by
    assert "1: 0.940× (50% interval 0.900–0.980" in socket
    assert "100,000: 0.970× (0% interval 0.970–0.970" in socket
    assert "**cannot be judged** (too few rounds for a 90% interval)" in socket
    flat = next(v for k, v in rows.items() if k.startswith("nodemesh flat within 5%"))
    # 0.970 / 0.940; bounds 0.970 / 0.980 and 0.970 / 0.900
    assert "100,000 over 1: 1.032 (interval 0.990–1.078, 0% coverage)" in flat
    assert "**cannot be judged** (too few rounds" in flat
    assert "not measured" in rows[TC_ROW]
    assert "100,000: 2.42×" in rows["nodemesh ≥ 2× HAProxy's connection rate"]
    assert "**met**" in rows["nodemesh ≥ 2× HAProxy's connection rate"]
    assert "not measured" in rows["nodemesh's keep-alive p99 ≤ 0.5× HAProxy's"]
    two.variants["haproxy"].not_run[100000] = "descriptors"
    two.variants["haproxy"].data["conn"].pop(100000)
    hap_rows = [line for line in run.targets(two, two.args.sizes) if "2× HAProxy" in line]
    assert hap_rows == ["| nodemesh ≥ 2× HAProxy's connection rate | HAProxy not run at N = "
                    "100,000 | not measured |"]
    assert "9.00 s | **met**" in rows["nodemesh programs 100,000 services in ≤ 10 s"]
    change = next(v for k, v in rows.items() if k.startswith("one change at 100,000"))
    assert "35.0 ms (30.0–40.0) | **met**" in change


def test_the_hooks_a_half_made_variant_recorded_are_removed_at_the_end(monkeypatch, tmp_path):
    monkeypatch.setattr(vr, "STATE_DIR", str(tmp_path / "state"))
    cgroup = tmp_path / "cg-nodemesh-tc"
    (cgroup / "wl-0" / "pod").mkdir(parents=True)
    vr.record_private_hooks("nmbtest", str(cgroup), str(tmp_path / "no-such-pins"))
    vr.forget_private_hooks("nmbtest")  # run.py's last step, whatever happened before
    assert not cgroup.exists()
    assert os.listdir(tmp_path / "state") == []


def test_directs_clients_run_in_a_cgroup_without_hooks_beside_the_hooked_one(monkeypatch,
                                                                            tmp_path):
    # the pair is fair when nodemesh's clients differ from direct's by the hooks only: not
    # the cgroup v2 root for one and a child cgroup for the other
    monkeypatch.setattr(vr, "STATE_DIR", str(tmp_path / "state"))
    hooked = tmp_path / "nodemesh-nmbx"
    hooked.mkdir()
    v = bare(vr.Direct)
    v.bench = type("Bench", (), {"lab": type("Lab", (), {"cgroup": str(hooked),
                                                         "prefix": "nmbx"})})()
    v.cgroup = v.plain_cgroup()
    assert os.path.dirname(v.cgroup) == str(tmp_path) and v.cgroup != str(hooked)
    assert os.path.isdir(v.cgroup)
    with open(tmp_path / "state" / "nmbx.json") as f:
        assert json.load(f) == {"pid": os.getpid(), "cgroups": [v.cgroup], "bpffs": []}
    v.close()
    assert not os.path.exists(v.cgroup) and hooked.is_dir()


def test_the_conn_tables_state_the_cpu_pressure_of_their_runs(monkeypatch, tmp_path):
    one, _ = two_parts(monkeypatch)
    for v in one.variants.values():
        v.data["conn_stall"][1] = [0.02, 0.40]
    one.args.commands = ["x"]
    text = run.report(one, one.args, [], "x")
    assert "CPU pressure during these runs (PSI: share of the run some task waited for a " \
           "CPU): median 21%, 2%–40%" in text
    pressure = tmp_path / "cpu"
    pressure.write_text("some avg10=1.00 avg60=0.50 avg300=0.10 total=2500000\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(
        pressure if p == "/proc/pressure/cpu" else p, *a, **k))
    assert run.cpu_stall() == 2.5


def test_netfilter_counters_are_read_once_after_the_conn_runs_not_before():
    """iptables-save -c took ~3 min at 100,000 services: its rules' counters start at 0 when
    loaded, so only nodemesh's (cumulative map counters) are read before the runs."""
    ipt, nm = bare(vr.Iptables, "iptables-nft"), bare(vr.Nodemesh, "nodemesh")
    reads = []
    for v in (ipt, nm):
        v.proof = lambda n, requests, v=v: reads.append((v.name, requests)) or "read"
    bench = object.__new__(run.Bench)
    bench.args = run.parse(["--sizes", "10", "--variants", "iptables-nft,nodemesh",
                            "--workloads", "conn", "--reps", "1"])
    bench.variants = {"iptables-nft": ipt, "nodemesh": nm}
    bench.requests, bench.load = {}, {}
    bench.run_workload = lambda v, n, w, seconds, counted=True: None
    bench.measure(10)
    assert reads == [("nodemesh", 0), ("iptables-nft", 0), ("nodemesh", 0)]
    assert ipt.proofs[10] == "read"


# -- the connection-rate method: bracketed rounds, intervals, verdicts (issue 13) --------------
def test_median_interval_takes_the_order_statistics_that_cover_90_percent():
    assert run.median_interval([float(x) for x in range(10, 0, -1)]) == \
        (2.0, 9.0, pytest.approx(1 - 2 * 11 / 1024))  # x(3), x(8) would cover only 89%
    assert run.median_interval([5.0, 1.0, 3.0, 2.0, 4.0]) == (1.0, 5.0, 0.9375)
    low, high, coverage = run.median_interval([1.0, 2.0, 3.0, 4.0])
    assert (low, high) == (1.0, 4.0) and coverage == 0.875  # too few: min-max, said so


def paired_bench(pairs, aa=None, others=None):
    """direct, direct-aa and nodemesh with per-round ratios to direct: pairs[N] is nodemesh's,
    aa[N] direct-aa's (1.00 each round when not given)."""
    bench = object.__new__(run.Bench)
    bench.args = run.parse(["--sizes", ",".join(str(n) for n in pairs), "--variants",
                            "direct,direct-aa,nodemesh", "--workloads", "conn"])
    bench.variants = {name: bare(vr.VARIANTS[name], name)
                      for name in ("direct", "direct-aa", "nodemesh")}
    for n, xs in pairs.items():
        bench.variants["direct"].data["conn"][n] = [100.0] * (2 * len(xs) + 1)
        for name, rs in (("nodemesh", xs), ("direct-aa", (aa or {}).get(n, [1.0] * len(xs)))):
            v = bench.variants[name]
            v.data["conn"][n] = [100 * r for r in rs]
            v.data["conn_pair"][n] = list(rs)
            v.data["conn_pair_others"][n] = list((others or {}).get(n, [0.0] * len(rs)))
    return bench


def socket_rows(bench):
    rows = {line.split(" | ")[0].lstrip("| "): line
            for line in run.targets(bench, bench.args.sizes) if line.startswith("| ")}
    flat = next((v for k, v in rows.items() if k.startswith("nodemesh flat")), "")
    return rows["nodemesh ≥ 0.97× direct, new connections, every N"], flat


def test_a_rate_target_is_met_missed_or_cannot_be_judged_by_its_interval():
    steady = [0.99, 1.0, 1.01, 0.995, 1.005, 0.99, 1.0, 1.01]
    met, flat = socket_rows(paired_bench({1: steady, 100000: steady}))
    assert "1: 1.000× (93% interval 0.990–1.010; range 0.99–1.01; 8 of 8 rounds)" in met
    assert met.endswith("| **met** |") and flat.endswith("| **met** |")
    short, flat = socket_rows(paired_bench({1: steady, 100000: [x - 0.1 for x in steady]}))
    assert short.endswith("| **missed** |")  # 0.89–0.91 at 100,000: short of 0.97 throughout
    assert "100,000 over 1: 0.900 (interval 0.881–0.919, 86% coverage)" in flat
    assert flat.endswith("| **missed** |")
    wide = [0.8, 1.15, 0.9, 1.1, 0.95, 1.05, 0.85, 1.0]
    vague, flat = socket_rows(paired_bench({1: wide, 100000: wide}))
    assert "(the interval straddles the target)" in vague
    assert "**cannot be judged** (an interval straddles the target)" in flat


def test_the_a_a_tests_bias_widens_the_interval_a_verdict_is_judged_by():
    close = [0.975, 0.98, 0.985, 0.98, 0.98, 0.975, 0.985, 0.98]
    alone, _ = socket_rows(paired_bench({1: close}))
    assert alone.endswith("| met where measured; not measured at N = 100,000 |")
    biased, _ = socket_rows(paired_bench({1: close}, aa={1: [1.02] * 8}))
    assert "± 0.020 A/A bias" in biased and "**cannot be judged**" in biased


def test_rounds_disturbed_by_other_work_are_left_out_when_enough_remain():
    xs = [1.0, 1.0, 0.99, 1.01, 1.0, 0.6, 0.7, 1.4]
    busy = [0.0, 0.02, 0.05, 0.0, 0.01, 0.5, 0.3, 0.4]  # the last three over 10% of the CPUs
    v = paired_bench({1: xs}, others={1: busy}).variants["nodemesh"]
    p = run.paired(v, 1)
    assert (p.used, p.total, p.disturbed, p.spread) == (5, 8, 3, (0.99, 1.01))
    assert "5 of 8 rounds; 3 disturbed, left out" in p.describe()
    busy[4] = 0.2  # four quiet rounds only: all eight kept, and said so
    p = run.paired(paired_bench({1: xs}, others={1: busy}).variants["nodemesh"], 1)
    assert (p.used, p.disturbed) == (8, 4) and "kept: too few others" in p.describe()


def test_a_bracketed_round_pairs_each_run_with_the_direct_runs_around_it():
    bench = object.__new__(run.Bench)
    bench.args = run.parse(["--sizes", "1", "--variants",
                            "direct,direct-aa,nodemesh,haproxy", "--workloads", "conn",
                            "--order", "bracketed"])
    bench.variants = {name: bare(vr.VARIANTS[name], name)
                      for name in ("direct", "direct-aa", "haproxy", "nodemesh")}
    order = []
    figures = iter([run.Run(100, 50, 0.0), run.Run(95, 52, 0.02),    # D, direct-aa
                    run.Run(90, 55, 0.01), run.Run(72, 60, 0.3),     # D, nodemesh
                    run.Run(80, 50, 0.05), run.Run(30, 90, 0.0)])    # D; haproxy, in turn

    def attempt(v, n, workload, seconds, counted=True):
        order.append(v.name)
        return next(figures)
    bench.attempt = attempt
    bench.bracketed_round(1)
    assert order == ["direct", "direct-aa", "direct", "nodemesh", "direct", "haproxy"]
    assert bench.variants["haproxy"].values("conn_pair", 1) == []  # no target against direct
    aa, nm = bench.variants["direct-aa"], bench.variants["nodemesh"]
    assert aa.values("conn_pair", 1) == [pytest.approx(95 / 95)]
    assert aa.values("conn_cpu_pair", 1) == [pytest.approx(52 / 52.5)]
    assert nm.values("conn_pair", 1) == [pytest.approx(72 / 85)]
    assert nm.values("conn_pair_others", 1) == [0.3]  # the most any of its three runs met


def test_appended_parts_each_show_their_command_date_and_method(monkeypatch):
    one, two = two_parts(monkeypatch)
    one.args.parts = [run.this_part(one.args, "bench/run.py --sizes 1", 0.0)]
    rec = json.loads(json.dumps(run.record(one, one.args, ["bench/run.py --sizes 1"], 2.0)))
    two.args.commands = ["bench/run.py --sizes 100000 --append r.md"]
    two.args.parts = [run.this_part(two.args, two.args.commands[0], 86400.0 * 365)]
    run.merge(two, two.args, rec)
    text = run.report(two, two.args, [], two.args.commands[-1])
    assert ("1. 1970-01-01 00:00 UTC: `bench/run.py --sizes 1` (conn 5 rounds of 2 s "
            "runs, side by side with direct, CPUs ") in text
    assert "2. 1971-01-01 00:00 UTC: `bench/run.py --sizes 100000 --append r.md` (conn 5 " in text


def test_a_runs_cost_is_its_own_cpu_and_the_rest_is_other_work(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  300 20 100 5000 7 3 77 50 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    monkeypatch.setattr(wl, "CLK_TCK", 100)
    assert wl.machine_times(str(stat)) == (5.0, 0.5)  # user+nice+system+irq+softirq; steal
    clock = iter([10.0, 11.0])
    machine = iter([(100.0, 1.0), (101.5, 1.1)])
    children = iter([2.0, 2.4])  # wrk: 0.4 s of CPU
    runtime = {7: iter([5.0, 5.5]), 8: iter([1.0, 1.0])}  # nginx 0.5 s; an idle server
    monkeypatch.setattr(wl.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(wl, "machine_times", lambda: next(machine))
    monkeypatch.setattr(wl, "children_cpu", lambda: next(children))
    monkeypatch.setattr(wl, "netns_pids", lambda names: [7, 8])
    monkeypatch.setattr(wl, "task_runtime", lambda pid: next(runtime[pid]))
    spent = wl.cost(wl.meter(["client", "server"]))
    assert spent.own == pytest.approx(0.9) and spent.others == pytest.approx(0.6)
    assert spent.client == pytest.approx(0.4)
    assert spent.others_share(2) == pytest.approx((0.6 + 0.1) / 2)


def test_concurrent_pairs_run_each_target_variant_beside_direct(monkeypatch):
    bench = paired_conn_bench(("direct", "nodemesh", "haproxy"), "--order", "concurrent")
    beside = []

    def side_by_side(a, b, seconds):
        beside.append((a, b))
        return (10000.0, 10000, ""), (9600.0, 9600, "")
    monkeypatch.setattr(wl, "conn_side_by_side", side_by_side)
    bench.concurrent_pairs(1)
    assert beside == [("direct", "nodemesh")]
    assert bench.variants["nodemesh"].values("conn_pair", 1) == [0.96]
    assert bench.requests == {("direct", 1): 10000, ("nodemesh", 1): 9600}


def test_side_by_side_the_cpu_companion_comes_from_the_runs_alone_with_the_a_a_bias():
    """Two wrk at once share their CPU time: the CPU a connection is paired from the runs
    each variant made alone in the same rounds, and direct-aa's alone runs give its bias."""
    bench = paired_bench({1: [1.0] * 6})
    for name, cpu in (("direct", [50.0] * 6), ("direct-aa", [51.0] * 6),
                      ("nodemesh", [60.0, 61.0, 59.0, 60.0, 62.0, 58.0])):
        bench.variants[name].data["conn_cpu_us"][1] = cpu
        bench.variants[name].data["conn"][1] = [100.0] * 6
    rows = [line for line in run.targets(bench, [1]) if line.startswith("| companion")]
    assert "1: 1.200× (97% interval 1.160–1.240" in rows[0] and "± 0.020 A/A bias" in rows[0]
    assert rows[0].endswith("| **missed** |")  # 1/1.26 .. 1/1.14: short of 0.97 throughout


# -- nodemesh-tc's baseline, the quick mode at 100,000, flatness (issue 13) -------------------
def test_the_tc_path_is_paired_beside_direct_routed_and_judged_against_it(monkeypatch):
    """An external client's limit is the node forwarding its packet untouched: nodemesh-tc
    runs beside direct-routed, and its target row is its ratio to that; the ratio to direct
    (no node hop) stays, as a reference labelled for what it is."""
    names = ("direct", "direct-aa", "nodemesh", "nodemesh-tc", "direct-routed")
    bench = paired_conn_bench(names)
    beside = []

    def side_by_side(a, b, seconds):
        beside.append((a, b))
        rate = 10000.0 if b == "direct-aa" else 9000.0
        return (10000.0, 10000, ""), (rate, int(rate), "")
    monkeypatch.setattr(wl, "conn_side_by_side", side_by_side)
    monkeypatch.setattr(wl, "meter", lambda netns: None)
    monkeypatch.setattr(wl, "cost", lambda m: wl.Cost(1.0, 0.0, 0.0, 0.0, 0.0))
    for _ in range(8):
        bench.concurrent_pairs(1)
    assert beside[:3] == [("direct", "direct-aa"), ("direct", "nodemesh"),
                          ("direct-routed", "nodemesh-tc")]
    for name, rate in (("direct", 100.0), ("direct-routed", 80.0), ("nodemesh-tc", 72.0)):
        bench.variants[name].data["conn"][1] = [rate] * 5
    rows = {line.split(" | ")[0].lstrip("| "): line
            for line in run.targets(bench, [1]) if line.startswith("| ")}
    assert "1: 0.900× (93% interval 0.900–0.900; range 0.90–0.90; 8 of 8 rounds)" in \
        rows[TC_ROW] and rows[TC_ROW].endswith("| met where measured; not measured at N = "
                                                "100,000 |")
    reference = next(v for k, v in rows.items() if k.startswith("reference, no target"))
    assert "1: 0.72× (direct-routed 0.80×)" in reference


def test_a_pairs_resets_run_from_one_shell_once_per_netns(monkeypatch):
    bench = object.__new__(run.Bench)
    d, v = bare(vr.Direct, "direct"), bare(vr.NodemeshTc, "nodemesh-tc")
    d.netns, d.server_netns = "c1", "b1"
    v.netns, v.server_netns, v.node = "c2", "b1", "n2"
    v.reset_state = lambda: None
    calls = []
    monkeypatch.setattr(run, "sh", lambda cmd, check=True: calls.append(cmd))
    bench.reset(d, v)
    assert len(calls) == 1 and calls[0].endswith(" wait")
    assert [ns for ns in ("c1", "b1", "c2", "n2") if f"ip netns exec {ns} " in calls[0]] == \
        ["c1", "b1", "c2", "n2"] and calls[0].count("ip netns exec b1 ") == 1


def test_quick_mode_marks_the_others_not_run_at_100000_with_their_load_time():
    bench = object.__new__(run.Bench)
    bench.args = run.parse(["--quick"])
    bench.variants = {name: bare(vr.VARIANTS[name], name) for name in bench.args.variants}
    programmed = []
    for v in bench.variants.values():
        v.set_a = []
        v.load_s[10000] = 3.9
        v.program = lambda n, specs, v=v: programmed.append(v.name) or (9.0, 700014)
    bench.services = lambda n, endpoints=None, measured_only=False: []
    bench.program(100000)
    assert programmed == ["direct", "direct-aa", "nodemesh"]
    assert bench.variants["nodemesh"].load_s[100000] == 9.0
    why = bench.variants["iptables-nft"].not_run[100000]
    assert why == ("the quick mode runs only direct, direct-aa, nodemesh at N = 100,000; "
                   "programming 10,000 services took 3.9 s here, so 100,000 would take at "
                   "least 39 s (scaled linearly); `make bench FULL=1` runs it")
    assert set(bench.variants) - {n for n, v in bench.variants.items()
                                  if 100000 in v.not_run} == set(programmed)
    assert "took" not in bench.variants["direct-routed"].not_run[100000]  # nothing to load
    # direct's kind gets the measured service's ports only (it names the backend itself)
    bench.set_a = ["198.18.7.201"]
    ports = run.Bench.services(bench, 100000, measured_only=True)
    assert [(s.name, s.port_name) for s in ports] == [
        ("svc-99999", "dns"), ("svc-99999", "iperf"), ("svc-99999", "http")]


def test_flatness_is_the_ratio_at_n_over_the_ratio_at_1_with_both_intervals():
    def p(median, low, high, coverage=0.96):
        return run.Paired(median, low, high, coverage, 12, 12, 0, (low, high))
    one = p(1.00, 0.98, 1.02)
    q = run.flat_bounds(p(0.99, 0.97, 1.01), one)
    assert q == pytest.approx((0.99, 0.97 / 1.02, 1.01 / 0.98, 0.96 * 0.96))
    assert run.judge_flat({100000: q}, 0.05) == "**met**"  # 0.951–1.031: inside 1 ± 0.05
    low = run.flat_bounds(p(0.90, 0.88, 0.92), one)  # 0.863–0.939: wholly below 0.95
    assert run.judge_flat({10000: q, 100000: low}, 0.05) == "**missed**"
    wide = run.flat_bounds(p(0.97, 0.90, 1.04), one)  # 0.882–1.061: straddles 0.95
    assert run.judge_flat({100000: wide}, 0.05).startswith("**cannot be judged** (an interval")
    few = run.flat_bounds(p(0.99, 0.98, 1.0, 0.5), one)
    assert run.judge_flat({100000: few}, 0.05).startswith("**cannot be judged** (too few")


def test_paired_and_alone_rounds_are_spread_evenly_over_the_rounds():
    picked = [i for i in range(12) if run.spread(i, 5, 12)]
    assert len(picked) == 5 and picked == [2, 4, 7, 9, 11]
    assert all(run.spread(i, 12, 12) for i in range(12))
    assert not any(run.spread(i, 0, 12) for i in range(12))


def test_the_cpu_table_has_one_row_a_variant_with_its_ratio_to_its_baseline(monkeypatch):
    bench = paired_bench({1: [1.0] * 6})
    for name, cpu in (("direct", [50.0] * 6), ("direct-aa", [51.0] * 6),
                      ("nodemesh", [55.0] * 6)):
        bench.variants[name].data["conn_cpu_us"][1] = cpu
        bench.variants[name].data["conn"][1] = [100.0] * 6
    lines = run.conn_method(bench, 1)
    rows = [line for line in lines if line.startswith("| direct") or
            line.startswith("| nodemesh")]
    assert [r.split(" | ")[0] for r in rows] == ["| direct", "| direct-aa", "| nodemesh"]
    assert rows[0].endswith("| – |")  # direct is its own baseline
    assert "to direct: 1.100× (97% interval 1.100–1.100" in rows[2]


def test_changes_build_the_n_services_once_per_endpoint_set(monkeypatch):
    """At 100,000 services each build took seconds (45 s for 3 changes, loaded): the specs
    of the N services are built once per endpoint set, shared by every variant's changes."""
    import controlplane

    class Probe:
        def __init__(self, *a, **k):
            self.proc = None

        def arm(self, *a, **k):
            pass

        def result(self, timeout):
            return {"landed": 0.0}

        def close(self):
            pass
    monkeypatch.setattr(controlplane, "Probe", Probe)
    bench = object.__new__(run.Bench)
    bench.args = run.parse(["--sizes", "10", "--variants", "nodemesh,nftables", "--workloads",
                            "change", "--changes", "3"])
    bench.lab = type("Lab", (), {"processes": []})()
    bench.variants = {}
    for name in ("nodemesh", "nftables"):
        v = bare(vr.VARIANTS[name], name)
        v.set_a, v.set_b, v.netns, v.cgroup = OLD, NEW, "c", None
        v.specs = specs(10)
        v.target = lambda port_name: ("10.97.0.1", 80)
        v.change = lambda new_specs, changed: 0.001
        bench.variants[name] = v
    builds = []
    bench.services = lambda n, endpoints=None, measured_only=False: builds.append(
        tuple(endpoints)) or specs(n, endpoints)
    bench.measure_changes(10)
    assert sorted(builds) == [tuple(OLD), tuple(NEW)]  # 6 changes, 2 builds
    assert all(len(v.values("change", 10)) == 3 for v in bench.variants.values())


def test_a_tables_rounds_leave_out_the_baselines_extra_bracketing_runs():
    bench = object.__new__(run.Bench)
    bench.variants = {name: bare(vr.VARIANTS[name], name)
                      for name in ("direct", "nodemesh-tc", "direct-routed")}
    bench.variants["direct"].data["conn"][1] = [1.0] * 5
    bench.variants["direct-routed"].data["conn"][1] = [1.0] * 9  # R T R, alone: 4 + 5
    bench.variants["nodemesh-tc"].data["conn"][1] = [1.0] * 5
    bench.variants["nodemesh-tc"].data["conn_pair"][1] = [1.0] * 4
    assert run.rounds(bench, "conn", 1) == 5


def test_the_map_poller_is_sched_batch_while_it_polls_and_as_before_after():
    """Its wake-ups every 0.5 ms preempted the agent's core loop mid-round (0.2-0.4 times a
    change on a quiet machine): a SCHED_BATCH thread never preempts on wake-up."""
    import time

    import controlplane

    reader = object.__new__(controlplane.MapReader)
    seen = []
    masters = iter([b"old", b"new"])

    def master(vip):
        seen.append(os.sched_getscheduler(0))
        return next(masters)

    reader.master = master
    reader.backends = lambda vip: frozenset({"10.0.0.2"})
    before = os.sched_getscheduler(0)
    reader.wait_switch("10.96.0.1", b"old", frozenset({"10.0.0.2"}),
                       deadline=time.monotonic() + 5)
    assert seen and set(seen) == {os.SCHED_BATCH}
    assert os.sched_getscheduler(0) == before


def test_a_benchmark_killed_with_sigterm_runs_its_teardown(tmp_path):
    # `timeout`, a CI job's end and `kill` send SIGTERM, whose default ends Python with no
    # `finally`: bench/run.py, killed so, left its lab's netns, hooked cgroups and servers.
    # Each benchmark that builds a lab calls sigterm.exit_on_sigterm() first (bench/sigterm.py).
    marker = tmp_path / "torn-down"
    script = (
        "import os, sys, time\n"
        f"sys.path.insert(0, {BENCH!r})\n"
        "import sigterm\n"
        "sigterm.exit_on_sigterm()\n"
        "try:\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(30)\n"
        "finally:\n"
        f"    open({str(marker)!r}, 'w').close()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        proc.terminate()
        assert proc.wait(timeout=10) == 143
    finally:
        proc.kill()
        proc.wait()
    assert marker.exists(), "the benchmark's finally (its teardown) did not run"
    for name in ("accel", "controlplane", "observability", "policy", "run", "soak",
                 "sock_cost", "tc"):
        with open(os.path.join(BENCH, f"{name}.py")) as f:
            assert "sigterm.exit_on_sigterm()" in f.read(), f"bench/{name}.py"
