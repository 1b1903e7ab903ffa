"""The YAML config: parsed, validated, and turned into model.Service objects.

Every problem is reported with the file, the line and the field path, e.g.
    services.yaml:7: services[0].ports[0].port: 70000 is not a port (1-65535)
and all problems of a file are reported together, so that one `nodemesh check` run shows them all.

Parsing is total: any input gives services or a ConfigError, and its cost is bounded by the
limits below whatever the YAML does (aliases, nesting, huge numbers, special files).
`--config` may also name a folder of files (config_files); Claims keeps their services apart.
"""
from __future__ import annotations

import gc
import ipaddress
import os
import re
import reprlib
import socket
import stat
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from . import maglev, reserved
from .datapath.maps import encode_addr
from .model import (
    ALGORITHMS,
    HEALTH_CHECK_TYPES,
    PROTOCOLS,
    Backend,
    ConnectionLimits,
    HealthCheck,
    OutlierDetection,
    Service,
    ServicePort,
    SessionAffinity,
)
from .selection import MAX_SLOTS

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# 100,000 services with 3 backends each are 28 MiB of YAML: room for larger services too.
MAX_FILE_BYTES = 64 << 20
MAX_DEPTH = 64  # the schema needs 6 levels
# Aliases share one parsed value, so they cost nothing to build, but every reference is walked
# again by validation: "billion laughs" (9 levels of 9 aliases) would be 387 million nodes.
MAX_ALIAS_NODES = 100_000
# Validation also reads every reference of a string whole (an address is stripped, a path
# scanned), so a string counts as one node per ALIAS_NODE_CHARS: else 1,000 aliases of a 1 MB
# health check path took 100 s.
ALIAS_NODE_CHARS = 64
MAX_NUMBER_CHARS = 64  # Python refuses ints over 4,300 digits; no field needs more than 10


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


# -- YAML to plain Python ------------------------------------------------------------------

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ten times faster
_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL, _MAP, _SEQ, _MERGE = (
    _TAG + t for t in ("str", "int", "float", "bool", "null", "map", "seq", "merge"))
_CONSTRUCT = yaml.constructor.SafeConstructor()
_NO_KEY = object()  # an open mapping waiting for its next key
_UNSEEN = object()
_ScalarEvent, _AliasEvent = yaml.ScalarEvent, yaml.AliasEvent
_MappingStartEvent, _MappingEndEvent = yaml.MappingStartEvent, yaml.MappingEndEvent
_SequenceStartEvent, _SequenceEndEvent = yaml.SequenceStartEvent, yaml.SequenceEndEvent


class _Refused(Exception):
    """A YAML construct this config does not take; _document adds the path."""

    def __init__(self, message: str, line: Optional[int]):
        self.message, self.line, self.path = message, line, ""


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag


def _scalar(ev: yaml.ScalarEvent, loader: Any) -> Any:
    """Plain YAML only: strings, integers, floats, booleans and null."""
    tag, value = ev.tag, ev.value
    if tag is None:
        if not ev.implicit[0]:  # quoted
            return value
        tag = loader.resolve(yaml.ScalarNode, value, ev.implicit)
        if tag not in (_INT, _FLOAT, _BOOL, _NULL, _MERGE):
            return value  # YAML 1.1 timestamps and '=' are plain strings here, as in YAML 1.2
    elif tag in ("!", _STR):
        return value
    line = ev.start_mark.line + 1
    if tag == _NULL:
        return None
    if tag == _BOOL:
        b = _CONSTRUCT.bool_values.get(value.lower())
        if b is None:
            raise _Refused(f"{_show(value)} is not a boolean", line)
        return b
    if tag in (_INT, _FLOAT):
        if len(value) > MAX_NUMBER_CHARS:
            raise _Refused(f"a number of {len(value)} characters is too long "
                           f"(at most {MAX_NUMBER_CHARS})", line)
        try:
            node = yaml.ScalarNode(tag, value)
            return (_CONSTRUCT.construct_yaml_int if tag == _INT
                    else _CONSTRUCT.construct_yaml_float)(node)
        except (ValueError, IndexError):
            raise _Refused(f"{_show(value)} is not a valid {_short_tag(tag)}", line) from None
    if tag == _MERGE:
        raise _Refused("YAML merge keys (<<) are not supported: write the fields out", line)
    raise _Refused(f"the tag {_short_tag(tag)} is not supported (plain YAML only: strings, "
                   f"numbers, booleans, null, lists and mappings)", line)


