"""Prometheus metrics, read from the kernel's maps at scrape time.

A custom collector sums the per-CPU counters when Prometheus asks, so the numbers are what the
kernel counted, with no timer and no copy that can go stale. It reads the snapshot the core
loop published, never the writer's state, so a scrape never delays a change. The HTTP server
also answers /healthz (the process is alive) and /readyz (hooks attached and the first sync
applied).

Detail level (--metrics-detail), which bounds the series a node exports:
  service  (default) per-service series only: {namespace, service, port, protocol}. At
           100,000 services that is about 200,000 series.
  backend  adds per-backend series ({namespace, service, backend}: connections and health),
           three or more times as many. Ask for it on nodes with a few thousand services.
"""
from __future__ import annotations

import logging
import platform
import socket
from typing import TYPE_CHECKING, Dict, Iterator, Tuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__, serving
from .datapath import maps as m
from .reconciler import PlainFrontend
from .snapshot import Snapshot, label_value

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger(__name__)

DETAIL_SERVICE, DETAIL_BACKEND = "service", "backend"


def backend_label(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class AgentMetrics:
    """Metrics the agent itself keeps (not read from maps)."""

    def __init__(self, registry: CollectorRegistry):
        self.reloads = Counter("nodemesh_config_reloads", "Desired-state updates applied",
                               ["source"], registry=registry)
        self.reload_failures = Counter(
            "nodemesh_config_reload_failures",
            "Desired-state updates rejected (invalid config); the last good state keeps serving",
            ["source"], registry=registry)
        self.last_reload_success = Gauge(
            "nodemesh_config_last_reload_successful",
            "1 if the last config load was good, 0 if it was rejected", ["source"],
            registry=registry)
        self.reconcile_errors = Counter(
            "nodemesh_reconcile_errors", "Frontend operations that failed in a round (each is "
            "retried with backoff)", registry=registry)
        self.reconcile_runs = Counter("nodemesh_reconcile_runs", "Reconciler rounds that wrote",
                                      registry=registry)
        self.reconcile_writes = Counter("nodemesh_reconcile_map_writes",
                                        "Map elements written or deleted by the reconciler",
                                        registry=registry)
        self.reconcile_last_seconds = Gauge("nodemesh_reconcile_last_duration_seconds",
                                            "Duration of the last reconciler round that wrote",
                                            registry=registry)
        self.ready = Gauge("nodemesh_ready", "1 once the hooks are attached and the first "
                                             "sync is applied", registry=registry)
        self.worker_restarts = Counter("nodemesh_worker_restarts",
                                       "Agent workers restarted after a crash", ["worker"],
                                       registry=registry)


class DatapathCollector(Collector):
    def __init__(self, agent: "Agent", detail: str = DETAIL_SERVICE):
        self.agent = agent
        self.detail = detail

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("nodemesh_build_info", "nodemesh build and kernel",
                                 labels=["version", "kernel", "abi"])
        info.add_metric([__version__, platform.release(), str(m.ABI_VERSION)], 1)
        yield info
        maps = self.agent.maps
        if maps is None:
            return
        try:
            yield from self._from_kernel(maps)
        except OSError as e:  # a scrape must not take the agent down
            log.warning("reading maps for metrics failed: %s", e)

    def _from_kernel(self, maps: m.Maps) -> Iterator[Metric]:
        snap = self.agent.snapshot
        yield GaugeMetricFamily("nodemesh_services", "Services in the desired state",
                                value=len(snap.services))
        yield GaugeMetricFamily("nodemesh_frontends",
                                "Frontends (VIP, port, protocol) known to the reconciler",
                                value=len(snap.frontends))
        yield GaugeMetricFamily("nodemesh_frontends_failing",
                                "Frontends whose last write or delete failed (retried with "
                                "backoff; see nodemesh services)", value=snap.failing)
        entries = {"services": 0, "backends": 0, "maglev": 0}
        maglev_rows = 0
        for p in snap.frontends.programmed_states():  # (no view built)
            entries["services"] += 1 + p.slot_count
            # not len(backend_ids): a PlainFrontend's would choose its backends again
            entries["backends"] += p.backend_count
            if p.maglev_rows:
                entries["maglev"] += 1
                maglev_rows += p.maglev_rows
        yield GaugeMetricFamily("nodemesh_maglev_rows",
                                "Rows of the Maglev tables in use (4 bytes each in the kernel, "
                                "and as much again for each table's spare)", value=maglev_rows)
        yield from self._maps(maps, entries)
        ev = CounterMetricFamily("nodemesh_datapath_events",
                                 "Datapath events by kind (races retried, reverse translations "
                                 "...)", labels=["event"])
        for name, v in maps.counters().items():
            ev.add_metric([name], v)
        yield ev
        core = self.agent.core
        if core is not None and core.policy is not None:
            # One series per policed service and verdict: bounded by the policies written.
            pv = CounterMetricFamily("nodemesh_policy_verdicts",
                                     "Connections (and unconnected UDP datagrams) the kernel "
                                     "denied (EPERM) or allowed and recorded (audit) by policy",
                                     labels=["namespace", "service", "verdict"])
            for (ns, name), v in sorted(core.policy.stats().items()):
                pv.add_metric([ns, name, "denied"], v["denied"])
                pv.add_metric([ns, name, "audit"], v["audited"])
            yield pv

    def render_large(self) -> bytes:
        """The per-service (and, at the backend detail level, per-backend) families, written
        as exposition text directly: at 100,000 services prometheus_client's generic path
        takes 3 s for what this does in a tenth of that."""
        maps = self.agent.maps
        if maps is None:
            return b""
        snap = self.agent.snapshot
        try:
            svc_stats = maps.percpu_sums("svc_stats")
            per_backend = self.detail == DETAIL_BACKEND
            be_stats = maps.percpu_sums("backend_stats") if per_backend else {}
            overflows = maps.percpu_sums("conn_overflows")
            active = connection_counts(maps) if per_backend else {}
        except OSError as e:  # a scrape must not take the agent down
            log.warning("reading maps for metrics failed: %s", e)
            return b""
        # Label sets are formatted as strings, once a frontend a scrape: cheaper to count and
        # write than tuples.
        conns: Dict[str, int] = {}
        refused: Dict[str, int] = {}
        be_conns: Dict[str, int] = {}
        be_active: Dict[str, int] = {}
        over: Dict[str, int] = {}
        redirects: Dict[str, int] = {}  # per service (namespace, service), as documented
        plain = PlainFrontend
        # Frontends in the kernel and desired (not those being written for the first time or
        # adopted and not desired), read from the snapshot without building their views.
        for p, d in snap.frontends.programmed():
            if type(d) is plain:
                svc = d.svc
                namespace, name = svc.namespace, svc.name
            else:
                namespace, name = d.namespace, d.service
            # formatted here: the snapshot keeps no label strings
            service_labels = f'namespace="{label_value(namespace)}",' \
                             f'service="{label_value(name)}"'
            key = p.key
            labels = f'{service_labels},port="{key.port}",protocol="{key.protocol}"'
            st = svc_stats.get(p.svc_id)  # the datapath creates it on first use
            if st is None:
                conns.setdefault(labels, 0)
                refused.setdefault(labels, 0)
            else:
                conns[labels] = conns.get(labels, 0) + st["connections"]
                refused[labels] = refused.get(labels, 0) + st["no_backend"]
            if p.limits != (0, 0):  # only limited frontends: the series stay bounded
                over[labels] = over.get(labels, 0) + \
                    overflows.get(p.svc_id, {}).get("value", 0)
            if st is not None and st["proxy_redirects"]:
                redirects[service_labels] = redirects.get(service_labels, 0) \
                    + st["proxy_redirects"]
            if per_backend:
                for (address, port), ident in p.backend_ids.items():
                    bl = f'{service_labels},backend="{backend_label(address, port)}"'
                    be_conns[bl] = be_conns.get(bl, 0) + \
                        be_stats.get(ident, {}).get("connections", 0)
                    if p.key.protocol == "TCP":
                        be_active[bl] = active.get((address, port), 0)
        out = [_text("nodemesh_service_connections", "counter",
                     "Connections (and unconnected UDP datagrams) balanced to a backend, "
                     "counted in the kernel", conns),
               _text("nodemesh_service_no_backend", "counter",
                     "Connections refused (ECONNREFUSED) because the service had no backend",
                     refused),
               _text("nodemesh_connection_limit_overflows", "counter",
                     "Connections refused (ECONNREFUSED) by connectionLimits: every backend at "
                     "maxConnectionsPerBackend, or the service at maxConnections", over),
               _text("nodemesh_proxy_redirects", "counter",
                     "TCP connects sent to the node-local proxy instead of a backend",
                     redirects)]
        if per_backend:
            out.append(_text("nodemesh_backend_active_connections", "gauge",
                             "TCP connections from this node to the backend, established or "
                             "being established, counted by the kernel", be_active))
            out.append(_text("nodemesh_backend_connections", "counter",
                             "Connections the kernel sent to this backend", be_conns))
            out.append(_text("nodemesh_backend_healthy", "gauge",
                             "1 if the backend is ready, not terminating, passing its health "
                             "checks and not ejected, else 0", self._healthy(snap)))
        return "".join(out).encode()

    def _healthy(self, snap: Snapshot) -> Dict[str, int]:
        core = self.agent.core
        unhealthy = core.selection_context().unhealthy if core is not None else frozenset()
        healthy: Dict[str, int] = {}
        for svc in snap.services.values():
            labels = f'namespace="{label_value(svc.namespace)}",service="{label_value(svc.name)}"'
            for b in svc.backends:
                ok = int(b.ready and not b.terminating and
                         (svc.namespace, svc.name, b.address) not in unhealthy)
                for sp in svc.ports:
                    healthy[f'{labels},backend="{backend_label(b.address, b.target_port(sp))}"'] \
                        = ok
        return healthy

    def _maps(self, maps: m.Maps, known: Dict[str, int]) -> Iterator[Metric]:
        entries = GaugeMetricFamily("nodemesh_bpf_map_entries", "Elements in a BPF map",
                                    labels=["map"])
        capacity = GaugeMetricFamily("nodemesh_bpf_map_capacity", "max_entries of a BPF map",
                                     labels=["map"])
        for spec in m.MAPS:
            cap = self.agent.sizes.capacity(spec)
            if spec.map_type in (m.bpfsys.MAP_TYPE_ARRAY, m.bpfsys.MAP_TYPE_PERCPU_ARRAY):
                n = cap  # arrays are always full
            elif spec.name in known:
                n = known[spec.name]  # what the reconciler wrote: no walk of 400,000 entries
            elif spec.map_type == m.bpfsys.MAP_TYPE_SK_STORAGE:
                continue  # per-socket storage cannot be walked from user space
            elif spec.percpu:
                continue  # stats maps: one entry per id that saw traffic, counted above
            else:
                n = maps.count(spec.name)
            entries.add_metric([spec.name], n)
            capacity.add_metric([spec.name], cap)
        yield entries
        yield capacity


def connection_counts(maps: m.Maps) -> Dict[Tuple[str, int], int]:
    """{(address, port): active + pending TCP connections} from the kernel's counts."""
    out: Dict[Tuple[str, int], int] = {}
    for key, value in maps.items("conn_counts"):
        ep = (m.decode_addr(key.family, key.addr), m.port_host(key.port))
        out[ep] = out.get(ep, 0) + int(value.active) + int(value.pending)
    return out


def _text(name: str, kind: str, doc: str, values: Dict[str, int]) -> str:
    """One family in the text exposition format (0.0.4), as prometheus_client writes it;
    `values` maps a formatted label set (a="x",b="y") to its value."""
    sample = f"{name}_total" if kind == "counter" else name
    lines = [f"# HELP {sample} {doc}\n", f"# TYPE {sample} {kind}\n"]
    # Unsorted: Prometheus needs no order, and sorting 100,000 label sets costs a tenth of a
    # second per scrape. Counters of idle services are 0, the one value not worth formatting.
    lines.extend(f"{sample}{{{labels}}} {floatToGoString(v) if v else '0.0'}\n"
                 for labels, v in values.items())
    return "".join(lines)


def exposition(registry: CollectorRegistry, collector: DatapathCollector) -> bytes:
    """The whole /metrics body: the registry's families, then the large ones."""
    return generate_latest(registry) + collector.render_large()


class _Handler(serving.Handler):
    agent: "Agent"
    registry: CollectorRegistry

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, ctype, code = exposition(self.registry, self.agent.datapath_metrics), \
                CONTENT_TYPE_LATEST, 200
        elif path == "/healthz":
            body, ctype, code = b"ok\n", "text/plain", 200
        elif path == "/readyz":
            ready = self.agent.ready
            body = b"ready\n" if ready else b"not ready\n"
            ctype, code = "text/plain", 200 if ready else 503
        else:
            body, ctype, code = b"not found\n", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        log.debug("metrics: " + fmt, *args)


# Prometheus needs one or two at a time; the cap keeps idle clients from using up the
# agent's descriptors (see serving).
MAX_CONNECTIONS = 128


class MetricsServer:
    def __init__(self, agent: "Agent", registry: CollectorRegistry, addr: str):
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host or "0.0.0.0", int(port)))
            sock.listen(serving.BACKLOG)
        except OSError:
            sock.close()
            raise
        handler = type("Handler", (_Handler,), {"agent": agent, "registry": registry})
        self.server = serving.Server(sock, handler, "metrics", registry, MAX_CONNECTIONS)

    @property
    def address(self) -> str:
        host, port = self.server.socket.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
