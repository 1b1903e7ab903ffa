"""The desired state: services, their ports and their backends.

Frozen dataclasses, validated once at the edge (nodemesh.config for files,
nodemesh.sources.kubernetes for the API) and trusted everywhere inside. Addresses are stored
in their canonical text form (ipaddress.ip_address(...).compressed) so that equal addresses
compare equal.
"""
from __future__ import annotations

import ipaddress
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple

PROTOCOLS = ("TCP", "UDP")
ALGORITHMS = ("random", "round_robin", "maglev", "least_connections")
HEALTH_CHECK_TYPES = ("tcp", "http")


class Backend:
    """One endpoint of a service.

    The conditions follow EndpointSlice semantics: `ready` backends take new connections;
    `serving` + `terminating` ones are used only when no backend is ready.

    Frozen, compared and hashed by its fields, like the model's dataclasses, and built the
    same way: Backend(address, weight=1, node=None, zone=None, ready=True, serving=True,
    terminating=False, ports=()). It is not one: a cluster has hundreds of thousands, so it
    keeps four slots, not eight (64 bytes, not 96): node and zone as one shared pair, the
    weight and the three conditions as one small int (cached by Python: no object of its
    own). `FIELDS` names the fields in constructor order; with_ports() is replace(ports=).
    """

    __slots__ = ("address", "ports", "_where", "_state")
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
            self.address == other.address and  # type: ignore[attr-defined]
            self._state == other._state and self._where == other._where and  # type: ignore[attr-defined]
            self.ports == other.ports)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> Tuple[Any, ...]:
        return (Backend, tuple([getattr(self, name) for name in Backend.FIELDS]))

    def __copy__(self) -> "Backend":
        return self

    def __deepcopy__(self, memo: Any) -> "Backend":
        return self

    def __repr__(self) -> str:
        return "Backend(" + ", ".join(f"{name}={getattr(self, name)!r}"
                                      for name in Backend.FIELDS) + ")"


# (node, zone) -> the one shared pair: nodes and zones repeat across every backend of a node.
# Bounded: past it (more nodes than any cluster has), a backend keeps a pair of its own.
_WHERE: Dict[Tuple[Optional[str], Optional[str]], Tuple[Optional[str], Optional[str]]] = {}
_WHERE_SIZE = 1 << 16
_set_address = Backend.address.__set__  # type: ignore[attr-defined]
_set_ports = Backend.ports.__set__  # type: ignore[attr-defined]
_set_where = Backend._where.__set__  # type: ignore[attr-defined]
_set_state = Backend._state.__set__  # type: ignore[attr-defined]
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


@dataclass(frozen=True, slots=True)
class Service:
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

    @property
    def key(self) -> Tuple[str, str]:
        return (self.namespace, self.name)

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


def canonical_ip(text: str) -> str:
    """Canonical text of an IP address; raises ValueError for anything else."""
    return ipaddress.ip_address(text.strip()).compressed
