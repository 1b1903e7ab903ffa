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
      history we need is compacted away: relist at once and replace the whole collection, so
      a deletion we missed is not kept forever.
    - A dropped connection or any other error: report it, wait a capped exponential backoff
      with jitter, and watch again from the last resourceVersion.
    - Every `resync_seconds` the collection is listed again in full (the watch is asked to
      end by then with timeoutSeconds), which repairs anything that went wrong unnoticed.
    - Lists ask for resourceVersion "0" (served from the API server's watch cache: cheap when
      every node lists at once), except the relist after a 410, which is a consistent read.
    A third thread translates and delivers: it waits until both collections have been listed
    once (never a half-synced set: services without their backends would black-hole traffic),
    then coalesces bursts (a 20 ms quiet period, at most 100 ms after the first change) and
    calls on_change with the complete list when it differs from the last one delivered. Only
    services touched since the last delivery are translated again.

Why raw streaming (`_preload_content=False`) and not `kubernetes.watch.Watch`
    Watch.stream swallows the first 410 and retries with the same, still too old
    resourceVersion, quietly opens a new watch whenever a stream ends, and turns every
    object into the client's model classes. We need to see each of those events to relist,
    back off and count them, and we translate from the API's own JSON (the same shape as the
    fixtures and `kubectl get -o json`). So we call the generated list functions with
    watch=True and `_preload_content=False`, which returns the urllib3 response (non-2xx
    still raises ApiException), and split the chunked stream into JSON lines ourselves.

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

import ipaddress
import json
import logging
import math
import random
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from ..model import Backend, Service, ServicePort, SessionAffinity, canonical_ip
from . import Delta, OnChange, OnError

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_TIMEOUT_SECONDS = 10800  # Kubernetes' default for sessionAffinity ClientIP
SUPPORTED_PROTOCOLS = ("TCP", "UDP")
FAMILY_VERSIONS = {"IPv4": 4, "IPv6": 6}

EVENT_KINDS = (
    "service_added", "service_modified", "service_deleted",
    "endpointslice_added", "endpointslice_modified", "endpointslice_deleted",
    "bookmark", "relist", "gone", "error",
)

ServiceKey = Tuple[str, str]  # (namespace, name)


class KubernetesSourceError(Exception):
    """The source cannot start: the client package is missing or the config is unusable."""


# --------------------------------------------------------------------------------------------
# Translation: API JSON (dicts, exactly as the API server sends them) -> model.Service.
# Pure functions; nothing here talks to a server.
# --------------------------------------------------------------------------------------------

@dataclass
class Translation:
    services: List[Service] = field(default_factory=list)
    # Deliberately not programmed, and worth a log line (an SCTP port, an FQDN slice).
    skipped: List[str] = field(default_factory=list)
    # Objects a valid API server should not produce (an address that is not an IP ...).
    invalid: List[str] = field(default_factory=list)


def translate(services: Iterable[dict], slices: Iterable[dict]) -> Translation:
    """Translate whole collections: every Service with the EndpointSlices that name it."""
    slices_by_service: Dict[ServiceKey, List[dict]] = {}
    for endpoint_slice in slices:
        key = slice_service_key(endpoint_slice)
        if key is not None:
            slices_by_service.setdefault(key, []).append(endpoint_slice)
    out = Translation()
    for service in services:
        translated = translate_service(service, slices_by_service.get(object_key(service), ()),
                                       out)
        if translated is not None:
            out.services.append(translated)
    out.services.sort(key=lambda s: s.key)
    return out


def object_key(obj: dict) -> ServiceKey:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "default", meta.get("name") or "")


def slice_service_key(endpoint_slice: dict) -> Optional[ServiceKey]:
    """The Service an EndpointSlice belongs to (its kubernetes.io/service-name label)."""
    meta = endpoint_slice.get("metadata") or {}
    service_name = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not service_name:
        return None
    return (meta.get("namespace") or "default", service_name)


