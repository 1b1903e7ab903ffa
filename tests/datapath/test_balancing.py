"""Real sockets in a client netns, hooked by the loaded programs, reaching real servers.

Statistics: the kernel's bpf_get_prandom_u32() cannot be seeded, so each split is checked
against a stated bound: every backend's share within 5 standard deviations of its weight's
share (a false failure about once in 1.7 million runs per backend).
"""
import json
import math
import subprocess
import sys

import pytest
from helpers import lab_per_module

from nodemesh.model import Backend, Service, ServicePort

pytestmark = pytest.mark.root


# One lab and one loaded datapath for the module: each test applies the whole desired set it
# needs (Reconciler.apply), so the suite's time goes to traffic, not to a BCC compile per test.
lab, loaded = lab_per_module()


def svc(lab, *, family=4, weights=(1, 1, 1), algorithm="random", ports=None, vip_index=10,
        backends=None):
    vip = lab.vip4(vip_index) if family == 4 else lab.vip6(vip_index)
    addrs = [b.ipv4 if family == 4 else b.ipv6 for b in (backends or lab.backends)]
    ports = ports or (ServicePort(80, 8080, "TCP", "http"), ServicePort(53, 5353, "UDP", "dns"))
    return Service("web", "test", vip, tuple(ports),
                   tuple(Backend(a, w) for a, w in zip(addrs, weights)), algorithm=algorithm)


def target(vip, port):
    return f"[{vip}]:{port}" if ":" in vip else f"{vip}:{port}"


def assert_split(counts, weights, names):
    n = sum(counts.values())
    for name, w in zip(names, weights):
        p = w / sum(weights)
        sigma = math.sqrt(n * p * (1 - p))
        got = counts.get(name, 0)
        assert abs(got - n * p) <= 5 * sigma, \
            f"{name}: {got} of {n}, expected {n * p:.0f} ± {5 * sigma:.0f} (5σ)"


@pytest.mark.parametrize("family", [4, 6])
def test_weighted_backends_share_connections_in_proportion(lab, datapath, family):
    service = svc(lab, family=family, weights=(1, 2, 3))
    datapath.apply([service])
    r = lab.client(["tcp", "--target", target(service.vip, 80), "--count", "3000",
                    "--concurrency", "4"])
    assert r["failed"] == 0 and r["ok"] == 3000
    assert_split(r["backends"], (1, 2, 3), ["b1", "b2", "b3"])
    assert r["peer_mismatch"] == 0  # getpeername() showed the VIP on every socket


def test_round_robin_follows_the_weights_exactly_in_each_cycle(lab, datapath):
    service = svc(lab, weights=(1, 1, 2), algorithm="round_robin")
    datapath.apply([service])
    r = lab.client(["tcp", "--target", target(service.vip, 80), "--count", "40"])
    assert r["backends"] == {"b1": 10, "b2": 10, "b3": 20}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("connected", [False, True], ids=["sendto", "connected"])
def test_udp_replies_come_from_the_vip(lab, datapath, family, connected):
    service = svc(lab, family=family)
    datapath.apply([service])
    args = ["udp", "--target", target(service.vip, 53), "--count", "300"]
    r = lab.client(args + (["--connected"] if connected else []))
    assert r["failed"] == 0 and r["ok"] == 300
    assert r["source_mismatch"] == 0  # recvfrom() reported the VIP, not the backend
    assert r["peer_mismatch"] == 0
    assert_split(r["backends"], (1, 1, 1), ["b1", "b2", "b3"])


def test_one_udp_socket_sending_to_the_vip_is_balanced_per_datagram(lab, datapath):
    service = svc(lab)
    datapath.apply([service])
    r = lab.client(["udp", "--target", target(service.vip, 53), "--count", "300",
                    "--reuse-socket"])
    assert r["ok"] == 300 and r["source_mismatch"] == 0
    assert len(r["backends"]) == 3


def test_getpeername_returns_the_vip_not_the_backend(lab, datapath):
    service = svc(lab)
    datapath.apply([service])
    code = ("import socket,sys; s=socket.create_connection(('%s',80)); "
            "print(s.getpeername()[0], s.getpeername()[1])" % service.vip)
    proc = lab.spawn([sys.executable, "-c", code], netns=lab.client_ns, in_cgroup=True,
                     stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=10)
    lab.processes.remove(proc)
    assert out.split() == [service.vip, "80"]


def test_a_service_without_backends_refuses_connections_at_once(lab, datapath):
    service = svc(lab, weights=())
    service = Service("web", "test", service.vip, service.ports, ())
    datapath.apply([service])
    r = lab.client(["tcp", "--target", target(service.vip, 80), "--count", "20"])
    assert r["errors"] == {"ECONNREFUSED": 20}
    r = lab.client(["udp", "--target", target(service.vip, 53), "--count", "5"])
    assert r["errors"] == {"ECONNREFUSED": 5}
    stats = datapath.maps.percpu_sums("svc_stats")
    assert sum(s["no_backend"] for s in stats.values()) == 25


def test_ipv4_mapped_destination_on_an_ipv6_socket_reaches_an_ipv4_backend(lab, datapath):
    service = svc(lab)
    datapath.apply([service])
    r = lab.client(["tcp", "--target", f"[::ffff:{service.vip}]:80", "--count", "30"])
    assert r["ok"] == 30 and r["peer_mismatch"] == 0
    assert datapath.maps.counters()["v4_in_v6"] == 30


