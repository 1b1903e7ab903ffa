"""The YAML config file: parsed, validated, and turned into model.Service objects.

Every problem is reported with the file, the line and the field path, e.g.
    services.yaml:7: services[0].ports[0].port: 70000 is not a port (1-65535)
and all problems of a file are reported together, so that one `nodemesh check` run shows them all.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import yaml

from .model import (ALGORITHMS, HEALTH_CHECK_TYPES, PROTOCOLS, Backend, HealthCheck,
                    OutlierDetection, Service, ServicePort, SessionAffinity, canonical_ip)

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    line: Optional[int] = None

    def render(self, filename: str) -> str:
        where = f"{filename}:{self.line}" if self.line else filename
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """A config that must not be applied. str() lists every problem, one a line."""

    def __init__(self, filename: str, problems: List[Problem]):
        self.filename = filename
        self.problems = problems
        super().__init__("\n".join(p.render(filename) for p in problems))


def _plain(node: yaml.Node, path: str, lines: Dict[str, int]) -> Any:
    """Turn a composed YAML node into plain Python, remembering the line of every path."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: Dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            child = f"{path}.{key}" if path else str(key)
            if key in out:
                lines[child] = key_node.start_mark.line + 1
                raise _Duplicate(child, key_node.start_mark.line + 1)
            out[key] = _plain(value_node, child, lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(item, f"{path}[{i}]", lines) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.ScalarNode) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True)


class _Duplicate(Exception):
    def __init__(self, path: str, line: int):
        self.path, self.line = path, line


class _Checker:
    """Walks the plain document; collects problems instead of stopping at the first."""

    def __init__(self, lines: Dict[str, int]):
        self.lines = lines
        self.problems: List[Problem] = []

    def fail(self, path: str, message: str) -> None:
        line = self.lines.get(path)
        if line is None:  # a missing field: point at its parent
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            line = self.lines.get(parent)
        self.problems.append(Problem(path, message, line))

    def fields(self, obj: Any, path: str, allowed: Tuple[str, ...], what: str) -> Dict[str, Any]:
        if obj is None:
            return {}
        if not isinstance(obj, dict):
            self.fail(path, f"must be a mapping ({what}), not {_kind(obj)}")
            return {}
        for key in obj:
            if key not in allowed:
                self.fail(f"{path}.{key}" if path else str(key),
                          f"unknown field (allowed: {', '.join(allowed)})")
        return obj

    def integer(self, value: Any, path: str, lo: int, hi: int, what: str) -> Optional[int]:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"{value!r} is not {what} (an integer {lo}-{hi})")
            return None
        if not lo <= value <= hi:
            self.fail(path, f"{value} is not {what} ({lo}-{hi})")
            return None
        return value

    def number(self, value: Any, path: str, lo: float, hi: float) -> Optional[float]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            self.fail(path, f"{value!r} must be a number from {lo} to {hi}")
            return None
        return float(value)

    def label(self, value: Any, path: str) -> Optional[str]:
        if not isinstance(value, str) or len(value) > 63 or not DNS1123_LABEL.match(value):
            self.fail(path, f"{value!r} is not a DNS-1123 label (lowercase letters, digits and "
                            f"'-', at most 63 characters, starting and ending alphanumeric)")
            return None
        return value

    def ip(self, value: Any, path: str, what: str) -> Optional[str]:
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            return canonical_ip(value)
        except ValueError:
            self.fail(path, f"{value!r} is not an IPv4 or IPv6 address ({what})")
            return None


def _kind(obj: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "empty"}.get(type(obj), type(obj).__name__)


SERVICE_FIELDS = ("name", "namespace", "vip", "ports", "algorithm", "sessionAffinity",
                  "healthCheck", "outlierDetection", "panicThresholdPercent", "trafficPolicy",
                  "trafficDistribution", "terminateConnectionsOnRemoval", "backends")
PORT_FIELDS = ("name", "port", "targetPort", "protocol")
BACKEND_FIELDS = ("address", "weight", "node", "zone", "ready", "serving", "terminating")
OUTLIER_FIELDS = ("consecutiveFailures", "baseEjectionSeconds", "maxEjectionPercent")
HEALTH_FIELDS = ("type", "intervalSeconds", "timeoutSeconds", "unhealthyThreshold",
                 "healthyThreshold", "path", "port")


