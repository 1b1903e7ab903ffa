"""Kubernetes Services + EndpointSlices (API JSON) -> model.Service, with no server involved."""
import copy
import dataclasses
import gc
import json
import pickle
import sys
from pathlib import Path

import pytest

from nodemesh.model import (
    Backend,
    ConnectionLimits,
    HealthCheck,
    OutlierDetection,
    Service,
    ServicePort,
    SessionAffinity,
    canonical_ip,
)
from nodemesh.sources import kubernetes
from nodemesh.sources.kubernetes import (
    Translation,
    assemble,
    endpoint_conditions,
    parse_service,
    parse_slice,
    translate,
    translate_service,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "k8s"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def web_service():
    return fixture("service-web")


def web_slices():
    return [fixture("endpointslice-web-7xk2p"), fixture("endpointslice-web-q9d4m")]


def make_service(namespace="default", name="svc", ports=None, **spec) -> dict:
    spec.setdefault("clusterIP", "10.96.0.10")
    spec.setdefault("clusterIPs", [spec["clusterIP"]])
    spec.setdefault("ipFamilies", ["IPv4"])
    spec.setdefault("type", "ClusterIP")
    spec["ports"] = ports if ports is not None else [
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
            "spec": spec, "status": {"loadBalancer": {}}}


def make_slice(name="svc-abcde", service="svc", namespace="default", address_type="IPv4",
               endpoints=(), ports=None) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "addressType": address_type,
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1",
                         "labels": {"kubernetes.io/service-name": service}},
            "endpoints": list(endpoints),
            "ports": ports if ports is not None else [
                {"name": "http", "port": 8080, "protocol": "TCP"}]}


def endpoint(address, **conditions):
    return {"addresses": [address], "conditions": conditions}


# -- the fixtures, as `kubectl get -o json` prints them

def test_fixtures_are_valid_kubernetes_objects():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for path in sorted(FIXTURES.glob("*.json")):
        kubernetes_validate.validate(json.loads(path.read_text()), "1.31", strict=True)


def test_strict_validation_would_catch_a_misspelt_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    broken = web_service()
    broken["spec"]["clusterIp"] = broken["spec"].pop("clusterIP")
    with pytest.raises(Exception):
        kubernetes_validate.validate(broken, "1.31", strict=True)


def test_web_service_translates_ports_affinity_locality_and_every_endpoint():
    assert translate_service(web_service(), web_slices()) == Service(
        name="web", namespace="shop", vip="10.96.41.17",
        ports=(
            # targetPort "web" is named: the first number the slices resolve it to.
            ServicePort(port=80, target_port=8080, protocol="TCP", name="http", node_port=30080),
            ServicePort(port=9100, target_port=9100, protocol="TCP", name="metrics",
                        node_port=31910),
        ),
        backends=(
            Backend(address="10.244.1.12", node="node-a", zone="zone-a", ready=True,
                    serving=True, terminating=False, ports=(("http", 8080), ("metrics", 9100))),
            Backend(address="10.244.1.13", node="node-a", zone="zone-a", ready=False,
                    serving=False, terminating=False, ports=(("http", 8080), ("metrics", 9100))),
            Backend(address="10.244.2.7", node="node-b", zone="zone-b", ready=False,
                    serving=True, terminating=True, ports=(("http", 8080), ("metrics", 9100))),
            # The canary pod names its port "web" 8081: its own slice says so.
            Backend(address="10.244.3.4", node="node-c", zone="zone-b", ready=True,
                    serving=True, terminating=False, ports=(("http", 8081), ("metrics", 9100))),
        ),
        session_affinity=SessionAffinity(timeout_seconds=600),
        internal_traffic_policy="Cluster",
        traffic_distribution="PreferClose",
        labels=(("app.kubernetes.io/name", "web"),),
    )


def test_named_target_port_resolves_per_backend():
    service = translate_service(web_service(), web_slices())
    http = service.ports[0]
    by_address = {b.address: b for b in service.backends}
    assert by_address["10.244.1.12"].target_port(http) == 8080
    assert by_address["10.244.3.4"].target_port(http) == 8081


