"""The TC packet path end to end in a lab of three nodes (nodemesh.lab.cluster): one agent per
node fed by one Kubernetes API, and real curl and dig from a client outside every node.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import threading
import time

import pytest
from k8s_fake_apiserver import FakeApiServer
from tcrun import InNetns

from nodemesh.lab.cluster import BIG_FILE_BYTES, CLIENT_ADDR, FABRIC_GW, new_cluster

pytestmark = pytest.mark.root


def service(name, ip, port, node_port, target, protocol="TCP", external="Cluster"):
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "lab"},
            "spec": {"type": "NodePort", "clusterIP": ip, "clusterIPs": [ip],
                     "ipFamilies": ["IPv4"],
                     "ports": [{"name": "p", "port": port, "protocol": protocol,
                                "targetPort": target, "nodePort": node_port}],
                     "externalTrafficPolicy": external}}


def endpoints(name, nodes, target, protocol="TCP"):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-x", "namespace": "lab",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": target, "protocol": protocol}],
            "endpoints": [{"addresses": [n.pod], "nodeName": n.name,
                           "conditions": {"ready": True}} for n in nodes]}


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
                    endpoints("dns", c.nodes, 53, protocol="UDP")):
            api.put(obj)
        kubeconfig = api.write_kubeconfig(f"{workdir}/kubeconfig")
        for node in c.nodes:
            c.start_pod_servers(node)
            c.start_agent(node, kubeconfig, ["--ct-udp-timeout", "2",
                                             "--ct-tcp-closing-timeout", "2"])
        for node in c.nodes:
            c.wait_ready(node)
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