def _path(stack: List[list]) -> str:
    """The field path of the value being read, from the open collections."""
    out = ""
    for container, _anchor, _nodes, key, _line in stack:
        if type(container) is list:
            out += f"[{len(container)}]"
        elif key is not _NO_KEY:
            out += f".{_key_text(key)}" if out else _key_text(key)
    return out


def _key_text(key: Any) -> str:
    """A mapping key as it appears in a path: cut short if it is long."""
    return key if type(key) is str and len(key) <= 80 else _show(key)


def _note_line(lines: Dict[str, int], stack: List[list], line: int) -> None:
    if not stack or type(stack[-1][0]) is list or stack[-1][3] is not _NO_KEY:  # not a key
        lines[_path(stack)] = line


def _document(source: Union[str, bytes], lines: Optional[Dict[str, int]] = None) -> Any:
    """The document as plain Python (dicts, lists, scalars), or None when empty.

    Built from the parser's events rather than a composed node graph: no recursion, no node
    objects, and aliases share the value they name. With `lines`, also record the line of every
    field path; that costs a string per value, so parse() asks only when it reports problems."""
    loader = _Loader(source)
    next_event = loader.get_event
    stack: List[list] = []  # open collections: [container, anchor, nodes, key, line]
    anchors: Dict[str, Tuple[Any, int]] = {}  # name -> (value, nodes it expands to)
    known: Dict[str, Any] = {}  # plain scalar text -> value
    aliased = 0
    root: Any = None
    documents = 0
    try:
        while True:
            ev = next_event()
            kind = type(ev)
            if kind is _ScalarEvent:
                if lines is not None:
                    _note_line(lines, stack, ev.start_mark.line + 1)
                # A plain scalar's value depends on its text alone, and most texts repeat
                # (keys, ports, weights): resolve each once and share the object.
                if ev.tag is None and ev.implicit[0]:
                    value = known.get(ev.value, _UNSEEN)
                    if value is _UNSEEN:
                        value = known[ev.value] = _scalar(ev, loader)
                else:
                    value = _scalar(ev, loader)
                nodes = 1 + len(ev.value) // ALIAS_NODE_CHARS
                if ev.anchor is not None:
                    anchors[ev.anchor] = (value, nodes)
            elif kind is _MappingEndEvent or kind is _SequenceEndEvent:
                value, anchor, nodes, _key, _line = stack.pop()
                if anchor is not None:
                    anchors[anchor] = (value, nodes)
            elif kind is _MappingStartEvent or kind is _SequenceStartEvent:
                line = ev.start_mark.line + 1
                mapping = kind is _MappingStartEvent
                if ev.tag not in (None, "!", _MAP if mapping else _SEQ):
                    raise _Refused(f"the tag {_short_tag(ev.tag)} is not supported on a "
                                   f"{'mapping' if mapping else 'list'}", line)
                if len(stack) >= MAX_DEPTH:
                    raise _Refused(f"nested deeper than {MAX_DEPTH} levels", line)
                if lines is not None:
                    _note_line(lines, stack, line)
                stack.append([{} if mapping else [], ev.anchor, 1, _NO_KEY, line])
                continue
            elif kind is _AliasEvent:
                line = ev.start_mark.line + 1
                if lines is not None:
                    _note_line(lines, stack, line)
                if any(frame[1] == ev.anchor for frame in stack):
                    raise _Refused(f"the alias *{ev.anchor} refers to a value that contains "
                                   f"it (a recursive alias)", line)
                if ev.anchor not in anchors:
                    raise _Refused(f"the alias *{ev.anchor} has no anchor &{ev.anchor} before "
                                   f"it", line)
                value, nodes = anchors[ev.anchor]
                aliased += nodes
                if aliased > MAX_ALIAS_NODES:
                    raise _Refused(f"aliases expand to more than {MAX_ALIAS_NODES:,} values "
                                   f"(a 'billion laughs' document?)", line)
            elif kind is yaml.DocumentStartEvent:
                documents += 1
                if documents > 1:
                    raise _Refused("a config is one YAML document, but '---' starts another",
                                   ev.start_mark.line + 1)
                continue
            elif ev is None or kind is yaml.StreamEndEvent:
                return root
            else:  # stream start, document end
                continue

            if not stack:
                root = value
                continue
            top = stack[-1]
            top[2] += nodes
            container = top[0]
            if type(container) is list:
                container.append(value)
            elif top[3] is not _NO_KEY:
                container[top[3]] = value
                top[3] = _NO_KEY
            elif type(value) is dict or type(value) is list:
                raise _Refused("a mapping key must be a plain value, not a list or mapping",
                               ev.start_mark.line + 1)
            else:
                if value in container:
                    top[3] = value  # for the path
                    raise _Refused("is given twice", ev.start_mark.line + 1)
                top[3] = value
    except _Refused as r:
        r.path = _path(stack)
        raise
    finally:
        loader.dispose()


