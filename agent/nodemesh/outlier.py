"""Passive outlier detection from kernel signals (Envoy's consecutive-failure detection).

The sockops program counts, per backend endpoint, TCP connects that closed before they were
established (refused, reset, timed out) and sends each failure on a ring buffer with the
running count of consecutive failures. This module turns those events into ejections:

  * a backend of a service with `outlierDetection` is ejected when an endpoint's consecutive
    failures reach `consecutiveFailures`;
  * it stays out for baseEjectionSeconds x (times ejected), so a backend that keeps failing
    stays out longer; each base period it then spends in service takes one off that count;
  * at most maxEjectionPercent of a service's backends are out at once (at least one may go);
  * the service's panic threshold (agent/selection.py) still applies on top.

Why sockops and not the sock:inet_sock_set_state tracepoint: sockops is attached to the same
cgroup as the balancing hooks, so it sees exactly the clients we balance and nothing else on
the node; it turns the state callback on only for sockets to watched endpoints, so other
connections cost nothing; and it hands us the socket, not a tracepoint's copy of fields.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram

from .model import Service

log = logging.getLogger(__name__)

Key = Tuple[str, str, str]  # (namespace, service, backend address)


@dataclass
class Ejection:
    times: int = 0                       # ejections so far (the multiplier)
    until: Optional[float] = None        # monotonic time it returns; None: in service
    returned_at: Optional[float] = None
    last_event_ns: int = 0


class OutlierDetector:
    """Thread-safety: on_failure runs on the ring-buffer thread, everything else on the core
    loop; one lock guards the state. `on_change` gets the services whose set changed.

    The kernel's consecutive-failure count is never written from here (only the reconciler
    writes maps, and a write would race the kernel's atomic adds). An ejection instead
    remembers the count it saw, and later events count from there, so a returning backend
    starts afresh just the same."""

    def __init__(self, registry: CollectorRegistry,
                 on_change: Callable[[Set[Tuple[str, str]]], None],
                 clock: Callable[[], float] = time.monotonic):
        self.on_change = on_change
        self.clock = clock
        self.lock = threading.Lock()
        self.state: Dict[Key, Ejection] = {}
        # endpoint (address, port) -> services watching it, with their settings
        self._watch: Dict[Tuple[str, int], Dict[Tuple[str, str], Service]] = {}
        self._services: Dict[Tuple[str, str], Service] = {}
        self._baseline: Dict[Tuple[str, int], int] = {}  # kernel count at the last ejection
        self.ejections = Counter("nodemesh_backend_ejections",
                                 "Backends ejected from a service's selection set",
                                 ["namespace", "service", "reason"], registry=registry)
        self.latency = Histogram("nodemesh_outlier_ejection_latency_seconds",
                                 "From the kernel's Nth failed connect to the ejection being "
                                 "programmed", buckets=(.001, .0025, .005, .01, .025, .05, .1,
                                                        .25, .5, 1),
                                 registry=registry)
        self.pending_latency: List[int] = []  # kernel timestamps of ejecting failures
        self.last_latencies: List[float] = []

    def configure(self, services: Sequence[Service]) -> None:
        """Whole-set form of configure_service."""
        wanted = {s.key for s in services}
        for key in [k for k in self._services if k not in wanted]:
            self.configure_service(key, None)
        for svc in services:
            self.configure_service(svc.key, svc)

    def configure_service(self, key: Tuple[str, str], svc: Optional[Service]) -> None:
        """One service's settings and backends (None: it is gone). Costs what it has."""
        if svc is not None and svc.outlier_detection is None:
            svc = None
        with self.lock:
            old = self._services.pop(key, None)
            if old is not None:
                for ep in _endpoints(old):
                    watchers = self._watch.get(ep)
                    if watchers is not None:
                        watchers.pop(key, None)
                        if not watchers:
                            del self._watch[ep]
                            self._baseline.pop(ep, None)
            if svc is None:
                live = set()
            else:
                self._services[key] = svc
                for ep in _endpoints(svc):
                    self._watch.setdefault(ep, {})[key] = svc
                live = {b.address for b in svc.backends}
            if old is not None:
                for b in old.backends:
                    if b.address not in live:
                        self.state.pop((key[0], key[1], b.address), None)

    def on_failure(self, address: str, port: int, consecutive: int, ts_ns: int) -> None:
        """A failed connect reported by the kernel (ring buffer thread)."""
        changed: Set[Tuple[str, str]] = set()
        with self.lock:
            now = self.clock()
            base = self._baseline.get((address, port), 0)
            # Below the baseline the kernel has reset its count (a success came between).
            count = consecutive - base if consecutive > base else consecutive
            for svc in self._watch.get((address, port), {}).values():
                od = svc.outlier_detection
                if count < od.consecutive_failures:
                    continue
                key = (svc.namespace, svc.name, address)
                st = self.state.setdefault(key, Ejection())
                if st.until is not None:
                    continue  # already out
                out = sum(1 for (ns, name, _), e in self.state.items()
                          if (ns, name) == svc.key and e.until is not None)
                cap = max(1, len(svc.backends) * od.max_ejection_percent // 100) \
                    if od.max_ejection_percent > 0 else 0
                if out >= cap:
                    log.warning("%s/%s: %s failing (%d in a row) but %d of %d backends are "
                                "already ejected (maxEjectionPercent %d)", svc.namespace,
                                svc.name, address, count, out, len(svc.backends),
                                od.max_ejection_percent)
                    continue
                self._decay(st, od.base_ejection_seconds, now)
                st.times += 1
                st.until = now + od.base_ejection_seconds * st.times
                st.last_event_ns = ts_ns
                self.ejections.labels(svc.namespace, svc.name, "consecutive_failures").inc()
                self.pending_latency.append(ts_ns)
                log.warning("%s/%s: ejected %s after %d consecutive failed connects, for "
                            "%.0fs (ejection #%d)", svc.namespace, svc.name, address,
                            count, od.base_ejection_seconds * st.times, st.times)
                changed.add(svc.key)
            if changed:
                self._baseline[(address, port)] = consecutive
        if changed:
            self.on_change(changed)

    @staticmethod
    def _decay(st: Ejection, base: float, now: float) -> None:
        # Each base period spent back in service forgives one earlier ejection.
        if st.returned_at is not None and st.times > 0:
            st.times = max(0, st.times - int((now - st.returned_at) // base))
            st.returned_at = None

    def expire(self) -> Optional[float]:
        """Return ejected backends whose time is up. Returns seconds to the next return."""
        if not self.state:  # no service watches its backends (nearly always): no lock taken
            return None
        changed: Set[Tuple[str, str]] = set()
        nxt = None
        with self.lock:
            now = self.clock()
            for key, st in self.state.items():
                if st.until is None:
                    continue
                if now >= st.until:
                    st.until = None
                    st.returned_at = now
                    changed.add((key[0], key[1]))
                    log.info("%s/%s: %s returns after its ejection", *key)
                else:
                    nxt = st.until - now if nxt is None else min(nxt, st.until - now)
        if changed:
            self.on_change(changed)
        return nxt

    def ejected(self) -> Set[Key]:
        if not self.state:  # nothing ever ejected (the core asks each change): no lock taken
            return set()
        with self.lock:
            return {k for k, st in self.state.items() if st.until is not None}

    def programmed(self) -> None:
        """The reconciler applied a set that includes the latest ejections: record latency."""
        now_ns = time.monotonic_ns()  # CLOCK_MONOTONIC, as bpf_ktime_get_ns()
        with self.lock:
            pending, self.pending_latency = self.pending_latency, []
        for ts in pending:
            seconds = max(0.0, (now_ns - ts) / 1e9)
            self.latency.observe(seconds)
            self.last_latencies = (self.last_latencies + [seconds])[-100:]

    def snapshot(self) -> List[Dict[str, object]]:
        with self.lock:
            now = self.clock()
            return [{"namespace": ns, "service": name, "backend": addr, "times": st.times,
                     "ejected_for_seconds": round(st.until - now, 1) if st.until else 0}
                    for (ns, name, addr), st in sorted(self.state.items())]


def _endpoints(svc: Service) -> Set[Tuple[str, int]]:
    return {(b.address, b.target_port(sp)) for sp in svc.ports if sp.protocol == "TCP"
            for b in svc.backends}
