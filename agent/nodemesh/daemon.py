"""The agent: sources -> core loop -> reconciler -> kernel, with metrics and the admin API
reading the snapshot the loop publishes.

The caller of run() is the core loop's thread (core.Core): it owns desired state and is the
only caller of the reconciler. Sources, health checks and the ring-buffer reader post events
to it; socket termination and the ring-buffer reader are supervised workers.

Start:  the datapath's compile starts in a child first; then the source is built and
        starts (its events wait in the core's queue) while the programs load against the
        pinned maps (adopting them) -> adopt programmed state -> the pages of
        the source's first sync as they come (partial deltas: written, nothing deleted) ->
        its first full set -> first full round (deletes what nobody wants) -> attach (swap
        into existing links) -> ready.
Stop:   SIGTERM/SIGINT end the process and leave the datapath in the kernel, serving the last
        state; the next agent adopts it. `nodemesh cleanup` is what removes it.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from prometheus_client import CollectorRegistry

from . import __version__, api, metrics
from .core import Core, SocketTerminator, SourceChanged, SourceFailed, Supervisor
from .datapath import loader
from .datapath import maps as m
from .datapath.tc import TcPath, TcSettings
from .health import HealthChecker
from .mesh import AccelCollector, MeshOptions, write_mesh_config
from .observability import Observability, Settings
from .outlier import OutlierDetector
from .policy import PolicyTable
from .reconciler import MAGLEV_MAX_ROWS, Reconciler, RoundResult
from .snapshot import Snapshot, SourceState
from .sources import Delta
from .tc_metrics import TcCollector

log = logging.getLogger(__name__)


@dataclass
class Options:
    config: Optional[str] = None
    source: str = "file"
    kubeconfig: Optional[str] = None
    metrics_addr: str = "127.0.0.1:9464"
    metrics_detail: str = metrics.DETAIL_SERVICE
    cgroup: Optional[str] = None
    bpffs: str = loader.DEFAULT_BPFFS
    admin_socket: str = api.DEFAULT_SOCKET
    node_name: Optional[str] = None
    node_zone: Optional[str] = None
    resync_seconds: float = 300.0
    sizes: m.MapSizes = field(default_factory=m.MapSizes)
    maglev_max_rows: int = MAGLEV_MAX_ROWS
    mesh: MeshOptions = field(default_factory=MeshOptions)
    interfaces: Tuple[str, ...] = ()  # the TC packet path (NodePort, external addresses)
    tc: TcSettings = field(default_factory=TcSettings)
    observe: Settings = field(default_factory=Settings)


class Agent:
    def __init__(self, opts: Options):
        self.opts = opts
        self.sizes = opts.sizes
        self.registry = CollectorRegistry()
        self.own_metrics = metrics.AgentMetrics(self.registry)
        self.datapath_metrics = metrics.DatapathCollector(self, opts.metrics_detail)
        self.registry.register(self.datapath_metrics)
        self.registry.register(AccelCollector(self))
        self.datapath: Optional[loader.Datapath] = None
        self.maps: Optional[m.Maps] = None
        self.core: Optional[Core] = None
        # The core loop's queue exists before the core: the source starts while the datapath
        # loads (BCC compiles in a child process), and what it sends meanwhile waits here.
        self.events: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._reload_children: Dict[str, Tuple[Any, Any]] = {}
        self.source: Any = None
        self.ready = False
        self.exit_code = 0
        self.started = time.time()
        self._stop = threading.Event()
        self.tc: Optional[TcPath] = None
        self._next_sweep = 0.0
        self.metrics_server: Optional[metrics.MetricsServer] = None
        self.admin: Optional[api.AdminServer] = None
        self.health = HealthChecker(self.registry, self._on_health_flip)
        self.outlier = OutlierDetector(self.registry, self._on_ejection)
        self.sockterm = SocketTerminator()
        self.workers = Supervisor(self._stop, self._give_up, self._count_restart)
        self._empty = Snapshot(source=SourceState(opts.source, opts.config))
        self.observability = Observability(self, opts.observe,
                                           opts.metrics_detail == metrics.DETAIL_BACKEND)

    # -- events from other threads ----------------------------------------------------------
    def _on_health_flip(self, key) -> None:
        if self.core is not None:
            self.core.on_health_flip(key)

    def _on_ejection(self, services) -> None:
        if self.core is not None:
            self.core.on_ejection(services)

    def desired(self, delta: Delta) -> None:
        """The source's on_change: only enqueued, so a source never waits for the kernel."""
        if not delta.partial:  # a page of the first sync is no reload
            reloads, last_success = self._reload_metrics()
            reloads.inc()
            last_success.set(1)
        self.events.put(SourceChanged(delta))

    def _reload_metrics(self) -> Tuple[Any, Any]:
        """The source's reloads counter and last-reload gauge: their labels looked up once
        per source name, not twice a change."""
        name = self.source_name
        children = self._reload_children.get(name)
        if children is None:
            children = self._reload_children[name] = (
                self.own_metrics.reloads.labels(name),
                self.own_metrics.last_reload_success.labels(name))
        return children

    def source_error(self, message: str) -> None:
        self.own_metrics.reload_failures.labels(self.source_name).inc()
        self._reload_metrics()[1].set(0)
        self.events.put(SourceFailed(message))

    def _count_restart(self, name: str) -> None:
        self.own_metrics.worker_restarts.labels(name).inc()

    def _give_up(self, why: str) -> None:
        log.error("%s: stopping so that the agent's supervisor restarts it", why)
        self.exit_code = 1
        self.stop()

    @property
    def source_name(self) -> str:
        return getattr(self.source, "name", self.opts.source)

    @property
    def snapshot(self) -> Snapshot:
        return self.core.snapshot if self.core is not None else self._empty

    def reload(self) -> None:
        if self.source is not None and hasattr(self.source, "reload"):
            self.source.reload()

    def stop(self) -> None:
        self._stop.set()

    # -- lifecycle --------------------------------------------------------------------------
    def _make_source(self) -> Any:
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

    def _node_zone(self) -> Optional[str]:
        return self.opts.node_zone or getattr(self.source, "node_zone", None)

    def run(self, datapath: Optional[loader.Datapath] = None) -> int:
        """Start, serve until stopped, stop; returns the exit code. `datapath` is one that
        loader.start() started already (its compile running); without it, run starts it."""
        if datapath is None:
            datapath = loader.start(self.opts.bpffs, self.opts.cgroup, self.sizes,
                                    self.opts.mesh.accelerate_local)
        # The compile (a child, ~2 s of clang's CPU) started first: the source's client import
        # and config take most of a second of this process's CPU, on the other CPU meanwhile.
        self.datapath = datapath
        cgroup = datapath.cgroup
        try:
            try:
                self.metrics_server = metrics.MetricsServer(self, self.registry,
                                                            self.opts.metrics_addr)
            except OSError as e:
                raise loader.DatapathError(f"--metrics-addr {self.opts.metrics_addr}: "
                                           f"{e.strerror}") from None
            self.source = self._make_source()
        except BaseException:
            # This start is over before it began: the compile ends, what it made in a folder
            # that held no pins is removed, and nothing else was touched.
            datapath.abandon_load()
            datapath.close()
            if self.metrics_server is not None:
                self.metrics_server.stop()
            raise
        self.metrics_server.start()
        log.info("metrics on http://%s/metrics", self.metrics_server.address)
        thresholds = _collect_less_while_syncing()
        try:
            # Listing 100,000 Services and EndpointSlices takes seconds of CPU, and so does the
            # datapath's compile, in a child process: on two CPUs they overlap. What the source
            # sends meanwhile waits in the core's queue; nothing is written before the first
            # round.
            self.source.start(self.desired, self.source_error)
            self.maps = self.datapath.load()
            # The compiler's CPU is free now: a source that decodes in a worker may use it.
            compile_done = getattr(self.source, "compile_done", None)
            if compile_done is not None:
                compile_done()
            write_mesh_config(self.maps, self.opts.mesh)
            reconciler = Reconciler(self.maps, self.sizes,
                                    maglev_max_rows=self.opts.maglev_max_rows)
            reconciler.adopt()
            self.core = Core(reconciler, self.health, self.outlier,
                             SourceState(self.source_name, self.opts.config),
                             node_name=self.opts.node_name, node_zone=self._node_zone,
                             on_round=self._after_round, events=self.events)
            self.core.policy = PolicyTable(self.maps, loader.cgroup2_root())
            self.admin = api.AdminServer(self, self.opts.admin_socket)
            self.admin.start()
            self.health.start()
            self.workers.spawn("failure-events", self._watch_failures)
            self.observability.start()
            self.workers.spawn("sockterm", lambda: self.sockterm.run(self._stop))
            while not self.core.synced:
                self.core.step(0.2, reconcile=False)
                if self.opts.source == "file" and self.core.snapshot.source.ok is False:
                    # A first config that is invalid: say so and exit, touching nothing. Any
                    # datapath a previous agent left keeps serving its last good state.
                    return 1
                if self._stop.is_set():
                    return 0
                if not self.core.synced:
                    # Pages of a first sync (partial deltas): programmed while the source
                    # decodes the next ones; nothing is deleted until the full set.
                    self.core.reconcile_listed()
            self.core.reconcile(force=True)
            _return_freed_memory()
            self.datapath.attach()
            if self.opts.interfaces:
                self._start_tc()
            self._set_ready(True)
            log.info("ready: %d frontends programmed, hooks attached to %s",
                     len(self.core.reconciler.programmed), cgroup)
            _freeze_first_sync(thresholds)
            return self._loop()
        finally:
            self._shutdown()

    def _start_tc(self) -> None:
        """Load the TC programs against the pinned maps and attach them (or swap them into
        the filters a previous agent left), after the first sync like the socket hooks."""
        self.tc = TcPath(self.opts.bpffs, self.sizes, self.opts.tc)
        self.tc.load()
        self.tc.attach(self.opts.interfaces)
        self.registry.register(TcCollector(self.tc))
        self._next_sweep = time.monotonic()

    def _tend_tc(self, now: float) -> None:
        """Every check: filters back in place, node addresses current, expired flows swept."""
        if self.tc is None:
            return
        missing = self.tc.attached()
        if missing:
            log.warning("TC filters missing on %s; attaching again", ", ".join(missing))
            self.tc.attach(missing)
        self.tc.sync_addresses()
        if now >= self._next_sweep:
            settings = self.opts.tc
            self._next_sweep = now + max(1, min(30, settings.udp_seconds,
                                                settings.tcp_closing_seconds))
            swept = self.tc.sweep()
            if swept:
                log.debug("conntrack: swept %d expired entries", swept)

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.own_metrics.ready.set(1 if ready else 0)

    def _loop(self) -> int:
        assert self.core is not None and self.datapath is not None
        now = time.monotonic()
        next_prune = now + self.opts.resync_seconds
        next_check = now + loader.CHECK_SECONDS
        while not self._stop.is_set():
            now = time.monotonic()
            # Python runs signal handlers on the main thread, but the kernel may deliver a
            # signal to any thread, and then nothing wakes this wait: keep it short so that
            # SIGHUP and SIGTERM are handled within a quarter of a second.
            timeout = min(0.25, next_check - now, next_prune - now)
            if self.core.reconciler.pending:  # (nothing to retry: no scan, nearly always)
                due = self.core.reconciler.next_attempt()
                if due is not None:
                    timeout = min(timeout, due - now)
            returns_in = self.outlier.expire()  # ejections whose time is up come back here
            if returns_in is not None:
                timeout = min(timeout, returns_in)
            self.core.step(timeout)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + loader.CHECK_SECONDS
                if not self.datapath.check_and_repair():
                    # Hooks gone for good (e.g. the cgroup): not ready; exit for a restart.
                    self._set_ready(False)
                    return 1
                try:
                    self._tend_tc(now)
                except Exception as e:  # an interface gone, netlink busy: next check retries
                    log.warning("TC path: %s", e)
            if now >= next_prune:
                next_prune = now + self.opts.resync_seconds
                self.core.prune()
        return self.exit_code

    def _after_round(self, result: RoundResult) -> None:
        if result.removed_endpoints:
            self.sockterm.request(result.removed_endpoints)
        if result:
            self.own_metrics.reconcile_runs.inc()
            self.own_metrics.reconcile_writes.inc(result.writes)
            self.own_metrics.reconcile_last_seconds.set(result.seconds)
        if result.failed:
            self.own_metrics.reconcile_errors.inc(result.failed)

    def _watch_failures(self) -> None:
        """Ring buffer of failed connects from sockops -> outlier detector."""
        from .datapath.ringbuf import RingBuffer, cast

        def on_event(data: bytes) -> None:
            ev = cast(data, m.FailureEvent)
            self.outlier.on_failure(m.decode_addr(ev.family, ev.addr), m.port_host(ev.port),
                                    ev.consecutive_failures, ev.ts_ns)

        assert self.datapath is not None
        ring = RingBuffer(self.datapath.ringbuf_fd)
        try:
            while not self._stop.is_set():
                ring.poll(on_event, 0.1)
        finally:
            ring.close()

    def _shutdown(self) -> None:
        self.ready = False
        self._stop.set()
        try:
            self.health.stop()
        except Exception as e:  # stopping must go on whatever one part does
            log.warning("stopping health checks: %s", e)
        self.workers.join()
        if self.source is not None:
            try:
                self.source.stop()
            except Exception as e:  # stopping must go on whatever one part does
                log.warning("stopping the source: %s", e)
        if self.admin is not None:
            self.admin.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.tc is not None:
            self.tc.close()  # fds only: the filters keep the programs attached
        self.observability.close()  # BPF run-time statistics end with the agent
        attached = bool(self.datapath and loader.attachments(self.datapath.bpffs))
        if self.datapath is not None:
            self.datapath.close()  # fds only: the pinned links keep the hooks attached
        if attached:
            log.info("stopped; the datapath stays in the kernel (remove it with "
                     "'nodemesh cleanup --bpffs %s')", self.opts.bpffs)
        else:
            log.info("stopped")

    # -- views: from the published snapshot, never from the writer's state -----------------
    def status(self) -> Dict[str, Any]:
        snap = self.snapshot
        counters = self.maps.counters() if self.maps else {}
        src = snap.source
        last = snap.last_round
        return {
            "version": __version__,
            "pid": os.getpid(),
            "ready": self.ready,
            "uptime_seconds": round(time.time() - self.started, 1),
            "node_name": self.opts.node_name,
            "source": {"kind": src.kind, "config": src.config, "ok": src.ok,
                       "error": src.error, "loads": src.loads, "failures": src.failures,
                       "last_change": src.last_change},
            "datapath": {
                "bpffs": self.opts.bpffs,
                "cgroup": self.datapath.cgroup if self.datapath else self.opts.cgroup,
                "adopted_pins": bool(self.datapath and self.datapath.adopted),
                "load_seconds": round(self.datapath.load_seconds, 3) if self.datapath else None,
                "hooks": loader.attachments(self.opts.bpffs) if self.datapath else [],
                "events": counters,
                "cost": self.observability.status(),
            },
            "services": len(snap.services),
            "frontends": len(snap.frontends),
            "failing_frontends": snap.failing,
            "conflicts": list(snap.conflicts),
            "health": {"checks": self.health.snapshot(), "ejections": self.outlier.snapshot(),
                       "ejection_latency_seconds": self.outlier.last_latencies[-10:],
                       "terminated_sockets": self.sockterm.terminated},
            "last_apply": None if last is None else {
                "added": last.added, "changed": last.changed, "removed": last.removed,
                "unchanged": last.unchanged, "failed": last.failed, "writes": last.writes,
                "seconds": round(last.seconds, 4), "errors": list(last.errors)},
        }

    def services_view(self) -> List[Dict[str, Any]]:
        snap = self.snapshot
        if self.maps is None:
            return []
        svc_stats = self.maps.percpu_sums("svc_stats")
        be_stats = self.maps.percpu_sums("backend_stats")
        by_service: Dict[tuple, Dict[str, Any]] = {}
        for view in sorted(snap.frontends.values(), key=lambda v: v.key):
            d, p, st = view.desired, view.programmed, view.status
            d = d or (p.desired if p else None)
            ns, name = (d.namespace, d.service) if d else ("", "")
            entry = by_service.setdefault((ns, name), {
                "namespace": ns, "name": name, "status": {"programmed": True, "errors": []},
                "frontends": []})
            if st.state != "done":
                entry["status"]["programmed"] = False
                if st.error:
                    entry["status"]["errors"].append(f"{view.key}: {st.error}")
            counts: Dict[int, int] = {}
            for ident in (p.slots if p else ()):
                counts[ident] = counts.get(ident, 0) + 1
            weights = {(a, port): w for a, port, w in d.backends} if d else {}
            backends = [{"address": a, "port": port, "id": ident,
                         "weight": weights.get((a, port)), "slots": counts.get(ident, 0),
                         "connections": be_stats.get(ident, {}).get("connections", 0)}
                        for (a, port), ident in sorted((p.backend_ids if p else {}).items())]
            stats = svc_stats.get(p.svc_id, {}) if p else {}
            entry["frontends"].append({
                "vip": view.key.vip, "port": view.key.port, "protocol": view.key.protocol,
                "family": view.key.family, "port_name": d.port_name if d else "",
                "svc_id": p.svc_id if p else None, "algorithm": d.algorithm if d else
                (p.algorithm if p else ""), "revision": p.revision if p else 0,
                "slots": len(p.slots) if p else 0, "selection": d.selection if d else "",
                "state": st.state, "error": st.error, "retries": st.retries,
                "backends": backends, "connections": stats.get("connections", 0),
                "no_backend": stats.get("no_backend", 0)})
        return list(by_service.values())