# -- validation ----------------------------------------------------------------------------

_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 80
_SHOW.maxlist = _SHOW.maxdict = 4


def _show(value: Any) -> str:
    """repr() for messages, cut short: a value may be megabytes long."""
    return _SHOW.repr(value)


def _line(lines: Dict[str, int], path: str) -> Optional[int]:
    line = lines.get(path)
    if line is None:  # a missing field: point at its parent
        line = lines.get(path.rsplit(".", 1)[0] if "." in path else "")
    return line


class _Checker:
    """Walks the plain document; collects problems instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: List[Problem] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def fields(self, obj: Any, path: str, allowed: Tuple[str, ...], what: str) -> Dict[str, Any]:
        if obj is None:
            return {}
        if not isinstance(obj, dict):
            self.fail(path, f"must be a mapping ({what}), not {_kind(obj)}")
            return {}
        for key in obj:
            if key not in allowed:
                self.fail(f"{path}.{_key_text(key)}" if path else _key_text(key),
                          f"unknown field (allowed: {', '.join(allowed)})")
        return obj

    def integer(self, value: Any, path: str, lo: int, hi: int, what: str) -> Optional[int]:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"{_show(value)} is not {what} (an integer {lo}-{hi})")
            return None
        if not lo <= value <= hi:
            self.fail(path, f"{value} is not {what} ({lo}-{hi})")
            return None
        return value

    def number(self, value: Any, path: str, lo: float, hi: float) -> Optional[float]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            self.fail(path, f"{_show(value)} must be a number from {lo} to {hi}")
            return None
        return float(value)

    def label(self, value: Any, path: str) -> Optional[str]:
        if not isinstance(value, str) or len(value) > 63 or not DNS1123_LABEL.match(value):
            self.fail(path, f"{_show(value)} is not a DNS-1123 label (lowercase letters, digits "
                            f"and '-', at most 63 characters, starting and ending alphanumeric)")
            return None
        return value

    def ip(self, value: Any, path: str, what: str, unusable) -> Optional[str]:
        """The canonical text of an address the datapath can program as `what`;
        `unusable(addr)` says why an address cannot be `what`."""
        if isinstance(value, str) and "%" in value:
            self.fail(path, f"{_show(value)} is a scoped IPv6 address: the datapath matches "
                            f"addresses without a zone (%...)")
            return None
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            text = value.strip()
            try:  # the datapath's own parser (maps.encode_addr); strict, so text is canonical
                packed = socket.inet_pton(socket.AF_INET, text)
                if 0 < packed[0] < 224:  # the common case, and no rule refuses 1.x-223.x
                    return text
                addr: Any = ipaddress.IPv4Address(packed)
            except OSError:
                addr = ipaddress.IPv6Address(text)
                text = addr.compressed
                encode_addr(text)
        except (ValueError, OSError):
            self.fail(path, f"{_show(value)} is not an IPv4 or IPv6 address ({what})")
            return None
        mapped = addr.version == 6 and addr.ipv4_mapped
        why = (f"IPv4-mapped addresses are IPv4 to the datapath: write {mapped}" if mapped
               else unusable(addr))
        if why:
            self.fail(path, f"{text} cannot be {what}: {why}")
            return None
        return text


def _family(address: str) -> int:
    return 6 if ":" in address else 4


def _kind(obj: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number",
            type(None): "empty"}.get(type(obj), type(obj).__name__)


_ZERO_NET = ipaddress.ip_network("0.0.0.0/8")
_CLASS_E = ipaddress.ip_network("240.0.0.0/4")
_BROADCAST = ipaddress.ip_address("255.255.255.255")


def _unusable_vip(addr) -> Optional[str]:
    # The hooks rewrite a destination before the kernel routes it, so a VIP only has to be an
    # address a client would send to. Loopback and link-local VIPs work that way (and are used:
    # a node-local DNS cache on 169.254.20.10, say); these are never a unicast destination.
    if addr.is_unspecified:
        return "it is unspecified (connecting to it means this host)"
    if addr.is_multicast:
        return "multicast is one-to-many, not a service"
    if addr == _BROADCAST:
        return "it is the broadcast address"
    if addr.version == 4 and addr in _ZERO_NET:
        return "0.0.0.0/8 means this network, not a destination"
    if addr.version == 4 and addr in _CLASS_E:
        return "240.0.0.0/4 is reserved"
    return None


def _unusable_backend(addr) -> Optional[str]:
    # A backend is a destination the kernel connects to after the rewrite, so it must be one
    # a socket can reach. Loopback works (the client's own host); IPv6 link-local would need
    # an interface (scope id) that the hook cannot give the socket.
    if addr.is_unspecified:
        return "it is unspecified"
    if addr.is_multicast:
        return "a connection cannot go to a multicast group"
    if addr == _BROADCAST:
        return "it is the broadcast address"
    if addr.version == 4 and addr in _ZERO_NET:
        return "0.0.0.0/8 is not a destination"
    if addr.version == 6 and addr.is_link_local:
        return "IPv6 link-local needs an interface (scope), which the datapath cannot set"
    return None


def _not_reserved(c: _Checker, vip: Optional[str], allow: Any, path: str) -> Optional[str]:
    # Loopback, link-local and the node's own addresses would capture local traffic: only
    # on request (reserved.py).
    if allow is not True and allow is not False:
        c.fail(f"{path}.allowReservedVIP", f"{_show(allow)} must be true or false")
        return None
    why = reserved.reserved_vip(vip) if vip is not None and not allow else None
    if why:
        c.fail(f"{path}.vip", f"{vip} is a reserved VIP: {why} (set allowReservedVIP: true "
                              f"on the service if that is what you mean)")
        return None
    return vip


SERVICE_FIELDS = ("name", "namespace", "vip", "ports", "algorithm", "sessionAffinity",
                  "healthCheck", "outlierDetection", "panicThresholdPercent", "trafficPolicy",
                  "trafficDistribution", "terminateConnectionsOnRemoval", "connectionLimits",
                  "backends", "maglev", "externalIPs", "loadBalancerIPs", "proxy",
                  "allowReservedVIP")
PORT_FIELDS = ("name", "port", "targetPort", "protocol", "nodePort")
BACKEND_FIELDS = ("address", "weight", "node", "zone", "ready", "serving", "terminating")
OUTLIER_FIELDS = ("consecutiveFailures", "baseEjectionSeconds", "maxEjectionPercent")
HEALTH_FIELDS = ("type", "intervalSeconds", "timeoutSeconds", "unhealthyThreshold",
                 "healthyThreshold", "path", "port")


def _proxy(c: _Checker, raw: Any, path: str) -> Optional[int]:
    """`proxy: {port: N}` redirects to a node-local proxy on N; `{enabled: false}` opts out
    of the node's --proxy-port; `{}` or `{enabled: true}` takes it. Returns Service.proxy_port."""
    p = c.fields(raw, path, ("port", "enabled"), "proxy")
    enabled = p.get("enabled", True)
    if not isinstance(enabled, bool):
        c.fail(f"{path}.enabled", f"{_show(enabled)} must be true or false")
        return None
    if "port" in p:
        port = c.integer(p["port"], f"{path}.port", 1, 65535, "a port")
        if not enabled:
            c.fail(f"{path}", "port and enabled: false contradict each other")
        return port
    return None if enabled else 0


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
        vip = c.ip(obj["vip"], f"{path}.vip", "a virtual IP", _unusable_vip)
        vip = _not_reserved(c, vip, obj.get("allowReservedVIP", False), path)
    algorithm = obj.get("algorithm", "random")
    if algorithm not in ALGORITHMS:
        c.fail(f"{path}.algorithm", f"{_show(algorithm)} is not an algorithm (one of: "
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
            b = _backend(c, rb, f"{path}.backends[{i}]", vip)
            if b is None:
                continue
            if b.address in seen_addr:
                c.fail(f"{path}.backends[{i}].address",
                       f"{b.address} is listed twice (also backends[{seen_addr[b.address]}])")
                continue
            seen_addr[b.address] = i
            backends.append(b)
        live = sum(1 for b in backends if b.weight > 0)
        if live > MAX_SLOTS:
            c.fail(f"{path}.backends", f"{live} backends with a weight are more than the "
                                       f"{MAX_SLOTS} slots of a frontend in the datapath")
        elif backends and not live:
            c.fail(f"{path}.backends", "every backend has weight 0: the service would refuse "
                                       "every connection")

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
    policy = external_policy = "Cluster"
    if "trafficPolicy" in obj:
        tp = c.fields(obj["trafficPolicy"], f"{path}.trafficPolicy", ("internal", "external"),
                      "trafficPolicy")
        policy = tp.get("internal", "Cluster")
        external_policy = tp.get("external", "Cluster")
        for key, value in (("internal", policy), ("external", external_policy)):
            if value not in ("Cluster", "Local"):
                c.fail(f"{path}.trafficPolicy.{key}", f"{_show(value)} is not a traffic policy "
                                                      f"(Cluster or Local)")
    external: Dict[str, List[str]] = {}
    for key in ("externalIPs", "loadBalancerIPs"):
        raw_addrs = obj.get(key, [])
        external[key] = []
        if not isinstance(raw_addrs, list):
            c.fail(f"{path}.{key}", f"must be a list of addresses, not {_kind(raw_addrs)}")
            continue
        for i, ra in enumerate(raw_addrs):
            addr = c.ip(ra, f"{path}.{key}[{i}]", "an external address", _unusable_vip)
            if addr is not None and vip is not None and _family(addr) != _family(vip):
                c.fail(f"{path}.{key}[{i}]", f"{addr} is IPv{_family(addr)} but the VIP {vip} "
                                             f"is IPv{_family(vip)}")
            elif addr is not None:
                external[key].append(addr)
    distribution = obj.get("trafficDistribution")
    if distribution is not None and distribution != "PreferClose":
        c.fail(f"{path}.trafficDistribution", f"{_show(distribution)} is not a traffic "
                                              f"distribution (PreferClose)")
    maglev_size = _maglev(c, obj, path, algorithm, backends)
    terminate = obj.get("terminateConnectionsOnRemoval", False)
    if not isinstance(terminate, bool):
        c.fail(f"{path}.terminateConnectionsOnRemoval", f"{_show(terminate)} must be true or "
                                                        f"false")

    limits = _connection_limits(c, obj, path)
    proxy_port = _proxy(c, obj["proxy"], f"{path}.proxy") if "proxy" in obj else None

    if len(c.problems) > before or name is None or namespace is None or vip is None:
        return None
    return Service(name=name, namespace=namespace, vip=vip, ports=tuple(ports),
                   backends=tuple(backends), algorithm=algorithm,
                   session_affinity=affinity, health_check=health, outlier_detection=outlier,
                   panic_threshold_percent=panic, internal_traffic_policy=policy,
                   traffic_distribution=distribution,
                   terminate_connections_on_removal=terminate, maglev_table_size=maglev_size,
                   external_ips=tuple(external["externalIPs"]),
                   load_balancer_ips=tuple(external["loadBalancerIPs"]),
                   external_traffic_policy=external_policy,
                   connection_limits=limits, proxy_port=proxy_port)


def _maglev(c: _Checker, obj: Dict[str, Any], path: str, algorithm: Any,
            backends: List[Backend]) -> int:
    """maglev.tableSize: a prime with room for every weighted backend."""
    if "maglev" not in obj:
        return maglev.DEFAULT_TABLE_SIZE
    if algorithm != "maglev":
        c.fail(f"{path}.maglev", f"is only for algorithm: maglev (this service has "
                                 f"{_show(algorithm)})")
        return maglev.DEFAULT_TABLE_SIZE
    mg = c.fields(obj["maglev"], f"{path}.maglev", ("tableSize",), "maglev")
    size = mg.get("tableSize", maglev.DEFAULT_TABLE_SIZE)
    why = maglev.check_table_size(size)
    if why:
        c.fail(f"{path}.maglev.tableSize", why)
        return maglev.DEFAULT_TABLE_SIZE
    live = sum(1 for b in backends if b.weight > 0)
    if live > size:
        c.fail(f"{path}.maglev.tableSize", f"{size} rows cannot hold {live} backends (a table "
                                           f"needs at least one row per backend, and "
                                           f"{maglev.ROWS_PER_BACKEND_ADVICE}x that to keep "
                                           f"the load within ~1%)")
    return int(size)


def _connection_limits(c: _Checker, obj: Dict[str, Any], path: str
                       ) -> Optional[ConnectionLimits]:
    if "connectionLimits" not in obj:
        return None
    cl = c.fields(obj["connectionLimits"], f"{path}.connectionLimits",
                  ("maxConnectionsPerBackend", "maxConnections"), "connectionLimits")
    per = c.integer(cl.get("maxConnectionsPerBackend", 0),
                    f"{path}.connectionLimits.maxConnectionsPerBackend", 0, 2**32 - 1, "a count")
    total = c.integer(cl.get("maxConnections", 0), f"{path}.connectionLimits.maxConnections",
                      0, 2**32 - 1, "a count")
    if per is None or total is None or (per, total) == (0, 0):
        return None
    return ConnectionLimits(per, total)


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
        c.fail(f"{path}.protocol", f"{_show(protocol)} is not a protocol (TCP or UDP)")
    name = obj.get("name", "")
    if name != "":
        name = c.label(name, f"{path}.name")
    node_port = None
    if "nodePort" in obj:
        node_port = c.integer(obj["nodePort"], f"{path}.nodePort", 1, 65535, "a port")
    if len(c.problems) > before or port is None or target is None or name is None:
        return None
    return ServicePort(port=port, target_port=target, protocol=protocol, name=name,
                       node_port=node_port)


def _backend(c: _Checker, raw: Any, path: str, vip: Optional[str]) -> Optional[Backend]:
    obj = c.fields(raw, path, BACKEND_FIELDS, "a backend")
    if not isinstance(raw, dict):
        return None
    before = len(c.problems)
    if "address" not in obj:
        c.fail(f"{path}.address", "is required")
        return None
    address = c.ip(obj["address"], f"{path}.address", "a backend", _unusable_backend)
    if address is not None and vip is not None and _family(address) != _family(vip):
        c.fail(f"{path}.address", f"{address} is IPv{_family(address)} but the VIP {vip} is "
                                  f"IPv{_family(vip)}: socket-level balancing cannot change a "
                                  f"socket's address family")
    weight = c.integer(obj.get("weight", 1), f"{path}.weight", 0, 65535, "a weight")
    extra = {}
    for key in ("node", "zone"):
        if key in obj:
            if not isinstance(obj[key], str) or not obj[key]:
                c.fail(f"{path}.{key}", f"{_show(obj[key])} must be a non-empty string")
            else:
                extra[key] = obj[key]
    # EndpointSlice conditions, for backends managed by hand (defaults: ready and serving).
    for key in ("ready", "serving", "terminating"):
        if key in obj:
            if not isinstance(obj[key], bool):
                c.fail(f"{path}.{key}", f"{_show(obj[key])} must be true or false")
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
        c.fail(f"{path}.type", f"{_show(kind)} is not a health check type (tcp or http)")
    interval = c.number(obj.get("intervalSeconds", 1), f"{path}.intervalSeconds", 0.1, 3600)
    timeout = c.number(obj.get("timeoutSeconds", 1), f"{path}.timeoutSeconds", 0.05, 3600)
    unhealthy = c.integer(obj.get("unhealthyThreshold", 2), f"{path}.unhealthyThreshold", 1, 100,
                          "a threshold")
    healthy = c.integer(obj.get("healthyThreshold", 1), f"{path}.healthyThreshold", 1, 100,
                        "a threshold")
    hc_path = obj.get("path", "/")
    if not isinstance(hc_path, str) or not hc_path.startswith("/") or \
            any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in hc_path):
        c.fail(f"{path}.path", f"{_show(hc_path)} must be an absolute HTTP path starting with "
                               f"'/', without spaces or control characters")
    port = None
    if "port" in obj:
        port = c.integer(obj["port"], f"{path}.port", 1, 65535, "a port")
    if len(c.problems) > before:
        return None
    return HealthCheck(type=kind, interval_seconds=interval, timeout_seconds=timeout,
                       unhealthy_threshold=unhealthy, healthy_threshold=healthy, path=hc_path,
                       port=port)


