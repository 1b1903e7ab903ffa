"""The Kubernetes source: Services and EndpointSlices from the API server, as model.Service.

    source = KubernetesSource(kubeconfig=None, node_name="node-a")   # in-cluster by default
    source.start(on_change, on_error)                                 # returns at once
    source.node_zone                     # this node's topology.kubernetes.io/zone, once read
    source.stop()                        # idempotent; a stopped source is not restarted

The constructor raises KubernetesSourceError, with a message fit for the user, when the
`kubernetes` package is missing or the kubeconfig / in-cluster config cannot be loaded.

How it follows the API
    One thread per collection (core/v1 Services, discovery.k8s.io/v1 EndpointSlices, all
    namespaces) lists, then watches from the list's resourceVersion with allowWatchBookmarks.
    - BOOKMARK events only advance the resourceVersion, so a reconnect after a quiet period
      resumes where it was instead of falling off the compacted history.
    - 410 Gone, as an HTTP 410 or as an ERROR event carrying a Status with code 410 inside a
      200 stream (what a real API server sends for a too old resourceVersion), means the
      history we need is compacted away: relist at once and diff the list against what we
      have, so a deletion we missed is not kept forever.
    - A dropped connection or any other error: report it, wait a capped exponential backoff
      with jitter, and watch again from the last resourceVersion.
    - Every `resync_seconds` the collection is listed again in full (the watch is asked to
      end by then with timeoutSeconds), which repairs anything that went wrong unnoticed.
    - Lists ask for resourceVersion "0" (served from the API server's watch cache: cheap when
      every node lists at once), except the relist after a 410, which is a consistent read.
      They come in pages of 500 (limit/continue), decoded one item at a time, and one
      collection lists at a time; the next page is asked for (its token is in the page's
      metadata, ahead of the items) before this one is parsed, so the server and the network
      produce it meanwhile. A relist parses only objects whose resourceVersion moved,
      and whatever it does not name is deleted.

What it keeps, and what it delivers
    Each object is parsed once, as it arrives, into the little translation needs: a Service
    into a model.Service without backends, a slice into its service's key and one
    model.Backend per address. No JSON is kept. A service is assembled again from those
    parts when it or one of its slices changes, and it shares its Backends with them, so the
    cache costs little beyond the services delivered.
    A third thread delivers Deltas (nodemesh.sources): the first full one once both
    collections have been listed (never a half-synced set: services without their backends
    would black-hole traffic), with full=True and every service. The slices are listed
    first, so that a Services list of several pages can stream before it: each page's
    services are assembled with their backends as they arrive and delivered as partial
    deltas (which delete nothing), and the agent programs them while the next page is
    decoded. Then only the services whose translation changed (upserts) and those that are
    gone or no longer programmable (deletes): a lone change at once, from the watch thread
    that read it (no other thread woken); a burst (a change within 10 ms of the last
    delivery) from the third thread, after 10 ms of quiet, at most 50 ms after the first
    change it holds. A change
    that translates to what was delivered is not delivered. The work of an event or a delta
    follows its size, not the number of services.

Why raw streaming (`_preload_content=False`) and not `kubernetes.watch.Watch`
    Watch.stream swallows the first 410 and retries with the same, still too old
    resourceVersion, quietly opens a new watch whenever a stream ends, and turns every
    object into the client's model classes. We need to see each of those events to relist,
    back off and count them, and we translate from the API's own JSON (the same shape as the
    fixtures and `kubectl get -o json`). So we ask for lists and watches with
    `_preload_content=False`, which returns the urllib3 response (non-2xx still raises
    ApiException), and split the chunked stream into JSON lines ourselves. The requests are
    built by the ApiClient itself (_RestCalls), not by the generated CoreV1Api, whose
    first use costs half a second of CPU at start.

Running it against a cluster (see docs/kubernetes-source.md)
    nodemesh run --source kubernetes --kubeconfig ~/.kube/config --node-name $(hostname)
    In the DaemonSet, drop --kubeconfig: the pod's service account is used (in-cluster config)
    and --node-name comes from the downward API (spec.nodeName). RBAC: get/list/watch on
    services (core) and endpointslices (discovery.k8s.io), get on nodes (the node's zone).

Metrics (on the registry given, prometheus_client.REGISTRY by default)
    nodemesh_source_events_total{source="kubernetes",kind}   kind: service_added|_modified|
        _deleted, endpointslice_added|_modified|_deleted, bookmark, relist, gone, error
    nodemesh_source_last_sync_timestamp_seconds{source="kubernetes"}   a full list completed
        or a change was delivered
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import reprlib
import socket
import sys
import threading
import time
import urllib.parse
import weakref
from dataclasses import dataclass, field, replace
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

from .. import maglev, threadname
from ..model import (
    ALGORITHMS,
    Backend,
    Service,
    ServicePort,
    SessionAffinity,
    canonical_ip,
    service_from_parts,
    service_parts,
    share_key,
)
from . import Delta, OnChange, OnError
from .kubernetes_decoder import DecodedPage, DecoderCrashed, PageDecoder

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_TIMEOUT_SECONDS = 10800  # Kubernetes' default for sessionAffinity ClientIP
SUPPORTED_PROTOCOLS = ("TCP", "UDP")
FAMILY_VERSIONS = {"IPv4": 4, "IPv6": 6}
# What the Service API has no field for: the algorithm, as a per-service annotation (the way
# Cilium takes service.cilium.io/lb-algorithm), and the Maglev table size.
ALGORITHM_ANNOTATION = "nodemesh.io/lb-algorithm"
MAGLEV_TABLE_SIZE_ANNOTATION = "nodemesh.io/maglev-table-size"

EVENT_KINDS = (
    "service_added", "service_modified", "service_deleted",
    "endpointslice_added", "endpointslice_modified", "endpointslice_deleted",
    "bookmark", "relist", "gone", "error", "decoder_crash",
)

ServiceKey = Tuple[str, str]  # (namespace, name)


class KubernetesSourceError(Exception):
    """The source cannot start: the client package is missing or the config is unusable."""


# --------------------------------------------------------------------------------------------
# Translation: API JSON (dicts, exactly as the API server sends them) -> model.Service.
# Pure functions; nothing here talks to a server. Each object is parsed once into the little
# the translation needs (parse_service, parse_slice); a service is then assembled from its
# parsed parts whenever it or one of its slices changes, without the JSON.
# --------------------------------------------------------------------------------------------

@dataclass
class Translation:
    services: List[Service] = field(default_factory=list)
    # Deliberately not programmed, and worth a log line (an SCTP port, an FQDN slice).
    skipped: List[str] = field(default_factory=list)
    # Objects a valid API server should not produce (an address that is not an IP ...).
    invalid: List[str] = field(default_factory=list)


class ParsedService(NamedTuple):
    """A Service's own part of its translation."""
    service: Service              # no backends yet; a named targetPort holds the port number
    named_ports: Tuple[str, ...]  # ports whose targetPort is a name: the slices resolve it


class ParsedSlice(NamedTuple):
    """What translation needs of an EndpointSlice: nothing of its JSON is kept."""
    service: Optional[ServiceKey]  # from its kubernetes.io/service-name label
    address_type: Optional[str]
    ports: Tuple[Tuple[str, int], ...]  # (name, number): named after the service's ports
    backends: Tuple[Backend, ...]  # one per valid address, in order, each with all the ports
    version: Union[int, str, None]  # resourceVersion: a relist skips what it already has


def translate(services: Iterable[dict], slices: Iterable[dict]) -> Translation:
    """Translate whole collections: every Service with the EndpointSlices that name it."""
    out = Translation()
    slices_by_service: Dict[ServiceKey, List[Tuple[str, ParsedSlice]]] = {}
    for endpoint_slice in slices:
        parsed = parse_slice(endpoint_slice, out)
        if parsed.service is not None:
            slices_by_service.setdefault(parsed.service, []).append(
                (object_key(endpoint_slice)[1], parsed))
    for service in services:
        parsed_service = parse_service(service, out)
        if parsed_service is not None:
            out.services.append(assemble(parsed_service, slices_by_service.get(
                object_key(service), ()), out))
    out.services.sort(key=lambda s: s.key)
    return out


def translate_service(service: dict, slices: Sequence[dict],
                      notes: Optional[Translation] = None) -> Optional[Service]:
    """One Service and its EndpointSlices -> model.Service, or None if it has nothing to program.

    Headless (clusterIP None), ExternalName and address-less services are skipped silently:
    they are normal and numerous. Other skips land in `notes`.
    """
    notes = notes if notes is not None else Translation()
    parsed = parse_service(service, notes)
    if parsed is None:
        return None
    return assemble(parsed, [(object_key(s)[1], parse_slice(s, notes)) for s in slices], notes)


def object_key(obj: dict) -> ServiceKey:
    """(namespace, name); strings whatever the object holds (parse_* report a bad one)."""
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    namespace, name = meta.get("namespace"), meta.get("name")
    return (sys.intern(namespace if isinstance(namespace, str) and namespace else "default"),
            name if isinstance(name, str) else "")


def slice_service_key(endpoint_slice: dict) -> Optional[ServiceKey]:
    """The Service an EndpointSlice belongs to (its kubernetes.io/service-name label)."""
    labels = _typed(_metadata(endpoint_slice), "labels", dict, "metadata.", {})
    service_name = _typed(labels, SERVICE_NAME_LABEL, str, "metadata.labels.")
    if not service_name:
        return None
    return (object_key(endpoint_slice)[0], sys.intern(service_name))


def object_version(obj: dict) -> Union[int, str, None]:
    """metadata.resourceVersion, only ever compared for equality; an int when it is one
    (always, in practice: half the memory of the string). None if there is none, or if it is
    not a string."""
    meta = obj.get("metadata")
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    if not isinstance(version, str):
        return None
    # An etcd revision is an int64: 19 digits (int() refuses 4,300).
    return int(version) if version.isascii() and version.isdigit() and len(version) <= 19 \
        else version


def _key_and_version(obj: dict) -> Tuple[ServiceKey, Union[int, str, None]]:
    """(object_key(obj), object_version(obj)), the metadata read once."""
    meta = obj.get("metadata")
    if type(meta) is dict:
        namespace, name = meta.get("namespace"), meta.get("name")
        version = meta.get("resourceVersion")
        if type(namespace) is str and namespace and type(name) is str and \
                type(version) is str and version.isdigit() and version.isascii() and \
                len(version) <= 19:
            return (sys.intern(namespace), name), int(version)
    return object_key(obj), object_version(obj)


class _Malformed(ValueError):
    """A field no valid API server sends (a port that is a list ...); the message names it."""


_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer",
          bool: "a boolean"}


def _typed(obj: dict, key: str, kind: type, path: str, default: Any = None) -> Any:
    """obj[key] if it is a `kind`, `default` if it is unset (absent or null); else _Malformed,
    naming `path` + key. JSON's true is no integer here."""
    value = obj.get(key)
    if type(value) is kind:  # nearly always: this runs for every field of 100,000 objects
        return value
    if value is None:
        return default
    if not isinstance(value, kind) or kind is int:  # an int that is not exactly one: a bool
        raise _Malformed(f"{path}{key}: {reprlib.repr(value)} is not {_KINDS[kind]}")
    return value


