"""Property tests of the Kubernetes translation (issue 14): whatever a Service and its
EndpointSlices hold, translation gives a service that fits the datapath, or skips it and says
why (Translation.invalid / .skipped); it never raises. A valid API server sends none of these
objects, but one that raised would fail the source's list or watch on every retry, and no
change would reach the datapath any more."""
import copy
import json
from pathlib import Path

import pytest
from fuzzing import FUZZ, ODD_INTS, ODD_STRINGS, assert_programmable, mutated, values
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemesh.sources import kubernetes
from nodemesh.sources.kubernetes import (
    Translation,
    object_key,
    object_version,
    parse_service,
    parse_slice,
    translate,
    translate_service,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "k8s"
# What translation does not read: mutating it would only spend examples.
UNREAD = {"annotations", "creationTimestamp", "generateName", "generation", "ownerReferences",
          "uid", "apiVersion", "kind", "status", "selector", "externalTrafficPolicy",
          "ipFamilyPolicy", "targetRef", "hints"}


def read(obj):
    if isinstance(obj, dict):
        return {k: read(v) for k, v in obj.items() if k not in UNREAD}
    return [read(v) for v in obj] if isinstance(obj, list) else obj


def fixture(name):
    return read(json.loads((FIXTURES / f"{name}.json").read_text()))


# Each fixture Service with its slices (the headless one has a slice, but no VIP; the
# ExternalName one neither).
CASES = [(fixture(service), [fixture(s) for s in slices]) for service, slices in [
    ("service-web", ["endpointslice-web-7xk2p", "endpointslice-web-q9d4m"]),
    ("service-api-dualstack", ["endpointslice-api-h5bnc", "endpointslice-api-lz8rt"]),
    ("service-db-headless", ["endpointslice-db-r2kfz"]),
    ("service-mail-externalname", []),
]]


def silently_skipped(service):
    """Headless, ExternalName and address-less services are normal: no note for them."""
    spec = service.get("spec")
    if spec is None:
        return True
    if not isinstance(spec, dict):
        return False
    if spec.get("type") == "ExternalName":
        return True
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return isinstance(ips, list) and (not ips or ips[0] == "None")


def check(service, slices):
    """translate_service and translate, checked: they leave their input alone, and give
    programmable services, or a note (unless the service has no VIP by design)."""
    before = copy.deepcopy((service, slices))
    notes = Translation()
    result = translate_service(service, slices, notes)
    assert all(isinstance(n, str) and n for n in notes.invalid + notes.skipped)
    if result is None:
        assert notes.invalid or notes.skipped or silently_skipped(service), notes
    else:
        assert_programmable(result)
    for translated in translate([service], slices).services:  # by key, not as given
        assert_programmable(translated)
    assert (service, slices) == before


# Values a Kubernetes object might hold in any field, and the near misses.
K8S_VALUES = values | st.sampled_from(ODD_STRINGS) | st.sampled_from(ODD_INTS)


@st.composite
def mutated_case(draw):
    """A fixture Service and some of its slices (maybe twice), each maybe mutated."""
    service, slices = draw(st.sampled_from(CASES[:2] * 3 + CASES[2:]))  # mostly with a VIP
    picked = [slices[i] for i in draw(st.lists(st.integers(0, len(slices) - 1), max_size=3))] \
        if slices else []
    mutate = st.booleans()
    if draw(mutate) or not picked:
        service = draw(mutated(service, new_values=K8S_VALUES, root=False))
    return service, [draw(mutated(s, new_values=K8S_VALUES, root=False)) if draw(mutate) else s
                     for s in picked]


@pytest.mark.slow
@settings(FUZZ, max_examples=700)
@given(mutated_case())
def test_a_mutated_service_or_slice_translates_or_is_skipped_with_a_note(case):
    check(*case)


# -- objects built from parts: dual stack, odd ports, the same address in several endpoints

GOOD = {"IPv4": ["10.96.0.10", "10.244.1.5", "10.244.1.6", "10.244.2.7"],
        "IPv6": ["fd00::10", "fd00:0:0:0:0:0:0:10", "fd00::5", "FD00::6", "2001:db8::7"]}
ODD_ADDRESSES = ["0.0.0.0", "224.0.0.1", "fe80::1%eth0", "::ffff:10.244.1.5", "10.244.1.5 ",
                 "010.244.1.5", "10.244.1", None, 5, ["10.244.1.5"]]


def mostly(good, odd, times=3):
    """Each part odd one time in times + 1: a case with many parts is still valid at times."""
    return st.one_of(*[good] * times, odd)


def address(family):
    """Mostly an address of the family (some repeat: duplicate endpoints), at times another."""
    return mostly(st.sampled_from(GOOD.get(family, GOOD["IPv4"])), st.sampled_from(
        GOOD["IPv4"] + GOOD["IPv6"] + ODD_ADDRESSES + ODD_STRINGS) | st.ip_addresses().map(str))


NUMBER = mostly(st.integers(1, 65535), st.sampled_from(ODD_INTS + ["80", "08", "http", "", None]))
PORT_NAME = mostly(st.sampled_from(["", "http", "dns", "metrics"]),
                   st.sampled_from(["HTTP", "a" * 300, 7, None]))
maybe = mostly(st.sampled_from([None, True, False]), st.sampled_from(["true", 1, []]))


@st.composite
def built_case(draw):
    families = draw(st.sampled_from([["IPv4"], ["IPv6"], ["IPv4", "IPv6"], ["IPv6", "IPv4"]]))
    spec = {"type": draw(st.sampled_from(["ClusterIP", "ClusterIP", "NodePort", "ExternalName"])),
            "clusterIPs": [draw(address(f)) for f in families],
            "ports": draw(st.lists(st.fixed_dictionaries(
                {"port": NUMBER},
                optional={"name": PORT_NAME, "protocol": st.sampled_from(["TCP", "UDP", "TCP", "SCTP"]),
                          "targetPort": NUMBER, "nodePort": NUMBER}), min_size=1, max_size=3))}
    spec["ipFamilies"] = draw(st.sampled_from([families, families, [], families[::-1], ["IPv5"]]))
    if draw(st.booleans()):
        spec["clusterIP"] = spec["clusterIPs"][0]
    if draw(st.booleans()):
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": draw(NUMBER)}}
    for key, choices in (("internalTrafficPolicy", ["Cluster", "Local", "Bogus"]),
                         ("trafficDistribution", ["PreferClose", "PreferSameNode"])):
        if draw(st.booleans()):
            spec[key] = draw(st.sampled_from(choices))
    service = {"metadata": {"name": "svc", "namespace": "default", "resourceVersion": "1"},
               "spec": spec}
    names = [p["name"] for p in spec["ports"] if isinstance(p.get("name"), str)] + ["other"]
    slices = []
    for i in range(draw(st.integers(1, 3))):
        address_type = draw(st.sampled_from(families + ["IPv4", "IPv6", "FQDN"]))
        endpoints = draw(st.lists(st.fixed_dictionaries(
            {"addresses": st.lists(address(address_type), max_size=3)},
            optional={"conditions": st.fixed_dictionaries({}, optional={
                "ready": maybe, "serving": maybe, "terminating": maybe}),
                "nodeName": st.sampled_from(["node-a", "node-b"]),
                "zone": st.sampled_from(["zone-a", "zone-b"])}), min_size=1, max_size=4))
        slices.append({
            "addressType": address_type,
            "metadata": {"name": f"svc-{i}", "namespace": "default", "resourceVersion": "2",
                         "labels": {"kubernetes.io/service-name": "svc"}},
            "endpoints": endpoints,
            "ports": draw(st.lists(st.fixed_dictionaries(
                {"name": st.sampled_from(names), "port": mostly(st.integers(1, 65535), NUMBER, 9)},
                optional={"protocol": st.sampled_from(["TCP", "UDP"])}), max_size=3))})
    return service, slices


@pytest.mark.slow
@settings(FUZZ, max_examples=250)
@given(built_case())
def test_a_service_built_from_odd_parts_translates_or_is_skipped_with_a_note(case):
    check(*case)


@settings(FUZZ, max_examples=100)
@given(st.lists(mutated_case(), max_size=4))
def test_translating_collections_of_mutated_objects_never_raises(cases):
    notes = translate([service for service, _ in cases], [s for _, slices in cases for s in slices])
    for service in notes.services:
        assert_programmable(service)


# -- what the fuzzing found: each raised (or gave a service the datapath cannot hold) before

DELETE = object()


def changed(case, target, path, value):
    """A fixture case with one field set (or deleted): target "service" or a slice's index."""
    service, slices = copy.deepcopy(CASES[case])
    obj = service if target == "service" else slices[target]
    for key in path[:-1]:
        obj = obj[key]
    if value is DELETE:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return service, slices


WEB, API = 0, 1
FOUND = {
    "port missing": (WEB, "service", ["spec", "ports", 0, "port"], DELETE),
    "port out of range": (WEB, "service", ["spec", "ports", 0, "port"], 70000),
    "port empty string": (WEB, "service", ["spec", "ports", 1, "port"], ""),
    "targetPort a superscript digit": (WEB, "service", ["spec", "ports", 1, "targetPort"], "\u00b2"),
    "nodePort a list": (WEB, "service", ["spec", "ports", 0, "nodePort"], [30080]),
    "port name a list": (WEB, "service", ["spec", "ports", 0, "name"], ["http"]),
    "ports not a list": (WEB, "service", ["spec", "ports"], 80),
    "affinity timeout over u32": (WEB, "service", ["spec", "sessionAffinityConfig", "clientIP",
                                                   "timeoutSeconds"], 2**32),
    "clusterIPs a mapping": (WEB, "service", ["spec", "clusterIPs"], {"10.96.41.17": 1}),
    "clusterIP a number": (WEB, "service", ["spec", "clusterIPs", 0], 174336017),
    "scoped IPv6 VIP": (API, "service", ["spec", "clusterIPs", 0], "fd00:10:96::1f4%eth0"),
    "ipFamilies entry a list": (API, "service", ["spec", "ipFamilies", 0], ["IPv6"]),
    "spec a list": (WEB, "service", ["spec"], ["ports"]),
    "labels a list": (WEB, "service", ["metadata", "labels"], ["app"]),
    "name a list": (WEB, "service", ["metadata", "name"], ["web"]),
    "traffic policy a list": (WEB, "service", ["spec", "internalTrafficPolicy"], ["Local"]),
    "endpoint a string": (WEB, 0, ["endpoints", 0], "10.244.1.12"),
    "conditions a list": (WEB, 0, ["endpoints", 0, "conditions"], ["ready"]),
    "nodeName a number": (WEB, 0, ["endpoints", 0, "nodeName"], 1),
    "address a number": (WEB, 0, ["endpoints", 0, "addresses", 0], 183238924),
    "scoped IPv6 backend": (API, 1, ["endpoints", 0, "addresses", 0], "fd00:10:244:1::14%eth0"),
    "slice port a superscript digit": (WEB, 0, ["ports", 0, "port"], "\u00b2"),
    "slice port out of range": (WEB, 0, ["ports", 0, "port"], 70000),
    "slice port name a number": (WEB, 0, ["ports", 0, "name"], 80),
    "resourceVersion a number": (WEB, 0, ["metadata", "resourceVersion"], 48390),
    "service-name label a list": (WEB, 0, ["metadata", "labels", "kubernetes.io/service-name"],
                                  ["web"]),
    "addressType a list": (WEB, 0, ["addressType"], ["IPv4"]),
}


@pytest.mark.parametrize("case", FOUND.values(), ids=FOUND.keys())
def test_what_fuzzing_found_translates_or_is_skipped_with_a_note(case):
    check(*changed(*case))


# -- the quick reads: each field is read without _typed when it has the type a valid API
#    server sends; whatever they give must be what the checked reads (through _typed) give

class CheckedDict(dict):
    """Not exactly a dict: the quick reads (type(x) is dict) pass it to the checked ones."""


class CheckedList(list):
    """Not exactly a list: the checked reads take it."""


# reprlib abbreviates a value by its type's name: with these, the notes read the same.
CheckedDict.__name__, CheckedList.__name__ = "dict", "list"


def the_checked_way(obj):
    if isinstance(obj, dict):
        return CheckedDict({key: the_checked_way(value) for key, value in obj.items()})
    if isinstance(obj, list):
        return CheckedList(the_checked_way(value) for value in obj)
    return obj


def parsed(service, slices, way):
    notes = Translation()
    records = [parse_service(way(service), notes)] + [parse_slice(way(s), notes) for s in slices]
    return records, notes


@settings(FUZZ, max_examples=300)
@given(mutated_case() | built_case())
def test_the_quick_reads_parse_what_the_checked_reads_parse(case):
    service, slices = case
    assert parsed(service, slices, lambda obj: obj) == parsed(service, slices, the_checked_way)
    for obj in [service, *slices]:
        assert kubernetes._key_and_version(obj) == (object_key(obj), object_version(obj))