def translate_service(service: dict, slices: Sequence[dict],
                      notes: Optional[Translation] = None) -> Optional[Service]:
    """One Service and its EndpointSlices -> model.Service, or None if it has nothing to program.

    Headless (clusterIP None), ExternalName and address-less services are skipped silently:
    they are normal and numerous. Other skips land in `notes`.
    """
    notes = notes if notes is not None else Translation()
    namespace, name = object_key(service)
    where = f"service {namespace}/{name}"
    spec = service.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return None
    vips = _cluster_ips(spec, where, notes)
    if not vips:
        return None

    ports = []
    for port in spec.get("ports") or ():
        protocol = port.get("protocol") or "TCP"
        port_name = port.get("name") or ""
        if protocol not in SUPPORTED_PROTOCOLS:
            notes.skipped.append(f"{where}: port {port_name or port.get('port')}: protocol "
                                 f"{protocol} is not supported; skipped")
            continue
        ports.append((port, port_name, protocol))
    if not ports:
        notes.skipped.append(f"{where}: no TCP or UDP port; skipped")
        return None

    families = {ipaddress.ip_address(vip).version for vip in vips}
    backends = _backends(slices, {name for _, name, _ in ports}, families, where, notes)
    first_resolved: Dict[str, int] = {}
    for backend in backends:
        for port_name, number in backend.ports:
            first_resolved.setdefault(port_name, number)

    service_ports = []
    for port, port_name, protocol in ports:
        target = port.get("targetPort", port["port"])
        if isinstance(target, str) and not target.isdigit():
            # A named targetPort is resolved per pod; the slices carry the numbers. The
            # service-level value is only a fallback for backends without their own.
            target_port = first_resolved.get(port_name, port["port"])
        else:
            target_port = int(target)
        service_ports.append(ServicePort(port=int(port["port"]), target_port=target_port,
                                         protocol=protocol, name=port_name,
                                         node_port=port.get("nodePort") or None))

    affinity = None
    if spec.get("sessionAffinity") == "ClientIP":
        client_ip = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
        affinity = SessionAffinity(
            timeout_seconds=int(client_ip.get("timeoutSeconds")
                                or DEFAULT_AFFINITY_TIMEOUT_SECONDS))

    labels = (service.get("metadata") or {}).get("labels") or {}
    return Service(
        name=name, namespace=namespace, vip=vips[0], extra_vips=tuple(vips[1:]),
        ports=tuple(service_ports), backends=tuple(backends), session_affinity=affinity,
        internal_traffic_policy=spec.get("internalTrafficPolicy") or "Cluster",
        traffic_distribution=spec.get("trafficDistribution") or None,
        labels=tuple(sorted(labels.items())),
    )


def _cluster_ips(spec: dict, where: str, notes: Translation) -> List[str]:
    """The service's virtual addresses, primary first; clusterIPs[i] is of ipFamilies[i]."""
    cluster_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not cluster_ips or cluster_ips[0] == "None":
        return []
    families = spec.get("ipFamilies") or []
    vips = []
    for index, text in enumerate(cluster_ips):
        try:
            vip = canonical_ip(text)
        except ValueError:
            notes.invalid.append(f"{where}: spec.clusterIPs[{index}]: {text!r} is not an IP "
                                 "address; skipped")
            continue
        family = families[index] if index < len(families) else None
        if family is not None and FAMILY_VERSIONS.get(family) != ipaddress.ip_address(vip).version:
            notes.invalid.append(f"{where}: spec.clusterIPs[{index}]: {vip} is not of family "
                                 f"{family} (spec.ipFamilies[{index}]); skipped")
            continue
        vips.append(vip)
    return vips


def endpoint_conditions(endpoint: dict) -> Tuple[bool, bool, bool]:
    """(ready, serving, terminating) with the API's meaning of an unset (nil) condition:
    ready nil is true, serving nil is ready, terminating nil is false."""
    conditions = endpoint.get("conditions") or {}
    ready = conditions.get("ready")
    ready = True if ready is None else bool(ready)
    serving = conditions.get("serving")
    serving = ready if serving is None else bool(serving)
    terminating = bool(conditions.get("terminating") or False)
    return ready, serving, terminating


