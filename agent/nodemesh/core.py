"""The core loop: one thread owns desired state and is the only caller of the reconciler.

Sources, health checks and the outlier detector never touch it directly: they post events
on a queue (`post`), from any thread. Each round the loop drains the queue, folds what it
got into the desired services, works out which services are dirty (a delta names them; a
health or outlier verdict names the services that hold that backend), hands only those to
the reconciler, reconciles what is due, and publishes an immutable Snapshot for readers.
So the work of a round follows the change, and a quiet round costs nearly nothing.
"""
from __future__ import annotations

import logging
import operator
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, List, Optional, Set, Tuple, Union

from . import selection, threadname
from .health import HealthChecker, TargetKey
from .model import HealthCheck, Service
from .outlier import OutlierDetector
from .reconciler import (
    DONE_STATUS,
    ERROR,
    FrontendKey,
    ProgrammedFrontend,
    Reconciler,
    RoundResult,
    service_frontends,
    watched_endpoints,
)
from .snapshot import FrontendView, Snapshot, SourceState
from .sources import Delta

if TYPE_CHECKING:
    from .policy import Mesh, PolicyTable

log = logging.getLogger(__name__)

ServiceKey = Tuple[str, str]


@dataclass(frozen=True)
class SourceChanged:
    delta: Delta


@dataclass(frozen=True)
class SourceFailed:
    message: str


@dataclass(frozen=True)
class BackendsChanged:
    """Health checks or the outlier detector changed the verdict on these services' backends."""
    services: FrozenSet[ServiceKey]


Event = Union[SourceChanged, SourceFailed, BackendsChanged]