def _metadata(obj: dict) -> dict:
    """obj's metadata, checked: object_key stands in defaults for a malformed name."""
    meta = _typed(obj, "metadata", dict, "", {})
    _typed(meta, "namespace", str, "metadata.")
    _typed(meta, "name", str, "metadata.")
    return meta


def _port_number(value: Any, path: str) -> int:
    """A port number, 1-65535: what the datapath's u16 holds, 0 aside. A string of digits is
    taken as its number, as it always was here."""
    if type(value) is int and 0 < value <= 65535:
        return value
    number = value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        number = int(value)
    if type(number) is not int or not 1 <= number <= 65535:
        raise _Malformed(f"{path}: {reprlib.repr(value)} is not a port number (1-65535)")
    return number


def _intern(text: Optional[str]) -> Optional[str]:
    """One copy of a string that repeats across objects (namespace, service name, node, zone,
    port name, label): JSON parsing makes a new one for every occurrence."""
    return sys.intern(text) if text else None


class _Pool:
    """One shared copy of each immutable value of a kind that repeats across objects (a port
    list, a label). Bounded, so the first values seen are the ones shared: the common ones,
    being common. One pool per kind, so that unique values of one kind (every service's own
    app label) cannot crowd out the common values of another."""

    def __init__(self, size: int = 4096):
        self._values: Dict[Any, Any] = {}
        self._size = size

    def __call__(self, value):
        shared = self._values.get(value)
        if shared is not None:
            return shared
        if len(self._values) < self._size:
            self._values[value] = value
        return value


_share_port, _share_ports, _share_label, _share_affinity = _Pool(), _Pool(), _Pool(), _Pool()
# An endpoint's address: one copy for the slices of every service a pod backs (and, from the
# decoding worker, for every occurrence in its pages: each is a new string there). Most
# addresses are a single pod's: past the first 4096 the pool only looks them up.
_share_address = _Pool()
# A Service port as the API sends it (port, targetPort, protocol, name, nodePort) -> its
# checked, shared ServicePort: most services repeat a few ports (80 -> 8080 TCP "http").
_ports_seen: Dict[Tuple[Any, ...], ServicePort] = {}


def _traffic_policy(spec: dict, field: str) -> str:
    """spec.<field>: Cluster (also when unset) or Local; the common value read the quick way."""
    policy = spec.get(field)
    if policy == "Cluster":
        return policy
    policy = _typed(spec, field, str, "spec.") or "Cluster"
    if policy not in ("Cluster", "Local"):
        raise _Malformed(f"spec.{field}: {reprlib.repr(policy)} is not Cluster or Local")
    return policy


def parse_service(service: dict, notes: Translation) -> Optional[ParsedService]:
    """A Service -> its part of the translation, or None if it has nothing to program.
    A malformed field skips the service (or the port it is in), with a note."""
    return _parse_service_at(service, object_key(service)[0], notes)


def _parse_service_at(service: dict, namespace: str,
                      notes: Translation) -> Optional[ParsedService]:
    """parse_service, for a caller that has the service's namespace (object_key) already."""
    try:
        return _parse_service(service, namespace, notes)
    except _Malformed as e:
        notes.invalid.append(f"service {namespace}/{object_key(service)[1]}: {e}; skipped")
        return None


def _parse_service(service: dict, namespace: str,
                   notes: Translation) -> Optional[ParsedService]:
    # Each field is read the quick way when it has the type a valid API server sends (nearly
    # always: this runs for each of 100,000 objects); anything else goes through _typed, the
    # one place that says what an unset value means and names a malformed one.
    meta = service.get("metadata")
    if type(meta) is not dict or type(meta.get("namespace")) is not str or \
            type(meta.get("name")) is not str:
        meta = _metadata(service)
    name = meta.get("name")
    if not name:
        raise _Malformed("metadata.name: is required")
    where = f"service {namespace}/{name}"
    spec = service.get("spec")
    if type(spec) is not dict:
        spec = _typed(service, "spec", dict, "", {})
    if spec.get("type") == "ExternalName":
        return None
    vips = _cluster_ips(spec, where, notes)
    if not vips:
        return None

    ports, named = [], []
    spec_ports = spec.get("ports")
    if type(spec_ports) is not list:
        spec_ports = _typed(spec, "ports", list, "spec.", ())
    for index, port in enumerate(spec_ports):
        try:
            service_port, is_named = _service_port(port, index, where, notes)
        except _Malformed as e:
            notes.invalid.append(f"{where}: {e}; the port is skipped")
            continue
        if service_port is not None:
            ports.append(service_port)
            if is_named:
                named.append(service_port.name)
    if not ports:
        notes.skipped.append(f"{where}: no TCP or UDP port; skipped")
        return None

    affinity = None
    if spec.get("sessionAffinity") == "ClientIP":
        path = "spec.sessionAffinityConfig."
        client_ip = _typed(_typed(spec, "sessionAffinityConfig", dict, "spec.", {}),
                           "clientIP", dict, path, {})
        timeout = _typed(client_ip, "timeoutSeconds", int, path + "clientIP.") or \
            DEFAULT_AFFINITY_TIMEOUT_SECONDS
        if not 1 <= timeout <= 86400:  # the API's range; the datapath holds a u32
            raise _Malformed(f"{path}clientIP.timeoutSeconds: {timeout} is not 1-86400")
        affinity = _share_affinity(SessionAffinity(timeout_seconds=timeout))

    policy = _traffic_policy(spec, "internalTrafficPolicy")
    external_policy = _traffic_policy(spec, "externalTrafficPolicy")
    external_ips: Tuple[str, ...] = ()
    if spec.get("externalIPs") is not None:
        external_ips = _external_addresses(_typed(spec, "externalIPs", list, "spec.", []),
                                           "spec.externalIPs", vips, where, notes)
    lb_ips: Tuple[str, ...] = ()
    status = service.get("status")
    balancer = status.get("loadBalancer") if type(status) is dict else None
    if status is not None and (type(status) is not dict or balancer is not None and (
            type(balancer) is not dict or balancer.get("ingress") is not None)):
        status = _typed(service, "status", dict, "", {})
        ingress = _typed(_typed(status, "loadBalancer", dict, "status.", {}), "ingress", list,
                         "status.loadBalancer.", [])
        lb_ips = _external_addresses(
            [i.get("ip") for i in ingress if isinstance(i, dict) and i.get("ip")],
            "status.loadBalancer.ingress", vips, where, notes)
    labels = meta.get("labels")
    if type(labels) is not dict:
        labels = _typed(meta, "labels", dict, "metadata.", {})
    shared_labels = []
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise _Malformed(f"metadata.labels: {reprlib.repr(key)}: {reprlib.repr(value)} is "
                             "not a string label")
        shared_labels.append(_share_label((sys.intern(key), sys.intern(value))))
    if len(shared_labels) > 1:
        shared_labels.sort()
    annotations = meta.get("annotations")
    if annotations is None or type(annotations) is dict and \
            ALGORITHM_ANNOTATION not in annotations and \
            MAGLEV_TABLE_SIZE_ANNOTATION not in annotations:
        algorithm, table_size = "random", maglev.DEFAULT_TABLE_SIZE
    else:
        algorithm, table_size = _algorithm(
            _typed(meta, "annotations", dict, "metadata.", {}), where, notes)
    distribution = spec.get("trafficDistribution")
    if distribution is not None:
        distribution = _intern(_typed(spec, "trafficDistribution", str, "spec."))
    return ParsedService(Service(
        name=sys.intern(name), namespace=namespace, vip=vips[0],
        extra_vips=tuple(vips[1:]), ports=_share_ports(tuple(ports)), session_affinity=affinity,
        internal_traffic_policy=sys.intern(policy),
        external_ips=external_ips, load_balancer_ips=lb_ips,
        external_traffic_policy=sys.intern(external_policy),
        traffic_distribution=distribution, labels=tuple(shared_labels),
        algorithm=algorithm, maglev_table_size=table_size,
    ), tuple(named))


def _algorithm(annotations: dict, where: str, notes: Translation) -> Tuple[str, int]:
    """(algorithm, Maglev table size) from the service's annotations. A bad value is noted
    and left out (the default stands): a typo in an annotation should not take the service
    off the datapath, which is what a malformed API field does."""
    algorithm, size = "random", maglev.DEFAULT_TABLE_SIZE
    text = annotations.get(ALGORITHM_ANNOTATION)
    if text is not None:
        if isinstance(text, str) and text.strip() in ALGORITHMS:
            algorithm = sys.intern(text.strip())
        else:
            notes.invalid.append(
                f"{where}: metadata.annotations[{ALGORITHM_ANNOTATION}]: "
                f"{reprlib.repr(text)} is not an algorithm (one of: {', '.join(ALGORITHMS)}); "
                "ignored, random is used")
    text = annotations.get(MAGLEV_TABLE_SIZE_ANNOTATION)
    if text is not None:
        number = int(text) if isinstance(text, str) and text.strip().isascii() and \
            text.strip().isdigit() and len(text.strip()) <= 7 else text
        why = maglev.check_table_size(number)
        if why:
            notes.invalid.append(f"{where}: metadata.annotations[{MAGLEV_TABLE_SIZE_ANNOTATION}]"
                                 f": {why}; ignored, {size} is used")
        else:
            size = number
    return algorithm, size


def _service_port(port: Any, index: int, where: str,
                  notes: Translation) -> Tuple[Optional[ServicePort], bool]:
    """spec.ports[index]: (ServicePort or None if its protocol is not ours, whether its
    targetPort is a name). Raises _Malformed."""
    path = f"spec.ports[{index}]"
    if not isinstance(port, dict):
        raise _Malformed(f"{path}: {reprlib.repr(port)} is not an object")
    protocol = port.get("protocol")
    if type(protocol) is not str or not protocol:
        protocol = _typed(port, "protocol", str, path + ".") or "TCP"
    port_name = port.get("name")
    if type(port_name) is not str:
        port_name = _typed(port, "name", str, path + ".", "")
    if protocol not in SUPPORTED_PROTOCOLS:
        notes.skipped.append(f"{where}: port {port_name or reprlib.repr(port.get('port'))}: "
                             f"protocol {protocol} is not supported; skipped")
        return None, False
    number = _port_number(port.get("port"), path + ".port")
    target = port.get("targetPort")
    named = isinstance(target, str) and not (target.isascii() and target.isdigit())
    if named or target is None:
        # A named targetPort is resolved per pod; the slices carry the numbers. The service
        # port is only the fallback for backends without their own.
        target = number
    node_port = port.get("nodePort") or None
    plain = type(target) is int and (node_port is None or type(node_port) is int)
    key = (number, target, protocol, port_name, node_port) if plain else None
    shared = _ports_seen.get(key) if plain else None  # checked already: one object
    if shared is None:
        shared = _share_port(ServicePort(
            port=number, target_port=_port_number(target, path + ".targetPort"),
            protocol=sys.intern(protocol), name=sys.intern(port_name),
            node_port=None if node_port is None else _port_number(node_port,
                                                                  path + ".nodePort")))
        if plain and len(_ports_seen) < 4096:
            _ports_seen[key] = shared
    return shared, named


