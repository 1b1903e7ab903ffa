"""Workload identity and L4 policy at connect() (bpf/lib/identity.h, bpf/lib/policy.h): real
clients in two cgroups under the lab's hooked cgroup, real servers, and a capture on the
client's interfaces."""
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from helpers import lab_per_module, remove_cgroups

from nodemesh.datapath.loader import cgroup2_root
from nodemesh.identity import Workload
from nodemesh.model import Backend, Service, ServicePort
from nodemesh.policy import Mesh, Policy, PolicySource, PolicyTable

pytestmark = pytest.mark.root

HOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "conn_holder.py")


# One lab and one load of the programs for the whole module (each test sets the services and
# policies it needs): the suite's time budget is spent on traffic, not on set-up.
lab, loaded = lab_per_module()


@pytest.fixture
def datapath(loaded):
    return loaded[1]


@pytest.fixture
def workloads(lab):
    """Two workload cgroups under the lab's cgroup; b's client runs in a child (a container
    under its pod), so its identity comes from an ancestor."""
    made = [os.path.join(lab.cgroup, "wl-a"), os.path.join(lab.cgroup, "wl-b"),
            os.path.join(lab.cgroup, "wl-b", "ctr")]
    for path in made:
        os.makedirs(path, exist_ok=True)
    servers = len(lab.processes)  # the module's servers stay; this test's clients go
    try:
        yield {"a": made[0], "b": made[2]}
    finally:
        for proc in lab.processes[servers:]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        del lab.processes[servers:]
        remove_cgroups(made)


def rel(path):
    return os.path.relpath(path, cgroup2_root())