class Core:
    def __init__(self, reconciler: Reconciler, health: HealthChecker, outlier: OutlierDetector,
                 source: SourceState, node_name: Optional[str] = None,
                 node_zone: Callable[[], Optional[str]] = lambda: None,
                 on_round: Callable[[RoundResult], None] = lambda r: None,
                 events: "Optional[queue.SimpleQueue[Event]]" = None):
        self.reconciler = reconciler
        self.health = health
        self.outlier = outlier
        self.node_name = node_name
        self.node_zone = node_zone
        self.on_round = on_round
        # A queue given by the caller may already hold what a source sent before the core
        # existed (the agent starts its source while the datapath loads).
        self.events: "queue.SimpleQueue[Event]" = events if events is not None \
            else queue.SimpleQueue()
        self.services: Dict[ServiceKey, Service] = {}
        self.synced = False               # the source's first full set has been folded in
        self._dirty: Set[ServiceKey] = set()
        self._conflicts: Dict[ServiceKey, List[str]] = {}
        self._failing: Set[FrontendKey] = set()
        # Services given health-check targets or outlier settings: the others (nearly all)
        # need no call to either (a first sync made 200,000 that did nothing).
        self._checked: Set[ServiceKey] = set()
        self._watched: Set[ServiceKey] = set()
        self._health_changed = False
        # Workloads and policies (agent/nodemesh/policy.py): recompiled when they or a
        # service change, before the round's service writes.
        self.mesh: Optional["Mesh"] = None
        self.policy: Optional["PolicyTable"] = None
        self._mesh_dirty = False
        self.snapshot = Snapshot(source=source)  # replaced, never changed: readers hold it
        # What a round folded in for the snapshot (the source's state, the services' records)
        # waits here for the round's one publish: a Snapshot built once a change, not three
        # times (see _unpublished).
        self._source_next: Optional[SourceState] = None
        self._services_next: Dict[ServiceKey, Optional[Service]] = {}
        self._plain_context: Optional[selection.Context] = None  # see selection_context

    # -- any thread -------------------------------------------------------------------------
    def post(self, event: Event) -> None:
        self.events.put(event)

    def on_health_flip(self, key: TargetKey) -> None:
        self.post(BackendsChanged(frozenset({(key.namespace, key.service)})))

    def on_ejection(self, services: Set[ServiceKey]) -> None:
        self.post(BackendsChanged(frozenset(services)))

    # -- the loop's thread ------------------------------------------------------------------
    def step(self, timeout: float, reconcile: bool = True) -> Optional[RoundResult]:
        """One round: wait up to `timeout` for an event, drain the queue, update what is
        dirty and (once synced) reconcile what is due. Returns the round's result."""
        try:
            first = self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            first = None
        if first is not None:
            # The drain only after an event: a wake that timed out found the queue empty
            # (what came since waits for the next wait, which returns at once).
            self._fold(first)
            get = self.events.get_nowait
            while True:
                try:
                    event = get()
                except queue.Empty:
                    break
                self._fold(event)
        if not self.synced or not reconcile:
            self._publish_folded()
            return None
        if first is None and not self._quiet_round_has_work():
            # The loop's periodic wake (for signals, checks, retries): nothing came and
            # nothing is due, so no round and no snapshot (the core's idle CPU at 100,000
            # services 0.09-0.12 % -> 0.07-0.09 %, bench/results/controlplane.md, chg5).
            return None
        return self.reconcile()

    def _unpublished(self, snap: Snapshot) -> Dict[str, Any]:
        """The snapshot fields folded in since the last publish (for `replace`), cleared."""
        changes: Dict[str, Any] = {}
        if self._source_next is not None:
            changes["source"], self._source_next = self._source_next, None
        if self._services_next:
            changes["services"] = snap.services.updated(self._services_next)
            self._services_next = {}
        return changes

    def _publish_folded(self) -> None:
        """Publish what was folded in, with no round (before the first sync, or a step
        told not to reconcile)."""
        if self._source_next is not None or self._services_next:
            self.snapshot = replace(self.snapshot, **self._unpublished(self.snapshot))

    def _quiet_round_has_work(self) -> bool:
        """A wake with no event still has a round to run: something dirty, a retry pending,
        workloads or policies to rewrite, or a health verdict to pass to the detector."""
        return bool(self._dirty or self.reconciler.pending or self._mesh_dirty
                    or self._health_changed)

    def reconcile(self, force: bool = False) -> RoundResult:
        if self._mesh_dirty or (self.mesh is not None and self.mesh.policies and self._dirty):
            self._apply_mesh()
        self._push_dirty()
        rec = self.reconciler
        result = rec.reconcile(force=force) if (rec.pending or force) else RoundResult()
        if self._health_changed:
            self._health_changed = False
            self.outlier.programmed()
        self.on_round(result)
        self._publish(result)
        return result

    def reconcile_listed(self) -> Optional[RoundResult]:
        """A round of the first sync, before the full set: program the services the source
        has listed so far (partial deltas) and delete nothing. Until the full set is in, a
        frontend nobody has named may belong to a service still to be listed; one adopted
        from the previous agent keeps serving. None if nothing was listed since."""
        if not self._dirty:
            return None
        listed: Set[FrontendKey] = set()
        self._push_dirty(listed)
        result = self.reconciler.reconcile(force=True, only=listed)
        self.on_round(result)
        self._publish(result, listed_only=True)
        return result

    def _apply_mesh(self) -> None:
        if self.policy is None or self.mesh is None:
            return
        try:
            self.policy.apply(self.mesh, self.services.values())
            self._mesh_dirty = False
        except (OSError, ValueError) as e:  # retried next round; the last policy stays
            self._mesh_dirty = True
            log.error("writing workloads and policies failed (retried): %s", e)

    def prune(self) -> List[str]:
        """Compare the kernel with our state (at the resync interval)."""
        found = self.reconciler.prune()
        if found:
            log.warning("kernel state drifted from the agent's; repairing: %s",
                        "; ".join(found[:5]))
        return found

    def _fold(self, event: Event) -> None:
        if isinstance(event, SourceChanged):
            d = event.delta
            if d.full:
                # In place, so that the dict keeps the key tuples it holds: a new dict of new
                # ones (Service.key makes one a call) with the old ones freed left ~100,000
                # free 64-byte blocks among the objects kept after a first sync at 100,000
                # services (bench/results/controlplane.md, mem8).
                services, dirty = self.services, self._dirty
                for s in d.upserts:
                    k = s.key
                    was = services.get(k)
                    if was is not s:  # after partial deltas, mostly the very objects
                        services[k] = s
                        if was is None or was != s:
                            dirty.add(k)
                wanted = {id(s) for s in d.upserts}
                gone = [k for k, s in services.items() if id(s) not in wanted]
                for k in gone:
                    del services[k]
                    dirty.add(k)
                self.synced = True
            else:
                for key in d.deletes:
                    if self.services.pop(key, None) is not None:
                        self._dirty.add(key)
                services, dirty = self.services, self._dirty
                for svc in d.upserts:
                    k = svc.key
                    was = services.get(k)
                    # `was != svc` only for a service known before: None != svc is a call
                    # to Service.__eq__ (NotImplemented), 100,000 in a first sync's pages.
                    if was is None or (was is not svc and was != svc):
                        services[k] = svc
                        dirty.add(k)
            if d.mesh is not None and d.mesh != self.mesh:
                self.mesh, self._mesh_dirty = d.mesh, True
            if not d.partial:  # a part of the first sync is no load of its own
                src = self._source_next or self.snapshot.source
                self._source_next = replace(src, ok=True, error=None, loads=src.loads + 1,
                                            last_change=time.time())
        elif isinstance(event, SourceFailed):
            log.error("desired state rejected; the last good state keeps serving:\n%s",
                      event.message)
            src = self._source_next or self.snapshot.source
            self._source_next = replace(src, ok=False, error=event.message,
                                        failures=src.failures + 1, last_change=time.time())
        elif isinstance(event, BackendsChanged):
            self._dirty.update(k for k in event.services if k in self.services)
            self._health_changed = True

    def selection_context(self) -> selection.Context:
        unhealthy = {(k.namespace, k.service, k.address) for k in self.health.unhealthy_keys()}
        ejected = self.outlier.ejected()
        zone = self.node_zone()
        if unhealthy or ejected:
            return selection.Context(node_name=self.node_name, node_zone=zone,
                                     unhealthy=frozenset(unhealthy | ejected))
        # Nearly always nothing is taken out: the same context as last time, if in the same
        # zone (a Context is immutable), rather than a new one and a frozenset a change.
        plain = self._plain_context
        if plain is None or plain.node_zone != zone or plain.node_name != self.node_name:
            plain = self._plain_context = selection.Context(node_name=self.node_name,
                                                            node_zone=zone)
        return plain

    def _push_dirty(self, wanted: Optional[Set[FrontendKey]] = None) -> None:
        """Hand each dirty service's wants to the reconciler, health checks and outlier
        detector. Only dirty services are looked at. `wanted` collects the frontends the
        dirty services want now."""
        if not self._dirty:
            return
        ctx = self.selection_context()
        rec = self.reconciler
        changes: Dict[ServiceKey, Optional[Service]] = {}
        services, checked, watched = self.services, self._checked, self._watched
        for key in self._dirty:
            svc = services.get(key)
            changes[key] = svc
            if svc is None:
                rec.remove_service(key)
                self._conflicts.pop(key, None)
                simple = False
            else:
                # No health check, no outlier detection (nearly every service): nothing to
                # watch, and no checker or detector to tell unless it had them before.
                simple = svc.simple()
                frontends = service_frontends(svc, ctx)
                conflicts = rec.set_service(key, frontends, _NOTHING_WATCHED if simple
                                            else watched_endpoints(svc))
                if conflicts:
                    self._conflicts[key] = conflicts
                    log.error("%s/%s not programmed where another service has the same "
                              "frontend: %s", key[0], key[1], "; ".join(conflicts))
                    if wanted is not None:
                        wanted.update(rec.frontends_of(key))
                else:
                    if self._conflicts:
                        self._conflicts.pop(key, None)
                    if wanted is not None:  # with no conflict, what it owns is what it wants
                        wanted.update(frontends)
            if simple and not (checked and key in checked) and not (watched and key in watched):
                continue
            if (svc is not None and svc.health_check is not None) or key in self._checked:
                targets = _health_targets(svc) if svc else {}
                self.health.set_service_targets(key, targets)
                if targets:
                    self._checked.add(key)
                else:
                    self._checked.discard(key)
            if (svc is not None and svc.outlier_detection is not None) or key in self._watched:
                self.outlier.configure_service(key, svc)
                if svc is not None and svc.outlier_detection is not None:
                    self._watched.add(key)
                else:
                    self._watched.discard(key)
        self._dirty.clear()
        self._services_next.update(changes)  # published with the round's frontends

    def _publish(self, result: RoundResult, listed_only: bool = False) -> None:
        rec = self.reconciler
        # What the snapshot stores (snapshot.stored_view): a done frontend written from what
        # it still wants is its ProgrammedFrontend; the view is built when a reader asks.
        views: Dict[FrontendKey, Union[FrontendView, ProgrammedFrontend, None]] = {}
        # A round of the first sync publishes what it touched; the frontends still pending
        # (adopted, not listed yet: up to all of them) wait for the full round.
        desired, programmed = rec.desired, rec.programmed
        # StatusTable.get inline: a status not stored is done if programmed (else none).
        stored, done = rec.status.stored, DONE_STATUS
        failing = self._failing
        # Not the union when nothing is pending (a first round's 100,000 keys hashed again).
        keys = result.touched if listed_only or not rec.pending else result.touched | rec.pending
        added = rec.last_added
        if added and len(added) <= len(keys):
            # First written this round (nearly all of a first sync's page round): each one's
            # stored view is itself, in one go; the loop below looks at the others.
            views.update(zip(map(_key_of, added), added))
            rec.last_added = []  # read: not held (a whole first round's are 0.8 MiB)
            if failing:
                failing.difference_update(views)
            keys = keys.difference(views)
        view = FrontendView
        for fk in keys:
            p = programmed.get(fk)
            st = stored(fk) or (done if p is not None else None)
            if st is None:
                views[fk] = None
                failing.discard(fk)
                continue
            d = desired.get(fk)
            if st is done and p is not None and d is not None and p.desired is d:
                views[fk] = p
                if failing:
                    failing.discard(fk)
                continue
            views[fk] = view(fk, d, p, st)
            if st.state == ERROR:
                failing.add(fk)
            elif failing:
                failing.discard(fk)
        snap = self.snapshot
        # The last round that did something (a quiet round would hide it); never changed again.
        # Readers want its counts and errors: the keys it touched (all 100,000 after a first
        # sync, 4 MiB) and the endpoints it removed stay with the caller.
        last = replace(result, touched=set(), removed_endpoints=[]) \
            if (result or snap.last_round is None) else snap.last_round
        self.snapshot = snap.with_frontends(
            views, generation=snap.generation + 1, last_round=last, failing=len(self._failing),
            conflicts=tuple(c for cs in self._conflicts.values() for c in cs),
            **self._unpublished(snap))


