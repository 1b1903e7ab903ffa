"""The desired state: services, their ports and their backends.

Frozen dataclasses, validated once at the edge (nodemesh.config for files,
nodemesh.sources.kubernetes for the API) and trusted everywhere inside. Addresses are stored
in their canonical text form (ipaddress.ip_address(...).compressed) so that equal addresses
compare equal.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterator, Optional, Tuple

PROTOCOLS = ("TCP", "UDP")
ALGORITHMS = ("random", "round_robin", "maglev", "least_connections")
HEALTH_CHECK_TYPES = ("tcp", "http")


@dataclass(frozen=True, slots=True)
class Backend:
    """One endpoint of a service.

    The conditions follow EndpointSlice semantics: `ready` backends take new connections;
    `serving` + `terminating` ones are used only when no backend is ready.
    """

    address: str
    weight: int = 1
    node: Optional[str] = None
    zone: Optional[str] = None
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    # Per-service-port target ports (service port name -> port), as EndpointSlices carry them.
    # Empty for file-configured backends, which use ServicePort.target_port.
    ports: Tuple[Tuple[str, int], ...] = ()

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.address).version

    def target_port(self, service_port: "ServicePort") -> int:
        for name, port in self.ports:
            if name == service_port.name:
                return port
        return service_port.target_port


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