def _backends(slices: Sequence[dict], port_names: Set[str], families: Set[int], where: str,
              notes: Translation) -> List[Backend]:
    """Every endpoint address of the service's slices, one Backend each, deduplicated.

    An address can sit in two slices for a moment (the controller moving endpoints between
    slices); the first slice by name wins and the other only adds port numbers it lacks.
    """
    by_address: Dict[str, Backend] = {}
    for endpoint_slice in sorted(slices, key=lambda s: (s.get("metadata") or {}).get("name", "")):
        slice_name = (endpoint_slice.get("metadata") or {}).get("name", "")
        address_type = endpoint_slice.get("addressType")
        if FAMILY_VERSIONS.get(address_type) not in families:
            notes.skipped.append(f"{where}: endpointslice {slice_name}: addressType "
                                 f"{address_type} does not match the service; skipped")
            continue
        # Slice ports are named after the service port; their number is the resolved target.
        ports = tuple((p.get("name") or "", int(p["port"]))
                      for p in endpoint_slice.get("ports") or ()
                      if p.get("port") is not None and (p.get("name") or "") in port_names)
        for endpoint in endpoint_slice.get("endpoints") or ():
            ready, serving, terminating = endpoint_conditions(endpoint)
            for text in endpoint.get("addresses") or ():
                try:
                    address = canonical_ip(text)
                except ValueError:
                    notes.invalid.append(f"{where}: endpointslice {slice_name}: {text!r} is "
                                         "not an IP address; skipped")
                    continue
                if ipaddress.ip_address(address).version != FAMILY_VERSIONS[address_type]:
                    notes.invalid.append(f"{where}: endpointslice {slice_name}: {address} is "
                                         f"not {address_type}; skipped")
                    continue
                known = by_address.get(address)
                if known is not None:
                    names = {name for name, _ in known.ports}
                    extra = tuple(p for p in ports if p[0] not in names)
                    if extra:
                        by_address[address] = replace(known, ports=known.ports + extra)
                    continue
                by_address[address] = Backend(
                    address=address, weight=1, node=endpoint.get("nodeName") or None,
                    zone=endpoint.get("zone") or None, ready=ready, serving=serving,
                    terminating=terminating, ports=ports)
    return sorted(by_address.values(), key=lambda b: (b.family, ipaddress.ip_address(b.address)))


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