_key_of = operator.attrgetter("key")
_NOTHING_WATCHED: FrozenSet[Tuple[str, int]] = frozenset()  # watched_endpoints of a simple one


def _health_targets(svc: Service) -> Dict[TargetKey, HealthCheck]:
    hc = svc.health_check
    if hc is None:
        return {}
    first = next((sp for sp in svc.ports if sp.protocol == "TCP"), svc.ports[0])
    return {TargetKey(svc.namespace, svc.name, b.address, hc.port or b.target_port(first)): hc
            for b in svc.backends}


class Supervisor:
    """Runs workers on threads. A worker that raises is logged, counted and restarted after
    a short backoff; one that keeps failing (5 times within a minute) makes the agent give up
    (`on_give_up`) so that its own supervisor (systemd, the kubelet) restarts it whole."""

    def __init__(self, stop: threading.Event, on_give_up: Callable[[str], None],
                 count: Callable[[str], None] = lambda name: None):
        self.stop = stop
        self.on_give_up = on_give_up
        self.count = count
        self.threads: List[threading.Thread] = []

    def spawn(self, name: str, work: Callable[[], None]) -> None:
        t = threadname.Thread(target=self._run, args=(name, work), name=name, daemon=True)
        self.threads.append(t)
        t.start()

    def _run(self, name: str, work: Callable[[], None]) -> None:
        crashes: List[float] = []
        while not self.stop.is_set():
            try:
                work()
                return
            except Exception:  # noqa: BLE001 - any crash is logged, counted and restarted
                log.exception("worker %s crashed; restarting it", name)
                self.count(name)
                now = time.monotonic()
                crashes = [t for t in crashes if now - t < 60] + [now]
                if len(crashes) >= 5:
                    self.on_give_up(f"worker {name} crashed 5 times within a minute")
                    return
                self.stop.wait(min(5.0, 0.1 * 2 ** len(crashes)))

    def join(self, timeout: float = 2.0) -> None:
        for t in self.threads:
            t.join(timeout)


