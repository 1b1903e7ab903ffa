"""Active connection counts (bpf/lib/conn_count.h), connection limits and least_connections,
with real sockets from the lab's client netns to servers that hold connections open."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers import lab_per_module

from nodemesh.metrics import connection_counts
from nodemesh.model import Backend, ConnectionLimits, Service, ServicePort

pytestmark = pytest.mark.root

HOLD_PORT = 9090
HOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "conn_holder.py")


# One lab and one load of the programs for the whole module (each test sets the services and
# policies it needs): the suite's time budget is spent on traffic, not on set-up.
lab, loaded = lab_per_module()


@pytest.fixture
def datapath(loaded):
    return loaded[1]


@pytest.fixture(scope="module")
def holding_lab(lab):
    """The lab with a second server per backend on HOLD_PORT that keeps connections open."""
    for b in lab.backends:
        proc = lab.spawn([sys.executable, "-m", "nodemesh.lab.server", "--name", b.name,
                          "--tcp", f"{b.ipv4}:{HOLD_PORT}", "--hold"], netns=b.netns,
                         stdout=subprocess.PIPE, text=True)
        assert "ready" in proc.stdout.readline()
    yield lab


class Holder:
    def __init__(self, lab, target):
        self.proc = lab.spawn([sys.executable, HOLDER, target], netns=lab.client_ns,
                              in_cgroup=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)

    def _say(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def open(self, n):
        return self._say(f"open {n}")

    def churn(self, n):
        return self._say(f"churn {n}")

    def close(self, k):
        return self._say(f"close {k}")

    def refused(self, target):
        return self._say(f"refused {target}")

    def again(self, target):
        return self._say(f"again {target}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


def svc(lab, algorithm="random", limits=None, port=HOLD_PORT, backends=None):
    return Service("hold", "test", lab.vip4(20), (ServicePort(80, port, "TCP", "tcp"),),
                   tuple(Backend(b.ipv4) for b in (backends or lab.backends)),
                   algorithm=algorithm, connection_limits=limits)


def counts(rec):
    return connection_counts(rec.maps)


def wait_counts(rec, want, timeout=2.0):
    deadline = time.monotonic() + timeout
    while True:
        got = {ep: n for ep, n in counts(rec).items() if n}
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def test_counts_follow_connections_and_never_leak(holding_lab, datapath):
    lab = holding_lab
    datapath.apply([svc(lab)])
    holder = Holder(lab, f"{lab.vip4(20)}:80")
    try:
        opened = holder.open(12)
        assert all(r["ok"] for r in opened)
        per = {}
        for r in opened:
            per[r["backend"]] = per.get(r["backend"], 0) + 1
        want = {(b.ipv4, HOLD_PORT): per[b.name] for b in lab.backends if b.name in per}
        assert wait_counts(datapath, want) == want
        holder.close(5)
        left = opened[5:]
        per = {}
        for r in left:
            per[r["backend"]] = per.get(r["backend"], 0) + 1
        want = {(b.ipv4, HOLD_PORT): per[b.name] for b in lab.backends if b.name in per}
        assert wait_counts(datapath, want) == want
    finally:
        holder.stop()
    assert wait_counts(datapath, {}) == {}


def latency_entries(rec, svc_ids):
    """{(svc_id, "addr:port"): (connects measured, closes measured)} of these frontends."""
    from nodemesh.datapath import maps as m
    out = {}
    for key, value in rec.maps.items("backend_latency"):
        if key.svc_id in svc_ids:
            ep = f"{m.decode_addr(key.family, key.addr)}:{m.port_host(key.port)}"
            out[(key.svc_id, ep)] = (sum(value.connect_us), value.closed)
    return out


def test_latency_names_where_a_reused_socket_connected_last(holding_lab, datapath):
    """lib/latency.h reads the frontend and backend from the socket storage that the connect
    hook fills for connection counting. A socket whose connect was refused and that connects
    again, after its service moved to another backend or through another service, is measured
    against its second destination only: the storage is rewritten, never stale."""
    from nodemesh import flows
    from nodemesh.reconciler import FrontendKey
    lab, rec = holding_lab, datapath
    b1, b2 = lab.backends[0], lab.backends[1]
    vip_a, vip_b = lab.vip4(21), lab.vip4(22)

    def service(name, vip, backend, port):
        return Service(name, "test", vip, (ServicePort(80, port, "TCP", "tcp"),),
                       (Backend(backend.ipv4),))

    gone_b = service("lat-b", vip_b, b1, 9191)  # no listener: refused
    rec.apply([service("lat-a", vip_a, b1, 9191), gone_b])
    ids = {rec.programmed[FrontendKey(4, v, 80, "TCP")].svc_id for v in (vip_a, vip_b)}
    svc_a = rec.programmed[FrontendKey(4, vip_a, 80, "TCP")].svc_id
    flows.configure(rec.maps, 0, 1, True)  # backend latency on, flow events off
    before = latency_entries(rec, ids)
    holder = Holder(lab, f"{vip_a}:80")
    try:
        assert holder.refused(f"{vip_a}:80")["error"] == "ECONNREFUSED"
        rec.apply([service("lat-a", vip_a, b2, HOLD_PORT), gone_b])  # a backend change
        assert holder.again(f"{vip_a}:80") == {"ok": True, "backend": b2.name}
        # Another service first (refused), then service a on the same socket.
        assert holder.refused(f"{vip_b}:80")["error"] == "ECONNREFUSED"
        assert holder.again(f"{vip_a}:80") == {"ok": True, "backend": b2.name}
        assert wait_counts(rec, {(b2.ipv4, HOLD_PORT): 2}) == {(b2.ipv4, HOLD_PORT): 2}
        holder.close(2)
        assert wait_counts(rec, {}) == {}
    finally:
        holder.stop()
        flows.configure(rec.maps, 0, 1, False)
    got = latency_entries(rec, ids)
    a_b2 = (svc_a, f"{b2.ipv4}:{HOLD_PORT}")
    connects, closes = before.get(a_b2, (0, 0))
    # Exactly: two connects and two closes under (service a, b2), and nothing anywhere else.
    assert got == {**before, a_b2: (connects + 2, closes + 2)}


def test_refused_connects_count_nothing(holding_lab, datapath):
    """Port 9191 has no listener: every connect is reset in SYN_SENT."""
    lab = holding_lab
    datapath.apply([svc(lab, port=9191)])
    holder = Holder(lab, f"{lab.vip4(20)}:80")
    try:
        res = holder.open(30)
        assert [r["error"] for r in res] == ["ECONNREFUSED"] * 30
        assert wait_counts(datapath, {}) == {}
    finally:
        holder.stop()


def test_counts_survive_an_agent_restart_in_the_middle(holding_lab, loaded):
    """Connections opened under one load of the programs close under the next: the pinned
    socket storage lets the new programs decrement what the old ones counted."""
    lab = holding_lab
    dp, rec = loaded
    rec.apply([svc(lab)])
    holder = Holder(lab, f"{lab.vip4(20)}:80")
    try:
        assert all(r["ok"] for r in holder.open(9))
        assert sum(wait_counts(rec, None, timeout=0.2).values()) == 9
        dp.close()  # the agent goes; pins and links stay
        # The next agent, in the module's shared objects (the later tests and the fixture's
        # teardown use them; a new Reconciler would leave theirs with closed fds).
        dp.__init__(lab.bpffs, lab.cgroup)
        rec.__init__(dp.load())
        rec.adopt()
        dp.attach()
        rec.apply([svc(lab)])
        assert all(r["ok"] for r in holder.open(3))
        assert sum(wait_counts(rec, None, timeout=0.2).values()) == 12
        holder.close(12)
        assert wait_counts(rec, {}) == {}
    finally:
        holder.stop()


def test_limit_refuses_the_tenth_of_three_backends_times_three(holding_lab, datapath):
    lab = holding_lab
    datapath.apply([svc(lab, limits=ConnectionLimits(max_connections_per_backend=3))])
    holder = Holder(lab, f"{lab.vip4(20)}:80")
    try:
        nine = holder.open(9)
        assert all(r["ok"] for r in nine)
        assert sorted(r["backend"] for r in nine) == ["b1"] * 3 + ["b2"] * 3 + ["b3"] * 3
        before = sum(v["value"] for v in datapath.maps.percpu_sums("conn_overflows").values())
        tenth = holder.open(1)[0]
        # Refused in the connect() call, not after a SYN's timeout (1 s); the bound allows for
        # a loaded machine's scheduling.
        assert tenth["error"] == "ECONNREFUSED" and tenth["ms"] < 200
        overflows = datapath.maps.percpu_sums("conn_overflows")
        assert sum(v["value"] for v in overflows.values()) == before + 1
        holder.close(1)
        wait_counts(datapath, None, timeout=0.2)
        again = holder.open(1)[0]
        assert again["ok"] and again["backend"] == nine[0]["backend"]
    finally:
        holder.stop()


def test_max_connections_caps_the_whole_service(holding_lab, datapath):
    lab = holding_lab
    datapath.apply([svc(lab, limits=ConnectionLimits(max_connections=4))])
    holder = Holder(lab, f"{lab.vip4(20)}:80")
    try:
        res = holder.open(6)
        assert [r["ok"] for r in res] == [True] * 4 + [False] * 2
        assert {r["error"] for r in res[4:]} == {"ECONNREFUSED"}
    finally:
        holder.stop()


@pytest.mark.parametrize("algorithm", ["random", "least_connections"])
def test_least_connections_spares_a_backend_holding_long_connections(holding_lab, datapath,
                                                                      algorithm):
    """b1 holds 8 long-lived connections (a slow backend, reached through another service);
    then 300 short connections, one at a time, to a service over all three.
    random: b1's share is 1/3 within 5σ. least_connections: P2C picks b1 only when it is not
    the more loaded of two distinct draws, which cannot happen while its 8 connections stay
    and the others carry at most one: bound, fewer than 5% (15 of 300)."""
    lab = holding_lab
    b1 = lab.backends[0]
    slow = Service("slow", "test", lab.vip4(21), (ServicePort(80, HOLD_PORT, "TCP"),),
                   (Backend(b1.ipv4),))
    datapath.apply([slow, svc(lab, algorithm=algorithm)])
    holder = Holder(lab, f"{lab.vip4(21)}:80")
    churner = Holder(lab, f"{lab.vip4(20)}:80")
    try:
        assert all(r["ok"] for r in holder.open(8))
        split = churner.churn(300)
        assert sum(split.values()) == 300
        share = split.get("b1", 0)
        if algorithm == "random":
            assert abs(share - 100) <= 5 * (300 * (1 / 3) * (2 / 3)) ** 0.5, split
        else:
            assert share < 15, split
    finally:
        holder.stop()
        churner.stop()
    # 300 connections of churn and 8 long ones, all closed: nothing is left counted.
    assert wait_counts(datapath, {}) == {}


IN_FLIGHT = r"""
import errno, json, socket, sys
s = socket.socket()
s.setblocking(False)
print(json.dumps(errno.errorcode.get(s.connect_ex((sys.argv[1], int(sys.argv[2]))))), flush=True)
sys.stdin.readline()
s.close()
"""


def test_a_connect_in_flight_is_counted_once_in_active_from_its_syn(holding_lab, datapath):
    """This build counts a connection once, at its SYN (TCP_CONNECT_CB), in `active`, and takes
    it back at CLOSE, so ESTABLISHED has no count to write (bpf/lib/conn_count.h). A connect to
    a backend address nobody holds (its ARP goes unanswered: the SYN never gets a reply) is
    counted while in flight, in active, pending untouched; nothing stays once it is closed."""
    from nodemesh.datapath import maps as m
    lab = holding_lab
    silent = f"198.18.{lab.subnet}.200"
    datapath.apply([Service("silent", "test", lab.vip4(23), (ServicePort(80, HOLD_PORT, "TCP"),),
                            (Backend(silent),))])
    proc = lab.spawn([sys.executable, "-c", IN_FLIGHT, lab.vip4(23), "80"],
                     netns=lab.client_ns, in_cgroup=True, stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline()) == "EINPROGRESS"
        raw = {(m.decode_addr(k.family, k.addr), m.port_host(k.port)): (v.active, v.pending)
               for k, v in datapath.maps.items("conn_counts")}
        assert raw[(silent, HOLD_PORT)] == (1, 0)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
        lab.processes.remove(proc)
    assert wait_counts(datapath, {}) == {}


STORAGES = r"""
import ctypes, json, socket, sys
from nodemesh.datapath import bpfsys
from nodemesh.datapath import maps as m
host, port, revnat_fd, conn_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection((host, port), timeout=5)
s.sendall(b"x\n")
s.recv(64)
out = {}
for name, fd, value in (("sock_revnat", revnat_fd, m.SockRevnat()),
                        ("sock_conn", conn_fd, m.SockConn())):
    out[name] = bpfsys.map_lookup(fd, ctypes.c_int(s.fileno()), value) and value.state
