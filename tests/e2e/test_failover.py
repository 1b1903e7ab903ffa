"""Failover driven by what the kernel and the health checks see, with real servers dying."""
import subprocess
import sys
import threading
import time

import pytest
from helpers import config_yaml

from nodemesh.lab.topology import sh

pytestmark = pytest.mark.root


def service(lab, *, backends=None, name="web", extra="", backend_extra=None, port=80,
            target=8080, protocol="TCP", vip=None):
    backends = lab.backends if backends is None else backends
    backend_extra = backend_extra or {}
    lines = [f"  - name: {name}", "    namespace: test", f"    vip: {vip or lab.vip4()}",
             "    ports:", f"      - {{port: {port}, targetPort: {target}, protocol: {protocol}}}"]
    if extra:
        lines += ["    " + line for line in extra.strip().splitlines()]
    lines.append("    backends:" + ("" if backends else " []"))
    for b in backends:
        more = backend_extra.get(b.name, "")
        lines.append(f"      - {{address: {b.ipv4}{', ' + more if more else ''}}}")
    return "\n".join(lines) + "\n"


def kill_server(lab, backend):
    for pid in sh(f"ip netns pids {backend.netns}", check=False).stdout.split():
        subprocess.run(["kill", "-9", pid])
    deadline = time.monotonic() + 5
    while sh(f"ip netns pids {backend.netns}", check=False).stdout.split():
        assert time.monotonic() < deadline, "server did not die"
        time.sleep(0.05)


def frontend(agent, port=80):
    for svc in agent.services():
        for fe in svc["frontends"]:
            if fe["port"] == port:
                return fe
    raise AssertionError("frontend not programmed")


def in_set(agent, port=80):
    return {b["address"] for b in frontend(agent, port)["backends"]}