def _external_addresses(texts: list, path: str, vips: List[str], where: str,
                        notes: Translation) -> Tuple[str, ...]:
    """externalIPs or load-balancer ingress IPs of the service's families; others noted."""
    out = []
    families = {_family(v) for v in vips}
    for index, text in enumerate(texts):
        try:
            addr = _canonical_ip(text)
        except (ValueError, AttributeError, TypeError):
            notes.invalid.append(f"{where}: {path}[{index}]: {reprlib.repr(text)} is not an IP "
                                 "address; skipped")
            continue
        if _family(addr) not in families:
            notes.skipped.append(f"{where}: {path}[{index}]: {addr} has no ClusterIP of its "
                                 "family; skipped")
            continue
        if addr not in out:
            out.append(addr)
    return tuple(out)


def _cluster_ips(spec: dict, where: str, notes: Translation) -> List[str]:
    """The service's virtual addresses, primary first; clusterIPs[i] is of ipFamilies[i]."""
    cluster_ips = spec.get("clusterIPs")
    families = spec.get("ipFamilies")
    if type(cluster_ips) is list and len(cluster_ips) == 1 and type(families) is list and \
            families[:1] == ["IPv4"] and _is_canonical_ipv4(cluster_ips[0]):
        return cluster_ips  # nearly every Service: one IPv4 ClusterIP, as canonical_ip has it
    cluster_ips = _typed(spec, "clusterIPs", list, "spec.") or (
        [spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not cluster_ips or cluster_ips[0] == "None":
        return []
    families = _typed(spec, "ipFamilies", list, "spec.", [])
    vips = []
    for index, text in enumerate(cluster_ips):
        try:
            vip = _canonical_ip(text)
        except ValueError:
            notes.invalid.append(f"{where}: spec.clusterIPs[{index}]: {reprlib.repr(text)} is "
                                 "not an IP address; skipped")
            continue
        family = families[index] if index < len(families) else None
        if family is not None and (not isinstance(family, str) or
                                   FAMILY_VERSIONS.get(family) != _family(vip)):
            notes.invalid.append(f"{where}: spec.clusterIPs[{index}]: {vip} is not of family "
                                 f"{family} (spec.ipFamilies[{index}]); skipped")
            continue
        vips.append(vip)
    return vips


def endpoint_conditions(endpoint: dict) -> Tuple[bool, bool, bool]:
    """(ready, serving, terminating) with the API's meaning of an unset (nil) condition:
    ready nil is true, serving nil is ready, terminating nil is false. A condition that is not
    a boolean raises _Malformed (a ValueError): the endpoint's state is unknown."""
    conditions = _typed(endpoint, "conditions", dict, "", {})
    ready = _typed(conditions, "ready", bool, "conditions.", True)
    serving = _typed(conditions, "serving", bool, "conditions.", ready)
    terminating = _typed(conditions, "terminating", bool, "conditions.", False)
    return ready, serving, terminating


def parse_slice(endpoint_slice: dict, notes: Translation) -> ParsedSlice:
    """An EndpointSlice -> one Backend per address, checked here once. A malformed field
    skips the slice (or the endpoint it is in), with a note."""
    return _parse_slice_at(endpoint_slice, object_key(endpoint_slice),
                           object_version(endpoint_slice), notes)


def _parse_slice_at(endpoint_slice: dict, key: ServiceKey, version: Union[int, str, None],
                    notes: Translation) -> ParsedSlice:
    """parse_slice, for a caller that has the slice's key and version already. Each field is
    read the quick way when it has the type a valid API server sends; anything else goes
    through _typed (what an unset value means, and the message naming a malformed one)."""
    try:
        meta = endpoint_slice.get("metadata")
        if type(meta) is not dict or type(meta.get("namespace")) is not str or \
                type(meta.get("name")) is not str:
            meta = _metadata(endpoint_slice)
        labels = meta.get("labels")
        if type(labels) is not dict:
            labels = _typed(meta, "labels", dict, "metadata.", {})
        service_name = labels.get(SERVICE_NAME_LABEL)
        if type(service_name) is not str:
            service_name = _typed(labels, SERVICE_NAME_LABEL, str, "metadata.labels.")
        service = (key[0], sys.intern(service_name)) if service_name else None
        address_type = endpoint_slice.get("addressType")
        if type(address_type) is not str:
            address_type = _typed(endpoint_slice, "addressType", str, "")
        address_type = _intern(address_type)
        family = FAMILY_VERSIONS.get(address_type)  # type: ignore[arg-type]
        if service is None or family is None:  # no service's, or FQDN: no backends to keep
            return ParsedSlice(service, address_type, (), (), version)
        slice_ports = endpoint_slice.get("ports")
        if type(slice_ports) is not list:
            slice_ports = _typed(endpoint_slice, "ports", list, "", ())
        ports = []
        for index, p in enumerate(slice_ports):
            if not isinstance(p, dict):
                raise _Malformed(f"ports[{index}]: {reprlib.repr(p)} is not an object")
            if p.get("port") is not None:
                port_name = p.get("name")
                if type(port_name) is not str:
                    port_name = _typed(p, "name", str, f"ports[{index}].", "")
                ports.append((sys.intern(port_name),
                              _port_number(p["port"], f"ports[{index}].port")))
        endpoints = endpoint_slice.get("endpoints")
        if type(endpoints) is not list:
            endpoints = _typed(endpoint_slice, "endpoints", list, "", ())
    except _Malformed as e:
        notes.invalid.append(f"endpointslice {key[0]}/{key[1]}: {e}; skipped")
        return ParsedSlice(None, None, (), (), version)
    shared_ports = _share_ports(tuple(ports))
    # address -> (its packed form: the sort key, its Backend)
    by_address: Dict[str, Tuple[bytes, Backend]] = {}
    for index, endpoint in enumerate(endpoints):
        try:
            if not isinstance(endpoint, dict):
                raise _Malformed(f"{reprlib.repr(endpoint)} is not an object")
            conditions = endpoint.get("conditions")
            if type(conditions) is dict:
                ready, serving, terminating = (conditions.get("ready"),
                                               conditions.get("serving"),
                                               conditions.get("terminating"))
            if type(conditions) is not dict or type(ready) is not bool or \
                    type(serving) is not bool or type(terminating) is not bool:
                ready, serving, terminating = endpoint_conditions(endpoint)
            node = endpoint.get("nodeName")
            if type(node) is not str:
                node = _typed(endpoint, "nodeName", str, "")
            node = sys.intern(node) if node else None
            zone = endpoint.get("zone")
            if type(zone) is not str:
                zone = _typed(endpoint, "zone", str, "")
            zone = sys.intern(zone) if zone else None
            addresses = endpoint.get("addresses")
            if type(addresses) is not list:
                addresses = _typed(endpoint, "addresses", list, "", ())
        except _Malformed as e:
            notes.invalid.append(f"{_slice_where(service, key)}: endpoints[{index}]: {e}; "
                                 "skipped")
            continue
        for text in addresses:
            packed = None
            if family == 4:  # nearly always an IPv4 address in canonical form: take it as is
                try:
                    packed = inet_pton(AF_INET, text)
                    if inet_ntop(AF_INET, packed) != text:
                        packed = None
                except (OSError, TypeError, ValueError):  # ValueError: a NUL in it
                    pass
            if packed is not None:
                address = text
            else:
                try:
                    address = _canonical_ip(text)
                except ValueError:
                    notes.invalid.append(f"{_slice_where(service, key)}: "
                                         f"{reprlib.repr(text)} is not an IP address; skipped")
                    continue
                if _family(address) != family:
                    notes.invalid.append(f"{_slice_where(service, key)}: {address} is not "
                                         f"{address_type}; skipped")
                    continue
                packed = socket.inet_pton(socket.AF_INET6 if family == 6 else socket.AF_INET,
                                          address)
            if address not in by_address:
                # Positional: this runs for every endpoint of 100,000 slices.
                by_address[address] = (packed, Backend(
                    _share_address(address), 1, node, zone, ready, serving, terminating,
                    shared_ports))
    # By number, as _in_order has it (one family in a slice: the packed forms compare).
    ordered = sorted(by_address.values()) if len(by_address) > 1 else by_address.values()
    return ParsedSlice(service, address_type, shared_ports,
                       tuple([backend for _, backend in ordered]), version)


inet_pton, inet_ntop, AF_INET = socket.inet_pton, socket.inet_ntop, socket.AF_INET


def _slice_where(service: ServiceKey, key: ServiceKey) -> str:
    return f"service {service[0]}/{service[1]}: endpointslice {key[1]}"


def assemble(parsed: ParsedService, slices: Iterable[Tuple[str, ParsedSlice]],
             notes: Translation) -> Service:
    """A parsed Service with its parsed slices ((name, slice) pairs) -> model.Service.

    Every address of the slices is one Backend, deduplicated. An address can sit in two
    slices for a moment (the controller moving endpoints between slices); the first slice by
    name wins and the other only adds port numbers it lacks. The Backends (and, with one
    slice, their tuple) are the parsed slices' own objects: the cache and the delivered
    services share them.
    """
    template, named_ports = parsed
    port_names = {p.name for p in template.ports}
    families = {_family(vip) for vip in template.vips}
    usable = []
    if not isinstance(slices, list) or len(slices) > 1:
        slices = sorted(slices, key=lambda pair: pair[0])
    for slice_name, endpoint_slice in slices:
        if FAMILY_VERSIONS.get(endpoint_slice.address_type) not in families:
            notes.skipped.append(f"service {template.namespace}/{template.name}: endpointslice "
                                 f"{slice_name}: addressType {endpoint_slice.address_type} "
                                 "does not match the service; skipped")
            continue
        backends = endpoint_slice.backends
        # Slice ports are named after the service port; their number is the resolved target.
        if any(name not in port_names for name, _ in endpoint_slice.ports):
            kept = tuple(p for p in endpoint_slice.ports if p[0] in port_names)
            backends = tuple(b.with_ports(kept) for b in backends)
        if backends:
            usable.append(backends)
    if len(usable) <= 1:
        backends = usable[0] if usable else ()
    else:
        by_address: Dict[str, Backend] = {}
        for backend in itertools.chain.from_iterable(usable):
            known = by_address.get(backend.address)
            if known is None:
                by_address[backend.address] = backend
                continue
            names = {name for name, _ in known.ports}
            extra = tuple(p for p in backend.ports if p[0] not in names)
            if extra:
                by_address[backend.address] = known.with_ports(known.ports + extra)
        backends = _in_order(by_address.values())

    ports = template.ports
    if named_ports:
        first_resolved: Dict[str, int] = {}
        for backend in backends:
            for port_name, number in backend.ports:
                first_resolved.setdefault(port_name, number)
        ports = tuple(replace(p, target_port=first_resolved.get(p.name, p.port))
                      if p.name in named_ports else p for p in ports)
    if backends == template.backends and ports == template.ports:
        return template
    return _with_backends(template, ports, backends)


_SERVICE_FIELDS = tuple(f.name for f in dataclasses.fields(Service))
_service_values = Service.values  # every field, in order: one call
_PORTS_AT, _BACKENDS_AT = _SERVICE_FIELDS.index("ports"), _SERVICE_FIELDS.index("backends")


def _with_backends(service: Service, ports: Tuple[ServicePort, ...],
                   backends: Tuple[Backend, ...]) -> Service:
    """replace(service, ports=ports, backends=backends), the other fields' shared tuple
    taken as it is (Service.with_backends)."""
    return service.with_backends(ports, backends)


# What the decoding worker hands over of each list item: a row of plain values (tuples,
# strings, numbers; the ServicePorts and SessionAffinity as they are, one per page), which
# unpickles without a Python call per object. The agent's process then builds each record
# once: a Service with its backends (not a template, then the assembled copy), a slice's
# Backends with their constructor. What parse_service / parse_slice decided (errors, notes,
# defaults) is in the row: the agent's process checks nothing again.
#   service row: (namespace, name, version, parts, named_ports, port_names, families),
#                parts: model.service_parts' (a Service built from them is one call of
#                service_from_parts, not Service()'s checks and sharing again); where it
#                has none, model.Service's fields in order (backends empty); None if not
#                programmed; port_names / families: of its ports / its VIPs (frozensets,
#                shared)
#   slice row:   (namespace, name, version, service_name, address_type, ports, backends),
#                backends: one tuple of model.Backend's fields in order per Backend
_NAME_AT, _NAMESPACE_AT = _SERVICE_FIELDS.index("name"), _SERVICE_FIELDS.index("namespace")
_backend_values = Backend.values  # every field, in order: one call
_PARTS_LENGTH = 4  # of model.service_parts' tuple (a Service's fields are 21)
_share_names, _share_families = _Pool(), _Pool()


def service_row(key: ServiceKey, version: Union[int, str, None],
                parsed: Optional[ParsedService]) -> Tuple[Any, ...]:
    """The decoding worker's row of a parsed Service (see above)."""
    if parsed is None:
        return (key[0], key[1], version, None, (), None, None)
    service = parsed.service
    parts = service_parts(service)
    return (key[0], key[1], version, _service_values(service) if parts is None else parts,
            parsed.named_ports,
            _share_names(frozenset([p.name for p in service.ports])),
            _share_families(frozenset([_family(vip) for vip in service.vips])))


def slice_row(key: ServiceKey, parsed: ParsedSlice) -> Tuple[Any, ...]:
    """The decoding worker's row of a parsed EndpointSlice (see above)."""
    return (key[0], key[1], parsed.version,
            parsed.service[1] if parsed.service is not None else None, parsed.address_type,
            parsed.ports, tuple([_backend_values(backend) for backend in parsed.backends]))


def _in_order(backends: Iterable[Backend]) -> Tuple[Backend, ...]:
    """IPv4 before IPv6, then by number, as ipaddress orders them (and cheaper)."""
    def order(backend: Backend) -> Tuple[int, bytes]:
        address = backend.address
        packed = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET,
                                  address)
        return (len(packed), packed)
    return tuple(sorted(backends, key=order))


def _ipv4_packed(text: Any) -> Optional[bytes]:
    """The 4 bytes of an IPv4 address written in canonical form; None for anything else."""
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
    except (OSError, TypeError, ValueError):  # ValueError: a NUL in it
        return None
    return packed if socket.inet_ntop(socket.AF_INET, packed) == text else None


def _is_canonical_ipv4(text: Any) -> bool:
    return _ipv4_packed(text) is not None


def _canonical_ip(text: Any) -> str:
    """canonical_ip, with a fast path for what the API server sends nearly always: an IPv4
    address in canonical form already (ipaddress takes ten times as long). ValueError for
    anything else, and for a scoped IPv6 address (fe80::1%eth0): ipaddress takes the zone,
    but the datapath matches addresses without one."""
    if not isinstance(text, str) or "%" in text:
        raise ValueError(text)
    try:
        if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text)) == text:
            return text
    except OSError:
        pass
    return canonical_ip(text)