Frontend = Tuple[str, int, str]


class Claims:
    """Service names and frontends already taken, and by whom: the first definition keeps
    them. Used within a file (owner "services[0]") and across a folder's files."""

    def __init__(self) -> None:
        self.services: Dict[Tuple[str, str], str] = {}
        self.frontends: Dict[Frontend, str] = {}

    def conflicts(self, svc: Service) -> List[Tuple[str, str]]:
        """(field, message) for each claim of `svc` that is already taken."""
        if svc.key in self.services:
            return [("name", f"service {svc.namespace}/{svc.name} is defined twice "
                             f"(also {self.services[svc.key]})")]
        taken = _claimed(svc)
        return [("vip", f"{_fmt_frontend(fe)} is already used by {self.frontends[fe]}")
                for fe in taken if fe in self.frontends]

    def add(self, svc: Service, owner: str) -> None:
        self.services[svc.key] = owner
        for fe in _claimed(svc):
            self.frontends[fe] = f"{owner} ({svc.namespace}/{svc.name})"


def _claimed(svc: Service) -> List[Frontend]:
    """Every (address, port, protocol) a service programs: VIPs, external addresses, nodePorts
    (as the all-zero address: a nodePort is the node's on every address)."""
    return [(vip, sp.port, sp.protocol) for vip, sp in svc.frontends()] + \
        [(addr, port, sp.protocol) for addr, port, sp in svc.external_frontends()]


