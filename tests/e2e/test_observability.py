"""Observability from the kernel, end to end: flow events with the VIP beside the backend, the
per-CPU rate limit and its loss counter, connect duration / RTT / bytes per backend from
sockops, and the datapath's own cost from BPF run-time statistics. Real connections from the
lab's client netns, a real agent, its real CLI."""
import json
import os
import time

import pytest
from helpers import cli, config_yaml, service_yaml

pytestmark = pytest.mark.root

REQUEST = len(b"GET / HTTP/1.0\r\nHost: nodemesh\r\n\r\n")  # what the lab client sends


def services(lab):
    web = service_yaml("web", lab.vip4(), [b.ipv4 for b in lab.backends],
                       extra_ports="      - {port: 53, targetPort: 5353, protocol: UDP}")
    empty = service_yaml("empty", lab.vip4(11), [])
    return config_yaml(web, empty)


class Follower:
    """`nodemesh flows --follow -o json` in the background, its lines collected."""

    def __init__(self, lab):
        import subprocess
        import sys
        import threading

        from helpers import ROOT

        # Ctrl-C's own disposition: a process started in the background (`make test &`)
        # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
        start = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                 "from nodemesh.cli import main; sys.exit(main(sys.argv[1:]))")
        self.proc = subprocess.Popen([sys.executable, "-c", start, "flows", "--follow",
                                      "-o", "json", "--admin-socket", lab.admin_socket],
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.lines = []
        self.reader = threading.Thread(
            target=lambda: self.lines.extend(json.loads(x) for x in self.proc.stdout),
            daemon=True)
        self.reader.start()

    def wait_for(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        while len(self.lines) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        return list(self.lines)

    def interrupt(self):
        import signal

        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=10)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def flows_json(lab, *args):
    r = cli("flows", "--admin-socket", lab.admin_socket, "-o", "json", "--last", "4096", *args,
            check=True)
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def series(metrics, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in metrics.items()
               if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


def test_each_connection_and_udp_flow_is_one_flow_event_with_the_vip_beside_the_backend(
        lab, agent):
    agent.write_config(services(lab))
    agent.start()
    backends = {f"{b.ipv4}:8080" for b in lab.backends}
    follow = Follower(lab)  # `nodemesh flows --follow -o json`, from before the traffic
    try:
        time.sleep(1)
        assert lab.client(["tcp", "--target", f"{lab.vip4()}:80", "--count", "40"])["ok"] == 40
        streamed = follow.wait_for(40)
        assert [f["vip"] for f in streamed] == [f"{lab.vip4()}:80"] * 40
        assert [f["seq"] for f in streamed] == sorted(f["seq"] for f in streamed)
        assert follow.interrupt() == 0
    finally:
        follow.kill()
    # 60 datagrams from one unconnected socket: a flow per backend it reached, not per datagram
    udp = lab.client(["udp", "--target", f"{lab.vip4()}:53", "--count", "60",
                      "--reuse-socket"])
    assert udp["ok"] == 60
    refused = lab.client(["tcp", "--target", f"{lab.vip4(11)}:80", "--count", "3"])
    assert refused["failed"] == 3

    def complete():
        got = flows_json(lab)
        return got if len(got) >= 40 + len(udp["backends"]) + 3 else None

    got = agent.wait_for(complete, what="the flow events")
    tcp = [f for f in got if f["protocol"] == "TCP" and f["verdict"] == "translated"]
    assert len(tcp) == 40
    assert {f["vip"] for f in tcp} == {f"{lab.vip4()}:80"}
    assert {f["backend"] for f in tcp} <= backends
    assert all((f["namespace"], f["service"]) == ("test", "web") for f in tcp)
    assert all(f["pid"] > 0 and f["comm"].startswith("python") and f["cgroup_id"] > 0
               for f in tcp)
    flows_udp = [f for f in got if f["protocol"] == "UDP"]
    assert len(flows_udp) == len(udp["backends"])  # one per backend reached, not 60
    assert {f["backend"] for f in flows_udp} == {f"{b.ipv4}:5353" for b in lab.backends
                                                  if b.name in udp["backends"]}
    no_backend = [f for f in got if f["verdict"] == "no_backend"]
    assert len(no_backend) == 3
    assert all(f["vip"] == f"{lab.vip4(11)}:80" and f["backend"] == "" and
               f["service"] == "empty" for f in no_backend)
    # The filters, server-side, and the table for people.
    one = sorted(backends)[0]
    by_addr = flows_json(lab, "--backend", one.split(":")[0])
    assert by_addr and all(f["backend"].split(":")[0] == one.split(":")[0] for f in by_addr)
    assert [f for f in by_addr if f["backend"] == one] == \
        [f for f in flows_json(lab, "--backend", one)]
    assert len(flows_json(lab, "--verdict", "no_backend")) == 3
    assert len(flows_json(lab, "--service", "test/empty")) == 3
    table = cli("flows", "--admin-socket", lab.admin_socket, check=True).stdout
    assert "VIP" in table.splitlines()[0] and "BACKEND" in table.splitlines()[0]
    assert f"{lab.vip4()}:80" in table
    bad = cli("flows", "--admin-socket", lab.admin_socket, "--service", "web")
    assert bad.returncode == 2 and "NAMESPACE/NAME" in bad.stderr


def test_the_kernel_rate_limits_flow_events_per_cpu_and_counts_what_it_refused(lab, agent):
    agent.write_config(services(lab))
    agent.start(extra=["--flow-events-rate", "20", "--flow-events-burst", "5"])
    n = 300
    started = time.monotonic()
    r = lab.client(["tcp", "--target", f"{lab.vip4()}:80", "--count", str(n),
                    "--concurrency", "4"])
    elapsed = time.monotonic() - started
    assert r["ok"] == n
    m = agent.metrics()
    sent = m[("nodemesh_flow_events_total", ())]
    lost = series(m, "nodemesh_flow_events_lost_total", reason="rate_limit")
    # Every connection is either reported or counted as refused, exactly.
    assert sent + lost == n
    assert series(m, "nodemesh_flow_events_lost_total", reason="ring_full") == 0
    # The bucket: 5 at once per CPU, then 20/s per CPU, over the client's run (plus a second
    # for the client's start-up inside it): an upper bound, whatever the scheduling.
    cpus = os.cpu_count() or 1
    assert 1 <= sent <= cpus * (5 + 20 * (elapsed + 1)) < n, (sent, elapsed)
    assert len(flows_json(lab)) == sent


def test_sockops_measures_latency_and_bytes_per_backend_and_bpf_stats_the_datapath_cost(
        lab, agent):
    agent.write_config(services(lab))
    agent.start(extra=["--bpf-stats", "on"])  # off by default: it costs every BPF program
    n = 90
    r = lab.client(["tcp", "--target", f"{lab.vip4()}:80", "--count", str(n)])
    assert r["ok"] == n
    per_backend = {f"{b.ipv4}:8080": r["backends"].get(b.name, 0) for b in lab.backends}

    def closed():
        m = agent.metrics()
        return m if series(m, "nodemesh_backend_rtt_seconds_count") == n else None

    m = agent.wait_for(closed, what="every connection's close counted")
    for backend, conns in per_backend.items():
        labels = {"namespace": "test", "service": "web", "backend": backend}
        assert series(m, "nodemesh_backend_connect_duration_seconds_count", **labels) == conns
        assert series(m, "nodemesh_backend_rtt_seconds_count", **labels) == conns
        # The lab client sends one request per connection; bytes_acked counts exactly it.
        assert series(m, "nodemesh_backend_bytes_total", direction="sent", **labels) == \
            REQUEST * conns
        assert series(m, "nodemesh_backend_bytes_total", direction="received", **labels) > 0
        assert series(m, "nodemesh_backend_retransmits_total", **labels) == 0
        inf = series(m, "nodemesh_backend_connect_duration_seconds_bucket", le="+Inf", **labels)
        assert inf == conns
    # A veth connect takes microseconds to a few ms: the sum is real time, below a second each.
    total = series(m, "nodemesh_backend_connect_duration_seconds_sum")
    assert 0 < total < n * 1.0
    # What the datapath cost, from BPF run-time statistics, and the agent's own footprint.
    assert series(m, "nodemesh_bpf_program_runs_total", program="connect4") >= n
    assert series(m, "nodemesh_bpf_program_run_seconds_total", program="connect4") > 0
    assert series(m, "nodemesh_bpf_program_runs_total", program="sockops") >= n
    assert series(m, "nodemesh_bpf_map_memory_bytes", map="services") > 0
    assert series(m, "nodemesh_bpf_map_memory_bytes", map="backend_latency") > 0
    assert series(m, "nodemesh_agent_threads") >= 2
    assert series(m, "nodemesh_agent_open_fds") > 0
    assert series(m, "nodemesh_agent_resident_memory_bytes") > 10 * 2**20
    assert series(m, "process_resident_memory_bytes") > 0  # the standard process collector
    cost = agent.status()["datapath"]["cost"]
    assert cost["enabled"] and cost["connections"] == n
    assert cost["kernel_ns_per_connection"] > 0
    text = cli("status", "--admin-socket", lab.admin_socket, check=True).stdout
    assert "ns per connection" in text


def test_each_observability_feature_can_be_turned_off(lab, agent):
    agent.write_config(services(lab))
    # BPF run-time statistics are off by default (every BPF program on the node would read
    # the clock twice a run): no flag here, so this checks the default too.
    agent.start(extra=["--backend-latency", "off", "--flow-events-rate", "0"])
    assert lab.client(["tcp", "--target", f"{lab.vip4()}:80", "--count", "20"])["ok"] == 20
    m = agent.metrics()
    assert series(m, "nodemesh_backend_connect_duration_seconds_count") == 0
    assert m[("nodemesh_flow_events_total", ())] == 0
    assert series(m, "nodemesh_flow_events_lost_total") == 0
    assert series(m, "nodemesh_bpf_program_runs_total") == 0
    assert agent.status()["datapath"]["cost"] == {"enabled": False}
