"""Prometheus metrics, read from the kernel's maps at scrape time.

A custom collector sums the per-CPU counters when Prometheus asks, so the numbers are what the
kernel counted, with no timer and no copy that can go stale. The HTTP server also answers
/healthz (the process is alive) and /readyz (hooks attached and the first sync applied).
"""
from __future__ import annotations

import logging
import platform
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Dict, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, \
    generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import __version__
from .datapath import maps as m

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger(__name__)


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
            "nodemesh_reconcile_errors", "Frontends that could not be programmed in a run",
            registry=registry)
        self.reconcile_runs = Counter("nodemesh_reconcile_runs", "Reconciler runs",
                                      registry=registry)
        self.reconcile_writes = Counter("nodemesh_reconcile_map_writes",
                                        "Map elements written or deleted by the reconciler",
                                        registry=registry)
        self.reconcile_last_seconds = Gauge("nodemesh_reconcile_last_duration_seconds",
                                            "Duration of the last reconciler run",
                                            registry=registry)
        self.ready = Gauge("nodemesh_ready", "1 once the hooks are attached and the first "
                                             "sync is applied", registry=registry)


class DatapathCollector(Collector):
    def __init__(self, agent: "Agent"):
        self.agent = agent

    def collect(self):
        info = GaugeMetricFamily("nodemesh_build_info", "nodemesh build and kernel",
                                 labels=["version", "kernel", "abi"])
        info.add_metric([__version__, platform.release(), str(m.ABI_VERSION)], 1)
        yield info
        rec, maps = self.agent.reconciler, self.agent.maps
        if rec is None or maps is None:
            return
        try:
            yield from self._from_kernel(rec, maps)
        except OSError as e:  # a scrape must not take the agent down
            log.warning("reading maps for metrics failed: %s", e)

    def _from_kernel(self, rec, maps):
        snapshot = rec.snapshot()
        svc_stats = maps.percpu_sums("svc_stats")
        be_stats = maps.percpu_sums("backend_stats")

        conns: Dict[Tuple[str, ...], int] = {}
        refused: Dict[Tuple[str, ...], int] = {}
        be_conns: Dict[Tuple[str, ...], int] = {}
        healthy: Dict[Tuple[str, ...], int] = {}
        services = set()
        for fe in snapshot:
            if not fe["service"]:
                continue  # adopted but not (yet) desired
            services.add((fe["namespace"], fe["service"]))
            labels = (fe["namespace"], fe["service"], str(fe["port"]), fe["protocol"])
            st = svc_stats.get(fe["svc_id"], {})
            conns[labels] = conns.get(labels, 0) + st.get("connections", 0)
            refused[labels] = refused.get(labels, 0) + st.get("no_backend", 0)
            for be in fe["backends"]:
                bl = (fe["namespace"], fe["service"], backend_label(be["address"], be["port"]))
                be_conns[bl] = be_conns.get(bl, 0) + \
                    be_stats.get(be["id"], {}).get("connections", 0)
        ctx = self.agent.selection_context()  # once per scrape, not once per backend
        for svc in self.agent.reconciler.services:
            for b in svc.backends:
                ok = 1 if self.agent.backend_healthy(svc, b, ctx) else 0
                for sp in svc.ports:
                    healthy[(svc.namespace, svc.name,
                             backend_label(b.address, b.target_port(sp)))] = ok

        svc_labels = ["namespace", "service", "port", "protocol"]
        be_labels = ["namespace", "service", "backend"]
        yield _family(CounterMetricFamily, "nodemesh_service_connections",
                      "Connections (and unconnected UDP datagrams) balanced to a backend, "
                      "counted in the kernel", svc_labels, conns)
        yield _family(CounterMetricFamily, "nodemesh_service_no_backend",
                      "Connections refused (ECONNREFUSED) because the service had no backend",
                      svc_labels, refused)
        yield _family(CounterMetricFamily, "nodemesh_backend_connections",
                      "Connections the kernel sent to this backend", be_labels, be_conns)
        yield _family(GaugeMetricFamily, "nodemesh_backend_healthy",
                      "1 if the backend is ready, not terminating, passing its health checks "
                      "and not ejected, else 0", be_labels, healthy)
        yield GaugeMetricFamily("nodemesh_services", "Services programmed in the datapath",
                                value=len(services))
        yield GaugeMetricFamily("nodemesh_frontends",
                                "Frontends (VIP, port, protocol) programmed in the datapath",
                                value=len(snapshot))

        entries = GaugeMetricFamily("nodemesh_bpf_map_entries", "Elements in a BPF map",
                                    labels=["map"])
        capacity = GaugeMetricFamily("nodemesh_bpf_map_capacity", "max_entries of a BPF map",
                                     labels=["map"])
        for spec in m.MAPS:
            cap = self.agent.sizes.capacity(spec)
            if spec.map_type in (m.bpfsys.MAP_TYPE_ARRAY, m.bpfsys.MAP_TYPE_PERCPU_ARRAY):
                n = cap  # arrays are always full
            elif spec.name == "svc_stats":
                n = len(svc_stats)
            elif spec.name == "backend_stats":
                n = len(be_stats)
            else:
                n = maps.count(spec.name)
            entries.add_metric([spec.name], n)
            capacity.add_metric([spec.name], cap)
        yield entries
        yield capacity

        ev = CounterMetricFamily("nodemesh_datapath_events",
                                 "Datapath events by kind (races retried, reverse translations "
                                 "...)", labels=["event"])
        for name, v in maps.counters().items():
            ev.add_metric([name], v)
        yield ev


def _family(cls, name: str, doc: str, labels, values: Dict[Tuple[str, ...], float]):
    fam = cls(name, doc, labels=labels)
    for label_values, v in sorted(values.items()):
        fam.add_metric(label_values, v)
    return fam


class _Handler(BaseHTTPRequestHandler):
    agent: "Agent"
    registry: CollectorRegistry

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, ctype, code = generate_latest(self.registry), CONTENT_TYPE_LATEST, 200
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


class MetricsServer:
    def __init__(self, agent: "Agent", registry: CollectorRegistry, addr: str):
        host, _, port = addr.rpartition(":")
        handler = type("Handler", (_Handler,), {"agent": agent, "registry": registry})
        server_cls = ThreadingHTTPServer
        if ":" in host.strip("[]"):
            import socket

            server_cls = type("V6Server", (ThreadingHTTPServer,),
                              {"address_family": socket.AF_INET6})
        self.httpd = server_cls((host.strip("[]") or "0.0.0.0", int(port)), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                       daemon=True)

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