def _check_vip(c: _Checker, vip: Optional[str], path: str) -> Optional[str]:
    if vip is None:
        return None
    addr = ipaddress.ip_address(vip)
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr.is_link_local or \
            (addr.version == 4 and addr == ipaddress.IPv4Address("255.255.255.255")):
        c.fail(path, f"{vip} cannot be a virtual IP (unspecified, loopback, link-local, "
                     f"multicast and broadcast addresses are reserved)")
        return None
    return vip


def _service(c: _Checker, raw: Any, path: str) -> Optional[Service]:
    obj = c.fields(raw, path, SERVICE_FIELDS, "a service")
    if not isinstance(raw, dict):
        return None
    before = len(c.problems)
    if "name" not in obj:
        c.fail(f"{path}.name", "is required")
    name = c.label(obj["name"], f"{path}.name") if "name" in obj else None
    namespace = c.label(obj.get("namespace", "default"), f"{path}.namespace")
    vip = None
    if "vip" not in obj:
        c.fail(f"{path}.vip", "is required")
    else:
        vip = _check_vip(c, c.ip(obj["vip"], f"{path}.vip", "the service's virtual IP"),
                         f"{path}.vip")
    algorithm = obj.get("algorithm", "random")
    if algorithm not in ALGORITHMS:
        c.fail(f"{path}.algorithm", f"{algorithm!r} is not an algorithm (one of: "
                                    f"{', '.join(ALGORITHMS)})")

    ports: List[ServicePort] = []
    raw_ports = obj.get("ports")
    if raw_ports is None:
        c.fail(f"{path}.ports", "is required (at least one port)")
    elif not isinstance(raw_ports, list) or not raw_ports:
        c.fail(f"{path}.ports", "must be a non-empty list of ports")
    else:
        for i, rp in enumerate(raw_ports):
            sp = _port(c, rp, f"{path}.ports[{i}]")
            if sp:
                ports.append(sp)
        seen: Dict[Tuple[int, str], int] = {}
        names: Dict[str, int] = {}
        for i, sp in enumerate(ports):
            if (sp.port, sp.protocol) in seen:
                c.fail(f"{path}.ports[{i}]", f"port {sp.port}/{sp.protocol} is listed twice "
                                             f"(also ports[{seen[(sp.port, sp.protocol)]}])")
            seen[(sp.port, sp.protocol)] = i
            if sp.name:
                if sp.name in names:
                    c.fail(f"{path}.ports[{i}].name", f"{sp.name!r} is used twice")
                names[sp.name] = i

    backends: List[Backend] = []
    raw_backends = obj.get("backends", [])
    if raw_backends is None:
        raw_backends = []
    if not isinstance(raw_backends, list):
        c.fail(f"{path}.backends", f"must be a list, not {_kind(raw_backends)}")
    else:
        seen_addr: Dict[str, int] = {}
        for i, rb in enumerate(raw_backends):
            b = _backend(c, rb, f"{path}.backends[{i}]")
            if b is None:
                continue
            if b.address in seen_addr:
                c.fail(f"{path}.backends[{i}].address",
                       f"{b.address} is listed twice (also backends[{seen_addr[b.address]}])")
                continue
            seen_addr[b.address] = i
            if vip is not None and b.family != ipaddress.ip_address(vip).version:
                c.fail(f"{path}.backends[{i}].address",
                       f"{b.address} is IPv{b.family} but the VIP {vip} is "
                       f"IPv{ipaddress.ip_address(vip).version}: socket-level balancing cannot "
                       f"change a socket's address family")
                continue
            backends.append(b)

    affinity = None
    if "sessionAffinity" in obj:
        sa = c.fields(obj["sessionAffinity"], f"{path}.sessionAffinity", ("clientIP",),
                      "sessionAffinity")
        cip = c.fields(sa.get("clientIP"), f"{path}.sessionAffinity.clientIP",
                       ("timeoutSeconds",), "clientIP")
        timeout = c.integer(cip.get("timeoutSeconds", 10800),
                            f"{path}.sessionAffinity.clientIP.timeoutSeconds", 1, 86400,
                            "a timeout in seconds")
        if timeout:
            affinity = SessionAffinity(timeout_seconds=timeout)

    health = None
    if "healthCheck" in obj:
        health = _health(c, obj["healthCheck"], f"{path}.healthCheck")

    outlier = None
    if "outlierDetection" in obj:
        od = c.fields(obj["outlierDetection"], f"{path}.outlierDetection", OUTLIER_FIELDS,
                      "outlierDetection")
        n = c.integer(od.get("consecutiveFailures", 5),
                      f"{path}.outlierDetection.consecutiveFailures", 1, 1000, "a count")
        base = c.number(od.get("baseEjectionSeconds", 30),
                        f"{path}.outlierDetection.baseEjectionSeconds", 0.1, 86400)
        pct = c.integer(od.get("maxEjectionPercent", 50),
                        f"{path}.outlierDetection.maxEjectionPercent", 0, 100, "a percentage")
        if None not in (n, base, pct):
            outlier = OutlierDetection(n, base, pct)
    panic = c.integer(obj.get("panicThresholdPercent", 50), f"{path}.panicThresholdPercent",
                      0, 100, "a percentage")
    policy = "Cluster"
    if "trafficPolicy" in obj:
        tp = c.fields(obj["trafficPolicy"], f"{path}.trafficPolicy", ("internal",),
                      "trafficPolicy")
        policy = tp.get("internal", "Cluster")
        if policy not in ("Cluster", "Local"):
            c.fail(f"{path}.trafficPolicy.internal", f"{policy!r} is not a traffic policy "
                                                     f"(Cluster or Local)")
    distribution = obj.get("trafficDistribution")
    if distribution is not None and distribution != "PreferClose":
        c.fail(f"{path}.trafficDistribution", f"{distribution!r} is not a traffic "
                                              f"distribution (PreferClose)")
    terminate = obj.get("terminateConnectionsOnRemoval", False)
    if not isinstance(terminate, bool):
        c.fail(f"{path}.terminateConnectionsOnRemoval", f"{terminate!r} must be true or false")

    if len(c.problems) > before or name is None or namespace is None or vip is None:
        return None
    return Service(name=name, namespace=namespace, vip=vip, ports=tuple(ports),
                   backends=tuple(backends), algorithm=algorithm,
                   session_affinity=affinity, health_check=health, outlier_detection=outlier,
                   panic_threshold_percent=panic, internal_traffic_policy=policy,
                   traffic_distribution=distribution,
                   terminate_connections_on_removal=terminate)