def _fmt_frontend(fe: Frontend) -> str:
    vip, port, proto = fe
    host = f"[{vip}]" if ":" in vip else vip
    return f"{host}:{port}/{proto}"


def _syntax_error(e: yaml.YAMLError, source: Union[str, bytes]) -> Problem:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        detail = " ".join(filter(None, [e.context, e.problem]))
        return Problem("", f"YAML syntax error: {detail}" +
                       (f" (line {line}, column {mark.column + 1})" if mark else ""), line)
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow
        line = source[:e.position].count(b"\n" if isinstance(source, bytes) else "\n") + 1
        return Problem("", f"not YAML text: {e.reason} (line {line})", line)
    return Problem("", f"YAML error: {e}")


def parse(text: Union[str, bytes], filename: str = "<config>") -> List[Service]:
    """Parse and validate a config document. Raises ConfigError listing every problem."""
    if isinstance(text, str):
        try:  # libyaml reads UTF-8; a str from elsewhere may hold lone surrogates
            text = text.encode("utf-8")
        except UnicodeEncodeError as e:
            line = text.count("\n", 0, e.start) + 1
            raise ConfigError(filename, [Problem("", f"not UTF-8 text: {e.reason} at "
                                                     f"character {e.start}", line)]) from None
    # Parsing makes no reference cycles (a recursive alias is refused), so the collector
    # could free nothing; at 100,000 services its passes over the document cost a fifth.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _parse(text, filename)
    finally:
        if collecting:
            gc.enable()


