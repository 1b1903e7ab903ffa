"""SNAT port reuse with real sockets: one node of nodemesh.lab.cluster with only 20 SNAT ports,
and an external client opening hundreds of short connections to one backend through a Cluster
NodePort. The backend (nginx, HTTP/1.0) closes first, so each old tuple sits in its TIME_WAIT
when the port comes round again.
"""
from __future__ import annotations

import json
import re
import sys

import pytest
from k8s_fake_apiserver import FakeApiServer
from tcrun import InNetns
from test_tc_cluster import endpoints, service

from nodemesh.lab.cluster import FABRIC_GW, new_cluster

pytestmark = pytest.mark.root

SNAT_PORTS = "40000-40019"


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("snat"))
    c = new_cluster(workdir, nodes=1)
    api = None
    try:
        with InNetns(c.fabric):
            api = FakeApiServer(host=FABRIC_GW)
        api.start()
        (node,) = c.nodes
        api.put(service("web", "10.96.0.10", 80, 30080, 8080))
        api.put(endpoints("web", [node], 8080))
        c.start_pod_servers(node)
        c.start_agent(node, api.write_kubeconfig(f"{workdir}/kubeconfig"),
                      ["--snat-ports", SNAT_PORTS])
        c.wait_ready(node, timeout=180)  # one agent; BCC compiles slowly on a loaded machine
        yield c
    finally:
        c.destroy()
        if api is not None:
            api.stop()


def test_300_short_connections_through_20_snat_ports_all_succeed(one_node):
    """300 connections at 100/s through 20 ports: each port comes round every ~0.2 s, while
    its old flow would hold it for --ct-tcp-closing-timeout (10 s) if closed flows kept their
    port; without reuse connection 21 on gets no port."""
    c = one_node
    (node,) = c.nodes
    # Sequential connections (the lab's client, GET /who), 10 ms apart, each within 2.5 s: a
    # SYN dropped for want of a port is retried by the client after 1 s and 3 s, so it fails.
    out = c.run_in(c.client, [sys.executable, "-m", "nodemesh.lab.client", "tcp", "--target",
                              f"{node.address}:30080", "--path", "/who", "--count", "300",
                              "--interval", "0.01", "--timeout", "2.5", "--max-seconds", "25"],
                   timeout=90).stdout
    r = json.loads(out)
    assert (r["ok"], r["failed"]) == (300, 0), r["errors"]
    assert r["backends"] == {"p1": 300}
    # The 20 ports did the work: no SYN was dropped for want of one (and retried).
    m = re.search(r'^nodemesh_drops_total\{reason="snat_exhausted"\} (\S+)$', c.metrics(node),
                  re.M)
    assert m is None or float(m.group(1)) == 0, m.group(0)
