#!/usr/bin/env python3
"""CPU of the core's first-sync page rounds alone, and of its parts, best of R in a process.

    .venv/bin/python bench/page_rounds.py 100000 [--agent DIR] [--repeats 4]

N Services + N EndpointSlices (bench/k8s_source.py's objects) are listed by the Kubernetes
source's own list loop in this process (no worker), keeping each services page's partial
delta; then, R times on a new Core and Reconciler over an in-memory map (tests/fakemaps.py),
with the agent's first-sync GC thresholds, every page's delta goes through what the agent's
core thread does with it (post, step, Core.reconcile_listed) and then the full set through
the full round. Printed: the page rounds' process CPU (the best of the R), and the CPU inside
Core._fold, Core._push_dirty, Reconciler._add_fresh (Reconciler._commit, the map writes, in
it), Core._publish and Shards.updated (in it) over that best repetition. Where
bench/k8s_sync_cpu.py interleaves the rounds with the source's parsing (whose CPU and garbage
move the rounds' figure by tens of percent on a shared machine), this times them apart:
alternate two checkouts' --agent (A B A B) for a side by side.
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("services", type=int)
    parser.add_argument("--agent", default=ROOT, metavar="DIR")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    sys.path[:0] = [os.path.join(args.agent, "agent"), os.path.join(ROOT, "tests"),
                    os.path.join(ROOT, "bench")]
    from fakemaps import FakeMaps
    from k8s_source import served_pages
    from prometheus_client import CollectorRegistry

    from nodemesh import daemon, snapshot
    from nodemesh.core import Core, SourceChanged
    from nodemesh.datapath import maps as m
    from nodemesh.health import HealthChecker
    from nodemesh.outlier import OutlierDetector
    from nodemesh.reconciler import Reconciler
    from nodemesh.snapshot import SourceState
    from nodemesh.sources import kubernetes as k8s

    n = args.services
    served = served_pages(n, lambda body: k8s._list_head(body.decode()))
    pages: Dict[str, Dict[Any, bytes]] = {c: dict(bodies) for c, bodies in served.items()}
    del served

    class Source:  # what a _Watcher asks of its source, without a server or a worker
        DECODE_IN_WORKER = False
        DECODE_SERVICES_IN_WORKER = False
        _listing = threading.Lock()
        _compile_done = threading.Event()
        _decoder = None
        resync_seconds = 300

        def _count(self, kind: str) -> None:
            pass

        def _mark_synced(self) -> None:
            pass

        def _watch_changed(self) -> None:
            pass

    state = k8s._ClusterState(lambda: None, lambda notes: None)
    deltas: List[Any] = []
    list_page = state.list_page

    def list_page_and_keep(kind: str, items: Any, seen: Any) -> None:
        list_page(kind, items, seen)
        if kind == "service":
            delta = state.take_delta()
            if delta is not None and delta.partial:
                deltas.append(delta)

    state.list_page = list_page_and_keep  # type: ignore[method-assign]
    for kind, collection in (("endpointslice", "endpointslices"), ("service", "services")):
        by_token = pages[collection]
        watcher = k8s._Watcher(kind, None, Source(), state)
        watcher._page = lambda query, by_token=by_token: by_token[query.get("_continue")]
        watcher._list()
    full = state.take_delta()
    del pages
    gc.collect()
    gc.freeze()
    daemon._collect_less_while_syncing()

    spent: Dict[str, float] = collections.Counter()

    def timed(owner: Any, name: str) -> None:
        inner: Callable[..., Any] = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            mark = time.process_time()
            try:
                return inner(*a, **k)
            finally:
                spent[name] += time.process_time() - mark

        setattr(owner, name, wrapper)

    for owner, name in ((Core, "_fold"), (Core, "_push_dirty"), (Reconciler, "_add_fresh"),
                        (Reconciler, "_commit"), (Core, "_publish"),
                        (snapshot.Shards, "updated")):
        timed(owner, name)
    best = None
    for _ in range(args.repeats):
        spent.clear()
        registry = CollectorRegistry()
        core = Core(Reconciler(FakeMaps(), m.MapSizes()),
                    HealthChecker(registry, lambda key: None),
                    OutlierDetector(registry, lambda services: None), SourceState("kubernetes"))
        started = time.process_time()
        for delta in deltas:
            core.post(SourceChanged(delta))
            core.step(0, reconcile=False)
            core.reconcile_listed()
        rounds = time.process_time() - started
        core.post(SourceChanged(full))
        core.step(0, reconcile=False)
        core.reconcile(force=True)
        assert len(core.reconciler.programmed) == n
        if best is None or rounds < best[0]:
            best = (rounds, dict(spent))
        del core
        gc.collect()
    assert best is not None
    print(f"{n:,} services, {len(deltas)} pages, agent {args.agent}: page rounds "
          f"{best[0]:.2f} s (best of {args.repeats}); in it " +
          ", ".join(f"{name} {seconds:.2f} s" for name, seconds in best[1].items()) +
          f" (process CPU; 1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
          f"CPUs)")


if __name__ == "__main__":
    main()