def _parse(text: bytes, filename: str) -> List[Service]:
    try:
        doc = _document(text)
    except yaml.YAMLError as e:
        raise ConfigError(filename, [_syntax_error(e, text)]) from None
    except _Refused as r:
        raise ConfigError(filename, [Problem(r.path, r.message, r.line)]) from None
    if doc is None:
        return []

    c = _Checker()
    top = c.fields(doc, "", ("services", "workloads", "policies"), "the config document")
    if "workloads" in top or "policies" in top:
        from . import meshconfig  # its problems are reported with the services'

        meshconfig.check(c, top)
    services: List[Service] = []
    raw_services = top.get("services", [])
    if raw_services is None:
        raw_services = []
    if not isinstance(raw_services, list):
        c.fail("services", f"must be a list, not {_kind(raw_services)}")
        raw_services = []
    claims = Claims()
    for i, raw in enumerate(raw_services):
        path = f"services[{i}]"
        svc = _service(c, raw, path)
        raw_services[i] = None  # done with it: the document shrinks as the services grow
        if svc is None:
            continue
        clashes = claims.conflicts(svc)
        for field, message in clashes:
            c.fail(f"{path}.{field}", message)
        if not clashes:
            claims.add(svc, path)
            services.append(svc)
    if c.problems:
        lines: Dict[str, int] = {}
        _document(text, lines)  # read again, for the lines: only when there is something to say
        raise ConfigError(filename, [replace(p, line=_line(lines, p.path)) for p in c.problems])
    return services


