"""The TC packet path end to end in a lab of three nodes (nodemesh.lab.cluster): one agent per
node fed by one Kubernetes API, and real curl, dig and sockets from a client outside every
node, over IPv4 and IPv6.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import time

import pytest
from k8s_fake_apiserver import FakeApiServer
from tcrun import InNetns

from nodemesh.api import get as admin_get
from nodemesh.lab.cluster import (
    BIG_FILE_BYTES,
    CLIENT_ADDR,
    CLIENT_ADDR6,
    FABRIC_GW,
    new_cluster,
)

pytestmark = pytest.mark.root

# The Maglev service's addresses from outside: documentation prefixes, routed only inside the
# lab's client netns (to one node at a time, as an ECMP router would).
MG_EXTERNAL_IP, MG_LB_IP, MG_LB_IP6 = "203.0.113.10", "203.0.113.11", "2001:db8:77::11"


def service(name, ips, port, node_port, target, protocol="TCP", external="Cluster", *,
            kind="NodePort", external_ips=(), lb_ips=(), annotations=None):
    ips = [ips] if isinstance(ips, str) else list(ips)
    obj = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "lab", "annotations": annotations or {}},
           "spec": {"type": kind, "clusterIP": ips[0], "clusterIPs": ips,
                    "ipFamilies": ["IPv6" if ":" in ip else "IPv4" for ip in ips],
                    "ipFamilyPolicy": "RequireDualStack" if len(ips) > 1 else "SingleStack",
                    "ports": [{"name": "p", "port": port, "protocol": protocol,
                               "targetPort": target, "nodePort": node_port}],
                    "externalIPs": list(external_ips),
                    "externalTrafficPolicy": external}}
    if lb_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return obj


def endpoints(name, nodes, target, protocol="TCP", family=4):
    """The service's EndpointSlice of one family (one slice per family, as Kubernetes has)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-x" if family == 4 else f"{name}-x6",
                         "namespace": "lab",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": f"IPv{family}",
            "ports": [{"name": "p", "port": target, "protocol": protocol}],
            "endpoints": [{"addresses": [n.pod if family == 4 else n.pod6],
                           "nodeName": n.name, "conditions": {"ready": True}} for n in nodes]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cluster"))
    c = new_cluster(workdir, nodes=3)
    api = None
    try:
        with InNetns(c.fabric):  # the API listens on the fabric, where every node reaches it
            api = FakeApiServer(host=FABRIC_GW)
        api.start()
        n1, n2, n3 = c.nodes
        for obj in (service("web", "10.96.0.10", 80, 30080, 8080),
                    endpoints("web", c.nodes, 8080),
                    service("web-local", "10.96.0.11", 80, 30081, 8080, external="Local"),
                    endpoints("web-local", c.nodes, 8080),
                    service("web-far", "10.96.0.12", 80, 30082, 8080),
                    endpoints("web-far", [n3], 8080),
                    service("dns", "10.96.0.53", 53, 30053, 53, protocol="UDP"),
                    endpoints("dns", c.nodes, 53, protocol="UDP"),
                    # IPv6: dual-stack services (one nodePort for both families) and a
                    # single-stack IPv6 one
                    service("dual-far", ["10.96.0.13", "fd00:96::13"], 80, 30083, 8080),
                    endpoints("dual-far", [n3], 8080),
                    endpoints("dual-far", [n3], 8080, family=6),
                    service("dual-local", ["10.96.0.14", "fd00:96::14"], 80, 30084, 8080,
                            external="Local"),
                    endpoints("dual-local", c.nodes, 8080),
                    endpoints("dual-local", c.nodes, 8080, family=6),
                    service("dns6", "fd00:96::53", 53, 30153, 53, protocol="UDP"),
                    endpoints("dns6", c.nodes, 53, protocol="UDP", family=6),
                    # Maglev on every kind of frontend the TC path has
                    service("web-mg", ["10.96.0.15", "fd00:96::15"], 80, 30090, 8080,
                            kind="LoadBalancer", external_ips=[MG_EXTERNAL_IP],
                            lb_ips=[MG_LB_IP, MG_LB_IP6],
                            annotations={"nodemesh.io/lb-algorithm": "maglev"}),
                    endpoints("web-mg", c.nodes, 8080),
                    endpoints("web-mg", c.nodes, 8080, family=6)):
            api.put(obj)
        kubeconfig = api.write_kubeconfig(f"{workdir}/kubeconfig")
        for node in c.nodes:
            c.start_pod_servers(node)
            c.start_agent(node, kubeconfig, ["--ct-udp-timeout", "2",
                                             "--ct-tcp-closing-timeout", "2"])
        for node in c.nodes:
            c.wait_ready(node, timeout=180)  # three BCC compiles on a loaded 2-CPU machine
        c.api = api
        yield c
    finally:
        c.destroy()
        if api is not None:
            api.stop()