SYNC_GC_THRESHOLDS = (100_000, 50, 100)


def _collect_less_while_syncing() -> Tuple[int, int, int]:
    """Until the first sync is programmed, let the cyclic collector run rarely; returns the
    thresholds to restore. The sync allocates millions of objects that all stay alive (the
    decoded pages, the services, the planned frontends), so each collection finds nearly
    nothing, yet every oldest-generation pass walks all that the sync holds so far (a tenth
    of its CPU at 100,000 services). Young cycles are still collected, every 100,000
    allocations instead of 700, so a sync that never ends does not hoard garbage."""
    old = gc.get_threshold()
    gc.set_threshold(*SYNC_GC_THRESHOLDS)
    return (old[0], old[1], old[2])


def _freeze_first_sync(thresholds: Tuple[int, int, int]) -> None:
    """The first sync's objects live as long as their services: take them out of the cyclic
    collector's reach, or every full collection walks 100,000 services' worth of objects
    (milliseconds of CPU per change at that size). Done once ready, not before: the full
    collection that keeps cyclic garbage out of the frozen set walks every object (~0.5 s
    at 100,000 services) and finds next to nothing to free, and nothing of it is needed to
    serve. A change that arrives meanwhile waits for it, once."""
    started = time.monotonic()
    unreachable = gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    _return_freed_memory()
    log.info("first sync frozen for the cyclic collector: %d objects (%d unreachable freed) "
             "in %.2fs", gc.get_freeze_count(), unreachable, time.monotonic() - started)


