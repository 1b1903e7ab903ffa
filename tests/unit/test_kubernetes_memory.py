"""What the Kubernetes source keeps per endpoint stays shared where it repeats
(bench/memory.py measures the whole). No root needed."""
import json
import pickle

from nodemesh.sources import kubernetes
from nodemesh.sources.kubernetes_decoder import decode_page


def slice_page(*slices) -> bytes:
    items = [{"metadata": {"name": f"{service}-1", "namespace": "shop", "resourceVersion": "8",
                           "labels": {"kubernetes.io/service-name": service}},
              "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
              "endpoints": [{"addresses": [address], "conditions": {"ready": True}}
                            for address in addresses]}
             for service, addresses in slices]
    return json.dumps({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                       "metadata": {"resourceVersion": "42"}, "items": items}).encode()


def stored_addresses(state):
    return {key[1]: [b.address for b in parsed.backends]
            for key, parsed in state._slices.items()}


def test_a_pods_address_in_the_slices_of_several_services_is_kept_once(monkeypatch):
    # A fresh pool: the module's keeps the first 4096 addresses it sees, which other tests
    # may have filled.
    monkeypatch.setattr(kubernetes, "_share_address", kubernetes._Pool())
    # Each page is its own JSON text: every occurrence of an address is a string of its own.
    pages = [slice_page(("web", ["10.1.0.7", "10.1.0.8"])),
             slice_page(("web-headless", ["10.1.0.7"]), ("admin", ["10.1.0.8"]))]

    # parsed in the agent's process (a watch event, or a list page without the worker)
    state = kubernetes._ClusterState(lambda: None, lambda notes: None)
    for body in pages:
        state.list_page("endpointslice", kubernetes._list_items(body.decode(), {}), set())
    # and from the decoding worker's rows, each page unpickled apart as the agent takes it
    from_rows = kubernetes._ClusterState(lambda: None, lambda notes: None)
    for body in pages:
        rows = pickle.loads(pickle.dumps(decode_page("endpointslice", body)))
        from_rows.list_page("endpointslice", rows, set())

    for cache in (state, from_rows):
        kept = stored_addresses(cache)
        assert kept == {"web-1": ["10.1.0.7", "10.1.0.8"], "web-headless-1": ["10.1.0.7"],
                        "admin-1": ["10.1.0.8"]}
        assert kept["web-1"][0] is kept["web-headless-1"][0]
        assert kept["web-1"][1] is kept["admin-1"][0]


def service_page(*names) -> bytes:
    items = [{"metadata": {"name": name, "namespace": "shop", "resourceVersion": "7"},
              "spec": {"clusterIP": f"10.96.0.{i + 1}",
                       "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
             for i, name in enumerate(names)]
    return json.dumps({"kind": "ServiceList", "apiVersion": "v1",
                       "metadata": {"resourceVersion": "43"}, "items": items}).encode()


def test_a_list_remembers_what_it_named_by_the_caches_own_names_and_relists_right():
    state = kubernetes._ClusterState(lambda: None, lambda notes: None)
    for kind, body in (("endpointslice", slice_page(("web", ["10.1.0.7"]))),
                       ("service", service_page("web", "old"))):
        seen = kubernetes._SeenKeys()
        state.list_page(kind, pickle.loads(pickle.dumps(decode_page(kind, body))), seen)
        state.list_done(kind, seen)
        # No (namespace, name) tuple a listed object, and no copy of a name: the strings
        # are the ones the cache keeps (a list of 100,000 left their blocks free, 12 MiB).
        stored = {k[1]: k[1] for k in (state._services if kind == "service" else
                                        state._slices)}
        assert len(seen) == len(stored)
        for names in seen._names.values():
            assert all(name is stored[name] for name in names)
    assert set(state._services) == {("shop", "web"), ("shop", "old")}
    # A relist that no longer names "old" drops it, from the worker's rows or the JSON.
    for items in (pickle.loads(pickle.dumps(decode_page("service", service_page("web")))),
                  kubernetes._list_items(service_page("web", "new").decode(), {})):
        seen = kubernetes._SeenKeys()
        state.list_page("service", items, seen)
        state.list_done("service", seen)
        assert ("shop", "web") in seen and ("shop", "old") not in seen
    assert set(state._services) == {("shop", "web"), ("shop", "new")}


def test_one_key_tuple_a_service_for_the_cache_the_service_and_the_core():
    # The cache's key, the delivered Service's key and what the core keys it by are one
    # tuple (Service.key was a property: a tuple of its own for each holder, 56 bytes).
    from fakemaps import FakeMaps
    from prometheus_client import CollectorRegistry

    from nodemesh.core import Core, SourceChanged
    from nodemesh.health import HealthChecker
    from nodemesh.outlier import OutlierDetector
    from nodemesh.reconciler import Reconciler
    from nodemesh.snapshot import SourceState

    state = kubernetes._ClusterState(lambda: None, lambda notes: None)
    for kind, body in (("endpointslice", slice_page(("web", ["10.1.0.7"]))),
                       ("service", service_page("web"))):
        seen = kubernetes._SeenKeys()
        state.list_page(kind, pickle.loads(pickle.dumps(decode_page(kind, body))), seen)
        state.list_done(kind, seen)
    delta = state.take_delta()
    (service,) = delta.upserts
    (cache_key,) = list(state._services)
    assert service.key is cache_key and service.key is service.key
    registry = CollectorRegistry()
    core = Core(Reconciler(FakeMaps()), HealthChecker(registry, lambda key: None),
                OutlierDetector(registry, lambda services: None), SourceState("kubernetes"))
    core.post(SourceChanged(delta))
    core.step(0)
    (core_key,) = list(core.services)
    assert core_key is cache_key
    assert all(k is cache_key for k in core.reconciler.by_service)


def test_services_labelled_with_their_own_names_share_one_labels_tuple():
    # app.kubernetes.io/name: <the service's name> made every service's labels its own tuple
    # (80 bytes a service); kept as a stand-in for the name, services labelled alike share
    # one, and every reader still sees each service's own labels.
    from nodemesh.model import Service, ServicePort

    ports = (ServicePort(port=80, target_port=8080),)

    def service(name, app):
        return Service(name=name, namespace="shop", vip="10.96.0.1", ports=ports,
                       labels=(("app.kubernetes.io/name", app), ("tier", "front")))

    web, api, odd = service("web", "web"), service("api", "api"), service("odd", "web")
    assert web._labels is api._labels
    assert web.labels == (("app.kubernetes.io/name", "web"), ("tier", "front"))
    assert api.labels == (("app.kubernetes.io/name", "api"), ("tier", "front"))
    assert odd.labels == (("app.kubernetes.io/name", "web"), ("tier", "front"))
    assert web == service("web", "web") and hash(web) == hash(service("web", "web"))
    assert web != odd and pickle.loads(pickle.dumps(api)) == api
    assert pickle.loads(pickle.dumps(api)).labels == api.labels
