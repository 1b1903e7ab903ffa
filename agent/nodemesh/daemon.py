"""The agent: source -> reconciler -> kernel, with metrics and the admin API around it.

One thread (the caller of run()) owns the reconciler: sources hand it complete desired sets
through a one-element mailbox, so a burst of changes is applied once, in order, by one writer.

Start:  load programs against the pinned maps (adopting them) -> adopt programmed state ->
        first sync -> attach (swap into existing links) -> ready.
Stop:   SIGTERM/SIGINT end the process and leave the datapath in the kernel, serving the last
        state; the next agent adopts it. `nodemesh cleanup` is what removes it.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from prometheus_client import CollectorRegistry

from . import __version__, api, metrics, selection
from .datapath import loader
from .datapath import maps as m
from .model import Backend, Service
from .outlier import OutlierDetector
from .reconciler import ApplyResult, Reconciler
from .sources import Delta

log = logging.getLogger(__name__)


@dataclass
class Options:
    config: Optional[str] = None
    source: str = "file"
    kubeconfig: Optional[str] = None
    metrics_addr: str = "127.0.0.1:9464"
    cgroup: Optional[str] = None
    bpffs: str = loader.DEFAULT_BPFFS
    admin_socket: str = api.DEFAULT_SOCKET
    node_name: Optional[str] = None
    node_zone: Optional[str] = None
    resync_seconds: float = 30.0
    sizes: m.MapSizes = field(default_factory=m.MapSizes)


class Agent:
    def __init__(self, opts: Options):
        self.opts = opts
        self.sizes = opts.sizes
        self.registry = CollectorRegistry()
        self.own_metrics = metrics.AgentMetrics(self.registry)
        self.registry.register(metrics.DatapathCollector(self))
        self.datapath: Optional[loader.Datapath] = None
        self.maps: Optional[m.Maps] = None
        self.reconciler: Optional[Reconciler] = None
        self.source = None
        self.ready = False
        self.started = time.time()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._mailbox_lock = threading.Lock()
        self._mailbox: Optional[List[Service]] = None
        self._first_desired = threading.Event()
        self.config_state: Dict[str, Any] = {"ok": None, "error": None, "loads": 0,
                                             "failures": 0, "last_change": None}
        self.metrics_server: Optional[metrics.MetricsServer] = None
        self.admin: Optional[api.AdminServer] = None
        self._retry_at: Optional[float] = None
        self._retry_delay = 1.0
        self.services: List[Service] = []     # the last desired set, before health is applied
        self._recompute = threading.Event()   # health or ejections changed: apply again
        from .health import HealthChecker

        self.health = HealthChecker(self.registry, self._health_changed)
        self.outlier = OutlierDetector(self.registry, self._health_changed,
                                       reset_endpoint=self._reset_endpoint)
        self.terminated_sockets = 0
        self._threads: List[threading.Thread] = []

    # -- health (checker and ring-buffer threads) -------------------------------------------
    def _health_changed(self) -> None:
        self._recompute.set()
        self._wake.set()

    def _reset_endpoint(self, address: str, port: int) -> None:
        if self.reconciler is not None:
            self.reconciler.reset_endpoint(address, port)

    def selection_context(self) -> selection.Context:
        unhealthy = {(k.namespace, k.service, k.address) for k in self.health.unhealthy_keys()}
        return selection.Context(node_name=self.opts.node_name, node_zone=self._node_zone(),
                                 unhealthy=frozenset(unhealthy | self.outlier.ejected()))

    def _node_zone(self) -> Optional[str]:
        return self.opts.node_zone or getattr(self.source, "node_zone", None)

    def _health_targets(self, services: List[Service]):
        from .health import TargetKey

        targets = {}
        for svc in services:
            hc = svc.health_check
            if hc is None:
                continue
            first = next((sp for sp in svc.ports if sp.protocol == "TCP"), svc.ports[0])
            for b in svc.backends:
                port = hc.port or b.target_port(first)
                targets[TargetKey(svc.namespace, svc.name, b.address, port)] = hc
        return targets

    def _watch_failures(self) -> None:
        """Ring buffer of failed connects from sockops -> outlier detector."""
        from .datapath.ringbuf import RingBuffer, cast

        def on_event(data: bytes) -> None:
            ev = cast(data, m.FailureEvent)
            self.outlier.on_failure(m.decode_addr(ev.family, ev.addr), m.port_host(ev.port),
                                    ev.consecutive_failures, ev.ts_ns)

        ring = RingBuffer(self.datapath.ringbuf_fd)
        try:
            while not self._stop.is_set():
                ring.poll(on_event, 0.1)
        finally:
            ring.close()

    # -- source callbacks (any thread) ------------------------------------------------------
    def desired(self, delta: "Delta") -> None:
        with self._mailbox_lock:
            current = {s.key: s for s in (self._mailbox if self._mailbox is not None
                                          else self.services)}
            if delta.full:
                current = {}
            for key in delta.deletes:
                current.pop(key, None)
            for svc in delta.upserts:
                current[svc.key] = svc
            self._mailbox = [current[k] for k in sorted(current)]
        self.config_state.update(ok=True, error=None, last_change=time.time())
        self.config_state["loads"] += 1
        self.own_metrics.reloads.labels(self.source_name).inc()
        self.own_metrics.last_reload_success.labels(self.source_name).set(1)
        self._first_desired.set()
        self._wake.set()

    def source_error(self, message: str) -> None:
        log.error("desired state rejected; the last good state keeps serving:\n%s", message)
        self.config_state.update(ok=False, error=message, last_change=time.time())
        self.config_state["failures"] += 1
        self.own_metrics.reload_failures.labels(self.source_name).inc()
        self.own_metrics.last_reload_success.labels(self.source_name).set(0)

    @property
    def source_name(self) -> str:
        return getattr(self.source, "name", self.opts.source)

    def reload(self) -> None:
        if self.source is not None and hasattr(self.source, "reload"):
            self.source.reload()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- lifecycle --------------------------------------------------------------------------
    def _make_source(self):
        if self.opts.source == "file":
            from .sources.file import FileSource

            if not self.opts.config:
                raise SystemExit("nodemesh run: --config FILE is required with the file source")
            return FileSource(self.opts.config)
        if self.opts.source == "kubernetes":
            from .sources.kubernetes import KubernetesSource, KubernetesSourceError

            try:
                return KubernetesSource(kubeconfig=self.opts.kubeconfig,
                                        node_name=self.opts.node_name, registry=self.registry)
            except KubernetesSourceError as e:
                raise SystemExit(f"nodemesh run --source kubernetes: {e}")
        raise SystemExit(f"unknown source {self.opts.source!r} (file or kubernetes)")

    def run(self) -> int:
        from .preflight import _bpf_syscall

        # What a node lacks is said before anything is touched, not as a traceback later.
        access = _bpf_syscall()
        if not access.ok:
            raise loader.DatapathError(f"BPF is not usable: {access.detail} ({access.fix}); "
                                       f"'nodemesh preflight' checks the whole node")
        cgroup = loader.check_cgroup(self.opts.cgroup or loader.cgroup2_root())
        self.source = self._make_source()
        try:
            self.metrics_server = metrics.MetricsServer(self, self.registry,
                                                        self.opts.metrics_addr)
        except OSError as e:
            raise loader.DatapathError(f"--metrics-addr {self.opts.metrics_addr}: "
                                       f"{e.strerror}") from None
        self.metrics_server.start()
        log.info("metrics on http://%s/metrics", self.metrics_server.address)
        self.datapath = loader.Datapath(self.opts.bpffs, cgroup, self.sizes)
        try:
            self.maps = self.datapath.load()
            self.reconciler = Reconciler(self.maps, self.sizes)
            self.reconciler.adopt()
            self.admin = api.AdminServer(self, self.opts.admin_socket)
            self.admin.start()
            self.health.start()
            watcher = threading.Thread(target=self._watch_failures, name="failure-events",
                                       daemon=True)
            watcher.start()
            self._threads.append(watcher)
            self.source.start(self.desired, self.source_error)
            if self.opts.source == "file" and self.config_state["ok"] is False:
                # A first config that is invalid: say so and exit, touching nothing. Any
                # datapath a previous agent left keeps serving its last good state.
                return 1
            while not self._first_desired.wait(0.2):
                if self._stop.is_set():
                    return 0
            self._apply_pending()
            self.datapath.attach()
            self.ready = True
            self.own_metrics.ready.set(1)
            log.info("ready: %d frontends programmed, hooks attached to %s",
                     len(self.reconciler.programmed), cgroup)
            self._loop()
            return 0
        finally:
            self._shutdown()

    def _loop(self) -> None:
        next_resync = time.monotonic() + self.opts.resync_seconds
        while not self._stop.is_set():
            timeout = next_resync - time.monotonic()
            if self._retry_at is not None:
                timeout = min(timeout, self._retry_at - time.monotonic())
            returns_in = self.outlier.expire()  # ejections whose time is up come back here
            if returns_in is not None:
                timeout = min(timeout, returns_in)
            # Python runs signal handlers on the main thread, but the kernel may deliver a
            # signal to any thread, and then nothing wakes this wait: keep it short so that
            # SIGHUP and SIGTERM are handled within a quarter of a second.
            self._wake.wait(min(max(0.0, timeout), 0.25))
            self._wake.clear()
            if self._stop.is_set():
                break
            self._apply_pending()
            now = time.monotonic()
            if self._recompute.is_set():
                self._recompute.clear()
                self._apply(self.services)
            if self._retry_at is not None and now >= self._retry_at:
                self._retry_at = None
                self._apply(self.services)
            if now >= next_resync:
                next_resync = now + self.opts.resync_seconds
                drift = self.reconciler.verify()
                if drift:
                    log.warning("kernel state drifted from the agent's; reprogramming: %s",
                                "; ".join(drift[:5]))
                    self._apply(self.services)

    def _apply_pending(self) -> None:
        with self._mailbox_lock:
            services, self._mailbox = self._mailbox, None
        if services is not None:
            self.services = services
            self.health.set_targets(self._health_targets(services))
            self.outlier.configure(services)
            self._apply(services)

    def _apply(self, services: List[Service]) -> None:
        self._recompute.clear()
        result = self.reconciler.apply(services, self.selection_context())
        self.outlier.programmed()
        if result.removed_endpoints:
            self._terminate(result)
        self.own_metrics.reconcile_runs.inc()
        self.own_metrics.reconcile_writes.inc(result.writes)
        self.own_metrics.reconcile_last_seconds.set(result.seconds)
        if result.failed:
            # Failed frontends keep their previous state; try again with capped backoff.
            self.own_metrics.reconcile_errors.inc(result.failed)
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, 30.0)
        else:
            self._retry_delay = 1.0

    def _terminate(self, result: ApplyResult) -> None:
        """End client sockets still connected to endpoints that left every selection set:
        connected UDP sockets always (else they stay pinned to a dead backend forever), TCP
        where the service asked for it. In a thread: it walks every network namespace."""
        udp = [(a, p) for a, p, proto, _ in result.removed_endpoints if proto == "UDP"]
        tcp = [(a, p) for a, p, proto, kill in result.removed_endpoints
               if proto == "TCP" and kill]

        def work():
            from .datapath import sockterm

            for proto, dests in (("UDP", udp), ("TCP", tcp)):
                if not dests:
                    continue
                try:
                    res = sockterm.destroy_sockets(dests, proto)
                except Exception as e:  # must never take the agent down
                    log.error("terminating %s sockets to %s failed: %s", proto, dests, e)
                    continue
                n = getattr(res, "destroyed", getattr(res, "total", 0))
                self.terminated_sockets += n
                if n:
                    log.info("terminated %d %s sockets to removed backends %s", n, proto,
                             dests)

        if udp or tcp:
            threading.Thread(target=work, name="sockterm", daemon=True).start()

    def _shutdown(self) -> None:
        self.ready = False
        self._stop.set()
        try:
            self.health.stop()
        except Exception as e:  # stopping must go on whatever one part does
            log.warning("stopping health checks: %s", e)
        for t in self._threads:
            t.join(timeout=2)
        if self.source is not None:
            try:
                self.source.stop()
            except Exception as e:  # stopping must go on whatever one part does
                log.warning("stopping the source: %s", e)
        if self.admin is not None:
            self.admin.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        attached = bool(self.datapath and loader.attachments(self.datapath.bpffs))
        if self.datapath is not None:
            self.datapath.close()  # fds only: the pinned links keep the hooks attached
        if attached:
            log.info("stopped; the datapath stays in the kernel (remove it with "
                     "'nodemesh cleanup --bpffs %s')", self.datapath.bpffs)
        else:
            log.info("stopped")

    # -- views ------------------------------------------------------------------------------
    def backend_healthy(self, svc: Service, b: Backend,
                        ctx: Optional[selection.Context] = None) -> bool:
        """Ready, not terminating, passing its health checks and not ejected. Pass ctx when
        asking about many backends: building it takes the checkers' locks."""
        if not b.ready or b.terminating:
            return False
        ctx = ctx or self.selection_context()
        return (svc.namespace, svc.name, b.address) not in ctx.unhealthy

    def status(self) -> Dict[str, Any]:
        rec = self.reconciler
        last = rec.last_result if rec else None
        counters = self.maps.counters() if self.maps else {}
        return {
            "version": __version__,
            "pid": os.getpid(),
            "ready": self.ready,
            "uptime_seconds": round(time.time() - self.started, 1),
            "node_name": self.opts.node_name,
            "source": {"kind": self.source_name, "config": self.opts.config,
                       **self.config_state},
            "datapath": {
                "bpffs": self.datapath.bpffs if self.datapath else self.opts.bpffs,
                "cgroup": self.datapath.cgroup if self.datapath else self.opts.cgroup,
                "adopted_pins": bool(self.datapath and self.datapath.adopted),
                "load_seconds": round(self.datapath.load_seconds, 3) if self.datapath else None,
                "hooks": loader.attachments(self.datapath.bpffs) if self.datapath else [],
                "events": counters,
            },
            "services": len(rec.services) if rec else 0,
            "health": {"checks": self.health.snapshot(), "ejections": self.outlier.snapshot(),
                       "ejection_latency_seconds": self.outlier.last_latencies[-10:],
                       "terminated_sockets": self.terminated_sockets,
                       "endpoints": [{"address": a, "port": p, **v} for (a, p), v in
                                     sorted(rec.endpoint_health().items())] if rec else []},
            "frontends": len(rec.programmed) if rec else 0,
            "last_apply": None if last is None else {
                "added": last.added, "changed": last.changed, "removed": last.removed,
                "unchanged": last.unchanged, "failed": last.failed, "writes": last.writes,
                "seconds": round(last.seconds, 4), "errors": last.errors},
        }

    def services_view(self) -> List[Dict[str, Any]]:
        rec = self.reconciler
        if rec is None or self.maps is None:
            return []
        svc_stats = self.maps.percpu_sums("svc_stats")
        be_stats = self.maps.percpu_sums("backend_stats")
        by_service: Dict[tuple, Dict[str, Any]] = {}
        for fe in rec.snapshot():
            key = (fe["namespace"], fe["service"])
            entry = by_service.setdefault(key, {
                "namespace": fe["namespace"], "name": fe["service"],
                "status": rec.status.get(key, {}), "frontends": []})
            st = svc_stats.get(fe["svc_id"], {})
            for be in fe["backends"]:
                be["connections"] = be_stats.get(be["id"], {}).get("connections", 0)
            entry["frontends"].append({**fe, "connections": st.get("connections", 0),
                                       "no_backend": st.get("no_backend", 0)})
        return list(by_service.values())


def install_signals(agent: Agent) -> None:
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    signal.signal(signal.SIGHUP, lambda *_: agent.reload())
