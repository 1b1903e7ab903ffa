"""What a new connection costs its client on the socket path, hooks and all, beside direct.

sock_cost.py times the programs themselves (run_time_ns); this times the whole connect/close as
the client's own CPU (getrusage: user + system), so it also sees what the programs' run time
does not show: the cgroup-BPF run machinery of every hook attached, the socket storage's
allocation and its RCU free, the sockops state callbacks. Three ways, from the same client netns
to the same server (one backend), run round-robin (ABCABC...) so machine load spreads over all:

  direct          the client in a cgroup of its own with no hooks (a sibling of the hooked
                  one, same depth), connecting to the backend's address
  hooked-backend  the client in the hooked cgroup, connecting to the backend's address: every
                  hook runs, nothing is translated (the hooks' machinery alone)
  nodemesh        the client in the hooked cgroup, connecting to the VIP: translated

Each connect is closed with an RST (SO_LINGER 0), so no TIME_WAIT piles up. With --perf DIR,
each way's client is also profiled (perf record -g on its pid, one round) into DIR/<way>.data,
and the top kernel symbols of each are printed (--perf-system: the whole machine's, while that
way runs alone), for comparing `__cgroup_bpf_run_filter_*`,
`bpf_sk_storage_free`, `tcp_call_bpf` and the like between the ways.

    sudo .venv/bin/python bench/sock_path.py [--connects 20000] [--rounds 5] [--perf /tmp/sp]
        [--perf-system]
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "agent"))

from sock_cost import CLIENT  # noqa: E402 - "<failures> <client CPU ns>" a chunk

WAYS = ("direct", "hooked-backend", "nodemesh")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connects", type=int, default=20000, help="connects a way and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--perf", default="", help="a folder: profile each way's client once")
    ap.add_argument("--perf-system", action="store_true",
                    help="with --perf: profile the whole machine (perf record -a) while each way "
                    "runs alone, so the server's side and the RCU callbacks are seen too (and "
                    "any other work on the machine: run it quietly)")
    args = ap.parse_args()
    if not 0 < args.connects <= 100000 or not 0 < args.rounds <= 20 or \
            not 0 < args.chunk <= args.connects:
        raise SystemExit("--connects must be in 1..100000, --rounds in 1..20 and --chunk in "
                         "1..connects")
    from nodemesh import flows
    from nodemesh.datapath.loader import Datapath, cleanup
    from nodemesh.lab.topology import new_lab
    from nodemesh.model import Backend, Service, ServicePort
    from nodemesh.reconciler import Reconciler

    # SIGTERM (a timeout) tears down like Ctrl-C: the unhooked cgroup below is not the lab's
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lab = new_lab("nmp", backends=1)
    plain = f"{lab.cgroup}-plain"  # the sibling without hooks, removed in finally
    dp = None
    procs: Dict[str, subprocess.Popen] = {}
    try:
        os.makedirs(plain, exist_ok=True)
        lab.start_servers(tcp_ports=(8080,), udp_ports=())
        dp = Datapath(lab.bpffs, lab.cgroup)
        maps = dp.load()
        rec = Reconciler(maps)
        rec.adopt()
        flows.configure(maps, flows.DEFAULT_RATE, flows.DEFAULT_BURST, True)
        dp.attach()
        vip, be = lab.vip4(10), lab.backends[0].ipv4
        rec.apply([Service("web", "bench", vip, (ServicePort(80, 8080, "TCP", "http"),),
                           (Backend(be, 1),))])
        target = {"direct": (be, "8080"), "hooked-backend": (be, "8080"),
                  "nodemesh": (vip, "80")}
        for way in WAYS:
            cg = plain if way == "direct" else lab.cgroup
            cmd = (f"echo $$ > {cg}/cgroup.procs && exec ip netns exec {lab.client_ns} "
                   f"{sys.executable} -c '{CLIENT}' {target[way][0]} {target[way][1]} "
                   f"{args.chunk}")
            procs[way] = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True,
                                          start_new_session=True)
        ns: Dict[str, List[float]] = {w: [] for w in WAYS}

        def run(way: str) -> List[float]:
            p = procs[way]
            assert p.stdin is not None and p.stdout is not None
            out = []
            for _ in range(max(args.connects // args.chunk, 1)):
                p.stdin.write("go\n")
                p.stdin.flush()
                fails, cpu_ns = p.stdout.readline().split()
                if fails != "0":
                    raise SystemExit(f"{way}: {fails} of {args.chunk} connects failed")
                out.append(int(cpu_ns) / args.chunk)
            return out

        for w in WAYS:  # warm up: the first connects of a process cost more
            run(w)
        for r in range(args.rounds):
            for w in (WAYS if r % 2 == 0 else tuple(reversed(WAYS))):
                chunks = run(w)
                ns[w].append(statistics.median(chunks))
            print(f"round {r + 1}: " + ", ".join(f"{w} {ns[w][-1] / 1000:.2f}" for w in WAYS)
                  + f" us CPU a connect (load {os.getloadavg()[0]:.1f})", flush=True)
        print(f"\nclient CPU a connect+close, median of {args.rounds} rounds' chunk medians "
              f"({args.connects} connects a way and round, chunks of {args.chunk}); "
              f"load {os.getloadavg()[0]:.1f}")
        base = statistics.median(ns["direct"])
        for w in WAYS:
            ratios = sorted(d / x for d, x in zip(ns["direct"], ns[w]))
            print(f"  {w:15} {statistics.median(ns[w]) / 1000:7.2f} us  "
                  f"+{(statistics.median(ns[w]) - base) / 1000:5.2f} us over direct; "
                  f"direct/this per round {ratios[0]:.3f}..{ratios[-1]:.3f}")
        if args.perf:
            os.makedirs(args.perf, exist_ok=True)
            for w in WAYS:
                data = os.path.join(args.perf, f"{w}.data")
                who = ["-a"] if args.perf_system else ["-p", str(procs[w].pid)]
                rec_p = subprocess.Popen(["perf", "record", "-q", "-g", "-o", data, *who],
                                         stderr=subprocess.DEVNULL)
                time.sleep(0.5)
                run(w)
                rec_p.send_signal(2)
                rec_p.wait(timeout=60)
                rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                                      "--sort", "sym", "-g", "none", "--percent-limit", "0.7"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True).stdout
                print(f"\n--- {w}: perf report (self, sym) ---")
                print("\n".join(ln for ln in rep.splitlines() if ln and not ln.startswith("#")))
    finally:
        for p in procs.values():
            if p.stdin:
                p.stdin.close()
            p.wait(timeout=30)
        if dp is not None:
            dp.close()
        cleanup(lab.bpffs)
        lab.destroy()
        try:
            os.rmdir(plain)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
