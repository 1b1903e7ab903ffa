"""What the config and Kubernetes fuzz tests share: settings, hostile values, a mutator, and
the property every service they produce must have (it fits the datapath)."""
from __future__ import annotations

import copy
import functools
import ipaddress
from typing import Any, List, Tuple

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from nodemesh import reconciler, selection
from nodemesh.datapath import maps
from nodemesh.model import ALGORITHMS, PROTOCOLS, Service

# Deterministic (the same examples on every run, no example database), and bounded: each
# test sets max_examples so that the fuzz suite stays under ~30 s on 2 cores. No per-example
# deadline: it was a timed assertion (one slow example on a loaded machine is no bug, and it
# failed a loaded run at 4.1 s); pytest-timeout catches a hang.
FUZZ = settings(derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Strings that mean something to one field or another, or nearly do.
ODD_STRINGS = [
    "", " ", "None", "null", "~", "true", "yes", "on", "TCP", "UDP", "SCTP", "tcp", "http",
    "random", "round_robin", "Local", "Cluster", "PreferClose", "ClientIP", "IPv4", "IPv6",
    "FQDN", "ExternalName", "/healthz", "/a b", "healthz", "web", "-web", "Web", "web-",
    "x" * 64, "x" * 300, "0", "80", "08", "65536", "99999999999", "1_000", "0x50", "1:20",
    "1e3", ".inf", ".nan", "\u0663", "\u00b2", "\u0000", "\u00e9", "\u202e", "a\nb",
    "10.0.0.1", " 10.0.0.1 ", "010.0.0.1", "10.0.0.256", "10.0.0", "10.0.0.1/32", "0.0.0.0",
    "0.1.2.3", "255.255.255.255", "224.0.0.1", "240.0.0.1", "127.0.0.1", "169.254.1.1",
    "::", "::1", "fe80::1", "fe80::1%eth0", "fd00::1%0", "::ffff:10.0.0.1", "fd00::1",
    "FD00:0:0:0:0:0:0:1", "2001:db8::1/64", "ff02::1", "1.2.3.4\u0000",
    "kubernetes.io/service-name",
]
ODD_INTS = [0, -1, 1, 53, 80, 65535, 65536, 86400, 86401, 16384, 2**31, 2**32, 2**63,
            2**64, -2**63, 10**100]

scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(ODD_INTS), st.integers(),
    st.floats(), st.sampled_from([80.0, 0.5, -0.0]), st.sampled_from(ODD_STRINGS),
    st.text(max_size=12), st.ip_addresses().map(str),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                      st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def _slots(obj: Any) -> List[Tuple[Any, Any]]:
    """Every (container, key) of a document, depth first; a container seen twice (shared, or
    containing itself) is walked once."""
    out: List[Tuple[Any, Any]] = []
    stack, seen = [obj], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        keys = list(node) if isinstance(node, dict) else range(len(node))
        for key in keys:
            out.append((node, key))
            if isinstance(node[key], (dict, list)):
                stack.append(node[key])
    return out


MUTATIONS = ("replace", "null", "delete", "extra", "duplicate", "wrap")


@st.composite
def mutated(draw, document: Any, new_values=values, keys=st.text(max_size=8),
            operations=MUTATIONS, most: int = 4, root: bool = True) -> Any:
    """A copy of `document` with one to `most` fields replaced (by a hostile value or null),
    deleted, duplicated or wrapped in a list, or extra keys added. "duplicate" inserts the
    same object again: YAML shows it as an anchor and an alias. `operations` may add "deep"
    and "loop", which only YAML can express. With root=False the document itself stays (a
    Kubernetes object is a JSON object, whatever it holds)."""
    doc = {"": copy.deepcopy(document)}
    for _ in range(draw(st.integers(1, most))):
        slots = _slots(doc if root else doc[""])
        if not slots:  # everything deleted
            break
        container, key = draw(st.sampled_from(slots))
        operation = draw(st.sampled_from(operations))
        if operation == "replace":
            container[key] = draw(new_values)
        elif operation == "null":
            container[key] = None
        elif operation == "delete" and container is not doc:
            del container[key]
        elif operation == "extra":
            target = container[key] if isinstance(container[key], dict) else container
            if isinstance(target, dict) and target is not doc:
                target[draw(keys)] = draw(new_values)
        elif operation == "duplicate":
            if isinstance(container, list):
                container.insert(key, container[key])
            elif isinstance(container[key], list) and container[key]:
                container[key].append(container[key][-1])
        elif operation == "wrap":
            container[key] = [container[key]]
        elif operation == "deep":  # past any depth limit
            for _ in range(draw(st.integers(1, 80))):
                container[key] = [container[key]]
        elif operation == "loop":  # a list that holds itself: only YAML can say that
            container[key] = [container[key]]
            container[key].append(container[key])
    return doc[""]


@functools.lru_cache(maxsize=256)
def _slot_count(algorithm: str, weights: Tuple[int, ...]) -> int:
    """Slots of a frontend: each port of a service, and each context, has the same ones; a
    round-robin sequence of 16,384 slots takes ~50 ms to compute."""
    return len(selection.slots_for(algorithm, weights))


def is_port(value: Any) -> bool:
    return type(value) is int and 1 <= value <= 65535


def assert_programmable(service: Service) -> None:
    """The service is what the model promises (types, ranges, canonical addresses) and every
    one of its frontends can be planned and packed for the datapath."""
    hash(service)  # services are compared and shared as keys
    assert isinstance(service.name, str) and isinstance(service.namespace, str)
    assert service.algorithm in ALGORITHMS
    assert service.internal_traffic_policy in ("Cluster", "Local")
    assert service.traffic_distribution is None or isinstance(service.traffic_distribution, str)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in service.labels)
    if service.session_affinity is not None:
        assert 1 <= service.session_affinity.timeout_seconds <= 86400
    for sp in service.ports:
        assert is_port(sp.port) and is_port(sp.target_port) and sp.protocol in PROTOCOLS
        assert isinstance(sp.name, str) and (sp.node_port is None or is_port(sp.node_port))
    for backend in service.backends:
        assert type(backend.weight) is int and 0 <= backend.weight <= 65535
        assert all(isinstance(name, str) and is_port(port) for name, port in backend.ports)
        assert backend.node is None or isinstance(backend.node, str)
        assert backend.zone is None or isinstance(backend.zone, str)
        assert all(type(c) is bool for c in (backend.ready, backend.serving,
                                              backend.terminating))
    for address in service.vips + tuple(b.address for b in service.backends):
        assert ipaddress.ip_address(address).compressed == address  # canonical: compares
        maps.encode_addr(address)
    for ctx in (selection.NO_CONTEXT, selection.Context(
            node_name=next((b.node for b in service.backends if b.node), "node-a"),
            node_zone=next((b.zone for b in service.backends if b.zone), "zone-a"))):
        for key, desired in reconciler.service_frontends(service, ctx).items():
            key.map_key()
            slots = _slot_count(desired.algorithm, tuple(w for *_, w in desired.backends))
            assert slots <= maps.SLOT_INDEX_MASK
            maps.pack_master_value(1, slots, 0, maps.ALGORITHM_IDS[desired.algorithm], 1,
                                   0, desired.affinity_timeout)
            for address, port, _weight in desired.backends:
                maps.pack_backend(address, port, maps.PROTO_IDS[key.protocol], 1, 0)
                maps.pack_endpoint_key(address, port)