def _family(address: str) -> int:
    """4 or 6, for an address already in canonical form."""
    return 6 if ":" in address else 4


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

class SourceMetrics:
    """nodemesh_source_* collectors; any source can label them with its own name."""

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge
        self.events = _registered(registry, "nodemesh_source_events", lambda: Counter(
            "nodemesh_source_events_total", "Events a source received or acted on, by kind",
            ["source", "kind"], registry=registry))
        self.last_sync = _registered(registry, "nodemesh_source_last_sync_timestamp_seconds",
                                     lambda: Gauge(
            "nodemesh_source_last_sync_timestamp_seconds",
            "When the source last completed a full list or delivered a change (Unix time)",
            ["source"], registry=registry))


def _registered(registry, name: str, create):
    """The collector registered under `name`, created if the registry has none yet.

    Another part of the agent (a second source, an in-process restart, the lead's metrics
    module) may have registered it first; reuse it instead of failing on a duplicate.
    """
    try:
        return create()
    except ValueError:
        existing = getattr(registry, "_names_to_collectors", {}).get(name)
        if existing is None:
            raise
        return existing


_metrics_by_registry: "weakref.WeakKeyDictionary[Any, SourceMetrics]" = \
    weakref.WeakKeyDictionary()
_metrics_lock = threading.Lock()


def source_metrics(registry) -> SourceMetrics:
    """One SourceMetrics per registry."""
    with _metrics_lock:
        metrics = _metrics_by_registry.get(registry)
        if metrics is None:
            metrics = _metrics_by_registry[registry] = SourceMetrics(registry)
        return metrics


# --------------------------------------------------------------------------------------------
# The cluster state both watchers write and the delivery thread reads
# --------------------------------------------------------------------------------------------

class _ServiceRecord(NamedTuple):
    version: Union[int, str, None]
    # Translated with its current slices (until the first delivery: without them); None: not
    # programmed (headless ...).
    service: Optional[Service]
    named_ports: Tuple[str, ...]
    # The names of its slices (in its namespace): one (nearly every service) as its bare
    # name, not in a tuple of one. Here rather than in a dict of their own: 5 MiB at 100,000.
    slices: Union[str, Tuple[str, ...]] = ()


class _ByNamespace:
    """A dict keyed by (namespace, name), kept as one dict of names per namespace: the key's
    tuple is not stored (64 bytes an object; the name and the namespace are strings the
    cluster state keeps anyway). What _ClusterState asks of a dict, with the same keys."""

    __slots__ = ("_names",)

    def __init__(self) -> None:
        self._names: Dict[str, Dict[str, Any]] = {}

    def get(self, key: ServiceKey, default: Any = None) -> Any:
        names = self._names.get(key[0])
        return default if names is None else names.get(key[1], default)

    def __getitem__(self, key: ServiceKey) -> Any:
        return self._names[key[0]][key[1]]

    def __setitem__(self, key: ServiceKey, value: Any) -> None:
        names = self._names.get(key[0])
        if names is None:
            names = self._names[key[0]] = {}
        names[key[1]] = value

    def pop(self, key: ServiceKey, default: Any = None) -> Any:
        names = self._names.get(key[0])
        if names is None:
            return default
        value = names.pop(key[1], default)
        if not names:
            del self._names[key[0]]
        return value

    def __contains__(self, key: object) -> bool:
        names = self._names.get(key[0]) if isinstance(key, tuple) and len(key) == 2 else None
        return names is not None and key[1] in names  # type: ignore[index]

    def __len__(self) -> int:
        return sum(len(names) for names in self._names.values())

    def __iter__(self) -> Iterator[ServiceKey]:
        for namespace, names in self._names.items():
            for name in names:
                yield (namespace, name)

    def items(self) -> Iterator[Tuple[ServiceKey, Any]]:
        for namespace, names in self._names.items():
            for name, value in names.items():
                yield (namespace, name), value

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _ByNamespace):
            return self._names == other._names
        return isinstance(other, dict) and dict(self.items()) == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"_ByNamespace({dict(self.items())!r})"


class _SeenKeys:
    """The keys a (re)list named, for list_done, kept as a set of names per namespace: the
    names are strings the cache keeps anyway (a service's interned, a slice's its key). A
    set of (namespace, name) tuples held one tuple a listed object (and, for a service, a
    copy of its name) until the list's end: allocated between the objects the cache keeps,
    they left their 64-byte blocks free inside Python's arenas (~100,000 more at ready at
    100,000 services, 6 MiB of RSS). What _ClusterState asks of a set, with the same
    keys."""

    __slots__ = ("_names",)

    def __init__(self) -> None:
        self._names: Dict[str, Set[str]] = {}

    def add(self, key: ServiceKey) -> None:
        names = self._names.get(key[0])
        if names is None:
            names = self._names[key[0]] = set()
        names.add(key[1])

    def __contains__(self, key: object) -> bool:
        names = self._names.get(key[0]) if isinstance(key, tuple) and len(key) == 2 else None
        return names is not None and key[1] in names  # type: ignore[index]

    def __len__(self) -> int:
        return sum(len(names) for names in self._names.values())


Seen = Union[Set[ServiceKey], _SeenKeys]