# glibc's mallopt() parameter (malloc.h)
_M_ARENA_MAX = -8
MALLOC_ARENAS = 1


def tune_allocator() -> bool:
    """One glibc malloc arena for the whole process: called at start, before its first
    thread. Returns whether it was set.

    glibc gives every thread that mallocs an arena of its own (up to 8 a CPU): at 100,000
    Kubernetes services the agent kept 16 (its page, watch and server threads), their free
    space resident beside the main heap's, ~12 MiB of RSS at ready more than with one
    (bench/results/controlplane.md). Python allocates under the GIL, so one arena makes
    nobody wait. (A fixed mmap threshold on top, so that the list pages never sit in the
    arena, measured 2-3 MiB worse: not set.) The operator's own setting (MALLOC_ARENA_MAX,
    GLIBC_TUNABLES) is left alone."""
    if "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc" in os.environ.get(
            "GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    return bool(mallopt(_M_ARENA_MAX, MALLOC_ARENAS))


def _return_freed_memory() -> None:
    """Hand the heap the first sync freed (the parser's transient objects) back to the OS.
    glibc keeps freed small blocks in its arenas, and RSS would stay at the start-up peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def install_signals(agent: Agent) -> None:
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    signal.signal(signal.SIGHUP, lambda *_: agent.reload())