def who(c, node, port, n):
    return [c.curl(f"http://{node.address}:{port}/who").strip() for _ in range(n)]


def test_a_nodeport_spreads_external_clients_over_backends_on_every_node(cluster):
    got = who(cluster, cluster.nodes[0], 30080, 30)
    # random over 3 backends: P(one gets none of 30) = 3 * (2/3)^30 < 2e-5
    assert set(got) == {"p1", "p2", "p3"}, got


def test_a_nodeport_on_node_a_reaches_a_backend_on_node_c_and_replies_come_from_a(cluster):
    n1, _, n3 = cluster.nodes
    # -w: curl reports the address it talked to; the reply must come from node A's address
    out = cluster.curl(f"http://{n1.address}:30082/who", "-w", " %{remote_ip}")
    assert out.split() == ["p3", n1.address]
    # Cluster policy: the backend saw node A (SNAT), not the client.
    assert cluster.access_log(n3)[-1].split()[0] == n1.address


def test_local_policy_keeps_the_client_address_and_stays_on_the_node(cluster):
    for node in cluster.nodes:
        assert set(who(cluster, node, 30081, 5)) == {f"p{node.index}"}
        assert cluster.access_log(node)[-1].split()[0] == CLIENT_ADDR  # the backend's own log


def test_dig_through_a_udp_nodeport_gets_answers_from_the_node_it_asked(cluster):
    # dig refuses a reply from another address than it asked ("reply from unexpected source")
    answers = {cluster.dig(cluster.nodes[1].address, 30053) for _ in range(12)}
    assert answers <= {"10.250.0.1", "10.250.0.2", "10.250.0.3"} and len(answers) >= 2, answers


def test_a_50mb_download_survives_a_backend_set_change(cluster):
    n1, n2, n3 = cluster.nodes
    proc = subprocess.Popen(["ip", "netns", "exec", cluster.client, "curl", "-sS",
                             "--limit-rate", "20M", "--max-time", "30",
                             f"http://{n1.address}:30082/big"], stdout=subprocess.PIPE)
    digest = hashlib.sha256()
    size = [0]

    def read():
        for chunk in iter(lambda: proc.stdout.read1(1 << 20), b""):
            size[0] += len(chunk)
            digest.update(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.monotonic() + 3
        while size[0] < (4 << 20):  # under way (it takes about 2.5 s at 20 MB/s)
            assert time.monotonic() < deadline and proc.poll() is None, "no download"
            time.sleep(0.05)
        assert size[0] < BIG_FILE_BYTES
        cluster.api.put(endpoints("web-far", [n2], 8080))  # p3 leaves the service
        deadline = time.monotonic() + 5
        while who(cluster, n1, 30082, 1) != ["p2"]:  # new connections: the new set
            assert time.monotonic() < deadline
            time.sleep(0.1)
        reader.join(timeout=30)
        assert proc.wait(timeout=30) == 0
        assert size[0] == BIG_FILE_BYTES
        assert digest.hexdigest() == hashlib.sha256(bytes(BIG_FILE_BYTES)).hexdigest()
        assert any("/big" in line for line in cluster.access_log(n3))  # it came from p3
    finally:
        proc.kill()
        reader.join(timeout=5)
        cluster.api.put(endpoints("web-far", [n3], 8080))


def metric(text, name, **labels):
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{([^}}]*)\}})? (\S+)$", line)
        if m and (not labels or all(f'{k}="{v}"' in (m.group(2) or "") for k, v in
                                    labels.items())):
            return float(m.group(3))
    raise AssertionError(f"{name}{{{want}}} not in metrics")


def test_conntrack_entries_expire_and_the_metrics_count_packets_and_drops(cluster):
    n1 = cluster.nodes[0]
    cluster.dig(n1.address, 30053)
    text = cluster.metrics(n1)
    assert metric(text, "nodemesh_conntrack_entries") >= 2     # both directions of the query
    assert metric(text, "nodemesh_conntrack_capacity") == 131072
    assert metric(text, "nodemesh_tc_packets_total", interface="eth0", direction="ingress",
                  verdict="dnat") > 0
    assert metric(text, "nodemesh_tc_packets_total", interface="eth0", direction="ingress",
                  verdict="reverse") > 0
    assert metric(text, "nodemesh_drops_total", reason="no_backend") == 0
    # UDP lives 2 s after its last datagram, TCP 2 s after FIN: then the agent sweeps them.
    deadline = time.monotonic() + 8
    while metric(cluster.metrics(n1), "nodemesh_conntrack_entries") > 0:
        assert time.monotonic() < deadline, "conntrack entries did not expire"
        time.sleep(0.5)


