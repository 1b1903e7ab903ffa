"""The desired state: services, their ports and their backends.

Frozen dataclasses, validated once at the edge (nodemesh.config for files,
nodemesh.sources.kubernetes for the API) and trusted everywhere inside. Addresses are stored
in their canonical text form (ipaddress.ip_address(...).compressed) so that equal addresses
compare equal.
"""
from __future__ import annotations

import ipaddress
from dataclasses import Field, FrozenInstanceError, dataclass, field
from typing import Any, ClassVar, Dict, Iterator, Optional, Tuple

PROTOCOLS = ("TCP", "UDP")
ALGORITHMS = ("random", "round_robin", "maglev", "least_connections")
HEALTH_CHECK_TYPES = ("tcp", "http")


@dataclass(frozen=True)
class _BackendFields:
    """Backend's fields: their names, order, defaults and types (dataclasses.fields(Backend),
    dataclasses.replace(backend, ...) and asdict read them from here). Never built."""

    address: str
    weight: int = 1
    node: Optional[str] = None
    zone: Optional[str] = None
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    ports: Tuple[Tuple[str, int], ...] = ()


class _Frozen:
    """What the model's slot classes share with a frozen dataclass: no assignment, copies are
    the object itself, pickling and repr by the fields of __dataclass_fields__ (in the
    constructor's order)."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[Dict[str, "Field[Any]"]]

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> Tuple[Any, ...]:
        cls = type(self)
        return (cls, tuple([getattr(self, name) for name in cls.__dataclass_fields__]))

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: Any) -> Any:
        return self

    def __repr__(self) -> str:
        return type(self).__name__ + "(" + ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self.__dataclass_fields__) + ")"


class Backend(_Frozen):
    """One endpoint of a service.

    The conditions follow EndpointSlice semantics: `ready` backends take new connections;
    `serving` + `terminating` ones are used only when no backend is ready.

    Frozen, compared and hashed by its fields, like the model's dataclasses, and built the
    same way: Backend(address, weight=1, node=None, zone=None, ready=True, serving=True,
    terminating=False, ports=()). It is not one: a cluster has hundreds of thousands, so it
    keeps four slots, not eight (64 bytes, not 96): node and zone as one shared pair, the
    weight and the three conditions as one small int (cached by Python: no object of its
    own). `FIELDS` names the fields in constructor order; with_ports() is replace(ports=),
    cheaper; dataclasses.fields(), replace() and asdict() take a Backend as they take a
    dataclass (the fields are _BackendFields').
    """

    __slots__ = ("address", "ports", "_where", "_state")
    __dataclass_fields__: ClassVar[Dict[str, "Field[Any]"]] = \
        _BackendFields.__dataclass_fields__
    __dataclass_params__ = _BackendFields.__dataclass_params__  # type: ignore[attr-defined]
    FIELDS = ("address", "weight", "node", "zone", "ready", "serving", "terminating", "ports")

    address: str
    # Per-service-port target ports (service port name -> port), as EndpointSlices carry them.
    # Empty for file-configured backends, which use ServicePort.target_port.
    ports: Tuple[Tuple[str, int], ...]
    _where: Tuple[Optional[str], Optional[str]]  # (node, zone), shared (_WHERE)
    _state: int  # weight << 3 | terminating << 2 | serving << 1 | ready

    def __init__(self, address: str, weight: int = 1, node: Optional[str] = None,
                 zone: Optional[str] = None, ready: bool = True, serving: bool = True,
                 terminating: bool = False, ports: Tuple[Tuple[str, int], ...] = ()) -> None:
        where = (node, zone)
        shared = _WHERE.get(where)
        if shared is None:
            shared = where
            if len(_WHERE) < _WHERE_SIZE:
                _WHERE[where] = where
        _set_address(self, address)
        _set_ports(self, ports)
        _set_where(self, shared)
        # int(): a bool weight (or a numpy int) is stored as the int it stands for
        _set_state(self, int(weight) << 3 | (4 if terminating else 0) | (2 if serving else 0)
                   | (1 if ready else 0))

    @property
    def weight(self) -> int:
        return self._state >> 3

    @property
    def node(self) -> Optional[str]:
        return self._where[0]

    @property
    def zone(self) -> Optional[str]:
        return self._where[1]

    @property
    def ready(self) -> bool:
        return self._state & 1 == 1

    @property
    def serving(self) -> bool:
        return self._state & 2 == 2

    @property
    def terminating(self) -> bool:
        return self._state & 4 == 4

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.address).version

    def target_port(self, service_port: "ServicePort") -> int:
        for name, port in self.ports:
            if name == service_port.name:
                return port
        return service_port.target_port

    def values(self) -> Tuple[Any, ...]:
        """Every field, in FIELDS' order (one call, where reading them by name is six)."""
        state, where = self._state, self._where
        return (self.address, state >> 3, where[0], where[1], state & 1 == 1, state & 2 == 2,
                state & 4 == 4, self.ports)

    def with_ports(self, ports: Tuple[Tuple[str, int], ...]) -> "Backend":
        """This backend with other target ports (dataclasses.replace(backend, ports=...))."""
        other = _new_backend(Backend)
        _set_address(other, self.address)
        _set_ports(other, ports)
        _set_where(other, self._where)
        _set_state(other, self._state)
        return other

    def _key(self) -> Tuple[Any, ...]:
        return (self.address, self._state, self._where, self.ports)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Backend:
            return NotImplemented
        return self is other or (
            self.address == other.address and self._state == other._state and
            self._where == other._where and self.ports == other.ports)

    def __hash__(self) -> int:
        return hash(self._key())



# (node, zone) -> the one shared pair: nodes and zones repeat across every backend of a node.
# Bounded: past it (more nodes than any cluster has), a backend keeps a pair of its own.
_WHERE: Dict[Tuple[Optional[str], Optional[str]], Tuple[Optional[str], Optional[str]]] = {}
_WHERE_SIZE = 1 << 16
_set_address = vars(Backend)["address"].__set__
_set_ports = vars(Backend)["ports"].__set__
_set_where = vars(Backend)["_where"].__set__
_set_state = vars(Backend)["_state"].__set__
_new_backend = object.__new__


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int
    protocol: str = "TCP"
    name: str = ""
    node_port: Optional[int] = None


@dataclass(frozen=True, slots=True)
class HealthCheck:
    type: str = "tcp"
    interval_seconds: float = 1.0
    timeout_seconds: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1
    path: str = "/"
    port: Optional[int] = None  # defaults to each backend's target port


@dataclass(frozen=True, slots=True)
class SessionAffinity:
    timeout_seconds: int = 10800


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Passive health from kernel signals (Envoy's consecutive-failure outlier detection)."""

    consecutive_failures: int = 5
    base_ejection_seconds: float = 30.0
    max_ejection_percent: int = 50


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Circuit breaking at connect(): 0 means no limit. Counts are active + pending TCP
    connections from this node, kept by the kernel (bpf/lib/conn_count.h)."""

    max_connections_per_backend: int = 0
    max_connections: int = 0


@dataclass(frozen=True)
class _ServiceFields:
    """Service's fields: their names, order, defaults and types (dataclasses.fields(Service),
    dataclasses.replace(service, ...) and asdict read them from here). Never built."""

    name: str
    namespace: str
    vip: str
    ports: Tuple[ServicePort, ...]
    backends: Tuple[Backend, ...] = ()
    algorithm: str = "random"
    session_affinity: Optional[SessionAffinity] = None
    health_check: Optional[HealthCheck] = None
    # Further virtual addresses of the same service (a dual-stack Kubernetes Service has one
    # ClusterIP per family). Each (vip, port, protocol) is one frontend in the datapath.
    extra_vips: Tuple[str, ...] = ()
    internal_traffic_policy: str = "Cluster"  # Cluster | Local
    traffic_distribution: Optional[str] = None  # PreferClose: same-zone backends first
    outlier_detection: Optional[OutlierDetection] = None
    panic_threshold_percent: int = 50  # below this share of healthy backends, use them all
    terminate_connections_on_removal: bool = False  # also kill TCP (UDP always) to removed
    # TCP connects to the service go to a node-local proxy on this port instead (bpf/lib/
    # proxy.h). None: the node's --proxy-port, if any; 0: never (per-service opt-out).
    proxy_port: Optional[int] = None
    labels: Tuple[Tuple[str, str], ...] = field(default=(), compare=True)
    maglev_table_size: int = 16381  # rows of each frontend's table (algorithm: maglev)
    # Traffic that enters the node (the TC path): externalIPs and loadBalancerIPs are further
    # addresses of each port; ports[].node_port answers on the node's own addresses.
    external_ips: Tuple[str, ...] = ()
    load_balancer_ips: Tuple[str, ...] = ()
    external_traffic_policy: str = "Cluster"  # Cluster (SNAT) | Local (client kept, local only)
    connection_limits: Optional[ConnectionLimits] = None


class Service(_Frozen):
    """A service: its addresses, ports and backends, and how its traffic is balanced.

    Frozen, compared and hashed by its fields, like the model's dataclasses; built the same
    way (the fields, their order and defaults are _ServiceFields', and dataclasses.fields(),
    replace() and asdict() take a Service as they take a dataclass). It is not one: a cluster
    has 100,000, and of its 21 fields 15 are set alike in nearly every service (the
    algorithm, the policies, the options). Those sit in one tuple shared by the services
    that set them alike, so a Service keeps seven slots (96 bytes), not 21 (200).
    """

    __slots__ = ("key", "vip", "ports", "backends", "_labels", "_rest")
    __dataclass_fields__: ClassVar[Dict[str, "Field[Any]"]] = \
        _ServiceFields.__dataclass_fields__
    __dataclass_params__ = _ServiceFields.__dataclass_params__  # type: ignore[attr-defined]

    # (namespace, name), kept: the core's and the reconciler's dicts key the service by it,
    # one tuple for all (a property made one a call: each holder kept its own, 56 bytes). A
    # source may hand over its own equal tuple (share_key).
    key: Tuple[str, str]
    vip: str
    ports: Tuple[ServicePort, ...]
    backends: Tuple[Backend, ...]
    # The labels as one flat tuple (key, value, key, value ...), shared when alike (_LABELS):
    # a tuple of pairs is a tuple more a label (64 bytes each), for a reader or two.
    _labels: Tuple[str, ...]
    _rest: Tuple[Any, ...]  # the fields of _REST, in its order; shared (_RESTS)
    # The fields kept in _rest, read through properties made from _REST (below the class).
    algorithm: str
    session_affinity: Optional[SessionAffinity]
    health_check: Optional[HealthCheck]
    extra_vips: Tuple[str, ...]
    internal_traffic_policy: str
    traffic_distribution: Optional[str]
    outlier_detection: Optional[OutlierDetection]
    panic_threshold_percent: int
    terminate_connections_on_removal: bool
    proxy_port: Optional[int]
    maglev_table_size: int
    external_ips: Tuple[str, ...]
    load_balancer_ips: Tuple[str, ...]
    external_traffic_policy: str
    connection_limits: Optional[ConnectionLimits]

    def __init__(
            self, name: str, namespace: str, vip: str, ports: Tuple[ServicePort, ...], backends:
            Tuple[Backend, ...] = (), algorithm: str = "random", session_affinity:
            Optional[SessionAffinity] = None, health_check: Optional[HealthCheck] = None,
            extra_vips: Tuple[str, ...] = (), internal_traffic_policy: str = "Cluster",
            traffic_distribution: Optional[str] = None, outlier_detection:
            Optional[OutlierDetection] = None, panic_threshold_percent: int = 50,
            terminate_connections_on_removal: bool = False, proxy_port: Optional[int] = None,
            labels: Tuple[Tuple[str, str], ...] = (), maglev_table_size: int = 16381,
            external_ips: Tuple[str, ...] = (), load_balancer_ips: Tuple[str, ...] = (),
            external_traffic_policy: str = "Cluster", connection_limits:
            Optional[ConnectionLimits] = None) -> None:
        rest = (algorithm, session_affinity, health_check, extra_vips, internal_traffic_policy,
                traffic_distribution, outlier_detection, panic_threshold_percent,
                terminate_connections_on_removal, proxy_port, maglev_table_size, external_ips,
                load_balancer_ips, external_traffic_policy, connection_limits)
        shared = _shared_rest(rest)
        _set_key(self, (namespace, name))
        _set_vip(self, vip)
        _set_service_ports(self, ports)
        _set_backends(self, backends)
        _set_labels(self, _flat_labels(labels, name) if labels else ())
        _set_rest(self, shared)

    @property
    def name(self) -> str:
        return self.key[1]

    @property
    def namespace(self) -> str:
        return self.key[0]

    @property
    def labels(self) -> Tuple[Tuple[str, str], ...]:
        flat = self._labels
        if _NAME in flat:
            name = self.key[1]
            return tuple([(k, name if v is _NAME else v) for k, v in zip(flat[::2], flat[1::2])])
        return tuple(zip(flat[::2], flat[1::2]))

    def values(self) -> Tuple[Any, ...]:
        """Every field, in the constructor's order (one call, where reading them by name is
        fifteen property calls)."""
        rest = self._rest
        return (self.name, self.namespace, self.vip, self.ports, self.backends, *rest[:10],
                self.labels, *rest[10:])

    def simple(self) -> bool:
        """One VIP (no extra, external or load-balancer addresses), not Maglev, no health
        check, no outlier detection, internalTrafficPolicy Cluster, no trafficDistribution
        and a panic threshold of at most 100 %: what nearly every Kubernetes service is, and
        what the first sync's fast paths (reconciler._plain_service, PlainFrontend's choice,
        the core's checks) need to know of its options. Those sit in the shared _rest tuple,
        so the answer is kept per tuple (a handful in a cluster), not worked out per service.
        """
        rest = self._rest
        got = _SIMPLE.get(id(rest))
        if got is not None and got[0] is rest:
            return got[1]
        simple = _simple_rest(rest)
        if len(_SIMPLE) < _RESTS_SIZE:
            _SIMPLE[id(rest)] = (rest, simple)  # the tuple kept: its id is not reused
        return simple

    def with_backends(self, ports: Tuple[ServicePort, ...],
                      backends: Tuple[Backend, ...]) -> "Service":
        """replace(self, ports=ports, backends=backends), without looking at the others."""
        other = _new_service(Service)
        _set_key(other, self.key)
        _set_vip(other, self.vip)
        _set_service_ports(other, ports)
        _set_backends(other, backends)
        _set_labels(other, self._labels)
        _set_rest(other, self._rest)
        return other

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Service:
            return NotImplemented
        return self is other or (
            self.key == other.key and self.vip == other.vip and self.ports == other.ports and
            self.backends == other.backends and self._labels == other._labels and
            self._rest == other._rest)

    def __hash__(self) -> int:
        return hash((self.key, self.vip, self.ports, self.backends,
                     self._labels, self._rest))


    @property
    def vips(self) -> Tuple[str, ...]:
        return (self.vip,) + self.extra_vips

    def frontends(self) -> Iterator[Tuple[str, "ServicePort"]]:
        """Yield (vip, ServicePort) for every frontend this service programs."""
        for vip in self.vips:
            for sp in self.ports:
                yield vip, sp

    def external_frontends(self) -> Iterator[Tuple[str, int, "ServicePort"]]:
        """Yield (address, port, ServicePort) for the frontends of traffic from outside: each
        externalIP and loadBalancerIP on the service port, and each nodePort on the all-zero
        address of each of the service's families (the TC path matches it on the addresses of
        the interfaces it is attached to)."""
        for addr in self.external_ips + self.load_balancer_ips:
            for sp in self.ports:
                yield addr, sp.port, sp
        families = sorted({":" in vip for vip in self.vips})
        for sp in self.ports:
            if sp.node_port:
                for v6 in families:
                    yield ("::" if v6 else "0.0.0.0"), sp.node_port, sp


_SERVICE_FIELDS = tuple(_ServiceFields.__dataclass_fields__)
_REST = ("algorithm", "session_affinity", "health_check", "extra_vips",
         "internal_traffic_policy", "traffic_distribution", "outlier_detection",
         "panic_threshold_percent", "terminate_connections_on_removal", "proxy_port",
         "maglev_table_size", "external_ips", "load_balancer_ips", "external_traffic_policy",
         "connection_limits")
# The tuples of those fields, shared: a cluster's services set them in a few ways. Bounded:
# past it, a service keeps a tuple of its own.
_RESTS: Dict[Tuple[Any, ...], Tuple[Any, ...]] = {}
_RESTS_SIZE = 1 << 12
_set_key = vars(Service)["key"].__set__
_set_vip = vars(Service)["vip"].__set__
_set_service_ports = vars(Service)["ports"].__set__
_set_backends = vars(Service)["backends"].__set__
_set_labels = vars(Service)["_labels"].__set__
# Labels as given (pairs) -> their flat tuple, one copy of each: bounded, as _RESTS.
_LABELS: Dict[Tuple[Tuple[str, str], ...], Tuple[str, ...]] = {}
_FLAT_LABELS: Dict[Tuple[str, ...], Tuple[str, ...]] = {}
_LABELS_SIZE = 1 << 12
_set_rest = vars(Service)["_rest"].__set__
_new_service = object.__new__
# Stands for the service's own name in a flat labels tuple: a label whose value is the
# service's name (app: <name>, app.kubernetes.io/name: <name>, as most services have) would
# make each service's tuple its own (80 bytes at 100,000 services: 7.6 MiB); with it, the
# services labelled alike share one. Only ever compared by identity where read (labels).
_NAME = "\x00(the service's name)"


def _flat_labels(labels: Tuple[Tuple[str, str], ...], name: str) -> Tuple[str, ...]:
    """The flat labels tuple a service keeps: shared when alike, its name as _NAME."""
    try:
        flat = _LABELS.get(labels)
    except TypeError:  # not hashable (a list in it): flattened, not shared
        flat = None
        hashable = False
    else:
        hashable = True
    if flat is None:
        if any(len(pair) != 2 for pair in labels):
            raise ValueError(f"labels: {labels!r} are not (key, value) pairs")
        flat = tuple([text for pair in labels for text in pair])
        if not hashable or _NAME in flat:  # (a value that is _NAME's text: kept as given)
            return flat
        if len(_LABELS) < _LABELS_SIZE:
            _LABELS[labels] = flat = _FLAT_LABELS.setdefault(flat, flat)
    values = flat[1::2]
    if name in values:
        named = tuple([_NAME if i % 2 and text == name else text
                       for i, text in enumerate(flat)])
        return _shared_flat(named)
    return flat


def _shared_flat(flat: Tuple[str, ...]) -> Tuple[str, ...]:
    """The one copy of a flat labels tuple alike to `flat` (bounded: past _LABELS_SIZE, its own)."""
    shared = _FLAT_LABELS.get(flat)
    if shared is None:
        shared = flat
        if len(_FLAT_LABELS) < _LABELS_SIZE:
            _FLAT_LABELS[flat] = flat
    return shared


def _shared_rest(rest: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """The one copy of a Service's other fields alike to `rest` (bounded, as _shared_flat);
    one with a field that is no hashable value (a list) is kept as it is, not shared."""
    try:
        shared = _RESTS.get(rest)
    except TypeError:
        return rest
    if shared is None:
        shared = rest
        if len(_RESTS) < _RESTS_SIZE:
            _RESTS[rest] = rest
    return shared


def _rest_field(i: int) -> "property":
    return property(lambda self: self._rest[i])


for _i, _name in enumerate(_REST):
    setattr(Service, _name, _rest_field(_i))
# The constructor's order (positional callers rely on it), _rest's order (the constructor
# builds it in _REST's), and the slots + _REST cover it.
assert _SERVICE_FIELDS == tuple(Service.__init__.__code__.co_varnames[1:22])
assert _REST == tuple(name for name in _SERVICE_FIELDS[5:] if name != "labels")
assert set(_SERVICE_FIELDS) == {*Service.__slots__[1:-1], *_REST} - {"_labels"} | {
    "labels", "name", "namespace"}


# id(a _rest tuple) -> (the tuple, Service.simple() of it): see Service.simple.
_SIMPLE: Dict[int, Tuple[Tuple[Any, ...], bool]] = {}


def _simple_rest(rest: Tuple[Any, ...]) -> bool:
    fields = dict(zip(_REST, rest))
    threshold = fields["panic_threshold_percent"]
    return (not fields["extra_vips"] and not fields["external_ips"]
            and not fields["load_balancer_ips"] and fields["algorithm"] != "maglev"
            and fields["health_check"] is None and fields["outlier_detection"] is None
            and fields["internal_traffic_policy"] != "Local"
            and fields["traffic_distribution"] is None
            and type(threshold) is int and threshold <= 100)


def all_serving(backends: Tuple[Backend, ...]) -> bool:
    """Every backend ready, not terminating and of weight 1 (selection.eligible's candidates
    before health and topology, all of them, in one slot each): one look at each packed
    state, where the properties are three calls a backend."""
    for b in backends:
        if b._state & 5 != 1 or b._state >> 3 != 1:
            return False
    return True


def share_key(service: Service, key: Tuple[str, str]) -> Service:
    """The service, holding `key` (equal to its own) as its key: a source that keys its
    cache by the same tuple keeps one tuple a service, not two."""
    if key is not service.key and key == service.key:
        _set_key(service, key)
    return service


def service_parts(service: Service) -> Optional[Tuple[Any, ...]]:
    """What a Service holds but its key and backends, as plain values: (vip, ports, flat
    labels, the other fields' tuple), for service_from_parts in another process (a source's
    decoding worker), where Service() would check and share them all again. None if a label
    value is the text of the name's stand-in (_NAME) without being it: that would not survive
    the trip."""
    labels = service._labels
    if _NAME in labels and any(text == _NAME and text is not _NAME for text in labels):
        return None
    return (service.vip, service.ports, labels, service._rest)


def service_from_parts(key: Tuple[str, str], backends: Tuple[Backend, ...],
                       parts: Tuple[Any, ...]) -> Service:
    """The Service of `key` with `backends` and service_parts' `parts` of one that Service()
    built, maybe in another process (unpickled: the labels' and the fields' tuples are shared
    again here, and the name's stand-in in the labels is this process's own again)."""
    vip, ports, labels, rest = parts
    if labels:
        # Found as it came when alike ones are shared already; else with this process's own
        # stand-in for the name (an unpickled copy of _NAME is only equal to it).
        labels = _FLAT_LABELS.get(labels) or _shared_flat(
            tuple([_NAME if text == _NAME else text for text in labels]))
    service = _new_service(Service)
    _set_key(service, key)
    _set_vip(service, vip)
    _set_service_ports(service, ports)
    _set_backends(service, backends)
    _set_labels(service, labels)
    _set_rest(service, _shared_rest(rest))
    return service


def canonical_ip(text: str) -> str:
    """Canonical text of an IP address; raises ValueError for anything else."""
    return ipaddress.ip_address(text.strip()).compressed