def test_dual_stack_service_has_one_vip_per_family_and_backends_of_both():
    service = translate_service(fixture("service-api-dualstack"),
                                [fixture("endpointslice-api-h5bnc"),
                                 fixture("endpointslice-api-lz8rt")])
    assert service.vip == "fd00:10:96::1f4"           # ipFamilies[0] is IPv6
    assert service.extra_vips == ("10.96.120.7",)
    assert [b.address for b in service.backends] == [
        "10.244.1.20", "10.244.2.21", "fd00:10:244:1::14", "fd00:10:244:2::15"]
    assert service.internal_traffic_policy == "Local"
    assert service.session_affinity is None
    assert [(p.name, p.port, p.target_port, p.protocol) for p in service.ports] == [
        ("grpc", 443, 8443, "TCP"), ("dns", 53, 5353, "UDP")]


@pytest.mark.parametrize("name", ["service-db-headless", "service-mail-externalname"])
def test_headless_and_external_name_services_are_not_programmed(name):
    assert translate_service(fixture(name), [fixture("endpointslice-db-r2kfz")]) is None


def test_translate_keeps_only_services_with_a_cluster_ip_sorted_by_namespace_and_name():
    services = [fixture(n) for n in ("service-web", "service-db-headless",
                                     "service-mail-externalname", "service-api-dualstack")]
    slices = [fixture(n) for n in ("endpointslice-web-7xk2p", "endpointslice-web-q9d4m",
                                   "endpointslice-api-h5bnc", "endpointslice-api-lz8rt",
                                   "endpointslice-db-r2kfz")]
    result = translate(services, slices)
    assert [s.key for s in result.services] == [("default", "api"), ("shop", "web")]
    assert result.invalid == [] and result.skipped == []


# -- endpoint conditions: the API's defaults for unset (nil) fields

@pytest.mark.parametrize("conditions, expected", [
    # conditions given                                   (ready, serving, terminating)
    ({},                                                  (True, True, False)),
    ({"ready": True},                                     (True, True, False)),
    ({"ready": False},                                    (False, False, False)),
    ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
    ({"ready": True, "serving": False},                   (True, False, False)),
    ({"serving": True, "terminating": True},              (True, True, True)),
    ({"ready": None, "serving": None, "terminating": None}, (True, True, False)),
])
def test_endpoint_conditions_apply_kubernetes_defaults(conditions, expected):
    assert endpoint_conditions({"addresses": ["10.0.0.1"], "conditions": conditions}) == expected


def test_an_endpoint_without_conditions_is_ready_and_serving():
    assert endpoint_conditions({"addresses": ["10.0.0.1"]}) == (True, True, False)


# -- ports

@pytest.mark.parametrize("port, slice_ports, expected_target", [
    # service port                                              slice ports -> target_port
    ({"name": "http", "port": 80, "targetPort": 8080},          [], 8080),
    ({"name": "http", "port": 80},                              [], 80),   # targetPort unset
    ({"name": "http", "port": 80, "targetPort": "web"},
     [{"name": "http", "port": 8081, "protocol": "TCP"}],       8081),
    ({"name": "http", "port": 80, "targetPort": "web"},         [], 80),   # unresolved: port
])
def test_target_port_is_numeric_or_resolved_from_the_slices(port, slice_ports, expected_target):
    service = make_service(ports=[dict(port, protocol="TCP")])
    slices = [make_slice(endpoints=[endpoint("10.244.0.5")], ports=slice_ports)]
    assert translate_service(service, slices).ports[0].target_port == expected_target


def test_a_single_unnamed_port_matches_the_slices_unnamed_port():
    service = make_service(ports=[{"port": 80, "protocol": "TCP", "targetPort": "web"}])
    slices = [make_slice(endpoints=[endpoint("10.244.0.5")],
                         ports=[{"name": "", "port": 8088, "protocol": "TCP"}])]
    result = translate_service(service, slices)
    assert result.ports[0].name == "" and result.ports[0].target_port == 8088
    assert result.backends[0].ports == (("", 8088),)


def test_node_port_is_kept_and_absent_when_unset():
    service = make_service(type="NodePort", ports=[
        {"name": "a", "port": 80, "protocol": "TCP", "targetPort": 80, "nodePort": 30001},
        {"name": "b", "port": 81, "protocol": "TCP", "targetPort": 81}])
    assert [p.node_port for p in translate_service(service, []).ports] == [30001, None]


