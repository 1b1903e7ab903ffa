#!/usr/bin/env python3
"""CPU of a one-service change round at N services, in-process: no kernel, no source.

    PYTHONPATH=agent:tests .venv/bin/python bench/core_round.py 100000 300 [--drop-entries]
        [--profile] [--cold] [--scrape]

Builds N services (3 backends each, one TCP port) in the agent's Core and Reconciler over
tests/fakemaps.py, runs the first round (all N in one round, with the agent's collector
thresholds of a first sync) and prints its CPU and the peak RSS it reached (VmHWM, reset
first; it includes the in-memory map's entries, which the kernel holds in the agent), then
`gc.collect(); gc.freeze()` as the agent does after its first sync. Then, twice, CHANGES
one-service changes (one backend replaced, a different service each time) through
`Core.step`, and prints the CPU time
(`time.process_time`) per round: the core loop's own work (planning, packing, the in-memory
map writes, status, the snapshot publish) without the Kubernetes source's threads or the
bpf(2) syscalls. --cold also times rounds that each start with the CPU caches evicted (a
64 MiB buffer written between them, untimed), as a lone change meets them in the agent.
--drop-entries keeps no services/backends entries in the in-memory map
(the kernel holds them, not the agent's heap), for the first round's peak RSS. --profile
adds a cProfile (CPU clock) of a third pass. --scrape times the per-frontend scrape
(render_large and collect) over the first round's snapshot at both detail levels. For a
side-by-side, run this script with PYTHONPATH at a `git archive` of another commit's agent
(and this checkout's tests), and alternate.
"""
import cProfile
import gc
import pstats
import sys
import time

from fakemaps import FakeMaps
from prometheus_client import CollectorRegistry

from nodemesh.core import Core, SourceChanged
from nodemesh.datapath import maps as m
from nodemesh.health import HealthChecker
from nodemesh.model import Backend, Service, ServicePort
from nodemesh.outlier import OutlierDetector
from nodemesh.reconciler import Reconciler
from nodemesh.snapshot import SourceState
from nodemesh.sources import Delta

PORTS = (ServicePort(name="http", port=80, target_port=8080),)


def service(i: int, generation: int = 0) -> Service:
    backends = []
    for j in range(3):
        n = i * 3 + j
        address = f"10.{128 + n // 65536}.{n // 256 % 256}.{n % 256}"
        if j == 2 and generation:  # a change: this backend was replaced
            address = f"10.{200 + generation // 65536}.{generation // 256 % 256}." \
                      f"{generation % 256}"
        backends.append(Backend(address=address))
    return Service(name=f"svc-{i}", namespace=f"ns-{i % 100}",
                   vip=f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}", ports=PORTS,
                   backends=tuple(backends))


class EntriesInTheKernel(FakeMaps):
    """Writes to the big maps are counted, not stored: their entries live in the kernel."""

    def update_packed(self, name, keys, values):
        if name in ("services", "backends"):
            self.calls.append(("update", name, len(keys)))
            return
        super().update_packed(name, keys, values)


def _status_mib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith(field))


def main() -> None:
    n, changes = int(sys.argv[1]), int(sys.argv[2])
    registry = CollectorRegistry()
    services = tuple(service(i) for i in range(n))
    gc.collect()
    gc.freeze()  # the source's objects: not the round's
    thresholds = gc.get_threshold()
    from nodemesh import daemon
    if hasattr(daemon, "_collect_less_while_syncing"):
        daemon._collect_less_while_syncing()
    core = Core(Reconciler(EntriesInTheKernel() if "--drop-entries" in sys.argv else FakeMaps(),
                          m.MapSizes()), HealthChecker(registry, lambda k: None),
                OutlierDetector(registry, lambda s: None), SourceState("kubernetes"))
    rss_before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current RSS
    start = time.process_time()
    core.post(SourceChanged(Delta(upserts=services, full=True)))
    core.step(0, reconcile=False)
    core.reconcile(force=True)
    first = time.process_time() - start
    print(f"N={n}: first round {first:.2f} s CPU ({first / n * 1e6:.0f} us a service); RSS "
          f"{rss_before} MiB before it, peak {_status_mib('VmHWM')} MiB during it")
    gc.set_threshold(*thresholds)
    gc.collect()
    gc.freeze()
    generation = [0]

    def rounds() -> float:
        start = time.process_time()
        for g in range(generation[0] + 1, generation[0] + changes + 1):
            core.post(SourceChanged(Delta(upserts=(service(g * 37 % n, g),))))
            result = core.step(0)
            assert result is not None and result.changed == 1, result
        generation[0] += changes
        return (time.process_time() - start) / changes

    if "--scrape" in sys.argv:
        scrape(core)
    print(f"N={n}: {rounds() * 1000:.3f} ms CPU a round (warm-up)")
    print(f"N={n}: {rounds() * 1000:.3f} ms CPU a round")
    if "--cold" in sys.argv:
        print(f"N={n}: {cold_rounds(core, service, n, generation, changes) * 1000:.3f} ms CPU "
              f"a round, the CPU caches evicted before each")
    if "--profile" in sys.argv:
        profile = cProfile.Profile(time.process_time)
        profile.enable()
        rounds()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


def scrape(core) -> None:
    """CPU of the per-frontend scrape (metrics.DatapathCollector.render_large and collect)
    over the published snapshot, at both detail levels, with kernel counters for every frontend (the
    maps' reads stubbed: the readers' walk of the snapshot is what is timed). Median of 5."""
    from types import SimpleNamespace

    from nodemesh import metrics

    ids = [v.programmed.svc_id for v in core.snapshot.frontends.values()]
    svc_stats = {i: {"connections": 7, "no_backend": 0, "proxy_redirects": 0} for i in ids}

    class Counters:
        def percpu_sums(self, name):
            return svc_stats if name == "svc_stats" else {}

        def items(self, name):
            return iter(())

        def counters(self):
            return {}

        def count(self, name):
            return 0

    agent = SimpleNamespace(maps=Counters(), snapshot=core.snapshot, core=core,
                            sizes=m.MapSizes())
    for detail in (metrics.DETAIL_SERVICE, metrics.DETAIL_BACKEND):
        collector = metrics.DatapathCollector(agent, detail)
        times = []
        for _ in range(5):
            start = time.process_time()
            size = len(collector.render_large())
            list(collector.collect())  # the families with the map entries counted
            times.append(time.process_time() - start)
        print(f"N={len(ids)}: scrape ({detail} detail) {sorted(times)[2] * 1000:.0f} ms CPU, "
              f"{size} bytes")


def cold_rounds(core, service, n: int, generation: list, changes: int) -> float:
    """The rounds again, each after writing one byte per cache line of a 64 MiB buffer (not
    timed): in the agent a change comes alone, tens of ms after the last one, and other
    processes have evicted the heap's lines from the CPU caches by then. Back-to-back rounds
    keep them warm and show a fraction of the agent's figure."""
    junk = bytearray(64 * 2 ** 20)
    ones = bytes(len(junk[::64]))
    total = 0.0
    for g in range(generation[0] + 1, generation[0] + changes + 1):
        junk[::64] = ones
        start = time.process_time()
        core.post(SourceChanged(Delta(upserts=(service(g * 37 % n, g),))))
        result = core.step(0)
        total += time.process_time() - start
        assert result is not None and result.changed == 1, result
    generation[0] += changes
    return total / changes


if __name__ == "__main__":
    main()