class _ClusterState:
    """The parsed collections, every service kept translated, and what changed since the last
    delivery. Work per event follows the event: one object parsed, one service assembled.
    Until the first delivery nothing is assembled: it assembles every service once; unless
    the services come in pages after the slices are listed (`stream_services`): then each
    service is assembled as its page arrives and delivered in a partial delta, so that the
    agent programs the first pages while the next ones are decoded."""

    def __init__(self, on_dirty: Callable[[], None], on_notes: Callable[[Translation], None]):
        self._lock = threading.Lock()
        self._on_dirty = on_dirty
        self._on_notes = on_notes
        self._services: Dict[ServiceKey, _ServiceRecord] = {}
        # Keyed by the slice's own (namespace, name), without a tuple for it (_ByNamespace).
        self._slices = _ByNamespace()
        # A stored service's record holds the names of its slices (a slice's
        # kubernetes.io/service-name label names a service of its own namespace); the names
        # of those whose service is not stored (yet: the slices are listed first) are here.
        # Emptied by the services list: replaced then (a dict keeps its table when emptied).
        self._orphans: Dict[ServiceKey, Union[str, Tuple[str, ...]]] = {}
        # Service key -> what the last delivery said of it, for keys changed since; filled
        # only once the first (full) delivery is out.
        self._changed: Dict[ServiceKey, Optional[Service]] = {}
        self._delivered = False
        # Before the first delivery, with the slices listed: services are assembled and
        # delivered page by page (partial deltas), the full delta follows the last page.
        self._streaming = False
        self._listed: Set[str] = set()                       # collections listed at least once
        self._put = {"service": self._put_service, "endpointslice": self._put_slice}
        self._drop = {"service": self._drop_service, "endpointslice": self._drop_slice}
        self._stored: Dict[str, Any] = {"service": self._services,
                                                           "endpointslice": self._slices}

    # -- what the watchers call
    @property
    def delivered(self) -> bool:
        """The first full delta is out (the first sync is over): from now on a delta carries
        only what changed."""
        return self._delivered

    def put(self, kind: str, obj: dict, signal: bool = True) -> None:
        """An ADDED or MODIFIED object. signal=False: the caller delivers (or signals) itself,
        as a watch does (KubernetesSource._watch_changed)."""
        key, version = _key_and_version(obj)
        self._apply(lambda notes: self._put[kind](
            key, version, _parse_slice_at(obj, key, version, notes) if kind == "endpointslice"
            else _parse_service_at(obj, key[0], notes), notes), signal)

    def delete(self, kind: str, obj: dict, signal: bool = True) -> None:
        self._apply(lambda notes: self._drop[kind](object_key(obj), notes), signal)

    def list_page(self, kind: str, items: Union[Iterable[dict], DecodedPage],
                  seen: Seen) -> None:
        """One page of a (re)list: only objects whose resourceVersion moved are parsed. The
        items are decoded as they are iterated, outside the lock; or they come decoded and
        parsed already (a DecodedPage, from the decoding worker), and only those whose
        resourceVersion moved are taken."""
        stored, put = self._stored[kind], self._put[kind]
        if isinstance(items, DecodedPage):
            notes = Translation(skipped=list(items.skipped), invalid=list(items.invalid))
            services = kind == "service"
            put_row = self._put_service_row if services else self._put_slice_row
            intern = sys.intern
            with self._lock:
                for row in items.items:
                    # The worker's strings are its own: share the agent's copies again (a
                    # service's name is interned where the cache keeps it).
                    key = (intern(row[0]), intern(row[1]) if services else row[1])
                    seen.add(key)
                    known = stored.get(key)
                    if known is None or known.version != row[2]:
                        put_row(key, row, notes)
            self._report(notes)
            return
        notes = Translation()
        lock, slices = self._lock, kind == "endpointslice"
        for obj in items:
            key, version = _key_and_version(obj)
            if not slices:
                key = (key[0], sys.intern(key[1]))
            seen.add(key)
            with lock:
                known = stored.get(key)
                if known is None or known.version != version:
                    put(key, version, _parse_slice_at(obj, key, version, notes) if slices
                        else _parse_service_at(obj, key[0], notes), notes)
        self._report(notes)

    def stream_services(self) -> None:
        """The services list has more than one page: if the slices are listed already (the
        source lists them first), assemble each service as its page arrives and deliver the
        pages as partial deltas until the list is complete. Services stored before are
        assembled now."""
        with self._lock:
            if self._delivered or self._streaming or "endpointslice" not in self._listed:
                return
            self._streaming = True
            notes = Translation()
            for key, record in self._services.items():
                if record.service is not None:  # not delivered yet: None before
                    self._services[key] = record._replace(service=assemble(
                        ParsedService(record.service, record.named_ports),
                        self._slices_for(key), notes))
                    self._changed.setdefault(key, None)
        self._report(notes)

    def list_done(self, kind: str, seen: Seen) -> None:
        """The list is complete: whatever it did not name was deleted meanwhile."""
        def apply(notes: Translation) -> None:
            for key in [key for key in self._stored[kind] if key not in seen]:
                self._drop[kind](key, notes)
            self._listed.add(kind)
        self._apply(apply)

    def _apply(self, change: Callable[[Translation], None], signal: bool = True) -> None:
        notes = Translation()
        with self._lock:
            change(notes)
        self._report(notes, signal)

    def _report(self, notes: Translation, signal: bool = True) -> None:
        if notes.skipped or notes.invalid:
            self._on_notes(notes)
        if signal:
            self._on_dirty()

    # -- under the lock
    def _put_service(self, key: ServiceKey, version: Union[int, str, None],
                     parsed: Optional[ParsedService], notes: Translation) -> None:
        members, key = self._service_key(key)
        service = parsed.service if parsed else None
        if parsed and (self._delivered or self._streaming):
            service = assemble(parsed, self._slices_for(key), notes)
        self._record_service(key, version, service, parsed.named_ports if parsed else ())

    def _service_key(self, key: ServiceKey) -> Tuple[List[ServiceKey], ServiceKey]:
        """The service's slices, and its key as the agent keeps it: one tuple for the key,
        its slice's and the dicts', one string for the key's name, the Service's and the
        label's."""
        members = self._members(key)
        return members, (self._slices[members[0]].service or key if members else
                         (key[0], sys.intern(key[1])))

    def _record_service(self, key: ServiceKey, version: Union[int, str, None],
                        service: Optional[Service], named_ports: Tuple[str, ...]) -> None:
        known = self._services.get(key)
        if known is not None and service == known.service:
            service = known.service  # keep the object the agent already holds
        elif service is not None:
            share_key(service, key)  # the cache's key is the Service's (and the core's)
        self._services[key] = _ServiceRecord(
            version, service, named_ports,
            known.slices if known is not None else self._take_orphans(key))
        self._note_change(key, known.service if known else None, service)

    def _put_service_row(self, key: ServiceKey, row: Tuple[Any, ...],
                         notes: Translation) -> None:
        """_put_service, from the decoding worker's row (service_row): the Service is built
        once, with its backends, where assemble would only hand on its one slice's (nearly
        every service); anything else goes through assemble, as _put_service does."""
        _, _, version, fields, named_ports, port_names, families = row
        members, key = self._service_key(key)
        service = None
        if fields is not None:
            # The key's strings are the agent's own (one copy of each), not the row's.
            if len(fields) == _PARTS_LENGTH:
                def build(backends: Tuple[Backend, ...]) -> Service:
                    return service_from_parts(key, backends, fields)
            else:
                def build(backends: Tuple[Backend, ...]) -> Service:
                    values = list(fields)
                    values[_NAMESPACE_AT], values[_NAME_AT] = key
                    values[_BACKENDS_AT] = backends
                    return Service(*values)
            if not (self._delivered or self._streaming) or not members:
                service = build(())  # no slices yet (or none to take): no backends
            elif len(members) == 1 and not named_ports:
                endpoint_slice = self._slices[members[0]]
                slice_ports = endpoint_slice.ports
                if FAMILY_VERSIONS.get(endpoint_slice.address_type) in families and (
                        slice_ports[0][0] in port_names if len(slice_ports) == 1 else
                        all(name in port_names for name, _ in slice_ports)):
                    service = build(endpoint_slice.backends)
            if service is None:
                service = assemble(ParsedService(build(()), named_ports),
                                   self._slices_for(key), notes)
        self._record_service(key, version, service, named_ports)

    def _put_slice_row(self, key: ServiceKey, row: Tuple[Any, ...],
                       notes: Translation) -> None:
        """_put_slice, from the decoding worker's row (slice_row)."""
        _, _, version, service_name, address_type, ports, backends = row
        share = _share_address
        self._put_slice(key, version, ParsedSlice(
            (key[0], sys.intern(service_name)) if service_name is not None else None,
            address_type, ports, tuple([Backend(share(values[0]), *values[1:])
                                        for values in backends]), version),
            notes)

    def _drop_service(self, key: ServiceKey, notes: Translation) -> None:
        known = self._services.pop(key, None)
        if known is not None:
            if known.slices:
                self._orphans[key] = known.slices
            self._note_change(key, known.service, None)

    def _put_slice(self, key: ServiceKey, version: Union[int, str, None], parsed: ParsedSlice,
                   notes: Translation) -> None:
        known = self._slices.get(key)
        if known is not None and known[:4] == parsed[:4]:
            # Nothing translation reads changed (a resourceVersion, a targetRef, a hint):
            # keep the stored Backends (the delivered service holds them) and skip the
            # service's re-assembly.
            self._slices[key] = known._replace(version=parsed.version)
            return
        self._slices[key] = parsed
        if known is not None and known.service not in (None, parsed.service):  # relabelled
            self._unlink(known.service, key, notes)
        if parsed.service is not None:
            names = self._slice_names(parsed.service)
            if key[1] not in names:
                self._set_slice_names(parsed.service, names + (key[1],))
            self._reassemble(parsed.service, notes)

    def _drop_slice(self, key: ServiceKey, notes: Translation) -> None:
        known = self._slices.pop(key, None)
        if known is not None and known.service is not None:
            self._unlink(known.service, key, notes)

    def _unlink(self, service: ServiceKey, slice_key: ServiceKey, notes: Translation) -> None:
        """The slice is no longer the service's: assemble the service without it."""
        self._set_slice_names(service, tuple(name for name in self._slice_names(service)
                                             if name != slice_key[1]))
        self._reassemble(service, notes)

    def _members(self, service: ServiceKey) -> Tuple[ServiceKey, ...]:
        """The keys of the service's slices."""
        return tuple([(service[0], name) for name in self._slice_names(service)])

    def _slice_names(self, service: ServiceKey) -> Tuple[str, ...]:
        """The names of the service's slices."""
        record = self._services.get(service)
        names = record.slices if record is not None else self._orphans.get(service, ())
        return (names,) if type(names) is str else names  # type: ignore[return-value]

    def _set_slice_names(self, service: ServiceKey, names: Tuple[str, ...]) -> None:
        value = names if len(names) != 1 else names[0]
        record = self._services.get(service)
        if record is not None:
            self._services[service] = record._replace(slices=value)
        elif value:
            self._orphans[service] = value
        else:
            self._take_orphans(service)

    def _take_orphans(self, service: ServiceKey) -> Union[str, Tuple[str, ...]]:
        """The names of a service's slices listed before it, taken from _orphans."""
        names = self._orphans.pop(service, ())
        if names and not self._orphans:
            self._orphans = {}  # a new, small table: the emptied one keeps its size
        return names

    def _slices_for(self, service: ServiceKey) -> List[Tuple[str, ParsedSlice]]:
        return [(key[1], self._slices[key]) for key in self._members(service)]

    def _reassemble(self, key: ServiceKey, notes: Translation) -> None:
        """A slice of this service changed: assemble it again from what is parsed."""
        known = self._services.get(key)
        if known is None or known.service is None or not (self._delivered or self._streaming):
            return
        service = assemble(ParsedService(known.service, known.named_ports),
                           self._slices_for(key), notes)
        if service is not known.service and service != known.service:
            self._services[key] = known._replace(service=service)
            self._note_change(key, known.service, service)

    def _note_change(self, key: ServiceKey, before: Optional[Service],
                     after: Optional[Service]) -> None:
        if (self._delivered or self._streaming) and before is not after:
            self._changed.setdefault(key, before)

    # -- what the delivery thread calls
    def take_delta(self) -> Optional[Delta]:
        """What changed since the last call, or None if nothing did. The first full delta,
        once both collections are listed, is the full set. Before it, while the services
        stream in after the slices, partial deltas carry the services of the pages listed
        so far, each with its backends (never a half-synced service: one without its
        backends would black-hole traffic)."""
        partial = False
        with self._lock:
            if not {"service", "endpointslice"} <= self._listed:
                if not self._streaming or not self._changed:
                    return None
                partial = True
            first = not self._delivered and not partial
            if first:
                notes = Translation()
                delta = self._first_delta(notes)
            else:
                changed, self._changed = self._changed, {}
                now = {key: self._services.get(key) for key in changed}
        if first:
            if notes.skipped or notes.invalid:
                self._on_notes(notes)
            return delta
        upserts, deletes = [], []
        for key in sorted(changed):
            after = now[key].service if now[key] is not None else None
            if after == changed[key]:
                continue  # changed and changed back
            if after is None:
                deletes.append(key)
            else:
                upserts.append(after)
        if not upserts and not deletes:
            return None
        return Delta(upserts=tuple(upserts), deletes=tuple(deletes), origin="kubernetes",
                     partial=partial)

    def _first_delta(self, notes: Translation) -> Delta:
        """Assemble every service once: the full set. Streamed services are assembled and
        current already (and delivered, most of them): the same objects again."""
        if self._streaming:
            self._streaming, self._changed, self._delivered = False, {}, True
            return Delta(upserts=tuple(record.service for _, record in
                                       sorted(self._services.items())
                                       if record.service is not None),
                         full=True, origin="kubernetes")
        services = []
        for key, record in sorted(self._services.items()):
            if record.service is not None:
                service = assemble(ParsedService(record.service, record.named_ports),
                                   self._slices_for(key), notes)
                self._services[key] = record._replace(service=service)
                services.append(service)
        self._delivered = True
        return Delta(upserts=tuple(services), full=True, origin="kubernetes")