def metric_sum(text, name, **labels):
    """The sum of every series of `name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{([^}}]*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            total += float(m.group(3))
    return total


def test_packets_the_ingress_translated_and_redirected_skip_the_egress_program(cluster):
    """A NodePort flow's packets are translated on the ingress of one interface and redirected
    to the egress of the other (client -> pod, pod -> eth0), whose program lets them go without
    a second conntrack lookup and without counting them again. 20 connections carry at least
    8 such packets each (SYN, ACK, request, FIN each way and their answers); the node's egress
    counters may still grow by what the node itself sends (ARP, ND, the agent's API watch):
    tolerance 20 packets in all, where a second lookup counts at least 160."""
    n2 = cluster.nodes[1]
    before = metric_sum(cluster.metrics(n2), "nodemesh_tc_packets_total", direction="egress")
    assert set(who(cluster, n2, 30081, 20)) == {"p2"}
    text = cluster.metrics(n2)
    after = metric_sum(text, "nodemesh_tc_packets_total", direction="egress")
    assert after - before < 20, (before, after)
    # and they were translated on ingress: requests (dnat) on eth0, replies (reverse) on pod
    assert metric(text, "nodemesh_tc_packets_total", interface="pod", direction="ingress",
                  verdict="reverse") >= 20 * 4


# -- IPv6 ------------------------------------------------------------------------------------

def test_a_v6_nodeport_on_node_a_reaches_a_backend_on_node_c_and_replies_come_from_a(cluster):
    n1, _, n3 = cluster.nodes
    out = cluster.curl(f"http://[{n1.address6}]:30083/who", "-w", " %{remote_ip}")
    assert out.split() == ["p3", n1.address6]
    # Cluster policy: the backend saw node A's IPv6 address (SNAT), not the client's.
    assert cluster.access_log(n3)[-1].split()[0] == n1.address6
    # The dual-stack service's IPv4 side answers on the same nodePort.
    out = cluster.curl(f"http://{n1.address}:30083/who", "-w", " %{remote_ip}")
    assert out.split() == ["p3", n1.address]
    assert cluster.access_log(n3)[-1].split()[0] == n1.address


def test_v6_local_policy_keeps_the_client_address_and_stays_on_the_node(cluster):
    for node in cluster.nodes:
        got = {cluster.curl(f"http://[{node.address6}]:30084/who").strip() for _ in range(3)}
        assert got == {f"p{node.index}"}
        assert cluster.access_log(node)[-1].split()[0] == CLIENT_ADDR6  # the backend's own log


def test_dig_over_v6_through_a_udp_nodeport_gets_answers_from_the_node_it_asked(cluster):
    # dig refuses a reply from another address than it asked ("reply from unexpected source")
    answers = {cluster.dig(cluster.nodes[1].address6, 30153) for _ in range(12)}
    assert answers <= {"10.250.0.1", "10.250.0.2", "10.250.0.3"} and len(answers) >= 2, answers


# -- Maglev on the packet path ---------------------------------------------------------------

# One TCP flow per source port from the client's address: GET /who, the backend's name back.
# The client closes with RST (SO_LINGER 0), so it keeps no TIME_WAIT and can use the same
# source port again at once, towards the same service address through another node.
FLOWS = r"""
import json, socket, struct, sys
family, src, dst, port, sports = json.loads(sys.argv[1])
out = []
for sport in sports:
    s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(5)
    s.bind((src, sport))
    s.connect((dst, port))
    s.sendall(b"GET /who HTTP/1.0\r\nHost: lab\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    out.append(data.partition(b"\r\n\r\n")[2].decode().strip())
print(json.dumps(out))
"""
FLOW_COUNT = 30  # per round; with 3 backends, P(a fair hash puts them all on one) = 3^-29


def flows(c, dst, port, sports):
    """{source port: backend} for one connection from each source port to dst:port."""
    family = 6 if ":" in dst else 4
    src = CLIENT_ADDR6 if family == 6 else CLIENT_ADDR
    out = c.run_in(c.client, [sys.executable, "-c", FLOWS,
                              json.dumps([family, src, dst, port, list(sports)])]).stdout
    return dict(zip(sports, json.loads(out)))


def mg_frontends(c, node, address, port=80):
    return [fe for svc in admin_get(node.admin_socket, "/v1/services")
            if (svc["namespace"], svc["name"]) == ("lab", "web-mg")
            for fe in svc["frontends"] if (fe["vip"], fe["port"]) == (address, port)]


def wait_for_mg_backends(c, address, port, want, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        got = [{b["address"] for b in fe["backends"]} for node in c.nodes
               for fe in mg_frontends(c, node, address, port) if fe.get("state", "done") == "done"]
        if got == [want] * len(c.nodes):
            return
        assert time.monotonic() < deadline, f"{address}:{port}: {got}, want {want} on every node"
        time.sleep(0.1)


# (frontend kind, the address each node is reached at, port, source ports): distinct port sets,
# so that no round meets the conntrack entries of another test's flows.
MG_KINDS = {
    "nodeport4": (lambda c, node: node.address, 30090, range(21000, 21000 + FLOW_COUNT)),
    "externalIP4": (lambda c, node: MG_EXTERNAL_IP, 80, range(21100, 21100 + FLOW_COUNT)),
    "loadBalancerIP4": (lambda c, node: MG_LB_IP, 80, range(21200, 21200 + FLOW_COUNT)),
    "loadBalancerIP6": (lambda c, node: MG_LB_IP6, 80, range(21300, 21300 + FLOW_COUNT)),
}


def round_through(c, node, kind):
    address, port, sports = MG_KINDS[kind]
    dst = address(c, node)
    if dst not in (node.address, node.address6):
        c.route_via(dst, node)  # ECMP chose this node for the service address
    return flows(c, dst, port, sports)


@pytest.mark.parametrize("kind", list(MG_KINDS))
def test_maglev_sends_a_flow_to_the_same_backend_through_any_node(cluster, kind):
    """The point of Maglev behind ECMP: the router may send a flow's packets to any node, and
    every node must choose the same backend for it, without sharing any state."""
    n1, n2, _ = cluster.nodes
    address, port, _ = MG_KINDS[kind]
    vip = address(cluster, n1) if "nodeport" not in kind else "0.0.0.0"
    assert [fe["algorithm"] for node in cluster.nodes
            for fe in mg_frontends(cluster, node, vip, port)] == ["maglev"] * 3
    through_a = round_through(cluster, n1, kind)
    through_b = round_through(cluster, n2, kind)
    assert through_a == through_b
    # ... and one client's flows spread over the backends (a hash of the flow, not of the
    # client alone); a fair hash leaves one of 3 backends without a flow of 30 with
    # probability 3 * (2/3)^30 < 2e-5 -- and the ports are fixed, so it is decided once.
    assert set(through_a.values()) == {"p1", "p2", "p3"}, through_a


def test_removing_one_of_three_maglev_backends_moves_only_its_flows(cluster):
    """Maglev's table bound (tests/unit/test_maglev.py): the rows that change owner are at most
    the rows of the removed backend + 2·M/N. For these backends at M = 16381 the extra is 9 rows
    (0.05%), so of the ~20 flows on the survivors we expect none to move; we allow 1 (the
    tolerance). Every flow of the removed backend moves, and only to the survivors."""
    n1, _, n3 = cluster.nodes
    sports = range(22000, 22000 + FLOW_COUNT)
    cluster.route_via(MG_LB_IP, n1)
    before = flows(cluster, MG_LB_IP, 80, sports)
    gone = {n3.pod}
    try:
        cluster.api.put(endpoints("web-mg", cluster.nodes[:2], 8080))  # p3 leaves
        wait_for_mg_backends(cluster, MG_LB_IP, 80, {n.pod for n in cluster.nodes} - gone)
        # Through another node, whose conntrack never saw these flows: a fresh choice.
        cluster.route_via(MG_LB_IP, n3)
        after = flows(cluster, MG_LB_IP, 80, sports)
    finally:
        cluster.api.put(endpoints("web-mg", cluster.nodes, 8080))
    on_removed = [p for p in sports if before[p] == "p3"]
    on_survivors = [p for p in sports if before[p] != "p3"]
    assert on_removed and on_survivors, before
    assert all(after[p] in ("p1", "p2") for p in on_removed), after
    moved = [p for p in on_survivors if after[p] != before[p]]
    assert len(moved) <= 1, (moved, before, after)
    wait_for_mg_backends(cluster, MG_LB_IP, 80, {n.pod for n in cluster.nodes})