def _port(c: _Checker, raw: Any, path: str) -> Optional[ServicePort]:
    obj = c.fields(raw, path, PORT_FIELDS, "a port")
    if not isinstance(raw, dict):
        return None
    before = len(c.problems)
    if "port" not in obj:
        c.fail(f"{path}.port", "is required")
        port = None
    else:
        port = c.integer(obj["port"], f"{path}.port", 1, 65535, "a port")
    target = c.integer(obj.get("targetPort", port if port else 1), f"{path}.targetPort", 1,
                       65535, "a port")
    protocol = obj.get("protocol", "TCP")
    if protocol not in PROTOCOLS:
        c.fail(f"{path}.protocol", f"{protocol!r} is not a protocol (TCP or UDP)")
    name = obj.get("name", "")
    if name != "":
        name = c.label(name, f"{path}.name")
    if len(c.problems) > before or port is None or target is None or name is None:
        return None
    return ServicePort(port=port, target_port=target, protocol=protocol, name=name)


def _backend(c: _Checker, raw: Any, path: str) -> Optional[Backend]:
    obj = c.fields(raw, path, BACKEND_FIELDS, "a backend")
    if not isinstance(raw, dict):
        return None
    before = len(c.problems)
    if "address" not in obj:
        c.fail(f"{path}.address", "is required")
        return None
    address = c.ip(obj["address"], f"{path}.address", "the backend's address")
    weight = c.integer(obj.get("weight", 1), f"{path}.weight", 0, 65535, "a weight")
    extra = {}
    for key in ("node", "zone"):
        if key in obj:
            if not isinstance(obj[key], str) or not obj[key]:
                c.fail(f"{path}.{key}", f"{obj[key]!r} must be a non-empty string")
            else:
                extra[key] = obj[key]
    # EndpointSlice conditions, for backends managed by hand (defaults: ready and serving).
    for key in ("ready", "serving", "terminating"):
        if key in obj:
            if not isinstance(obj[key], bool):
                c.fail(f"{path}.{key}", f"{obj[key]!r} must be true or false")
            else:
                extra[key] = obj[key]
    if "serving" not in extra:  # EndpointSlice: an unset serving condition follows ready
        extra["serving"] = extra.get("ready", True)
    if len(c.problems) > before or address is None or weight is None:
        return None
    return Backend(address=address, weight=weight, **extra)


