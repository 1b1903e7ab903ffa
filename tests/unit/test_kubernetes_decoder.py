"""The Kubernetes source's decoding worker (sources/kubernetes_decoder.py): a child process
that decodes list pages and hands back what the source would have parsed itself."""
import json
import os
import signal
from pathlib import Path

from nodemesh.model import Backend, Service
from nodemesh.sources import kubernetes
from nodemesh.sources.kubernetes_decoder import (
    DecodedPage,
    DecoderCrashed,
    PageDecoder,
    decode_page,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "k8s"


def page(kind: str, items, **metadata) -> bytes:
    return json.dumps({"kind": f"{kind}List", "apiVersion": "v1",
                       "metadata": {"resourceVersion": "42", **metadata},
                       "items": items}).encode()


def fixtures(prefix: str):
    return [json.loads(path.read_text()) for path in sorted(FIXTURES.glob(f"{prefix}-*.json"))]


def one_slice_services():
    """Services of one EndpointSlice each (the agent builds these without assemble), and
    the cases where it must not: a slice port the service lacks, a slice of the other
    family, a named targetPort."""
    def service(name, ports, vip="10.96.7.1"):
        return {"metadata": {"name": name, "namespace": "one", "resourceVersion": "7"},
                "spec": {"clusterIP": vip, "ports": ports}}

    def endpoint_slice(name, service_name, ports, addresses, address_type="IPv4"):
        return {"metadata": {"name": name, "namespace": "one", "resourceVersion": "8",
                             "labels": {"kubernetes.io/service-name": service_name}},
                "addressType": address_type, "ports": ports,
                "endpoints": [{"addresses": [a], "conditions": {"ready": True},
                               "nodeName": "node-a", "zone": "z1"} for a in addresses]}

    http = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
    named = [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"}]
    slice_http = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    services = [service("plain", http), service("extra-port", http), service("v6", http),
                service("named", named), service("lonely", http), service("other-port", http)]
    slices = [endpoint_slice("plain-1", "plain", slice_http, ["10.1.0.2", "10.1.0.1"]),
              endpoint_slice("extra-port-1", "extra-port",
                             slice_http + [{"name": "metrics", "port": 9090}], ["10.1.1.1"]),
              endpoint_slice("v6-1", "v6", slice_http, ["fd00::1"], "IPv6"),
              endpoint_slice("named-1", "named", [{"name": "http", "port": 8443}],
                             ["10.1.2.1"]),
              endpoint_slice("other-port-1", "other-port", [{"name": "metrics", "port": 9090}],
                             ["10.1.3.1"])]
    return services, slices


def states_from(pages, decoded):
    """The cluster state and its deltas after the slices' page, then the services' (streamed,
    as the agent lists them), each page taken as the source takes it: decoded by the worker
    (`decoded`), or parsed from its JSON in this process."""
    notes = []
    state = kubernetes._ClusterState(lambda: None, notes.append)
    deltas = []
    for kind, body in pages:
        seen = set()
        if kind == "service":
            state.stream_services()
        items = decoded[kind] if decoded else kubernetes._list_items(body.decode(), {})
        state.list_page(kind, items, seen)
        state.list_done(kind, seen)
        deltas.append(state.take_delta())
    # Notes by page, in any order (the worker's come before the ones assembling adds).
    return deltas, [(sorted(n.skipped), sorted(n.invalid)) for n in notes], state


def test_the_agent_builds_the_same_services_from_the_workers_rows_as_from_the_json():
    # Every fixture (named target ports, session affinity, dual stack, headless, external
    # name, two slices a service), services of one slice each (the quick way and each case
    # that must not take it) and a malformed service: the same partial and full deltas, the
    # same notes, the same cache, whichever process parsed the pages.
    malformed = {"metadata": {"name": "bad", "namespace": "shop"},
                 "spec": {"clusterIP": "10.96.1.1", "ports": [{"port": "http"}]}}
    services, slices = one_slice_services()
    pages = [("endpointslice", page("EndpointSlice", fixtures("endpointslice") + slices)),
             ("service", page("Service", fixtures("service") + services + [malformed],
                              **{"continue": "t"}))]
    crashes = []
    decoder = PageDecoder(crashes.append)
    with decoder.session():
        pending = [decoder.submit(kind, body) for kind, body in pages]
        answers = [decoder.result(p) for p in pending]
    for (kind, body), answer in zip(pages, answers):
        assert isinstance(answer, DecodedPage)
        assert answer == decode_page(kind, body)
    assert answers[1].metadata == {"resourceVersion": "42", "continue": "t"}
    from_rows = states_from(pages, {kind: answer for (kind, _), answer in zip(pages, answers)})
    from_json = states_from(pages, None)
    assert from_rows[:2] == from_json[:2]
    assert from_rows[2]._services == from_json[2]._services
    assert from_rows[2]._slices == from_json[2]._slices
    full = {s.key: s for s in from_rows[0][-1].upserts}
    assert full[("one", "plain")].backends[0].address == "10.1.0.1"  # in order
    assert full[("one", "named")].ports[0].target_port == 8443
    assert ("one", "bad") not in full and ("one", "lonely") in full
    assert any("metrics" not in dict(b.ports) for b in full[("one", "extra-port")].backends)
    assert [b.ports for b in full[("one", "other-port")].backends] == [()]
    assert any("bad" in m for _, invalid in from_rows[1] for m in invalid)
    assert any("v6-1" in m for skipped, _ in from_rows[1] for m in skipped)
    assert crashes == []


def test_the_worker_hands_over_rows_of_plain_values_not_model_objects():
    # A Service or Backend object unpickles through its constructor, a Python call per
    # object in the agent's process; a row of plain values does not (the ports and session
    # affinity aside: shared, one per page).
    pages = [("service", page("Service", fixtures("service"))),
             ("endpointslice", page("EndpointSlice", fixtures("endpointslice")))]

    def objects(value):
        if isinstance(value, (Service, Backend)):
            yield value
        elif isinstance(value, tuple):
            for item in value:
                yield from objects(item)

    for kind, body in pages:
        answer = decode_page(kind, body)
        assert answer.items and not list(objects(answer.items))


def test_a_page_that_is_not_json_fails_alone_and_the_worker_keeps_serving():
    decoder = PageDecoder(lambda why: None)
    with decoder.session():
        broken = decoder.submit("service", b"{\"items\": [}")
        good = decoder.submit("service", page("Service", fixtures("service")))
        try:
            decoder.result(broken)
        except ValueError as error:
            assert "JSONDecodeError" in str(error)
        else:
            raise AssertionError("a page that is not JSON was decoded")
        assert decoder.result(good).items
    assert decoder.crashes == 0


def test_a_killed_worker_fails_its_pages_is_counted_and_the_next_page_starts_another():
    crashes = []
    decoder = PageDecoder(crashes.append)
    with decoder.session():
        first = decoder.submit("service", page("Service", fixtures("service")))
        decoder.result(first)  # the worker is up
        worker = decoder._worker
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
        lost = decoder.submit("service", page("Service", fixtures("service")))
        if lost is not None:  # given to the dead worker before its end was noticed
            try:
                decoder.result(lost)
            except DecoderCrashed:
                pass
        again = decoder.submit("service", page("Service", fixtures("service")))
        assert again is not None and decoder.result(again).items
    assert decoder.crashes == 1 and "signal 9" in crashes[0]


def test_after_too_many_crashes_no_worker_is_started(monkeypatch):
    crashes = []
    decoder = PageDecoder(crashes.append)
    monkeypatch.setattr(PageDecoder, "MAX_CRASHES", 1)

    def cannot_start(self):
        raise OSError("no more processes")

    monkeypatch.setattr(PageDecoder, "_start", cannot_start)
    with decoder.session():
        assert decoder.submit("service", page("Service", [])) is None
        assert decoder.submit("service", page("Service", [])) is None
    assert decoder.crashes == 1 and not decoder.usable
    assert "no more processes" in crashes[0] and "decoded in the agent's process" in crashes[0]


def test_a_service_rebuilt_from_its_parts_in_another_process_is_the_service():
    """model.service_parts / service_from_parts, as the worker's rows carry a Service: the
    name's stand-in in the labels comes back as this process's own (labels reads it by
    identity), and a label that only looks like it is not handed over that way."""
    import pickle

    from nodemesh import model
    from nodemesh.model import Backend, ServicePort, service_from_parts, service_parts
    port = ServicePort(port=80, target_port=8080, protocol="TCP", name="http")
    backends = (Backend("10.1.0.1", ports=(("http", 8080),)),)
    for labels in [(), (("app", "web"),), (("app", "web"), ("tier", "x")),
                   (("app", "other"), ("team", "web"))]:
        service = Service(name="web", namespace="one", vip="10.96.0.1", ports=(port,),
                          backends=backends, labels=labels, algorithm="maglev")
        parts = pickle.loads(pickle.dumps(service_parts(service)))
        rebuilt = service_from_parts(("one", "web"), backends, parts)
        assert rebuilt == service and rebuilt.labels == service.labels == labels
        assert rebuilt.values() == service.values()
    lookalike = Service(name="web", namespace="one", vip="10.96.0.1", ports=(port,),
                        labels=(("app", "web"), ("odd", "".join(list(model._NAME)))))
    assert service_parts(lookalike) is None

