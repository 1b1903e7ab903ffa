"""Traffic from outside the node, in the control plane (no root): the config fields, the
Kubernetes translation, and the frontends the reconciler programs for the TC path."""
from __future__ import annotations

import pytest
from test_kubernetes_translation import make_service

from nodemesh import config, selection
from nodemesh.datapath import maps as m
from nodemesh.reconciler import FrontendKey, service_frontends
from nodemesh.sources.kubernetes import Translation, parse_service

SERVICE = """
services:
  - name: web
    vip: 10.96.0.10
    externalIPs: [203.0.113.5]
    loadBalancerIPs: [203.0.113.6]
    trafficPolicy: {external: Local}
    ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
    backends:
      - {address: 10.0.0.1, node: node-a}
      - {address: 10.0.0.2, node: node-b}
"""


def test_config_reads_node_ports_external_addresses_and_the_external_policy():
    [svc] = config.parse(SERVICE)
    assert svc.ports[0].node_port == 30080
    assert (svc.external_ips, svc.load_balancer_ips) == (("203.0.113.5",), ("203.0.113.6",))
    assert svc.external_traffic_policy == "Local"


@pytest.mark.parametrize("bad,field", [
    ("nodePort: 30080", "nodePort: 70000"),
    ("externalIPs: [203.0.113.5]", "externalIPs: [not-an-ip]"),
    ("externalIPs: [203.0.113.5]", "externalIPs: ['2001:db8::1']"),
    ("loadBalancerIPs: [203.0.113.6]", "loadBalancerIPs: [224.0.0.1]"),
    ("{external: Local}", "{external: Nearby}"),
])
def test_bad_external_fields_are_refused_naming_the_field(bad, field):
    with pytest.raises(config.ConfigError) as e:
        config.parse(SERVICE.replace(bad, field))
    where = {"nodePort": "ports[0].nodePort", "externalIPs": "externalIPs[0]",
             "loadBalancerIPs": "loadBalancerIPs[0]", "{external": "trafficPolicy.external"}
    assert next(v for k, v in where.items() if field.startswith(k)) in str(e.value)


def test_two_services_cannot_claim_one_node_port():
    other = SERVICE.split("services:\n")[1].replace("name: web", "name: api").replace(
        "10.96.0.10", "10.96.0.11").replace("203.0.113.5", "203.0.113.7").replace(
        "203.0.113.6", "203.0.113.8")
    with pytest.raises(config.ConfigError, match=r"0\.0\.0\.0:30080/TCP is already used"):
        config.parse(SERVICE + other)


def test_local_external_frontends_hold_only_this_nodes_backends_and_say_local():
    [svc] = config.parse(SERVICE)
    fes = service_frontends(svc, selection.Context(node_name="node-a"))
    cluster_ip = fes[FrontendKey(m.FAMILY_V4, "10.96.0.10", 80, "TCP")]
    assert len(cluster_ip.backends) == 2 and cluster_ip.flags == 0  # internal policy: Cluster
    for addr, port in (("203.0.113.5", 80), ("203.0.113.6", 80), ("0.0.0.0", 30080)):
        fe = fes[FrontendKey(m.FAMILY_V4, addr, port, "TCP")]
        assert fe.backends == (("10.0.0.1", 8080, 1),) and fe.flags == m.SVC_F_EXT_LOCAL


def test_kubernetes_fills_external_ips_load_balancer_ips_and_the_external_policy():
    obj = make_service(type="LoadBalancer", externalIPs=["203.0.113.5", "bogus"],
                       externalTrafficPolicy="Local",
                       ports=[{"name": "http", "port": 80, "protocol": "TCP",
                               "targetPort": 8080, "nodePort": 30080}])
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.6"},
                                                  {"hostname": "lb.example"}]}}
    notes = Translation()
    svc = parse_service(obj, notes).service
    assert svc.external_ips == ("203.0.113.5",) and svc.load_balancer_ips == ("203.0.113.6",)
    assert svc.external_traffic_policy == "Local" and svc.ports[0].node_port == 30080
    assert any("spec.externalIPs[1]" in n for n in notes.invalid)
