#!/usr/bin/env python3
"""Maglev tables: build time, agent CPU and memory, and kernel memory, up to 100,000 services.

    .venv/bin/python bench/maglev.py                     # quick: 10,000 services
    .venv/bin/python bench/maglev.py --services 100000   # the issue's size (a few minutes)

Parts:
  build      nodemesh.maglev.build_table for 3 backends at each table size: median (min-max) of
             --repeats runs, in this process (pure Python).
  program    N services x 3 backends, algorithm maglev, through the real reconciler into a real
             datapath: programs loaded and maps pinned in a private bpffs folder, attached to no
             cgroup (no traffic). Table size 307 (the smallest prime >= 100 x 3 backends: the
             Maglev paper's sizing for ~1% balance), then --big services at the default 16,381.
             Measured: the first apply (every table built and written), one service changed
             afterwards (set_service + reconcile, as the core loop does; median of --changes,
             alternately moved to 3 other backends and back), this process's RSS growth, and
             the kernel memory of the tables from /proc/self/fdinfo's memlock of a sample of
             them (active and spare have the same size).
The reconciler's node limit (--maglev-max-rows) is raised for the run: 100,000 x 307 rows is
over the 16,777,216-row default, which is the point of the limit.

Safety: nothing is attached; the pin folder is /sys/fs/bpf/nmb-maglev-<pid>, removed on exit.
Results: markdown on stdout and appended to bench/results/maglev.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "agent"))

from nodemesh import maglev  # noqa: E402
from nodemesh.datapath import bpfsys  # noqa: E402
from nodemesh.datapath.loader import Datapath, cleanup  # noqa: E402
from nodemesh.datapath.maglev_tables import _open  # noqa: E402
from nodemesh.model import Backend, Service, ServicePort  # noqa: E402
from nodemesh.reconciler import FrontendKey, Reconciler, service_frontends  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fmt(xs: List[float], unit: str = "ms", scale: float = 1000) -> str:
    v = sorted(x * scale for x in xs)
    return f"{statistics.median(v):.3g} {unit} ({v[0]:.3g}–{v[-1]:.3g})"


def build_part(repeats: int) -> str:
    rows = ["| table size | build, 3 backends | build, 100 backends |", "|---|---|---|"]
    for size in (307, 1021, 4093, 16381, 65521):
        cells = []
        for n in (3, 100):
            if n > size:
                cells.append("–")
                continue
            backends = [(maglev.backend_key(f"10.1.{i // 256}.{i % 256}", 8080), 1)
                        for i in range(n)]
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                maglev.build_table(backends, size)
                times.append(time.perf_counter() - t)
            cells.append(fmt(times))
        rows.append(f"| {size:,} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def services(n: int, size: int, offset: int = 0, moved: int = -1) -> List[Service]:
    out = []
    for i in range(offset, offset + n):
        first = 10 if i != moved else 13
        out.append(Service(f"s{i}", "bench", f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",
                           (ServicePort(80, 8080, "TCP", "http"),),
                           tuple(Backend(f"10.200.0.{first + k}") for k in range(3)),
                           algorithm="maglev", maglev_table_size=size))
    return out


def memlock(rec: Reconciler, svc_ids: List[int]) -> float:
    """Mean kernel memory (memlock) of the tables of these frontends, in bytes."""
    got = []
    for svc_id in svc_ids:
        fd = _open(rec.maps.fd("maglev"), svc_id)
        if fd is None:
            continue
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("memlock:"):
                        got.append(int(line.split()[1]))
        finally:
            bpfsys.close(fd)
    return statistics.mean(got) if got else 0.0


def program_part(n: int, size: int, changes: int) -> Dict[str, str]:
    folder = f"/sys/fs/bpf/nmb-maglev-{os.getpid()}"
    dp = Datapath(folder, None)
    try:
        rec = Reconciler(dp.load(), maglev_max_rows=1 << 28)
        want = services(n, size)
        rss0 = rss_mib()
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = rec.apply(want)
        first, first_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        assert result.failed == 0, result.errors
        rss1 = rss_mib()
        times = []
        for c in range(changes):
            # One service moves to other backends (and back): what the core loop does for one
            # changed service (set_service, then a round), not a whole-set apply.
            i = (c // 2 * 7919) % n
            svc = services(1, size, offset=i, moved=i if c % 2 == 0 else -1)[0]
            t = time.perf_counter()
            rec.set_service(svc.key, service_frontends(svc))
            r = rec.reconcile()
            times.append(time.perf_counter() - t)
            assert r.failed == 0 and r.changed == 1, r
        ids = [rec.programmed[FrontendKey(4, s.vip, 80, "TCP")].svc_id for s in want[:200]]
        per_table = memlock(rec, ids)
        return {"n": f"{n:,}", "size": f"{size:,}", "first": f"{first:.1f} s",
                "first_cpu": f"{first_cpu:.1f} s", "per_service": f"{first / n * 1000:.2f} ms",
                "change": fmt(times), "rss": f"{rss1 - rss0:.0f} MiB",
                "table": f"{per_table / 1024:.1f} KiB",
                "kernel": f"{per_table * n / 2**20:,.0f} MiB "
                          f"(+ as much for spares once changed)"}
    finally:
        dp.close()
        cleanup(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--big", type=int, default=200, help="services at the default 16,381 rows")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--output", default=os.path.join(ROOT, "bench", "results", "maglev.md"))
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()[0]
    build = build_part(args.repeats)
    runs = [program_part(args.services, 307, args.changes),
            program_part(args.big, maglev.DEFAULT_TABLE_SIZE, args.changes)]
    head = (f"## Maglev, {started}\n\nkernel {platform.release()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}; `bench/maglev.py "
            f"{' '.join(sys.argv[1:])}`; 1-min load average {load0:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end (other engineers shared the machine). "
            f"Definitions: bench/maglev.py's docstring.\n")
    prog = ["| services × 3 backends | table size | first apply (wall / CPU) | per service | "
            "one service changed, median (min–max) | agent RSS growth | kernel memory per "
            "table (memlock) | kernel memory, all tables |", "|---|---|---|---|---|---|---|---|"]
    prog += [f"| {r['n']} | {r['size']} | {r['first']} / {r['first_cpu']} | {r['per_service']} "
             f"| {r['change']} | {r['rss']} | {r['table']} | {r['kernel']} |" for r in runs]
    text = (head + "\n### Table build (Python)\n\n" + build + "\n\n### Programming the kernel\n\n"
            + "\n".join(prog) + "\n")
    print(text)
    new = not os.path.exists(args.output)
    with open(args.output, "a") as f:
        f.write(("# nodemesh Maglev benchmarks\n\n" if new else "\n") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