def _health(c: _Checker, raw: Any, path: str) -> Optional[HealthCheck]:
    obj = c.fields(raw, path, HEALTH_FIELDS, "a health check")
    if not isinstance(raw, dict):
        return None
    before = len(c.problems)
    kind = obj.get("type", "tcp")
    if kind not in HEALTH_CHECK_TYPES:
        c.fail(f"{path}.type", f"{kind!r} is not a health check type (tcp or http)")
    interval = c.number(obj.get("intervalSeconds", 1), f"{path}.intervalSeconds", 0.1, 3600)
    timeout = c.number(obj.get("timeoutSeconds", 1), f"{path}.timeoutSeconds", 0.05, 3600)
    unhealthy = c.integer(obj.get("unhealthyThreshold", 2), f"{path}.unhealthyThreshold", 1, 100,
                          "a threshold")
    healthy = c.integer(obj.get("healthyThreshold", 1), f"{path}.healthyThreshold", 1, 100,
                        "a threshold")
    hc_path = obj.get("path", "/")
    if not isinstance(hc_path, str) or not hc_path.startswith("/") or \
            any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in hc_path):
        c.fail(f"{path}.path", f"{hc_path!r} must be an absolute HTTP path starting with '/', "
                               f"without spaces or control characters")
    port = None
    if "port" in obj:
        port = c.integer(obj["port"], f"{path}.port", 1, 65535, "a port")
    if len(c.problems) > before:
        return None
    return HealthCheck(type=kind, interval_seconds=interval, timeout_seconds=timeout,
                       unhealthy_threshold=unhealthy, healthy_threshold=healthy, path=hc_path,
                       port=port)


def parse(text: str, filename: str = "<config>") -> List[Service]:
    """Parse and validate a config document. Raises ConfigError listing every problem."""
    lines: Dict[str, int] = {}
    try:
        # libyaml's composer when present: the same marks, about ten times faster on the large
        # files a big node has (10,000 services).
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        detail = " ".join(filter(None, [e.context, e.problem]))
        raise ConfigError(filename, [Problem("", f"YAML syntax error: {detail}"
                                                 + (f" (line {line}, column {mark.column + 1})"
                                                    if mark else ""), line)]) from None
    except yaml.YAMLError as e:
        raise ConfigError(filename, [Problem("", f"YAML error: {e}")]) from None
    if node is None:
        return []
    try:
        doc = _plain(node, "", lines)
    except _Duplicate as d:
        raise ConfigError(filename, [Problem(d.path, "is given twice", d.line)]) from None

    c = _Checker(lines)
    top = c.fields(doc, "", ("services",), "the config document")
    services: List[Service] = []
    raw_services = top.get("services", [])
    if raw_services is None:
        raw_services = []
    if not isinstance(raw_services, list):
        c.fail("services", f"must be a list, not {_kind(raw_services)}")
        raw_services = []
    owners: Dict[Tuple[str, int, str], str] = {}
    names: Dict[Tuple[str, str], int] = {}
    for i, raw in enumerate(raw_services):
        path = f"services[{i}]"
        svc = _service(c, raw, path)
        if svc is None:
            continue
        if svc.key in names:
            c.fail(f"{path}.name", f"service {svc.namespace}/{svc.name} is defined twice "
                                   f"(also services[{names[svc.key]}])")
            continue
        names[svc.key] = i
        clash = False
        for vip, sp in svc.frontends():
            fe = (vip, sp.port, sp.protocol)
            if fe in owners:
                c.fail(f"{path}.vip", f"{_fmt_frontend(fe)} is already used by {owners[fe]}")
                clash = True
        if clash:
            continue
        for vip, sp in svc.frontends():
            owners[(vip, sp.port, sp.protocol)] = f"{path} ({svc.namespace}/{svc.name})"
        services.append(svc)
    if c.problems:
        raise ConfigError(filename, c.problems)
    return services


def _fmt_frontend(fe: Tuple[str, int, str]) -> str:
    vip, port, proto = fe
    host = f"[{vip}]" if ":" in vip else vip
    return f"{host}:{port}/{proto}"


def load(path: str) -> List[Service]:
    """Read and parse a config file. Raises ConfigError (also for an unreadable file)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, [Problem("", f"cannot read the file: {e.strerror}")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, [Problem("", f"not UTF-8 text: {e}")]) from None
    return parse(text, path)