class Client:
    """tests/conn_holder.py in the client netns, inside one workload's cgroup."""

    def __init__(self, lab, cgroup, target):
        import json
        self.json = json
        cmd = (f"echo $$ > {shlex.quote(os.path.join(cgroup, 'cgroup.procs'))} && exec ip netns "
               f"exec {lab.client_ns} {shlex.quote(sys.executable)} {HOLDER} {target}")
        self.proc = subprocess.Popen(["sh", "-c", cmd], start_new_session=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lab.processes.append(self.proc)

    def say(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.json.loads(self.proc.stdout.readline())


def syn_capture(lab, count):
    """tcpdump of SYNs (without ACK) on every interface of the client netns; returns once it
    is listening."""
    capture = subprocess.Popen(
        ["ip", "netns", "exec", lab.client_ns, "tcpdump", "-i", "any", "-nn", "-l", "-c",
         str(count), "tcp[tcpflags] & tcp-syn != 0 and not tcp[tcpflags] & tcp-ack != 0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = ""
    while "listening on" not in seen:  # printed once the capture is open
        line = capture.stderr.readline()
        assert line, f"tcpdump did not start: {seen}"
        seen += line
    return capture


def web(lab):
    return Service("web", "shop", lab.vip4(30),
                   (ServicePort(80, 8080, "TCP", "http"), ServicePort(53, 5353, "UDP", "dns")),
                   tuple(Backend(b.ipv4) for b in lab.backends))


def mesh(lab, workloads, *policies, b_socket_lb=True):
    return Mesh((Workload(rel(workloads["a"]), "shop", "frontend", (("app", "web"),), name="a"),
                 Workload(rel(os.path.dirname(workloads["b"])), "shop", "batch", (),
                          socket_lb=b_socket_lb, name="b")), tuple(policies))


ALLOW_FRONTEND = Policy("frontend-only", "shop", "ALLOW", "web", (80,),
                        (PolicySource(service_accounts=("frontend",)),))


@pytest.fixture
def table(lab, loaded):
    dp, rec = loaded
    return PolicyTable(rec.maps, cgroup2_root())


def test_an_allowed_workload_connects_and_a_denied_one_fails_at_once_without_a_syn(
        lab, datapath, table, workloads):
    svc = web(lab)
    datapath.apply([svc])
    table.apply(mesh(lab, workloads, ALLOW_FRONTEND), [svc])
    a = Client(lab, workloads["a"], f"{svc.vip}:80")
    b = Client(lab, workloads["b"], f"{svc.vip}:80")
    before = table.stats()[("shop", "web")]
    capture = syn_capture(lab, 1000)
    try:
        denied = b.say("connect 20")
        time.sleep(0.3)
        os.killpg(capture.pid, signal.SIGINT)
        out, err = capture.communicate(timeout=10)
    finally:
        if capture.poll() is None:
            os.killpg(capture.pid, signal.SIGKILL)
    assert [r["error"] for r in denied] == ["EPERM"] * 20
    # At once: the median connect() fails within 1 ms, and none waits anywhere near a SYN
    # retransmission (1 s): the bound on the slowest allows for a loaded machine's scheduling.
    ms = sorted(r["ms"] for r in denied)
    assert ms[len(ms) // 2] < 1.0 and ms[-1] < 200, ms
    assert out.strip() == "", out  # not one SYN left the client
    assert all(r["ok"] for r in a.say("connect 5"))
    stats = table.stats()[("shop", "web")]
    assert stats["denied"] - before["denied"] == 20 and stats["audited"] == before["audited"]


def test_the_capture_would_have_seen_a_syn(lab, datapath, table, workloads):
    """The no-SYN assertion above can fail: the same capture sees an allowed client's SYNs."""
    svc = web(lab)
    datapath.apply([svc])
    table.apply(mesh(lab, workloads, ALLOW_FRONTEND), [svc])
    a = Client(lab, workloads["a"], f"{svc.vip}:80")
    capture = syn_capture(lab, 3)
    try:
        assert all(r["ok"] for r in a.say("connect 3"))
        out, _ = capture.communicate(timeout=10)
    finally:
        if capture.poll() is None:
            os.killpg(capture.pid, signal.SIGKILL)
    assert out.count("Flags [S]") >= 3


def test_a_policy_change_applies_to_the_next_connect(lab, datapath, table, workloads):
    """From the start of PolicyTable.apply to a denied connect: within 100 ms."""
    svc = web(lab)
    datapath.apply([svc])
    m0 = mesh(lab, workloads, ALLOW_FRONTEND)
    table.apply(m0, [svc])
    a = Client(lab, workloads["a"], f"{svc.vip}:80")
    assert a.say("connect 1")[0]["ok"]
    started = time.monotonic()
    deny = Policy("no-frontend", "shop", "DENY", "web", (),
                  (PolicySource(labels=(("app", "web"),)),))
    table.apply(mesh(lab, workloads, ALLOW_FRONTEND, deny), [svc])
    res = a.say("connect 1")[0]
    took = time.monotonic() - started
    assert res.get("error") == "EPERM" and took < 0.1, (res, took)


def test_audit_allows_and_counts(lab, datapath, table, workloads):
    svc = web(lab)
    datapath.apply([svc])
    audit = Policy("watch-batch", "shop", "AUDIT", "web", (80,),
                   (PolicySource(service_accounts=("batch",)),))
    table.apply(mesh(lab, workloads, audit), [svc])
    b = Client(lab, workloads["b"], f"{svc.vip}:80")
    a = Client(lab, workloads["a"], f"{svc.vip}:80")
    before = table.stats()[("shop", "web")]
    assert all(r["ok"] for r in b.say("connect 7"))
    assert all(r["ok"] for r in a.say("connect 4"))
    after = table.stats()[("shop", "web")]
    assert (after["denied"] - before["denied"], after["audited"] - before["audited"]) == (0, 7)


def test_a_denied_unconnected_sendto_fails_with_the_same_error(lab, datapath, table, workloads):
    svc = web(lab)
    datapath.apply([svc])
    deny = Policy("no-batch-dns", "shop", "DENY", "web", (53,),
                  (PolicySource(service_accounts=("batch",)),))
    table.apply(mesh(lab, workloads, deny), [svc])
    b = Client(lab, workloads["b"], f"{svc.vip}:53")
    a = Client(lab, workloads["a"], f"{svc.vip}:53")
    assert [r.get("error") for r in b.say("sendto 5")] == ["EPERM"] * 5
    assert all(r["ok"] for r in a.say("sendto 5"))
    # The TCP port is not covered by that rule.
    b_tcp = Client(lab, workloads["b"], f"{svc.vip}:80")
    assert all(r["ok"] for r in b_tcp.say("connect 2"))


def test_an_opted_out_workload_reaches_the_vip_untranslated(lab, datapath, table, workloads):
    """b has socketLB: false: its connect() goes to the VIP itself, which the lab blackholes
    in the client netns (so it fails with the route's error), while a is balanced."""
    svc = web(lab)
    datapath.apply([svc])
    table.apply(mesh(lab, workloads, b_socket_lb=False), [svc])
    a = Client(lab, workloads["a"], f"{svc.vip}:80")
    b = Client(lab, workloads["b"], f"{svc.vip}:80")
    assert all(r["ok"] for r in a.say("connect 3"))
    res = b.say("connect 3")
    assert not any(r["ok"] for r in res)
    assert {r["error"] for r in res} <= {"EINVAL", "ENETUNREACH", "EHOSTUNREACH"}, res
