#!/usr/bin/env python3
"""CPU of the agent's first sync from the Kubernetes source, phase by phase, without HTTP or
the kernel: what is left of "synced in <= 10 s" once the network and the datapath are out.

    .venv/bin/python bench/k8s_sync_cpu.py 50000 [--agent DIR]

N Services + N EndpointSlices (bench/k8s_source.py's objects) are paged (500 a page) as the
fake API server serves them (tests/k8s_fake_apiserver.py), then timed in this process with
process CPU time:

  list         every page decoded and parsed into the source's cluster state, by the
               source's own list loop (_Watcher._list, the page fetches stubbed with the
               stored pages): with the decoding worker when the agent code has one (its CPU
               is reported apart, as "worker"), unless --no-worker; "list wall" is its
               elapsed time. Agent code that streams the first sync (Core.reconcile_listed)
               lists the slices first, then the services, and after each services page
               takes the partial delta and runs the core's round of it here, in line
               ("of which page rounds": their CPU), where the agent runs them on its core
               thread while the next page decodes: this harness adds the two, it does not
               overlap them
  first delta  the full set assembled (take_delta)
  core round   the core folds it, plans every frontend (all of them, or what the page
               rounds left) and packs the map writes into an in-memory map
               (tests/fakemaps.py), and publishes its snapshot
  collect      the full gc.collect() the agent does before it freezes the first sync
  (--compiling: the slices' pages go where the agent sends them while its datapath compiles)
  (--source-only: no core at all, neither page rounds nor core round: the source's part)
  per event    then (--events N, 1,000 by default) N watch events, each one EndpointSlice
               MODIFIED (an endpoint's pod replaced: a new address), taken as the source's
               watch thread takes an event's JSON line (json.loads, _Watcher._handle: parse,
               assemble, the event counter) and its delivery thread the change (take_delta,
               the last-sync gauge): the source's CPU a change, without HTTP and without the
               two threads' wake-ups; in microseconds an event

The GC thresholds are the agent's during a first sync (daemon._collect_less_while_syncing)
when the agent code has them. --agent DIR times another checkout's agent/ (for example a
`git archive` of an older commit), for side-by-side runs: alternate them (A B A B), since a
shared machine moves CPU times by tens of percent.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("services", type=int)
    parser.add_argument("--agent", default=ROOT, metavar="DIR",
                        help="the checkout whose agent/ is timed (default: this one)")
    parser.add_argument("--no-worker", action="store_true",
                        help="parse every page in this process (the decoding worker off)")
    parser.add_argument("--compiling", action="store_true",
                        help="the agent's settings on two CPUs while its datapath compiles "
                        "(which here never ends): the slices' pages as the agent lists them "
                        "then (the worker's only, or parsed in this process in older "
                        "checkouts), the services' the worker's")
    parser.add_argument("--source-only", action="store_true",
                        help="the source's part alone: no core (no page rounds, no core round)")
    parser.add_argument("--events", type=int, default=1000, metavar="N",
                        help="EndpointSlice MODIFIED events timed after the sync (0: none)")
    args = parser.parse_args()
    sys.path[:0] = [os.path.join(args.agent, "agent"), os.path.join(ROOT, "tests"),
                    os.path.join(ROOT, "bench")]
    from fakemaps import FakeMaps
    from k8s_source import served_pages, slice_object
    from prometheus_client import CollectorRegistry

    from nodemesh import daemon
    from nodemesh.core import Core, SourceChanged
    from nodemesh.datapath import maps as m
    from nodemesh.health import HealthChecker
    from nodemesh.outlier import OutlierDetector
    from nodemesh.reconciler import Reconciler
    from nodemesh.snapshot import SourceState
    from nodemesh.sources import kubernetes as k8s

    n = args.services

    def head(body: bytes) -> dict:
        if hasattr(k8s, "_list_head"):
            return k8s._list_head(body.decode())
        fields: dict = {}  # an older checkout: read the page's metadata the long way
        for _ in k8s._list_items(body.decode(), fields):
            pass
        return fields["metadata"]

    pages = served_pages(n, head)
    gc.collect()
    gc.freeze()  # the pages are the server's, not the agent's: out of the collector's sight
    if hasattr(daemon, "_collect_less_while_syncing"):
        daemon._collect_less_while_syncing()

    class Source:  # what a _Watcher asks of its source, without a server
        # The worker for both lists (shared), or for neither; or (--compiling) the agent's
        # two-CPU settings, without the compile's end.
        DECODE_IN_WORKER = not args.no_worker and not args.compiling
        DECODE_SERVICES_IN_WORKER = args.compiling
        _listing = threading.Lock()
        _compile_done = threading.Event()  # no compile here
        _decoder = k8s.PageDecoder(print) if hasattr(k8s, "PageDecoder") else None
        resync_seconds = 300
        source = None  # the source's own counting, once the events are timed

        def _count(self, kind):
            if self.source is not None:
                self.source._count(kind)

        def _mark_synced(self):
            if self.source is not None:
                self.source._mark_synced()

        def _watch_changed(self):  # a watch's own delivery: this harness takes the delta
            pass

    times = {}
    registry = CollectorRegistry()
    core = Core(Reconciler(FakeMaps(), m.MapSizes()), HealthChecker(registry, lambda key: None),
                OutlierDetector(registry, lambda services: None), SourceState("kubernetes"))
    streaming = hasattr(core, "reconcile_listed")
    order = (("endpointslice", "endpointslices"), ("service", "services")) if streaming \
        else (("service", "services"), ("endpointslice", "endpointslices"))
    started, wall = time.process_time(), time.monotonic()
    state = k8s._ClusterState(lambda: None, lambda notes: None)
    rounds = [0.0]
    if streaming:
        list_page = state.list_page

        def list_page_then_program(kind, items, seen):
            list_page(kind, items, seen)
            mark = time.process_time()
            delta = state.take_delta() if kind == "service" else None
            if delta is not None and delta.partial and not args.source_only:
                core.post(SourceChanged(delta))
                core.step(0, reconcile=False)
                core.reconcile_listed()
            rounds[0] += time.process_time() - mark

        state.list_page = list_page_then_program
    for kind, collection in order:
        by_token = {token: body for token, body in pages[collection]}
        watcher = k8s._Watcher(kind, None, Source(), state)
        # As the agent's own _page gives them: bytes (boot7 on), text before.
        as_bytes = k8s._Watcher._page.__annotations__.get("return") in ("bytes", bytes)
        watcher._page = lambda query, by_token=by_token, as_bytes=as_bytes: \
            by_token[query.get("_continue")] if as_bytes else \
            by_token[query.get("_continue")].decode("utf-8")
        watcher._list()
    times["list"] = time.process_time() - started
    times["of which page rounds"] = rounds[0]
    times["list wall"] = time.monotonic() - wall
    while any(t.name in ("kubernetes-decoder-read", "kubernetes-decoder-reap")
              for t in threading.enumerate()):
        time.sleep(0.01)  # the worker exits once the list is done: its CPU, once it has
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    times["worker"] = usage.ru_utime + usage.ru_stime
    mark = time.process_time()
    delta = state.take_delta()
    times["first delta"] = time.process_time() - mark
    if not args.source_only:
        mark = time.process_time()
        core.post(SourceChanged(delta))
        core.step(0, reconcile=False)
        result = core.reconcile(force=True)
        times["core round"] = time.process_time() - mark
    mark = time.process_time()
    gc.collect()
    times["collect"] = time.process_time() - mark
    assert args.source_only or len(core.reconciler.programmed) == n, result
    assert delta is not None and len(delta.upserts) == n
    times["total"] = time.process_time() - started
    times["total wall"] = time.monotonic() - wall
    if args.events:
        # Each event replaces one endpoint of another service's slice (a new address each
        # time), as bench/k8s_source.py's changes do; the lines are made before timing.
        import json
        lines = []
        for e in range(args.events):
            obj = slice_object(e * (n // args.events), generation=e + 1)
            obj["metadata"]["resourceVersion"] = str(10 ** 9 + e)
            lines.append(json.dumps({"type": "MODIFIED", "object": obj}).encode())
        source = Source()
        # The source's own _count and _mark_synced (its metrics), without its client: a
        # KubernetesSource built without __init__, given what those two read.
        counting = object.__new__(k8s.KubernetesSource)
        counting._metrics = k8s.source_metrics(CollectorRegistry())
        counting._event_counters = {kind: counting._metrics.events.labels(
            source="kubernetes", kind=kind) for kind in k8s.EVENT_KINDS}
        counting._last_sync = counting._metrics.last_sync.labels(source="kubernetes")
        source.source = counting
        watcher = k8s._Watcher("endpointslice", None, source, state)
        delivered = 0
        mark = time.process_time()
        for line in lines:
            watcher._handle(json.loads(line))
            delta = state.take_delta()
            delivered += len(delta.upserts) if delta is not None else 0
            source._mark_synced()
        times["per event"] = (time.process_time() - mark) / args.events * 1e6
        assert delivered == args.events, delivered
    load = os.getloadavg()[0]
    load = os.getloadavg()[0]
    print(f"{n:,} services, agent {args.agent}: " +
          ", ".join(f"{name} {seconds:.0f} µs" if name == "per event" else
                    f"{name} {seconds:.2f} s" for name, seconds in times.items()) +
          f" (CPU of this process, the worker's apart, and wall; 1-min load average "
          f"{load:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