def test_sctp_ports_are_skipped_with_a_note_and_the_rest_kept():
    service = make_service(ports=[
        {"name": "sig", "port": 3868, "protocol": "SCTP", "targetPort": 3868},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}])
    notes = translate([service], [])
    assert [(p.name, p.protocol) for p in notes.services[0].ports] == [("dns", "UDP")]
    assert notes.skipped == ["service default/svc: port sig: protocol SCTP is not "
                             "supported; skipped"]


def test_a_service_with_only_sctp_ports_is_skipped():
    service = make_service(ports=[{"name": "sig", "port": 3868, "protocol": "SCTP",
                                   "targetPort": 3868}])
    assert translate([service], []).services == []


# -- service-level fields

@pytest.mark.parametrize("spec, expected", [
    ({"sessionAffinity": "ClientIP",
      "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}}}, SessionAffinity(30)),
    ({"sessionAffinity": "ClientIP"},                                  SessionAffinity(10800)),
    ({"sessionAffinity": "None"},                                      None),
    ({},                                                               None),
])
def test_session_affinity_client_ip_with_its_timeout(spec, expected):
    assert translate_service(make_service(**spec), []).session_affinity == expected


@pytest.mark.parametrize("spec, policy, distribution", [
    ({},                                                    "Cluster", None),
    ({"internalTrafficPolicy": "Local"},                    "Local", None),
    ({"trafficDistribution": "PreferClose"},                "Cluster", "PreferClose"),
])
def test_internal_traffic_policy_and_traffic_distribution(spec, policy, distribution):
    service = translate_service(make_service(**spec), [])
    assert (service.internal_traffic_policy, service.traffic_distribution) == (policy,
                                                                               distribution)


def test_a_service_without_cluster_ip_is_skipped():
    service = make_service()
    del service["spec"]["clusterIP"], service["spec"]["clusterIPs"]
    assert translate_service(service, []) is None


def test_a_cluster_ip_of_the_wrong_family_is_reported_and_left_out():
    service = make_service(clusterIP="10.96.0.10", clusterIPs=["10.96.0.10", "10.96.0.11"],
                           ipFamilies=["IPv4", "IPv6"])
    notes = translate([service], [])
    assert notes.services[0].vips == ("10.96.0.10",)
    assert notes.invalid == ["service default/svc: spec.clusterIPs[1]: 10.96.0.11 is not of "
                             "family IPv6 (spec.ipFamilies[1]); skipped"]


def test_addresses_are_canonical():
    service = make_service(clusterIP="fd00:10:96:0:0:0:0:a", ipFamilies=["IPv6"])
    slices = [make_slice(address_type="IPv6",
                         endpoints=[endpoint("fd00:10:244:0:0:0:0:5")])]
    result = translate_service(service, slices)
    assert result.vip == "fd00:10:96::a"
    assert result.backends[0].address == "fd00:10:244::5"


# -- which slices and endpoints belong to a service

def test_slices_attach_by_service_name_label_in_the_same_namespace():
    services = [make_service(name="a"), make_service(name="b"),
                make_service(name="a", namespace="other", clusterIP="10.96.0.99")]
    slices = [make_slice(name="a-1", service="a", endpoints=[endpoint("10.244.0.1")]),
              make_slice(name="b-1", service="b", endpoints=[endpoint("10.244.0.2")]),
              make_slice(name="a-1", service="a", namespace="other",
                         endpoints=[endpoint("10.244.0.3")])]
    unlabeled = make_slice(name="x-1", endpoints=[endpoint("10.244.0.4")])
    del unlabeled["metadata"]["labels"]
    by_key = {s.key: [b.address for b in s.backends]
              for s in translate(services, slices + [unlabeled]).services}
    assert by_key == {("default", "a"): ["10.244.0.1"], ("default", "b"): ["10.244.0.2"],
                      ("other", "a"): ["10.244.0.3"]}


def test_fqdn_slices_and_slices_of_another_family_are_skipped():
    service = make_service()
    slices = [make_slice(name="svc-fqdn", address_type="FQDN",
                         endpoints=[endpoint("db.example.com")]),
              make_slice(name="svc-v6", address_type="IPv6", endpoints=[endpoint("fd00::5")]),
              make_slice(name="svc-v4", endpoints=[endpoint("10.244.0.5")])]
    notes = translate([service], slices)
    assert [b.address for b in notes.services[0].backends] == ["10.244.0.5"]
    assert len(notes.skipped) == 2 and notes.invalid == []


def test_every_address_of_an_endpoint_is_a_backend():
    slices = [make_slice(endpoints=[{"addresses": ["10.244.0.5", "10.244.0.6"],
                                     "conditions": {"ready": True}}])]
    assert [b.address for b in translate_service(make_service(), slices).backends] == [
        "10.244.0.5", "10.244.0.6"]


def test_an_address_in_two_slices_is_one_backend_from_the_first_slice_by_name():
    first = make_slice(name="svc-aaaaa", endpoints=[endpoint("10.244.0.5", ready=True)])
    second = make_slice(name="svc-bbbbb", endpoints=[endpoint("10.244.0.5", ready=False),
                                                     endpoint("10.244.0.6")])
    backends = translate_service(make_service(), [second, first]).backends
    assert [(b.address, b.ready) for b in backends] == [("10.244.0.5", True),
                                                       ("10.244.0.6", True)]


def test_node_and_zone_come_from_the_endpoint_and_weight_is_one():
    slices = [make_slice(endpoints=[dict(endpoint("10.244.0.5"), nodeName="n1", zone="z1"),
                                    endpoint("10.244.0.6")])]
    backends = translate_service(make_service(), slices).backends
    assert [(b.node, b.zone, b.weight) for b in backends] == [("n1", "z1", 1),
                                                              (None, None, 1)]


def test_an_endpoint_address_that_is_not_an_ip_is_reported_and_skipped():
    slices = [make_slice(endpoints=[endpoint("not-an-ip"), endpoint("10.244.0.6")])]
    notes = translate([make_service()], slices)
    assert [b.address for b in notes.services[0].backends] == ["10.244.0.6"]
    assert notes.invalid == ["service default/svc: endpointslice svc-abcde: 'not-an-ip' is not "
                             "an IP address; skipped"]


def test_a_service_without_slices_has_no_backends():
    assert translate_service(make_service(), []).backends == ()


def test_translation_does_not_modify_its_input():
    service, slices = web_service(), web_slices()
    before = copy.deepcopy((service, slices))
    translate([service], slices)
    assert (service, slices) == before


def test_slice_ports_the_service_does_not_name_are_left_out():
    slices = [make_slice(endpoints=[endpoint("10.244.0.5")],
                         ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                                {"name": "debug", "port": 6060, "protocol": "TCP"}])]
    assert translate_service(make_service(), slices).backends[0].ports == (("http", 8080),)


# -- what the source keeps: parsed once, shared with what it delivers

def test_a_service_shares_its_backends_with_its_parsed_slice():
    notes = Translation()
    parsed_slice = parse_slice(make_slice(endpoints=[endpoint("10.244.0.6"),
                                                     endpoint("10.244.0.5")]), notes)
    service = assemble(parse_service(make_service(), notes), [("svc-abcde", parsed_slice)],
                       notes)
    assert [b.address for b in service.backends] == ["10.244.0.5", "10.244.0.6"]
    assert service.backends is parsed_slice.backends  # one slice: even the tuple is shared


def test_a_parsed_slice_keeps_no_json():
    parsed = parse_slice(make_slice(endpoints=[endpoint("10.244.0.5")]), Translation())
    assert not any(isinstance(value, dict) for value in parsed)
    assert parsed.service == ("default", "svc") and parsed.version == 1


@pytest.mark.parametrize("text", ["10.1.2.3", "0.0.0.0", "255.255.255.255", " 10.1.2.3",
                                  "010.1.2.3", "10.1.2", "1.2.3.256", "fd00:0:0::0:1",
                                  "::ffff:10.1.2.3", "FD00::1", "not-an-ip", ""])
def test_the_fast_ip_path_agrees_with_canonical_ip(text):
    try:
        expected = canonical_ip(text)
    except ValueError:
        with pytest.raises(ValueError):
            kubernetes._canonical_ip(text)
    else:
        assert kubernetes._canonical_ip(text) == expected


# -- a List response, decoded one item at a time

def test_list_items_are_decoded_one_by_one_and_the_other_fields_kept():
    fields = {}
    body = ('{"items": [{"a": 1}, {"b": [2, {"c": "]"}]}],\n "kind": "ServiceList",'
            ' "metadata": {"resourceVersion": "7", "continue": "x"}}')
    assert list(kubernetes._list_items(body, fields)) == [{"a": 1}, {"b": [2, {"c": "]"}]}]
    assert fields == {"kind": "ServiceList",
                      "metadata": {"resourceVersion": "7", "continue": "x"}}


@pytest.mark.parametrize("body", ['{"items": [], "metadata": {}}', '{"items": null}', ' { } '])
def test_a_list_without_items_yields_none(body):
    assert list(kubernetes._list_items(body, {})) == []


@pytest.mark.parametrize("body", ['[]', '{"items": [{"a": 1}', '{"items": [{"a": 1},'])
def test_a_broken_list_body_is_an_error(body):
    with pytest.raises(ValueError):
        list(kubernetes._list_items(body, {}))


def annotated_service(**annotations):
    service = make_service()
    service["metadata"]["annotations"] = annotations
    return service


@pytest.mark.parametrize("annotations, algorithm, size", [
    ({},                                                          "random", 16381),
    ({"nodemesh.io/lb-algorithm": "maglev"},                      "maglev", 16381),
    ({"nodemesh.io/lb-algorithm": "maglev",
      "nodemesh.io/maglev-table-size": "307"},                    "maglev", 307),
    ({"nodemesh.io/lb-algorithm": "round_robin"},                 "round_robin", 16381),
    ({"nodemesh.io/lb-algorithm": "least_connections"},           "least_connections", 16381),
])
def test_the_algorithm_and_maglev_table_size_come_from_annotations(annotations, algorithm,
                                                                     size):
    service = translate_service(annotated_service(**annotations), [])
    assert (service.algorithm, service.maglev_table_size) == (algorithm, size)


@pytest.mark.parametrize("annotations, message", [
    ({"nodemesh.io/lb-algorithm": "consistent"},
     "service default/svc: metadata.annotations[nodemesh.io/lb-algorithm]: 'consistent' is not "
     "an algorithm (one of: random, round_robin, maglev, least_connections); ignored, random "
     "is used"),
    ({"nodemesh.io/lb-algorithm": "maglev", "nodemesh.io/maglev-table-size": "1000"},
     "service default/svc: metadata.annotations[nodemesh.io/maglev-table-size]: 1000 is not "
     "prime"),
    ({"nodemesh.io/lb-algorithm": "maglev", "nodemesh.io/maglev-table-size": "big"},
     "service default/svc: metadata.annotations[nodemesh.io/maglev-table-size]: 'big' is not "
     "a table size (a prime 7-131071); ignored, 16381 is used"),
])
def test_a_bad_algorithm_annotation_is_noted_and_the_service_still_programmed(annotations,
                                                                               message):
    notes = Translation()
    service = translate_service(annotated_service(**annotations), [], notes)
    assert service is not None and service.vip == "10.96.0.10"
    assert service.maglev_table_size == 16381
    assert len(notes.invalid) == 1 and notes.invalid[0].startswith(message), notes.invalid


# -- the source's cache (_ClusterState), without a server

def cluster_state():
    state = kubernetes._ClusterState(lambda: None, lambda notes: None)
    state._listed.update({"service", "endpointslice"})
    return state


def test_a_service_keeps_one_key_tuple_with_its_slice():
    # Three copies of ("default", "svc") a service were 5 MiB at 100,000: one is enough.
    state = cluster_state()
    state.put("endpointslice", make_slice(endpoints=[endpoint("10.244.0.5")]))
    state.put("service", make_service())
    (key,) = state._services
    assert key == ("default", "svc")
    assert key is state._slices[("default", "svc-abcde")].service


def test_a_service_follows_its_slices_as_they_come_move_and_go():
    state = cluster_state()
    state.put("service", make_service())
    state.take_delta()

    def addresses():
        delta = state.take_delta()
        return [[b.address for b in s.backends] for s in delta.upserts] if delta else None

    state.put("endpointslice", make_slice("svc-a", endpoints=[endpoint("10.244.0.5")]))
    assert addresses() == [["10.244.0.5"]]
    state.put("endpointslice", make_slice("svc-b", endpoints=[endpoint("10.244.0.4")]))
    assert addresses() == [["10.244.0.4", "10.244.0.5"]]
    state.delete("endpointslice", make_slice("svc-a"))
    assert addresses() == [["10.244.0.4"]]
    state.put("endpointslice", make_slice("svc-b", service="other",
                                          endpoints=[endpoint("10.244.0.4")]))  # relabelled
    assert addresses() == [[]]
    state.put("endpointslice", make_slice("svc-c", endpoints=[endpoint("10.244.0.6")]))
    assert addresses() == [["10.244.0.6"]]
    assert state._orphans == {("default", "other"): "svc-b"}
    assert state._services[("default", "svc")].slices == "svc-c"
    # A service deleted keeps its slices' names for when it comes back (as a slice listed
    # before its service does), and the slice's service is assembled with them.
    state.delete("service", make_service())
    assert state.take_delta().deletes == (("default", "svc"),)
    assert state._orphans == {("default", "other"): "svc-b", ("default", "svc"): "svc-c"}
    state.put("service", make_service())
    assert addresses() == [["10.244.0.6"]]
    state.delete("endpointslice", make_slice("svc-b", service="other"))
    assert state._orphans == {}


def test_a_slice_update_that_changes_nothing_translated_does_not_reassemble_its_service(
        monkeypatch):
    # A new resourceVersion (a targetRef, a hint) changes no Backend: the service is not
    # assembled again, and the stored slice keeps the Backends the delivered service holds.
    state = cluster_state()
    state.put("service", make_service())
    state.put("endpointslice", make_slice(endpoints=[endpoint("10.244.0.5")]))
    state.take_delta()
    backends = state._slices[("default", "svc-abcde")].backends
    assembled, assemble = [], kubernetes.assemble
    monkeypatch.setattr(kubernetes, "assemble", lambda *a: assembled.append(a) or assemble(*a))
    again = make_slice(endpoints=[endpoint("10.244.0.5")])
    again["metadata"]["resourceVersion"] = "2"
    state.put("endpointslice", again)
    assert assembled == [] and state.take_delta() is None
    stored = state._slices[("default", "svc-abcde")]
    assert stored.version == 2 and stored.backends is backends


def test_a_backend_is_four_slots_and_keeps_its_fields_meaning():
    # 300,000 Backends at 100,000 services: 64 bytes each, not a dataclass's 96.
    backend = Backend("10.244.0.5", 3, "node-a", "zone-a", False, True, True, (("http", 8080),))
    assert sys.getsizeof(backend) <= 64
    assert (backend.address, backend.weight, backend.node, backend.zone, backend.ready,
            backend.serving, backend.terminating, backend.ports) == \
        ("10.244.0.5", 3, "node-a", "zone-a", False, True, True, (("http", 8080),))
    same = Backend(address="10.244.0.5", weight=3, node="node-a", zone="zone-a", ready=False,
                   terminating=True, ports=(("http", 8080),))
    assert same == backend and hash(same) == hash(backend)
    assert pickle.loads(pickle.dumps(backend)) == backend
    assert backend.values() == tuple(getattr(backend, name) for name in Backend.FIELDS)
    assert Backend("10.244.0.5") != Backend("10.244.0.5", ready=False)
    assert Backend("10.244.0.5") != Backend("10.244.0.5", weight=2)
    assert Backend("10.244.0.5", zone="a") != Backend("10.244.0.5", node="a")
    assert backend.with_ports(()) == Backend("10.244.0.5", 3, "node-a", "zone-a", False, True,
                                             True)
    assert Backend("10.244.0.5", node="node-a", zone="zone-a")._where is backend._where
    # the dataclass functions take it as they took the dataclass it was
    assert [f.name for f in dataclasses.fields(backend)] == list(Backend.FIELDS)
    assert dataclasses.replace(backend, weight=2) == Backend(
        "10.244.0.5", 2, "node-a", "zone-a", False, True, True, (("http", 8080),))
    assert dataclasses.asdict(Backend("10.244.0.5"))["serving"] is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        backend.weight = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        backend.address = "10.244.0.6"  # type: ignore[misc]


def test_the_cache_keeps_no_tuple_for_a_slice_key():
    # (namespace, slice name) a slice was 6 MiB at 100,000: the names are kept per namespace.
    state = cluster_state()
    state.put("endpointslice", make_slice(endpoints=[endpoint("10.244.0.5")]))
    state.put("service", make_service())
    assert ("default", "svc-abcde") in state._slices and len(state._slices) == 1
    seen, stack, tuples = set(), [state.__dict__], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type) or callable(obj):
            continue
        seen.add(id(obj))
        if type(obj) is tuple and obj == ("default", "svc-abcde"):
            tuples.append(obj)
        stack.extend(gc.get_referents(obj))
    assert tuples == []
    state.delete("endpointslice", make_slice())
    assert len(state._slices) == 0 and list(state._slices) == []