def test_processes_outside_the_hooked_cgroup_are_untouched(lab, datapath):
    service = svc(lab)
    datapath.apply([service])
    # Give the VIP a real address in the client netns with its own server: an untranslated
    # connection reaches it, a translated one reaches a backend.
    from nodemesh.lab.topology import sh

    sh(f"ip -n {lab.client_ns} addr add {service.vip}/32 dev lo")
    server = None
    try:
        server = lab.spawn([sys.executable, "-m", "nodemesh.lab.server", "--name",
                            "untranslated", "--tcp", f"{service.vip}:80"], netns=lab.client_ns,
                           stdout=subprocess.PIPE, text=True)
        assert "ready" in server.stdout.readline()
        outside = lab.spawn([sys.executable, "-m", "nodemesh.lab.client", "tcp", "--target",
                             f"{service.vip}:80", "--count", "20"], netns=lab.client_ns,
                            in_cgroup=False, stdout=subprocess.PIPE, text=True)
        out, _ = outside.communicate(timeout=30)
        lab.processes.remove(outside)
        import json

        assert json.loads(out)["backends"] == {"untranslated": 20}
        inside = lab.client(["tcp", "--target", f"{service.vip}:80", "--count", "20"])
        assert "untranslated" not in inside["backends"] and inside["ok"] == 20
    finally:  # the lab is the module's: leave its client netns as the next test expects it
        if server is not None:
            server.kill()
            server.communicate(timeout=10)
            lab.processes.remove(server)
        sh(f"ip -n {lab.client_ns} addr del {service.vip}/32 dev lo")


PEERS = r"""
import json, socket, sys
v4, v6 = sys.argv[1], sys.argv[2]
out = []
for family, vip, port in ((socket.AF_INET, v4, 80), (socket.AF_INET6, v6, 80),
                          (socket.AF_INET6, "::ffff:" + v4, 80)):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.connect((vip, port))
    out.append(["tcp", vip, list(s.getpeername()[:2])])
    s.close()
for family, vip in ((socket.AF_INET, v4), (socket.AF_INET6, v6)):
    u = socket.socket(family, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.connect((vip, 53))
    u.send(b"q")
    _, source = u.recvfrom(512)
    out.append(["udp", vip, list(source[:2]), list(u.getpeername()[:2])])
    u.close()
print(json.dumps(out))
"""


def test_connected_sockets_see_the_vip_without_a_revnat_entry(lab, loaded):
    """A connected socket (TCP, UDP connect()) keeps its reverse translation in its own
    storage (sock_revnat), freed with it: getpeername and recvfrom show the VIP, IPv4, IPv6
    and v4-mapped alike, and the shared revnat LRU gets no entry for it."""
    dp, datapath = loaded
    v4, v6 = svc(lab, family=4), svc(lab, family=6, vip_index=11)
    datapath.apply([v4, Service("web6", "test", v6.vip, v6.ports, v6.backends)])
    # The datapath is the module's: earlier tests' unconnected UDP may have left entries.
    before = dp.maps.count("revnat")
    proc = lab.spawn([sys.executable, "-c", PEERS, v4.vip, v6.vip], netns=lab.client_ns,
                     in_cgroup=True, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=20)
    lab.processes.remove(proc)
    got = json.loads(out)
    assert got == [
        ["tcp", v4.vip, [v4.vip, 80]], ["tcp", v6.vip, [v6.vip, 80]],
        ["tcp", "::ffff:" + v4.vip, ["::ffff:" + v4.vip, 80]],
        ["udp", v4.vip, [v4.vip, 53], [v4.vip, 53]], ["udp", v6.vip, [v6.vip, 53], [v6.vip, 53]],
    ]
    assert dp.maps.count("revnat") == before


HELD = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 8080))
print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little"), flush=True)  # SO_COOKIE
sys.stdin.readline()
print(*s.getpeername()[:2], flush=True)
"""


def test_a_socket_with_only_a_revnat_entry_still_sees_its_vip(lab, loaded):
    """A socket an older agent connected has its reverse translation in revnat only (no
    sock_revnat storage): getpeername still finds it there, so an upgrade keeps the VIP."""
    from nodemesh.datapath import bpfsys
    from nodemesh.datapath import maps as m

    dp, datapath = loaded
    service = svc(lab)
    datapath.apply([service])
    backend = lab.backends[0].ipv4
    proc = lab.spawn([sys.executable, "-c", HELD, backend], netns=lab.client_ns, in_cgroup=True,
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    cookie = int(proc.stdout.readline())
    family, addr = m.encode_addr(backend)
    _, vip = m.encode_addr(service.vip)
    bpfsys.map_update(dp.maps.fd("revnat"),
                      m.RevnatKey(cookie, (m.u32 * 4)(*addr), m.port_be(8080), family),
                      m.RevnatValue((m.u32 * 4)(*vip), m.port_be(80), 0, 1))
    out, _ = proc.communicate("\n", timeout=10)
    lab.processes.remove(proc)
    assert out.split() == [service.vip, "80"]