def tcp(lab, count=90, **kw):
    args = ["tcp", "--target", f"{lab.vip4()}:80", "--count", str(count)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return lab.client(args)


HC = "healthCheck: {type: tcp, intervalSeconds: 0.2, timeoutSeconds: 0.2, " \
     "unhealthyThreshold: 2, healthyThreshold: 1}"


def test_a_dead_backend_leaves_after_its_health_checks_and_returns_when_it_is_back(
        linked_lab, linked_agent):
    lab, agent = linked_lab, linked_agent
    b1 = lab.backends[0]
    agent.write_config(config_yaml(service(lab, extra=HC)))
    agent.start()
    assert len(in_set(agent)) == 3
    kill_server(lab, b1)
    time.sleep(0.2 * 2 + 1.0)  # interval x unhealthy threshold, plus one second
    r = tcp(lab, count=200)
    assert r["failed"] == 0 and set(r["backends"]) == {"b2", "b3"}, r
    assert agent.metric("nodemesh_backend_healthy", namespace="test", service="web",
                        backend=f"{b1.ipv4}:8080") == 0
    lab.start_servers(tcp_ports=(8080,), udp_ports=(5353,), backends=[b1])
    agent.wait_for(lambda: b1.ipv4 in in_set(agent), timeout=5, what="b1 back in the set")
    assert "b1" in tcp(lab, count=90)["backends"]
    assert agent.metric("nodemesh_health_checks_total", result="failure") >= 2


def test_a_refusing_backend_is_ejected_by_kernel_signals_within_its_threshold(lab, agent):
    b1 = lab.backends[0]
    od = "outlierDetection: {consecutiveFailures: 3, baseEjectionSeconds: 30, " \
         "maxEjectionPercent: 50}"
    agent.write_config(config_yaml(service(lab, extra=od)))
    agent.start()
    kill_server(lab, b1)  # nothing listens: every connect to b1 is refused (RST)
    # One connection at a time, 100/s: in-flight connections while the ejection is being
    # programmed are at most the client's rate x the ejection latency (~ms here).
    r = tcp(lab, count=300, interval=0.01)
    assert r["errors"].get("ECONNREFUSED", 0) <= 3 + 2, r  # threshold + in-flight bound
    assert r["errors"].get("ECONNREFUSED", 0) >= 3, r      # it did take 3 failures
    assert b1.ipv4 not in in_set(agent)
    assert agent.metric("nodemesh_backend_ejections_total", namespace="test", service="web",
                        reason="consecutive_failures") == 1
    health = agent.status()["health"]
    assert health["ejections"][0]["backend"] == b1.ipv4
    print(f"ejection latency (kernel Nth failure -> programmed): "
          f"{health['ejection_latency_seconds']}")


def test_ejections_stop_at_max_ejection_percent(lab, agent):
    od = "outlierDetection: {consecutiveFailures: 2, baseEjectionSeconds: 30, " \
         "maxEjectionPercent: 34}"
    agent.write_config(config_yaml(service(lab, extra=od)))
    agent.start()
    for b in lab.backends[:2]:
        kill_server(lab, b)
    tcp(lab, count=200, interval=0.005)
    assert len(in_set(agent)) == 2  # 34 % of 3 backends: one may be ejected, not two


def test_panic_mode_uses_every_backend_when_too_few_are_healthy(linked_lab, linked_agent):
    lab, agent = linked_lab, linked_agent
    agent.write_config(config_yaml(service(lab, extra=HC)))
    agent.start()
    kill_server(lab, lab.backends[0])
    kill_server(lab, lab.backends[1])
    agent.wait_for(lambda: frontend(agent)["selection"] == "panic", timeout=5,
                   what="panic mode")
    assert len(in_set(agent)) == 3  # 1 of 3 healthy < 50 %: balance over all of them
    # The same with the threshold off: only the healthy one.
    agent.write_config(config_yaml(service(lab, extra=HC + "\npanicThresholdPercent: 0")))
    agent.wait_for(lambda: in_set(agent) == {lab.backends[2].ipv4}, timeout=5,
                   what="only the healthy backend")
    assert tcp(lab, count=60)["backends"] == {"b3": 60}


def test_session_affinity_keeps_a_client_on_one_backend_until_that_backend_leaves(lab, agent):
    agent.write_config(config_yaml(service(
        lab, extra="sessionAffinity: {clientIP: {timeoutSeconds: 60}}")))
    agent.start()
    r = tcp(lab, count=100)
    assert r["ok"] == 100 and len(r["backends"]) == 1, r
    (first,) = r["backends"]
    rest = [b for b in lab.backends if b.name != first]
    agent.write_config(config_yaml(service(
        lab, backends=rest, extra="sessionAffinity: {clientIP: {timeoutSeconds: 60}}")))
    agent.wait_for(lambda: len(in_set(agent)) == 2, what="the set without " + first)
    r = tcp(lab, count=100)
    assert r["ok"] == 100 and len(r["backends"]) == 1 and first not in r["backends"], r


LONG_TCP = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    s.sendall(b"x\n")
    print(s.recv(100).decode().strip(), flush=True)
    time.sleep(0.1)
"""


def test_terminating_backends_get_no_new_connections_but_keep_their_own(lab, agent):
    b1 = lab.backends[0]
    # A long-lived connection needs a server that keeps it open.
    for b in lab.backends:
        lab.spawn([sys.executable, "-m", "nodemesh.lab.server", "--name", b.name, "--hold",
                   "--tcp", f"{b.ipv4}:9090"], netns=b.netns, stdout=subprocess.PIPE)
    time.sleep(0.5)
    hold = "      - {port: 90, targetPort: 9090}"
    text = service(lab, backends=[b1]).replace(
        "      - {port: 80, targetPort: 8080, protocol: TCP}",
        "      - {port: 80, targetPort: 8080, protocol: TCP}\n" + hold)
    agent.write_config(config_yaml(text))
    agent.start()
    long = lab.spawn([sys.executable, "-c", LONG_TCP, lab.vip4(), "90", "4"],
                     netns=lab.client_ns, in_cgroup=True, stdout=subprocess.PIPE, text=True)
    assert long.stdout.readline().strip() == "b1"
    terminating = {"b1": "ready: false, serving: true, terminating: true"}
    agent.write_config(config_yaml(service(lab, backend_extra=terminating).replace(
        "      - {port: 80, targetPort: 8080, protocol: TCP}",
        "      - {port: 80, targetPort: 8080, protocol: TCP}\n" + hold)))
    agent.wait_for(lambda: b1.ipv4 not in in_set(agent), what="b1 out of the set")
    r = tcp(lab, count=90)
    assert "b1" not in r["backends"] and r["failed"] == 0
    out, _ = long.communicate(timeout=10)
    lab.processes.remove(long)
    assert long.returncode == 0 and set(out.split()) == {"b1"}  # the old connection lived on
    # Every backend terminating but serving: they are used rather than refusing everything.
    all_terminating = {b.name: "ready: false, serving: true, terminating: true"
                       for b in lab.backends}
    agent.write_config(config_yaml(service(lab, backend_extra=all_terminating)))
    agent.wait_for(lambda: frontend(agent)["selection"] == "terminating-fallback",
                   what="terminating fallback")
    r = tcp(lab, count=90)
    assert r["failed"] == 0 and len(r["backends"]) == 3


LONG_UDP = r"""
import socket, sys, time
target = (sys.argv[1], int(sys.argv[2]))
end = time.monotonic() + float(sys.argv[3])
s = None
while time.monotonic() < end:
    if s is None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        s.connect(target)          # balanced once, at connect(): pinned to one backend
    try:
        s.send(b"ping")
        print(s.recv(100).decode(), flush=True)
    except OSError as e:           # destroyed under us: reconnect, as real clients do
        print("error", e.errno, flush=True)
        s.close()
        s = None
    time.sleep(0.05)
"""


def test_a_connected_udp_client_moves_to_a_live_backend_when_its_backend_is_removed(lab, agent):
    b1 = lab.backends[0]
    agent.write_config(config_yaml(service(lab, backends=[b1], port=53, target=5353,
                                           protocol="UDP")))
    agent.start()
    client = lab.spawn([sys.executable, "-c", LONG_UDP, lab.vip4(), "53", "8"],
                       netns=lab.client_ns, in_cgroup=True, stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == "b1"
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(client.stdout))
    reader.start()
    # b1's server keeps running: without termination the socket would talk to it forever.
    agent.write_config(config_yaml(service(lab, backends=lab.backends[1:], port=53,
                                           target=5353, protocol="UDP")))
    client.wait(timeout=15)
    reader.join(timeout=5)
    lab.processes.remove(client)
    replies = [line.strip() for line in lines if not line.startswith("error")]
    assert any(line.startswith("error") for line in lines), "the socket was never terminated"
    assert replies[-1] in ("b2", "b3"), lines[-5:]
    assert agent.status()["health"]["terminated_sockets"] >= 1


def test_local_traffic_policy_uses_only_this_nodes_backends(lab, agent):
    nodes = {"b1": "node: node-a", "b2": "node: node-b", "b3": "node: node-a"}
    agent.write_config(config_yaml(service(lab, extra="trafficPolicy: {internal: Local}",
                                           backend_extra=nodes)))
    agent.start(extra=["--node-name", "node-a"])
    r = tcp(lab, count=90)
    assert set(r["backends"]) == {"b1", "b3"} and r["failed"] == 0


def test_zone_preference_keeps_traffic_in_zone_and_spills_over_when_the_zone_is_down(
        linked_lab, linked_agent):
    lab, agent = linked_lab, linked_agent
    zones = {"b1": "zone: zone-a", "b2": "zone: zone-b", "b3": "zone: zone-b"}
    agent.write_config(config_yaml(service(lab, extra="trafficDistribution: PreferClose\n" + HC,
                                           backend_extra=zones)))
    agent.start(extra=["--node-zone", "zone-a"])
    assert tcp(lab, count=60)["backends"] == {"b1": 60}
    kill_server(lab, lab.backends[0])
    agent.wait_for(lambda: in_set(agent) == {lab.backends[1].ipv4, lab.backends[2].ipv4},
                   timeout=5, what="spill-over to zone-b")
    r = tcp(lab, count=60)
    assert r["failed"] == 0 and set(r["backends"]) == {"b2", "b3"}