def read(path: str) -> bytes:
    """A config file's bytes. Raises ConfigError for anything but a regular file of at most
    MAX_FILE_BYTES: a FIFO would block, /dev/zero would never end."""
    def refuse(message: str) -> ConfigError:
        return ConfigError(path, [Problem("", message)])

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # look before opening: no FIFO, no device
            raise refuse("is a folder" if os.path.isdir(path) else
                         "is not a regular file (a FIFO, socket or device?)")
        # O_NONBLOCK: if a FIFO was swapped in since the stat, opening it still cannot block.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise refuse("is not a regular file")
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise refuse(f"cannot read the file: {e.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise refuse(f"is larger than {MAX_FILE_BYTES >> 20} MiB, the most a config may be")
    return data


def load(path: str) -> List[Service]:
    """Read and parse a config file. Raises ConfigError (also for an unreadable file)."""
    return parse(read(path), path)


def config_files(folder: str) -> List[str]:
    """The files of a config folder: its *.yaml and *.yml, sorted, not recursive. Hidden names
    are skipped: editors' swap and lock files (.web.yaml.swp, .#web.yaml) and the ..data
    links of a mounted ConfigMap (its files are links through ..data to the same content)."""
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise ConfigError(folder, [Problem("", f"cannot read the folder: {e.strerror}")]) from None
    return [os.path.join(folder, n) for n in sorted(names)
            if n.endswith((".yaml", ".yml")) and not n.startswith(".")]


def cross_file_problems(claims: Claims, filename: str, services: List[Service]) -> List[Problem]:
    """Problems of a folder's file against the files before it; none: the claims are added."""
    problems = [Problem(f"services[{i}].{field}", message)
                for i, svc in enumerate(services) for field, message in claims.conflicts(svc)]
    if not problems:
        for i, svc in enumerate(services):
            claims.add(svc, f"{filename} services[{i}]")
    return problems
