#!/usr/bin/env python3
"""What observability costs the datapath: everything of issue 11 on against the socket
datapath alone, side by side, with the kernel's own clock.

    .venv/bin/python bench/observability.py              # 5 rounds x 3 variants x 5 s (~2 min)
    .venv/bin/python bench/observability.py --reps 7 --seconds 5

Variants, switched in place between runs through the observe_config map (same programs, same
maps, same lab; bpf/lib/observe.h):
  alone     flow events off, backend latency off: the socket datapath alone (each hook still
            reads the one switch entry)
  flows     flow events only, at the default 1,000/s per CPU (the rest counted as lost)
  latency   backend latency only: connect duration / RTT / bytes / retransmits per backend
  on        the defaults: both
  unlimited as `on`, but every connection sends its flow event (a reader drains the ring, as
            the agent does)

Method. bench/run.py's lab: nginx (1 worker) in a backend netns, wrk -t1 -c32 -H "Connection:
close" from a client netns in the hooked cgroup (every request a new connection), one service
of 3 endpoints. Variants alternate round by round (A B C A B C ...) after a warm-up; before each
run TIME_WAIT sockets are destroyed. The bench holds BPF_ENABLE_STATS (as the agent does) and
reads run_time_ns/run_cnt of every program from fdinfo before and after each run: kernel ns
per connection = the delta of all programs' run time / the connections the kernel balanced in
that run. Reported: medians with min-max, and the ratios of medians to `alone`.
Targets (issue 11): < 10% extra kernel time per connection, connection rate within 3%; under
the flood (`on`: wrk is a flood of new connections) the rate drops by no more than 5%.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from types import SimpleNamespace
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workloads as wl  # noqa: E402
from run import Bench, log  # noqa: E402

from nodemesh import bpfstats, flows  # noqa: E402
from nodemesh.datapath.loader import cleanup  # noqa: E402
from nodemesh.datapath.ringbuf import RingBuffer  # noqa: E402
from nodemesh.lab.topology import new_lab  # noqa: E402

VARIANTS = {  # name: (flow events per second per CPU, burst, backend latency)
    "alone": (0, 1, False),
    "flows": (flows.DEFAULT_RATE, flows.DEFAULT_BURST, False),
    "latency": (0, 1, True),
    "on": (flows.DEFAULT_RATE, flows.DEFAULT_BURST, True),
    "unlimited": (100_000_000, 1_000_000, True),
}


def fmt(values: List[float], digits: int = 0) -> str:
    return (f"{statistics.median(values):,.{digits}f} "
            f"({min(values):,.{digits}f}-{max(values):,.{digits}f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--output", help="results file (default bench/results/observability.md)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("benchmarks need root (netns, cgroups, BPF)", file=sys.stderr)
        return 1
    command = "bench/observability.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if os.environ.get("NODEMESH_BPF_DIR"):  # a side-by-side run of another build's C sources
        command = f"NODEMESH_BPF_DIR={os.environ['NODEMESH_BPF_DIR']} {command}"
    import sigterm  # bench/: a kill tears the lab down too
    sigterm.exit_on_sigterm()
    lab = new_lab("nmo", backends=1)
    workdir = tempfile.mkdtemp(prefix="nodemesh-bench-obs-")
    bench = Bench(SimpleNamespace(variants=["nodemesh"], load_timeout=60.0), lab, workdir)
    stop = threading.Event()
    drained = [0]
    reader = None
    try:
        bench.setup()
        bench.program(1)
        v = bench.variants["nodemesh"]
        assert v.dp.maps is not None
        maps = v.dp.maps
        cost = bpfstats.KernelCost(v.dp.programs, {})
        if cost.stats_fd is None:
            print("BPF_ENABLE_STATS refused: cannot measure kernel time", file=sys.stderr)
            return 1
        ring = RingBuffer(v.dp.flow_ringbuf_fd)

        def drain() -> None:  # what the agent's flow worker does, minus decoding
            def one(_data: bytes) -> None:
                drained[0] += 1
            while not stop.is_set():
                ring.poll(one, 0.1)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()

        def conns() -> int:
            return sum(s["connections"] for s in maps.percpu_sums("svc_stats").values())

        def kernel_ns() -> Dict[str, int]:
            return {k: p["run_ns"] for k, p in cost.program_stats().items()}

        def kernel_runs() -> Dict[str, int]:
            return {k: p["runs"] for k, p in cost.program_stats().items()}

        results: Dict[str, Dict[str, List[float]]] = {
            name: {"rate": [], "ns": [], "sent": [], "lost": []} for name in VARIANTS}
        per_prog: Dict[str, Dict[str, List[float]]] = {name: {} for name in VARIANTS}
        runs_prog: Dict[str, Dict[str, List[float]]] = {name: {} for name in VARIANTS}
        load_before = os.getloadavg()[0]
        for rnd in range(args.reps + 1):  # round 0: warm-up, not counted
            for name, (rate, burst, latency) in VARIANTS.items():
                flows.configure(maps, rate, burst, latency)
                bench.reset(v)
                b0, c0, k0, r0 = flows.budget(maps), conns(), kernel_ns(), kernel_runs()
                rps, _reqs, _note = wl.conn(v.client("http"), 1 if rnd == 0 else args.seconds)
                time.sleep(0.2)  # the last connections' closes reach sockops
                b1, c1, k1, r1 = flows.budget(maps), conns(), kernel_ns(), kernel_runs()
                if rnd == 0:
                    continue
                n = max(c1 - c0, 1)
                r = results[name]
                r["rate"].append(rps)
                r["ns"].append(sum(k1[p] - k0[p] for p in k1) / n)
                r["sent"].append((b1["sent"] - b0["sent"]) / n)
                r["lost"].append((b1["lost_rate_limit"] + b1["lost_ring_full"]
                                  - b0["lost_rate_limit"] - b0["lost_ring_full"]) / n)
                for p in k1:
                    per_prog[name].setdefault(p, []).append((k1[p] - k0[p]) / n)
                    runs_prog[name].setdefault(p, []).append((r1[p] - r0[p]) / n)
                log(f"  round {rnd} {name:>9}: {rps:,.0f} conn/s, "
                    f"{r['ns'][-1]:,.0f} kernel ns/conn, events sent {r['sent'][-1]:.1%} "
                    f"lost {r['lost'][-1]:.1%}")
        load_after = os.getloadavg()[0]
        flows.configure(maps, flows.DEFAULT_RATE, flows.DEFAULT_BURST, True)
        text = report(results, per_prog, runs_prog, args, command, load_before, load_after,
                      drained[0])
        out = args.output or os.path.join(ROOT, "bench", "results", "observability.md")
        with open(out, "w") as f:
            f.write(text)
        print(text)
        cost.close()
        return 0
    finally:
        stop.set()
        if reader is not None:
            reader.join(timeout=2)
        bench.close()
        cleanup(lab.bpffs)
        lab.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def report(results, per_prog, runs_prog, args, command, load_before, load_after, drained) -> str:
    base_rate = statistics.median(results["alone"]["rate"])
    base_ns = statistics.median(results["alone"]["ns"])
    lines = [
        "# Observability cost (issue 11)", "",
        f"`{command}` on {os.uname().nodename} ({os.cpu_count()} CPUs, kernel "
        f"{os.uname().release}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{args.reps} rounds x {args.seconds} s per variant, alternating; 1-min load average "
        f"{load_before:.1f} before, {load_after:.1f} after (the machine is shared).", "",
        "| variant | new connections/s | ratio | kernel ns per connection | ratio | "
        "flow events sent / lost per connection |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rate, ns = statistics.median(r["rate"]), statistics.median(r["ns"])
        lines.append(f"| {name} | {fmt(r['rate'])} | {rate / base_rate:.3f} | {fmt(r['ns'])} | "
                     f"{ns / base_ns:.3f} | {statistics.median(r['sent']):.1%} / "
                     f"{statistics.median(r['lost']):.1%} |")
    # Each round's variant against the same round's `alone`, a few seconds apart: the other
    # work on a shared machine drifts between rounds more than within one.
    lines += ["", "Paired ratios: each round's figure over the same round's `alone`, median "
              "(min-max) over the rounds:", "",
              "| variant | new connections/s | kernel ns per connection |", "|---|---|---|"]
    for name, r in results.items():
        if name == "alone":
            continue
        rates = [a / b for a, b in zip(r["rate"], results["alone"]["rate"])]
        nss = [a / b for a, b in zip(r["ns"], results["alone"]["ns"])]
        lines.append(f"| {name} | {fmt(rates, 3)} | {fmt(nss, 3)} |")
    lines += ["", "Kernel ns per connection by program (median):", "",
              "| program | " + " | ".join(results) + " |",
              "|---|" + "---|" * len(results)]
    progs = sorted({p for d in per_prog.values() for p in d})
    for p in progs:
        cells = [f"{statistics.median(per_prog[n][p]):,.0f}" if per_prog[n].get(p) else "-"
                 for n in results]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += ["", "Runs per connection by program (median; programs that never ran left out):", "",
              "| program | " + " | ".join(results) + " |",
              "|---|" + "---|" * len(results)]
    for p in progs:
        medians = [statistics.median(runs_prog[n][p]) if runs_prog[n].get(p) else 0.0
                   for n in results]
        if any(medians):
            lines.append(f"| {p} | " + " | ".join(f"{x:.2f}" for x in medians) + " |")
    lines += ["", f"The ring reader drained {drained:,} flow events in all.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