def test_a_service_is_seven_slots_and_keeps_every_field_of_the_dataclass_it_was():
    # 100,000 Services: 96 bytes each, not the 21-slot dataclass's 200. The 15 fields most
    # services set alike are one shared tuple; each still reads, compares and replaces alone.
    names = [f.name for f in dataclasses.fields(Service)]
    assert names[:5] == ["name", "namespace", "vip", "ports", "backends"] and len(names) == 21
    values = dict(
        name="web", namespace="shop", vip="10.96.0.1", ports=(ServicePort(80, 8080),),
        backends=(Backend("10.244.0.5"),), algorithm="maglev",
        session_affinity=SessionAffinity(60), health_check=HealthCheck(type="http"),
        extra_vips=("fd00::1",), internal_traffic_policy="Local",
        traffic_distribution="PreferClose", outlier_detection=OutlierDetection(3),
        panic_threshold_percent=20, terminate_connections_on_removal=True, proxy_port=15001,
        labels=(("app", "web"),), maglev_table_size=251, external_ips=("192.0.2.1",),
        load_balancer_ips=("192.0.2.2",), external_traffic_policy="Local",
        connection_limits=ConnectionLimits(5, 6))
    assert sorted(values) == sorted(names)
    service = Service(**values)
    assert sys.getsizeof(service) <= 96
    assert {name: getattr(service, name) for name in names} == values
    assert Service(*[values[name] for name in names]) == service  # positional, in order
    assert service.values() == tuple(values[name] for name in names)
    assert dataclasses.asdict(service)["connection_limits"] == {
        "max_connections_per_backend": 5, "max_connections": 6}
    plain = Service("x", "y", "10.96.0.9", ())
    for name in names:
        other = dataclasses.replace(service, **{name: getattr(plain, name)})
        assert other != service and getattr(other, name) != values[name]
        assert all(getattr(other, n) == values[n] for n in names if n != name)
        assert dataclasses.replace(other, **{name: values[name]}) == service
        assert hash(dataclasses.replace(other, **{name: values[name]})) == hash(service)
    assert pickle.loads(pickle.dumps(service)) == service
    assert Service("a", "b", "10.96.0.2", ())._rest is Service("c", "d", "10.96.0.3", ())._rest
    with pytest.raises(dataclasses.FrozenInstanceError):
        service.algorithm = "random"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        service.name = "other"  # type: ignore[misc]