class SocketTerminator:
    """Ends client sockets still connected to endpoints no frontend uses any more, on one
    worker that coalesces requests (a burst of changes is one walk of the namespaces)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: Dict[Tuple[str, int, str], bool] = {}
        self.terminated = 0

    def request(self, removed: List[Tuple[str, int, str, bool]]) -> None:
        """(address, port, protocol, end TCP too): UDP is always ended (a connected UDP socket
        stays pinned to a dead backend forever), TCP where the service asked for it."""
        with self._cond:
            for address, port, proto, kill_tcp in removed:
                if proto == "UDP" or kill_tcp:
                    self._pending[(address, port, proto)] = True
            if self._pending:
                self._cond.notify()

    def run(self, stop: threading.Event) -> None:
        from .datapath import sockterm

        while not stop.is_set():
            with self._cond:
                while not self._pending and not stop.is_set():
                    self._cond.wait(0.5)
                batch, self._pending = self._pending, {}
            for proto in ("UDP", "TCP"):
                dests = sorted((a, p) for a, p, pr in batch if pr == proto)
                if not dests:
                    continue
                try:
                    res = sockterm.destroy_sockets(dests, proto)
                except OSError as e:
                    log.error("terminating %s sockets to %s failed: %s", proto, dests, e)
                    continue
                n = getattr(res, "destroyed", getattr(res, "total", 0))
                self.terminated += n
                if n:
                    log.info("terminated %d %s sockets to removed backends %s", n, proto, dests)