print(json.dumps(out))
"""


def test_a_translated_tcp_socket_has_one_storage_that_holds_its_count_state(holding_lab,
                                                                           datapath):
    """connect() creates one socket storage (sock_revnat), and sockops keeps the connection's
    count state in it: no second storage (sock_conn) a connection."""
    lab = holding_lab
    datapath.apply([svc(lab)])
    # The map fds are handed over: `ip netns exec` mounts its own /sys, without the bpffs.
    fds = [datapath.maps.fd("sock_revnat"), datapath.maps.fd("sock_conn")]
    proc = lab.spawn([sys.executable, "-c", STORAGES, lab.vip4(20), "80", *map(str, fds)],
                     netns=lab.client_ns, in_cgroup=True, stdout=subprocess.PIPE, text=True,
                     pass_fds=fds)
    out, _ = proc.communicate(timeout=20)
    lab.processes.remove(proc)
    assert json.loads(out) == {"sock_revnat": 2, "sock_conn": False}  # 2: NM_SOCK_ACTIVE


def older_build(tmp_path, define: str):
    """This bpf/ copied, built the former way: `#define <define> 1` in sock_lb.c (a
    measuring build's switch). Returns (this bpf/, the copy)."""
    from nodemesh.datapath.loader import bpf_source_dir

    this = str(bpf_source_dir())
    older = tmp_path / "bpf"
    shutil.copytree(this, older)
    text = (older / "sock_lb.c").read_text()
    (older / "sock_lb.c").write_text(f"#define {define} 1\n" + text)
    return this, str(older)


def restart_with(lab, dp, rec, services) -> None:
    """The agent restarted in the module's shared objects, as in the restart test above."""
    dp.close()
    dp.__init__(lab.bpffs, lab.cgroup)
    rec.__init__(dp.load())
    rec.adopt()
    dp.attach()
    rec.apply(services)


def test_connections_an_older_agent_counted_close_under_this_one(holding_lab, loaded, tmp_path,
                                                                 monkeypatch):
    """An older agent's connect hook kept a socket's count state in a second storage
    (sock_conn; its sock_revnat has no NM_SOCK_F_COUNTS). After an upgrade this build's sockops
    counts those sockets down from there: nothing stays counted once all have closed."""
    this, older = older_build(tmp_path, "NM_COST_TWO_STORAGES")
    lab = holding_lab
    dp, rec = loaded

    def restart():
        restart_with(lab, dp, rec, [svc(lab)])

    holder = Holder(lab, f"{lab.vip4(20)}:80")
    try:
        monkeypatch.setenv("NODEMESH_BPF_DIR", older)
        restart()
        assert all(r["ok"] for r in holder.open(6))
        assert sum(wait_counts(rec, None, timeout=0.2).values()) == 6
        monkeypatch.setenv("NODEMESH_BPF_DIR", this)
        restart()
        assert all(r["ok"] for r in holder.open(3))
        assert sum(wait_counts(rec, None, timeout=0.2).values()) == 9
        holder.close(9)
        assert wait_counts(rec, {}) == {}
    finally:
        holder.stop()
        if os.environ["NODEMESH_BPF_DIR"] != this:  # failed under the older build: the later
            monkeypatch.setenv("NODEMESH_BPF_DIR", this)  # tests of this module want this one
            restart()


def test_max_connections_counts_what_an_older_build_counted_too(holding_lab, loaded, tmp_path,
                                                                 monkeypatch):
    """A frontend's connections are counted in svc_conns, an array by svc_id; an older build
    counted them in the svc_conn_counts hash. After an upgrade maxConnections counts both, and
    each connection is taken back where it was counted: nothing is left once all close."""
    from nodemesh.datapath import bpfsys
    from nodemesh.datapath import maps as m
    from nodemesh.reconciler import FrontendKey

    this, older = older_build(tmp_path, "NM_COST_SVC_HASH")
    lab = holding_lab
    dp, rec = loaded
    limited = svc(lab, limits=ConnectionLimits(max_connections=4))

    def restart():
        restart_with(lab, dp, rec, [limited])

    def frontend_counts():
        svc_id = rec.programmed[FrontendKey(4, lab.vip4(20), 80, "TCP")].svc_id
        hashed = {m.key_int(k): v.active + v.pending for k, v in rec.maps.items("svc_conn_counts")}
        arr = m.ConnCount()
        assert bpfsys.map_lookup(rec.maps.fd("svc_conns"), m.u32(svc_id), arr)
        return hashed.get(svc_id, 0), arr.active + arr.pending

    holder = Holder(lab, f"{lab.vip4(20)}:80")
    try:
        monkeypatch.setenv("NODEMESH_BPF_DIR", older)
        restart()
        assert all(r["ok"] for r in holder.open(2))
        assert frontend_counts() == (2, 0)
        monkeypatch.setenv("NODEMESH_BPF_DIR", this)
        restart()
        assert [r["ok"] for r in holder.open(3)] == [True, True, False]
        assert frontend_counts() == (2, 2)
        holder.close(4)
        assert wait_counts(rec, {}) == {}
        assert frontend_counts() == (0, 0)
    finally:
        holder.stop()
        if os.environ["NODEMESH_BPF_DIR"] != this:  # failed under the older build: the later
            monkeypatch.setenv("NODEMESH_BPF_DIR", this)  # tests of this module want this one
            restart()