class _ClusterState:
    """Raw Services and EndpointSlices, and which services changed since the last delivery."""

    def __init__(self, on_dirty: Callable[[], None]):
        self._lock = threading.Lock()
        self._on_dirty = on_dirty
        self.services: Dict[ServiceKey, dict] = {}
        self.slices: Dict[ServiceKey, dict] = {}          # keyed by the slice's own name
        self._slices_of: Dict[ServiceKey, Set[ServiceKey]] = {}
        self._dirty: Set[ServiceKey] = set()
        self.listed: Set[str] = set()                      # collections listed at least once

    # -- services
    def put_service(self, obj: dict) -> None:
        with self._lock:
            key = object_key(obj)
            self.services[key] = obj
            self._dirty.add(key)
        self._on_dirty()

    def delete_service(self, obj: dict) -> None:
        with self._lock:
            key = object_key(obj)
            self.services.pop(key, None)
            self._dirty.add(key)
        self._on_dirty()

    def replace_services(self, items: List[dict]) -> None:
        fresh = {object_key(obj): obj for obj in items}
        with self._lock:
            for key in set(self.services) | set(fresh):
                if _version(self.services.get(key)) != _version(fresh.get(key)):
                    self._dirty.add(key)
            self.services = fresh
            self.listed.add("service")
        self._on_dirty()

    # -- endpointslices
    def put_slice(self, obj: dict) -> None:
        with self._lock:
            self._put_slice_locked(obj)
        self._on_dirty()

    def delete_slice(self, obj: dict) -> None:
        with self._lock:
            self._drop_slice_locked(object_key(obj))
        self._on_dirty()

    def replace_slices(self, items: List[dict]) -> None:
        fresh = {object_key(obj): obj for obj in items}
        with self._lock:
            for key in set(self.slices) - set(fresh):
                self._drop_slice_locked(key)
            for key, obj in fresh.items():
                if _version(self.slices.get(key)) != _version(obj):
                    self._put_slice_locked(obj)
            self.listed.add("endpointslice")
        self._on_dirty()

    def _put_slice_locked(self, obj: dict) -> None:
        key = object_key(obj)
        self._drop_slice_locked(key)  # its service label may have changed
        self.slices[key] = obj
        service = slice_service_key(obj)
        if service is not None:
            self._slices_of.setdefault(service, set()).add(key)
            self._dirty.add(service)

    def _drop_slice_locked(self, key: ServiceKey) -> None:
        old = self.slices.pop(key, None)
        service = slice_service_key(old) if old is not None else None
        if service is not None:
            members = self._slices_of.get(service)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._slices_of[service]
            self._dirty.add(service)

    # -- delivery
    def is_synced(self) -> bool:
        with self._lock:
            return {"service", "endpointslice"} <= self.listed

    def take_dirty(self) -> Dict[ServiceKey, Tuple[Optional[dict], List[dict]]]:
        """The changed services with their current raw Service and slices; clears the set."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            return {key: (self.services.get(key),
                          [self.slices[k] for k in self._slices_of.get(key, ())])
                    for key in dirty}


def _version(obj: Optional[dict]) -> Optional[str]:
    return None if obj is None else (obj.get("metadata") or {}).get("resourceVersion")


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

    def __init__(self, kind: str, list_function: Callable[..., Any], source: "KubernetesSource",
                 put: Callable[[dict], None], delete: Callable[[dict], None],
                 replace: Callable[[List[dict]], None],
                 after_list: Optional[Callable[[], None]] = None):
        self.thread = threading.Thread(target=self.run, name=f"kubernetes-{kind}-watch",
                                       daemon=True)
        self.kind = kind
        self._list_function = list_function
        self._source = source
        self._put, self._delete, self._replace = put, delete, replace
        self._after_list = after_list
        self._backoff = _Backoff()
        self._response_lock = threading.Lock()
        self._response = None
        self.resource_version: Optional[str] = None
        self._consistent_list = False

    def run(self) -> None:
        stopping = self._source._stopping
        resync_at = 0.0
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
        response = self._call(resource_version=None if self._consistent_list else "0",
                              _request_timeout=(self.CONNECT_TIMEOUT_SECONDS, 120))
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        items = body.get("items") or []
        self._replace(items)
        self._consistent_list = False
        self._backoff.reset()  # the server answers: a later failure starts from a short wait
        self.resource_version = (body.get("metadata") or {}).get("resourceVersion")
        self._source._count("relist")
        self._source._mark_synced()
        log.info("kubernetes %s: listed %d at resourceVersion %s", self.kind, len(items),
                 self.resource_version)
        if self._after_list is not None:
            self._after_list()

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
            for line in _json_lines(response):
                self._handle(json.loads(line))
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
            self._put(obj)
            self._source._count(f"{self.kind}_{kind.lower()}")
        elif kind == "DELETED":
            self._delete(obj)
            self._source._count(f"{self.kind}_deleted")
        else:
            log.debug("kubernetes %s watch: ignoring event type %r", self.kind, kind)
            return
        if version:
            self.resource_version = version

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


class KubernetesSource:
    """Desired services from a Kubernetes API server (Services + EndpointSlices)."""

    name = "kubernetes"
    QUIET_SECONDS = 0.02      # deliver once the stream has been quiet this long...
    MAX_DELAY_SECONDS = 0.1   # ...or this long after the first change, whichever comes first

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
        for kind in EVENT_KINDS:  # make every series visible at 0
            self._metrics.events.labels(source=self.name, kind=kind)
        self._stopping = threading.Event()
        self._changed = threading.Event()
        self._state = _ClusterState(on_dirty=self._changed.set)
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
        core = self._client.CoreV1Api(self._new_api_client())
        discovery = self._client.DiscoveryV1Api(self._new_api_client())
        state = self._state
        self._watchers = [
            _Watcher("service", core.list_service_for_all_namespaces, self,
                     put=state.put_service, delete=state.delete_service,
                     replace=state.replace_services, after_list=self._refresh_node_zone),
            _Watcher("endpointslice", discovery.list_endpoint_slice_for_all_namespaces, self,
                     put=state.put_slice, delete=state.delete_slice,
                     replace=state.replace_slices),
        ]
        self._core = core
        delivery = threading.Thread(target=self._deliver_loop, name="kubernetes-delivery",
                                    daemon=True)
        self._threads = [*(w.thread for w in self._watchers), delivery]
        for thread in self._threads:
            thread.start()

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

    # -- what the watchers call
    def _new_api_client(self):
        api_client = self._client.ApiClient(configuration=self._configuration)
        self._api_clients.append(api_client)
        return api_client

    def _count(self, kind: str) -> None:
        self._metrics.events.labels(source=self.name, kind=kind).inc()

    def _mark_synced(self) -> None:
        self._metrics.last_sync.labels(source=self.name).set_to_current_time()

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

    # -- delivery
    def _deliver_loop(self) -> None:
        translated: Dict[ServiceKey, Service] = {}
        delivered: Optional[List[Service]] = None
        while not self._stopping.is_set():
            self._changed.wait()
            if self._stopping.is_set():
                return
            self._coalesce()
            if self._stopping.is_set():
                return
            if not self._state.is_synced():
                continue  # the other collection's first list will wake us again
            notes = Translation()
            for key, (service, slices) in self._state.take_dirty().items():
                result = translate_service(service, slices, notes) if service else None
                if result is None:
                    translated.pop(key, None)
                else:
                    translated[key] = result
            for message in notes.skipped:
                log.info("kubernetes: %s", message)
            for message in notes.invalid:
                log.warning("kubernetes: %s", message)
                self._report_error(f"kubernetes: {message}")
            services = [translated[key] for key in sorted(translated)]
            if services == delivered:
                continue
            delivered = services
            try:
                self._on_change(Delta(upserts=tuple(services), full=True, origin="kubernetes"))
            except Exception:  # noqa: BLE001 - a broken callback must not stop delivery
                log.exception("kubernetes source: on_change raised")
            self._mark_synced()

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
