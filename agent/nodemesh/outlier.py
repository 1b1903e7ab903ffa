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
    def __init__(self, registry: CollectorRegistry, on_change: Callable[[], None],
                 reset_endpoint: Callable[[str, int], None] = lambda a, p: None,
                 clock: Callable[[], float] = time.monotonic):
        self.on_change = on_change
        self.reset_endpoint = reset_endpoint
        self.clock = clock
        self.lock = threading.Lock()
        self.state: Dict[Key, Ejection] = {}
        # endpoint (address, port) -> services watching it, with their settings
        self._watch: Dict[Tuple[str, int], List[Service]] = {}
        self._services: Dict[Tuple[str, str], Service] = {}
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
        watch: Dict[Tuple[str, int], List[Service]] = {}
        for svc in services:
            if svc.outlier_detection is None:
                continue
            for sp in svc.ports:
                if sp.protocol != "TCP":
                    continue
                for b in svc.backends:
                    watch.setdefault((b.address, b.target_port(sp)), []).append(svc)
        with self.lock:
            self._watch = watch
            self._services = {s.key: s for s in services if s.outlier_detection is not None}
            live = {(s.namespace, s.name, b.address) for s in self._services.values()
                    for b in s.backends}
            for key in list(self.state):
                if key not in live:
                    del self.state[key]

    def on_failure(self, address: str, port: int, consecutive: int, ts_ns: int) -> None:
        """A failed connect reported by the kernel (ring buffer thread)."""
        changed = False
        with self.lock:
            now = self.clock()
            for svc in self._watch.get((address, port), ()):
                od = svc.outlier_detection
                if consecutive < od.consecutive_failures:
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
                                svc.name, address, consecutive, out, len(svc.backends),
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
                            consecutive, od.base_ejection_seconds * st.times, st.times)
                changed = True
        if changed:
            self.reset_endpoint(address, port)
            self.on_change()

    @staticmethod
    def _decay(st: Ejection, base: float, now: float) -> None:
        # Each base period spent back in service forgives one earlier ejection.
        if st.returned_at is not None and st.times > 0:
            st.times = max(0, st.times - int((now - st.returned_at) // base))
            st.returned_at = None

    def expire(self) -> Optional[float]:
        """Return ejected backends whose time is up. Returns seconds to the next return."""
        changed = False
        nxt = None
        with self.lock:
            now = self.clock()
            for key, st in self.state.items():
                if st.until is None:
                    continue
                if now >= st.until:
                    st.until = None
                    st.returned_at = now
                    changed = True
                    log.info("%s/%s: %s returns after its ejection", *key)
                else:
                    nxt = st.until - now if nxt is None else min(nxt, st.until - now)
        if changed:
            self.on_change()
        return nxt

    def ejected(self) -> Set[Key]:
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