# --------------------------------------------------------------------------------------------
# Watching one collection
# --------------------------------------------------------------------------------------------

class _Gone(Exception):
    """The resourceVersion we hold is older than the server's history: relist."""


class _WatchFailed(Exception):
    """An ERROR event other than 410 in the watch stream."""


class _Backoff:
    """Capped exponential backoff with jitter; resets once a connection has proved healthy."""

    def __init__(self, initial: float = 0.2, cap: float = 30.0):
        self.initial, self.cap = initial, cap
        self._next = initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        # Jitter spreads the reconnects of a thousand nodes after an API server restart.
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._next = self.initial


class _Watcher:
    """List, then watch from the list's resourceVersion, until stopped (in its own thread)."""

    CONNECT_TIMEOUT_SECONDS = 10
    # A watch asks the server to end it by then (client-go picks 5-10 minutes too); the read
    # timeout adds a margin, so a silently dead connection is noticed without cutting a live one.
    WATCH_SECONDS = (300, 600)
    READ_MARGIN_SECONDS = 30
    HEALTHY_AFTER_SECONDS = 10  # a watch that lived this long resets the backoff
    # Lists come in pages (limit/continue, client-go's page size): a 100,000-object list is
    # never one body to hold and parse at once. A server may ignore the limit (a list served
    # from its watch cache, resourceVersion "0"): one big page then.
    PAGE_SIZE = 500

    def __init__(self, kind: str, list_function: Callable[..., Any], source: "KubernetesSource",
                 state: "_ClusterState", after_list: Optional[Callable[[], None]] = None,
                 first_list_after: Optional[threading.Event] = None):
        self.thread = threadname.Thread(target=self.run, name=f"kubernetes-{kind}-watch",
                                       daemon=True)
        self.kind = kind
        self._list_function = list_function
        self._source = source
        self._state = state
        self._after_list = after_list
        self._first_list_after = first_list_after
        self._backoff = _Backoff()
        self._response_lock = threading.Lock()
        self._response = None
        self.resource_version: Optional[str] = None
        self._consistent_list = False
        # A Services or EndpointSlices watch hands its events to delivery itself
        # (KubernetesSource._watch_changed); the pods' and policies' state signals its own.
        self._delivers = isinstance(state, _ClusterState)

    def run(self) -> None:
        stopping = self._source._stopping
        resync_at = 0.0
        # The services are listed first after the slices: then each page of services is
        # complete as it arrives and is delivered at once (_ClusterState.stream_services).
        while self._first_list_after is not None and not self._first_list_after.wait(0.05):
            if stopping.is_set():
                return
        while not stopping.is_set():
            try:
                if self.resource_version is None or time.monotonic() >= resync_at:
                    self._list()
                    resync_at = time.monotonic() + self._source.resync_seconds
                self._watch(until=resync_at)
            except _Gone as gone:
                # Expected after a long disconnect or compaction: relist now, no backoff.
                self._source._count("gone")
                log.info("kubernetes %s watch: %s; relisting", self.kind, gone)
                self.resource_version = None
                self._consistent_list = True
            except Exception as error:  # noqa: BLE001 - every failure is retried the same way
                if stopping.is_set():
                    break
                self._source._count("error")
                message = f"kubernetes {self.kind} watch: {_describe(error)}"
                delay = self._backoff.next_delay()
                log.warning("%s; retrying in %.1fs", message, delay)
                self._source._report_error(message)
                stopping.wait(delay)

    def _list(self) -> None:
        # resourceVersion "0" lets the API server answer from its watch cache, which matters
        # when every node lists at once (boot, API server restart). After a 410 ask for a
        # consistent read instead, as client-go does: the cache may be what was behind.
        query = {"resource_version": None if self._consistent_list else "0"}
        seen = _SeenKeys()
        # One list at a time: decoding and parsing are CPU-bound, and while one list parses,
        # each socket read of the other waits for the GIL (the convoy effect): two lists of
        # 100,000 objects at once took three times their CPU time.
        source = self._source
        decoder = source._decoder if self.kind in ("service", "endpointslice") else None
        with self._source._listing, contextlib.ExitStack() as stack:
            fetcher = _PageFetcher(self._page, self.kind)
            stack.callback(fetcher.close)
            page = fetcher.ask(query)
            # Pages given to the decoding worker, oldest first, with their text (parsed here
            # if the worker fails them).
            handed: Deque[Tuple[Any, bytes]] = collections.deque()
            stack_entered = False
            while True:
                # The page stays bytes: the worker is given them as they came (no decode
                # and encode again of ~1 MB a page in this process), and only the pages
                # parsed here are decoded.
                body = page.result()
                # The next page is asked for before this one is parsed, so that the server
                # (and the network) produce it while we parse: the page's metadata comes
                # before its items, and holds the token. Further pages name only the token
                # (with a resourceVersion they are refused); an expired token is a 410, and
                # the relist starts over.
                head = _page_head(body)
                token = head.get("continue") if head is not None else None
                following = fetcher.ask({"_continue": token}) if token else None
                if token and self.kind == "service":
                    self._state.stream_services()
                # A list of more than one page is decoded on both CPUs: the worker is given a
                # page whenever it holds fewer than two, and this thread parses the others.
                # Pages whose metadata comes after their items (no server sends that) are
                # parsed here: their token is known only then.
                pending = None
                mode = self._worker_mode() if decoder is not None else None
                if mode is not None and head is not None and \
                        (token or handed or stack_entered) and decoder.usable:
                    if mode == "only":
                        # The services' pages: this process has the core's rounds of the
                        # pages before to run meanwhile, so it leaves the parsing to the
                        # worker and waits for its answers (without the GIL) instead.
                        while len(handed) >= 2 and decoder.usable:
                            self._take_decoded(decoder, *handed.popleft(), seen)
                    if len(handed) < 2 and decoder.usable:
                        if not stack_entered:  # the worker runs while this list does
                            stack.enter_context(decoder.session())
                            stack_entered = True
                        pending = decoder.submit(self.kind, body)
                if pending is not None:
                    handed.append((pending, body))
                    metadata = head
                else:
                    fields: Dict[str, Any] = {}
                    self._state.list_page(self.kind, _list_items(body.decode("utf-8"), fields),
                                          seen)
                    metadata = fields.get("metadata") or {}
                while handed and (handed[0][0].done() or not metadata.get("continue")):
                    self._take_decoded(decoder, *handed.popleft(), seen)
                if not metadata.get("continue"):
                    break
                page = following if following is not None and token == metadata["continue"] \
                    else fetcher.ask({"_continue": metadata["continue"]})
            self._state.list_done(self.kind, seen)
        self._consistent_list = False
        self._backoff.reset()  # the server answers: a later failure starts from a short wait
        self.resource_version = metadata.get("resourceVersion")
        self._source._count("relist")
        self._source._mark_synced()
        log.info("kubernetes %s: listed %d at resourceVersion %s", self.kind, len(seen),
                 self.resource_version)
        if self._after_list is not None:
            self._after_list()

    def _worker_mode(self) -> Optional[str]:
        """Whether the decoding worker takes this list's next page: "only" (every page, this
        thread parses none), "share" (when it holds fewer than two: both processes parse),
        or None (this thread parses every page). Asked page by page: the datapath's compile,
        which the slices list runs alongside, may end half-way through it. While it runs,
        the slices' pages are the worker's only: the compiler has the other CPU, and a page
        costs this process a sixth of what it costs to parse it here (its rows taken), so
        the worker, not this process, competes with the compiler. The first sync is what
        the agent waits for; a later relist keeps to what it did before (on two CPUs: the
        services shared with the worker, the slices parsed here, where a slice whose
        resourceVersion did not move is not parsed at all)."""
        source = self._source
        first_sync = not self._state.delivered
        if self.kind == "service":
            if not (source.DECODE_IN_WORKER or source.DECODE_SERVICES_IN_WORKER):
                return None
            return "only" if first_sync else "share"
        if source.DECODE_IN_WORKER:
            return "share"
        if first_sync and source.DECODE_SERVICES_IN_WORKER:
            return "share" if source._compile_done.is_set() else "only"
        return None

    def _take_decoded(self, decoder: PageDecoder, pending: Any, body: bytes,
                      seen: Seen) -> None:
        """A page the worker decoded; or, if the worker failed it, the page parsed here."""
        try:
            decoded = decoder.result(pending)
        except DecoderCrashed:
            self._state.list_page(self.kind, _list_items(body.decode("utf-8"), {}), seen)
            return
        self._state.list_page(self.kind, decoded, seen)

    def _page(self, query: Dict[str, Any]) -> bytes:
        """One page of a list, as the server sent it (UTF-8 JSON)."""
        response = self._call(limit=self.PAGE_SIZE, **query,
                              _request_timeout=(self.CONNECT_TIMEOUT_SECONDS, 120))
        try:
            return bytes(response.data)
        finally:
            response.release_conn()

    def _watch(self, until: float) -> None:
        # End by the next resync; timeoutSeconds is whole seconds, at least 1.
        seconds = max(1, math.ceil(min(random.uniform(*self.WATCH_SECONDS),
                                       until - time.monotonic())))
        started = time.monotonic()
        response = self._call(watch=True, resource_version=self.resource_version,
                              allow_watch_bookmarks=True, timeout_seconds=seconds,
                              _request_timeout=(self.CONNECT_TIMEOUT_SECONDS,
                                                seconds + self.READ_MARGIN_SECONDS))
        with self._response_lock:
            self._response = response
        if self._source._stopping.is_set():  # stop() ran before we published the response
            self._abort_response()
        try:
            decode = _DECODER.decode
            for line in _json_lines(response):
                # json.loads(bytes) less its encoding sniff: the API server writes UTF-8.
                self._handle(decode(line.decode("utf-8", "surrogatepass")))
        finally:
            with self._response_lock:
                self._response = None
            # Close rather than return it to the pool: a stream we stopped reading may still
            # have bytes in flight that the next request on that connection would read.
            response.close()
            response.release_conn()
            lived = time.monotonic() - started
            if lived >= self.HEALTHY_AFTER_SECONDS:
                self._backoff.reset()
        if lived < 1 and seconds > 1:
            # A stream that ends cleanly at once (a proxy cutting watches): don't spin.
            self._source._stopping.wait(self._backoff.next_delay())

    def _handle(self, event: dict) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone(obj.get("message") or "410 Gone")
            raise _WatchFailed(f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            self._source._count("bookmark")
        elif kind in ("ADDED", "MODIFIED"):
            if self._delivers:
                self._state.put(self.kind, obj, signal=False)
            else:
                self._state.put(self.kind, obj)
            self._source._count(f"{self.kind}_{kind.lower()}")
        elif kind == "DELETED":
            if self._delivers:
                self._state.delete(self.kind, obj, signal=False)
            else:
                self._state.delete(self.kind, obj)
            self._source._count(f"{self.kind}_deleted")
        else:
            log.debug("kubernetes %s watch: ignoring event type %r", self.kind, kind)
            return
        if version:
            self.resource_version = version
        if kind != "BOOKMARK" and self._delivers:
            self._source._watch_changed()

    def _call(self, **kwargs):
        from kubernetes.client.exceptions import ApiException
        try:
            return self._list_function(_preload_content=False, **kwargs)
        except ApiException as error:
            if error.status == 410:
                raise _Gone(f"HTTP 410 {error.reason}") from error
            raise

    def _abort_response(self) -> None:
        """Unblock a read in progress (stop): shut the socket down under it."""
        with self._response_lock:
            response = self._response
        if response is None:
            return
        connection = getattr(response, "connection", None) or getattr(response, "_connection", None)
        sock = getattr(connection, "sock", None)
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
            else:
                response.close()
        except (OSError, ValueError, RuntimeError):
            pass


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
_AFTER_ITEM = re.compile(r"[ \t\n\r]*(?:,[ \t\n\r]*)?")


def _list_items(text: str, fields: Dict[str, Any]) -> Iterator[dict]:
    """The items of a List (JSON text), decoded one at a time; its other top-level fields
    (metadata ...) land in `fields` once the items are consumed.

    json.loads would build every item of the page first: with the items thousands of
    objects at a time, all alive together, which survive into the cyclic GC's oldest
    generation and make it traverse the whole cache again and again during a big sync.
    """
    def skip(index: int, separator: str = "") -> int:
        index = _SPACE.match(text, index).end()
        if separator and text.startswith(separator, index):
            index = _SPACE.match(text, index + 1).end()
        return index

    index = skip(0)
    if not text.startswith("{", index):
        raise ValueError("a list response that is not a JSON object")
    index = skip(index + 1)
    while not text.startswith("}", index):
        key, index = _DECODER.raw_decode(text, index)
        index = skip(index, ":")
        if key == "items" and text.startswith("[", index):
            index = skip(index + 1)
            decode, after_item = _DECODER.raw_decode, _AFTER_ITEM.match
            while not text.startswith("]", index):
                item, index = decode(text, index)
                yield item
                index = after_item(text, index).end()  # skip(index, ","), in one call
            index += 1
        else:
            fields[key], index = _DECODER.raw_decode(text, index)
        index = skip(index, ",")


def _list_head(text: str) -> Optional[Dict[str, Any]]:
    """A List's metadata, read without decoding its items, if it comes before them (as the
    API server sends it); None if it does not."""
    index = _SPACE.match(text, 0).end()
    if not text.startswith("{", index):
        return None
    index = _SPACE.match(text, index + 1).end()
    while not text.startswith("}", index):
        key, index = _DECODER.raw_decode(text, index)
        index = _SPACE.match(text, index).end()
        if not text.startswith(":", index) or key == "items":
            return None
        value, index = _DECODER.raw_decode(text, _SPACE.match(text, index + 1).end())
        if key == "metadata":
            return value if isinstance(value, dict) else None
        index = _SPACE.match(text, index).end()
        if text.startswith(",", index):
            index = _SPACE.match(text, index + 1).end()
    return None


_HEAD_BYTES = 4096  # a List's metadata (kind, apiVersion, resourceVersion, continue) is less


def _page_head(body: bytes) -> Optional[Dict[str, Any]]:
    """_list_head of a page still in bytes: only its start is decoded, unless the metadata
    does not end within it (a truncated start either fails to decode or says nothing)."""
    if len(body) > _HEAD_BYTES:
        try:
            head = _list_head(body[:_HEAD_BYTES].decode("utf-8", "ignore"))
        except ValueError:
            head = None
        if head is not None:
            return head
    return _list_head(body.decode("utf-8"))


class _PageFetcher:
    """The pages of one list, fetched in the order asked on one thread for the whole list
    (daemon: a stopping agent does not wait for it), while the caller parses the page
    before. Not a thread per page: each Thread.start() waits for the new thread to take the
    GIL, which the core's rounds hold during the streamed Services list (0.38 s of the
    listing thread's time over 200 pages, in a profile)."""

    def __init__(self, fetch: Callable[[Dict[str, Any]], bytes], kind: str):
        self._fetch = fetch
        self._asked: "queue.SimpleQueue[Optional[_PageFetch]]" = queue.SimpleQueue()
        threadname.Thread(target=self._run, daemon=True,
                          name=f"kubernetes-{kind}-page").start()

    def ask(self, query: Dict[str, Any]) -> "_PageFetch":
        page = _PageFetch(query)
        self._asked.put(page)
        return page

    def close(self) -> None:
        """The thread ends after the page it is fetching (a list that stopped half-way)."""
        self._asked.put(None)

    def _run(self) -> None:
        while True:
            page = self._asked.get()
            if page is None:
                return
            page._run(self._fetch)


class _PageFetch:
    """One list page, asked of a _PageFetcher: result() waits for it."""

    def __init__(self, query: Dict[str, Any]):
        self._query = query
        self._body: Optional[bytes] = None
        self._error: Optional[BaseException] = None
        self._done = threading.Event()

    def _run(self, fetch: Callable[[Dict[str, Any]], bytes]) -> None:
        query = self._query
        try:
            self._body = fetch(query)
        except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
            self._error = error
        finally:
            self._done.set()

    def result(self) -> bytes:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._body is not None
        return self._body


def _json_lines(response) -> Iterator[bytes]:
    """The watch stream split into lines; one JSON event per line, chunks may split lines."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                break
            line, buffer = buffer[:newline], buffer[newline + 1:]
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


def _describe(error: BaseException) -> str:
    status = getattr(error, "status", None)
    if status:  # ApiException: the Status message is the useful part
        body = getattr(error, "body", None)
        try:
            message = json.loads(body).get("message") if body else None
        except (ValueError, AttributeError):
            message = None
        return f"HTTP {status} {getattr(error, 'reason', '')}".rstrip() + (
            f": {message}" if message else "")
    return f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------

def _import_client():
    try:
        from kubernetes import client, config  # noqa: F401
    except ImportError as error:
        raise KubernetesSourceError(
            "the kubernetes source needs the 'kubernetes' Python package "
            "(pip install 'nodemesh[kubernetes]' or pip install 'kubernetes>=28')") from error
    return client, config


class _RestCalls:
    """The few API calls the source makes (lists, watches, a node), through the ApiClient
    alone. The generated CoreV1Api costs ~0.5 s of CPU on first use (its module: hundreds of
    pydantic-validated methods), on the agent's process while the first lists run; the
    source needs none of that. The same keyword arguments as the generated functions and the
    same answer: with _preload_content=False the urllib3 response, ApiException if the
    status is not 2xx. An argument not named here is refused (KeyError)."""

    # Every query parameter of the generated list functions, by their argument names.
    QUERY = {"limit": "limit", "resource_version": "resourceVersion", "_continue": "continue",
             "watch": "watch", "allow_watch_bookmarks": "allowWatchBookmarks",
             "timeout_seconds": "timeoutSeconds", "field_selector": "fieldSelector",
             "label_selector": "labelSelector", "pretty": "pretty",
             "resource_version_match": "resourceVersionMatch",
             "send_initial_events": "sendInitialEvents", "shard_selector": "shardSelector"}

    def __init__(self, api_client: Any) -> None:
        self._api = api_client

    @staticmethod
    def usable(api_client: Any) -> bool:
        """The client's request builder is there (the pydantic-generated clients; 37.0.2
        here); older clients keep the generated API classes."""
        return all(callable(getattr(api_client, name, None))
                   for name in ("param_serialize", "_call_with_legacy_options"))

    def get(self, path: str, _preload_content: bool = False, _request_timeout: Any = None,
            **params: Any) -> Any:
        if _preload_content:
            raise ValueError("the source reads every answer raw (_preload_content=False)")
        query = [(self.QUERY[name], value) for name, value in params.items()
                 if value is not None]
        request = self._api.param_serialize(
            method="GET", resource_path=path, query_params=query,
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        return self._api._call_with_legacy_options(request, {}, None, False,
                                                   _request_timeout, True)

    def list_service_for_all_namespaces(self, **kwargs: Any) -> Any:
        return self.get("/api/v1/services", **kwargs)

    def list_endpoint_slice_for_all_namespaces(self, **kwargs: Any) -> Any:
        return self.get("/apis/discovery.k8s.io/v1/endpointslices", **kwargs)

    def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
        return self.get("/api/v1/pods", **kwargs)

    def list_cluster_custom_object(self, group: str, version: str, plural: str,
                                   **kwargs: Any) -> Any:
        return self.get(f"/apis/{group}/{version}/{plural}", **kwargs)

    def read_node(self, name: str, **kwargs: Any) -> Any:
        return self.get(f"/api/v1/nodes/{urllib.parse.quote(name, safe='')}", **kwargs)


class KubernetesSource:
    """Desired services from a Kubernetes API server (Services + EndpointSlices)."""

    name = "kubernetes"
    # Big lists are decoded on two CPUs: this process and a worker process
    # (sources/kubernetes_decoder.py). False: every page is parsed in this process.
    # Only where the agent may use three CPUs or more: the first list runs while BCC
    # compiles the datapath in a child process, and on two CPUs the worker takes the CPU the
    # compile needs. Measured on 2 CPUs at 100,000 services (bench/results/controlplane.md):
    # the lists alone 11.1-12.0 s -> 8.2-8.3 s of wall time with the worker, but start -> ready
    # unchanged (25.5 s and 25.4 s against 25.6 s and 23.8 s) for 4.5 s more CPU.
    DECODE_IN_WORKER = len(os.sched_getaffinity(0)) >= 3
    # On two CPUs, the Services list (it runs after the slices, once the compile is done,
    # while the core programs its pages: the worker parses all its pages, and this process
    # only takes them), and the slices' pages once the agent says the compile is over
    # (compile_done): then the second CPU is free.
    DECODE_SERVICES_IN_WORKER = len(os.sched_getaffinity(0)) >= 2
    # The coalescing window. A watch event that finds the source idle (nothing delivered in
    # the last QUIET_SECONDS, no burst held) is delivered at once, by the watch thread that
    # read it: a lone change wakes no other thread of the source. One that comes sooner is
    # part of a burst: the delivery thread holds it until the stream has been quiet
    # QUIET_SECONDS, or MAX_DELAY_SECONDS after the first change it holds, whichever comes
    # first.
    QUIET_SECONDS = 0.01
    MAX_DELAY_SECONDS = 0.05

    def __init__(self, kubeconfig: Optional[str] = None, node_name: Optional[str] = None,
                 resync_seconds: float = 300, registry=None):
        self.kubeconfig = kubeconfig
        self.node_name = node_name
        self.resync_seconds = resync_seconds
        self.node_zone: Optional[str] = None  # the node's topology.kubernetes.io/zone label
        self._client, config = _import_client()
        self._configuration = self._load_configuration(config)
        if registry is None:
            from prometheus_client import REGISTRY
            registry = REGISTRY
        self._metrics = source_metrics(registry)
        # Every series visible at 0; the children kept, so that an event costs no labels()
        # look-up (which checks and sorts the labels every time).
        self._event_counters = {kind: self._metrics.events.labels(source=self.name, kind=kind)
                                for kind in EVENT_KINDS}
        self._last_sync = self._metrics.last_sync.labels(source=self.name)
        self._stopping = threading.Event()
        self._listing = threading.Lock()  # held by the watcher that is listing
        self._slices_listed = threading.Event()  # the services are listed after the slices
        self._compile_done = threading.Event()  # compile_done(): a CPU for the worker
        self._changed = threading.Event()
        # One delivery at a time (a watch thread's or the delivery thread's), so that deltas
        # reach on_change in the order they were taken.
        self._delivering = threading.Lock()
        self._last_delivery = -math.inf  # time.monotonic() of the last delta delivered
        self._burst = False  # a watch left a change to the delivery thread's window
        self._state = _ClusterState(on_dirty=self._changed.set, on_notes=self._report_notes)
        self._decoder = PageDecoder(on_crash=self._decoder_crashed)
        self._mesh_state: Optional[Any] = None  # pods on this node and MeshPolicies
        self._threads: List[threading.Thread] = []
        self._watchers: List[_Watcher] = []
        self._api_clients: List[Any] = []
        self._on_change: Optional[OnChange] = None
        self._on_error: Optional[OnError] = None
        self._node_warned = False

    def _load_configuration(self, config):
        configuration = self._client.Configuration()
        try:
            if self.kubeconfig:
                config.load_kube_config(config_file=self.kubeconfig,
                                        client_configuration=configuration,
                                        persist_config=False)
            else:
                config.load_incluster_config(client_configuration=configuration)
        except (config.ConfigException, OSError, ValueError, TypeError, KeyError) as error:
            if self.kubeconfig:
                raise KubernetesSourceError(
                    f"kubeconfig {self.kubeconfig}: {error}") from error
            raise KubernetesSourceError(
                f"in-cluster Kubernetes config: {error} (outside a pod, pass --kubeconfig FILE)"
            ) from error
        return configuration

    # -- the source contract
    def start(self, on_change: OnChange, on_error: OnError) -> None:
        if self._threads:
            raise RuntimeError("KubernetesSource.start() called twice")
        self._on_change, self._on_error = on_change, on_error
        core, discovery = self._api("CoreV1Api"), self._api("DiscoveryV1Api")
        self._watchers = [
            _Watcher("service", core.list_service_for_all_namespaces, self, self._state,
                     after_list=self._refresh_node_zone, first_list_after=self._slices_listed),
            _Watcher("endpointslice", discovery.list_endpoint_slice_for_all_namespaces, self,
                     self._state, after_list=self._slices_listed.set),
        ]
        if self.node_name:  # workloads are this node's pods: without a node, no identities
            self._watchers += self._mesh_watchers(core)
        self._core = core
        delivery = threadname.Thread(target=self._deliver_loop, name="kubernetes-delivery",
                                    daemon=True)
        self._threads = [*(w.thread for w in self._watchers), delivery]
        for thread in self._threads:
            thread.start()

    def compile_done(self) -> None:
        """The agent's datapath compile (a child process) is over: on two CPUs the decoding
        worker may take the slices' pages too, on the CPU the compiler had."""
        self._compile_done.set()

    def _mesh_watchers(self, core) -> List["_Watcher"]:
        """Pods on this node (field selector spec.nodeName) and MeshPolicies, for workload
        identities and policies (sources/kubernetes_mesh.py)."""
        import functools

        from ..datapath.loader import cgroup2_root
        from .kubernetes_mesh import GROUP, PLURAL, VERSION, MeshState

        def note(message: str) -> None:
            log.warning("kubernetes: %s", message)
            self._report_error(f"kubernetes: {message}")

        self._mesh_state = state = MeshState(self._changed.set, note, cgroup2_root())
        custom = self._api("CustomObjectsApi")
        pods = functools.partial(core.list_pod_for_all_namespaces,
                                 field_selector=f"spec.nodeName={self.node_name}")
        policies = functools.partial(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        return [_Watcher("pod", pods, self, state), _Watcher("meshpolicy", policies, self, state)]

    def stop(self) -> None:
        self._stopping.set()
        self._changed.set()
        for watcher in self._watchers:
            watcher._abort_response()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        for api_client in self._api_clients:
            try:
                api_client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._api_clients = []
        self._decoder.stop()

    def _api(self, generated: str) -> Any:
        """The calls of one watcher, on an ApiClient (a connection pool) of its own: direct
        (_RestCalls), or the client's generated class of that name where it is too old."""
        api_client = self._new_api_client()
        if _RestCalls.usable(api_client):
            return _RestCalls(api_client)
        return getattr(self._client, generated)(api_client)

    # -- what the watchers call
    def _new_api_client(self):
        api_client = self._client.ApiClient(configuration=self._configuration)
        self._api_clients.append(api_client)
        return api_client

    def _count(self, kind: str) -> None:
        counter = self._event_counters.get(kind)
        if counter is None:  # a kind not in EVENT_KINDS
            counter = self._event_counters[kind] = self._metrics.events.labels(
                source=self.name, kind=kind)
        counter.inc()

    def _mark_synced(self) -> None:
        self._last_sync.set_to_current_time()

    def _report_error(self, message: str) -> None:
        if self._on_error is None:
            return
        try:
            self._on_error(message)
        except Exception:  # noqa: BLE001 - a broken callback must not kill the watch
            log.exception("kubernetes source: on_error raised")

    def _refresh_node_zone(self) -> None:
        """Learn this node's zone (for zone-aware preference) after each full service list."""
        if not self.node_name:
            return
        try:
            response = self._core.read_node(self.node_name, _preload_content=False,
                                            _request_timeout=(10, 30))
            try:
                node = json.loads(response.data)
            finally:
                response.release_conn()
        except Exception as error:  # noqa: BLE001 - the zone is a nicety, not a requirement
            if not self._node_warned:
                log.warning("kubernetes: cannot read node %s for its zone: %s", self.node_name,
                            _describe(error))
                self._node_warned = True
            return
        self.node_zone = ((node.get("metadata") or {}).get("labels") or {}).get(ZONE_LABEL)

    def _decoder_crashed(self, why: str) -> None:
        log.warning("kubernetes: %s; its pages are parsed in the agent's process", why)
        self._count("decoder_crash")

    def _report_notes(self, notes: Translation) -> None:
        for message in notes.skipped:
            log.info("kubernetes: %s", message)
        for message in notes.invalid:
            log.warning("kubernetes: %s", message)
            self._report_error(f"kubernetes: {message}")

    # -- delivery
    def _watch_changed(self) -> None:
        """A Service or EndpointSlice watch event changed the cluster state (in the calling
        watch thread). If the source is idle, deliver it now, from this thread: a lone change
        then costs no wake-up of the delivery thread, nor its cold re-read of the state, and
        no wait. Else (a burst, or a delivery under way) leave it to the delivery thread's
        window; the watch never waits for a delivery."""
        if not self._burst and self._state.delivered and \
                time.monotonic() - self._last_delivery >= self.QUIET_SECONDS and \
                self._delivering.acquire(blocking=False):
            try:
                self._deliver()
            except Exception:  # noqa: BLE001 - a bug here must not end the watch
                log.exception("kubernetes source: delivering from the watch failed")
                self._burst = True
                self._changed.set()  # the delivery thread tries again
            finally:
                self._delivering.release()
        else:
            self._burst = True
            self._changed.set()

    def _deliver_loop(self) -> None:
        while not self._stopping.is_set():
            self._changed.wait()
            if self._stopping.is_set():
                return
            self._coalesce()
            if self._stopping.is_set():
                return
            with self._delivering:
                self._deliver()
                # After the delivery: a change a watch applies meanwhile waits for the next
                # window (it set _changed again), and does not go ahead of this delta.
                self._burst = False

    def _deliver(self) -> None:
        """Take what changed and hand it to on_change, if anything did (with _delivering
        held: deltas reach on_change in the order they were taken)."""
        delta = self._state.take_delta()
        mesh = self._mesh_state.take_mesh() if self._mesh_state is not None else None
        if mesh is not None:
            delta = replace(delta, mesh=mesh) if delta is not None else \
                Delta(mesh=mesh, origin="kubernetes")
        if delta is None:
            return  # not synced yet, or nothing the agent would see changed
        # Stamped before the hand-off, so that the watch thread's last work before its next
        # read blocks is the on_change that wakes the core, which may otherwise find the GIL
        # still held and sleep on it once more (~0.15 of changes; 0.12 with this order, one
        # trace each: not a measured gain).
        self._last_delivery = time.monotonic()
        self._mark_synced()
        try:
            self._on_change(delta)
        except Exception:  # noqa: BLE001 - a broken callback must not stop delivery
            log.exception("kubernetes source: on_change raised")

    def _coalesce(self) -> None:
        """Wait for a burst to end: QUIET_SECONDS of silence, at most MAX_DELAY_SECONDS."""
        deadline = time.monotonic() + self.MAX_DELAY_SECONDS
        while True:
            self._changed.clear()
            remaining = min(self.QUIET_SECONDS, deadline - time.monotonic())
            if remaining <= 0 or not self._changed.wait(remaining):
                return
            if self._stopping.is_set():
                return