def test_a_service_keeps_its_labels_as_one_flat_tuple_shared_when_alike():
    # A tuple of pairs is a tuple more a label: 48 bytes a service with one label of its
    # own and one in common. They read back as the pairs they were given.
    labels = (("app.kubernetes.io/name", "web"), ("app.kubernetes.io/part-of", "shop"))
    one = Service("web", "shop", "10.96.0.1", (), labels=labels)
    two = Service("web2", "shop", "10.96.0.2", (), labels=tuple(list(labels)))
    assert one.labels == labels and two.labels == labels and Service("a", "b", "c", ()).labels == ()
    assert two._labels == ("app.kubernetes.io/name", "web", "app.kubernetes.io/part-of", "shop")
    three = Service("web3", "shop", "10.96.0.3", (), labels=tuple(list(labels)))
    assert three._labels is two._labels
    # one's app label is its own name: kept as a stand-in, shared by the services so labelled
    # (test_kubernetes_memory.py)
    assert one._labels is Service("web", "other", "10.96.0.4", (), labels=labels)._labels
    assert dataclasses.replace(one, labels=()).labels == ()
    assert dataclasses.replace(one, name="web2", vip="10.96.0.2") == two
    with pytest.raises(ValueError, match="labels"):
        Service("web", "shop", "10.96.0.1", (), labels=(("a", "b", "c"),))  # type: ignore[arg-type]
