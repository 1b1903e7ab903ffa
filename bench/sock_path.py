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
  nodemesh+stats  the same while this process holds BPF_ENABLE_STATS (as the agent does by
                  default, --bpf-stats on): every BPF program run on the node then reads the
                  clock twice (sched_clock: kvm-clock's pvclock on this VM)

Each connect is closed with an RST (SO_LINGER 0), so no TIME_WAIT piles up. With --perf DIR,
each way's client is also profiled (perf record -g on its pid, one round) into DIR/<way>.data,
and the top kernel symbols of each are printed (--perf-system: the whole machine's, while that
way runs alone), for comparing `__cgroup_bpf_run_filter_*`,
`bpf_sk_storage_free`, `tcp_call_bpf` and the like between the ways.

    sudo .venv/bin/python bench/sock_path.py [--connects 20000] [--rounds 5] [--perf /tmp/sp]
        [--perf-system]

--wrk SECONDS measures bench/run.py's conn workload instead, whole: wrk -t1 -c32 -H "Connection:
close" on CPU 0 against nginx (1 worker) on CPU 1, direct and nodemesh alone in turn (ABAB...),
and per connection: the whole machine's busy CPU (both CPUs, /proc/stat, others' work
included: run it quietly), each CPU's busy share (is CPU 0, where wrk and the handshakes'
softirq run, saturated?), wrk's and nginx's own CPU, how many times connect4 and sockops ran
and for how long (BPF_ENABLE_STATS), and wrk's mean latency:

    sudo .venv/bin/python bench/sock_path.py --wrk 5 --rounds 6
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

from sock_cost import CLIENT, hooks_up  # noqa: E402 - "<failures> <client CPU ns>" a chunk

WAYS = ("direct", "hooked-backend", "nodemesh", "nodemesh+stats")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connects", type=int, default=20000, help="connects a way and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--perf", default="", help="a folder: profile each way's client once")
    ap.add_argument("--wrk", type=float, default=0.0,
                    help="seconds: measure wrk's conn workload per way instead (see above)")
    ap.add_argument("--perf-system", action="store_true",
                    help="with --perf: profile the whole machine (perf record -a) while each way "
                    "runs alone, so the server's side and the RCU callbacks are seen too (and "
                    "any other work on the machine: run it quietly)")
    args = ap.parse_args()
    if not 0 < args.connects <= 100000 or not 0 < args.rounds <= 20 or \
            not 0 < args.chunk <= args.connects:
        raise SystemExit("--connects must be in 1..100000, --rounds in 1..20 and --chunk in "
                         "1..connects")
    from nodemesh.bpfstats import enable_stats
    from nodemesh.datapath import bpfsys
    from nodemesh.datapath.loader import Datapath, cleanup
    from nodemesh.lab.topology import new_lab
    from nodemesh.model import Backend, Service, ServicePort

    # SIGTERM (a timeout) tears down like Ctrl-C: the unhooked cgroup below is not the lab's
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.wrk:
        if not 0 < args.wrk <= 60:
            raise SystemExit("--wrk must be in (0, 60] seconds")
        return wrk_ways(args.wrk, args.rounds, args.perf)
    lab = new_lab("nmp", backends=1)
    plain = f"{lab.cgroup}-plain"  # the sibling without hooks, removed in finally
    dp = None
    procs: Dict[str, subprocess.Popen] = {}
    try:
        os.makedirs(plain, exist_ok=True)
        lab.start_servers(tcp_ports=(8080,), udp_ports=())
        dp = Datapath(lab.bpffs, lab.cgroup)
        rec = hooks_up(dp)
        vip, be = lab.vip4(10), lab.backends[0].ipv4
        rec.apply([Service("web", "bench", vip, (ServicePort(80, 8080, "TCP", "http"),),
                           (Backend(be, 1),))])
        target = {"direct": (be, "8080"), "hooked-backend": (be, "8080"),
                  "nodemesh": (vip, "80"), "nodemesh+stats": (vip, "80")}
        for way in WAYS:
            cg = plain if way == "direct" else lab.cgroup
            cmd = (f"echo $$ > {cg}/cgroup.procs && exec ip netns exec {lab.client_ns} "
                   f"{sys.executable} -c '{CLIENT}' {target[way][0]} {target[way][1]} "
                   f"{args.chunk}")
            procs[way] = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True,
                                          start_new_session=True)
        ns: Dict[str, List[float]] = {w: [] for w in WAYS}
        lows: Dict[str, List[float]] = {w: [] for w in WAYS}  # each round's least disturbed

        def run(way: str) -> List[float]:
            stats = enable_stats() if way.endswith("+stats") else None
            try:
                return _chunks(procs[way])
            finally:
                bpfsys.close(stats)

        def _chunks(p: subprocess.Popen) -> List[float]:
            assert p.stdin is not None and p.stdout is not None
            out = []
            for _ in range(max(args.connects // args.chunk, 1)):
                p.stdin.write("go\n")
                p.stdin.flush()
                fails, cpu_ns = p.stdout.readline().split()
                if fails != "0":
                    raise SystemExit(f"{fails} of {args.chunk} connects failed")
                out.append(int(cpu_ns) / args.chunk)
            return out

        for w in WAYS:  # warm up: the first connects of a process cost more
            run(w)
        for r in range(args.rounds):
            for w in (WAYS if r % 2 == 0 else tuple(reversed(WAYS))):
                chunks = run(w)
                ns[w].append(statistics.median(chunks))
                lows[w].append(min(chunks))
            print(f"round {r + 1}: " + ", ".join(f"{w} {ns[w][-1] / 1000:.2f}" for w in WAYS)
                  + f" us CPU a connect (load {os.getloadavg()[0]:.1f})", flush=True)
        print(f"\nclient CPU a connect+close, median of {args.rounds} rounds' chunk medians "
              f"({args.connects} connects a way and round, chunks of {args.chunk}); "
              f"load {os.getloadavg()[0]:.1f}")
        base = statistics.median(ns["direct"])
        base_low = statistics.median(lows["direct"])
        for w in WAYS:
            ratios = sorted(d / x for d, x in zip(ns["direct"], ns[w]))
            low = statistics.median(lows[w])
            print(f"  {w:15} {statistics.median(ns[w]) / 1000:7.2f} us  "
                  f"{(statistics.median(ns[w]) - base) / 1000:+5.2f} us over direct; "
                  f"direct/this per round {ratios[0]:.3f}..{ratios[-1]:.3f}; lowest chunk "
                  f"(median of rounds) {low / 1000:.2f} us, {(low - base_low) / 1000:+5.2f}")
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


WRK_WAYS = ("direct", "nodemesh")


def _perf_top(data: str, limit: float) -> str:
    rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort",
                          "sym", "-g", "none", "--percent-limit", str(limit)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    return "\n".join(ln for ln in rep.splitlines() if ln and not ln.startswith("#"))


def _cpu_busy() -> List[float]:
    """Busy seconds of each CPU since boot (user + nice + system + irq + softirq)."""
    tck = os.sysconf("SC_CLK_TCK")
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                v = [int(x) for x in line.split()[1:8]]
                out.append((v[0] + v[1] + v[2] + v[5] + v[6]) / tck)
    return out


def wrk_ways(seconds: float, rounds: int, perf: str = "") -> int:
    """bench/run.py's conn workload, direct and nodemesh alone in turn, and where its CPU goes."""
    import re
    import resource
    import shutil
    import tempfile

    from nodemesh.bpfstats import enable_stats, fdinfo
    from nodemesh.datapath import bpfsys
    from nodemesh.datapath.loader import Datapath, cleanup
    from nodemesh.lab.topology import new_lab
    from nodemesh.model import Backend, Service, ServicePort

    lab = new_lab("nmw", backends=1)
    plain = f"{lab.cgroup}-plain"
    work = tempfile.mkdtemp(prefix="nm-sockpath-")  # nginx's config, pid and logs
    dp = None
    stats = None
    rows: Dict[str, List[Dict[str, float]]] = {w: [] for w in WRK_WAYS}
    try:
        os.makedirs(plain, exist_ok=True)
        be = lab.backends[0]
        lab.start_nginx(be, 8080, "ok", work, connections=8192)
        nginx = [int(x) for x in subprocess.run(["ip", "netns", "pids", be.netns],
                                                capture_output=True, text=True).stdout.split()]
        for pid in nginx:
            subprocess.run(["taskset", "-a", "-pc", "1", str(pid)], stdout=subprocess.DEVNULL,
                           check=True)
        dp = Datapath(lab.bpffs, lab.cgroup)
        rec = hooks_up(dp)
        vip = lab.vip4(10)
        rec.apply([Service("web", "bench", vip, (ServicePort(80, 8080, "TCP", "http"),),
                           (Backend(be.ipv4, 1),))])
        stats = enable_stats()
        target = {"direct": f"http://{be.ipv4}:8080/", "nodemesh": f"http://{vip}:80/"}
        progs = {"connect4": dp.programs["connect4"], "sockops": dp.programs["sockops"]}

        def nginx_cpu() -> float:
            total = 0
            for pid in nginx:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        total += int(f.read().split()[0])
            return total / 1e9

        def one(way: str, profile: str = "") -> Dict[str, float]:
            cg = plain if way == "direct" else lab.cgroup
            cmd = (f"echo $$ > {cg}/cgroup.procs && exec ip netns exec {lab.client_ns} "
                   f"taskset -c 0 wrk -t1 -c32 -d{seconds:g}s -H 'Connection: close' "
                   f"{target[way]}")
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            busy0, ng0, bpf0 = _cpu_busy(), nginx_cpu(), {k: fdinfo(f) for k, f in progs.items()}
            t0 = time.monotonic()
            proc = subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.PIPE, text=True)
            rec_p = None
            if profile:  # wrk's and nginx's own contexts, their softirq work included
                time.sleep(0.5)  # wrk has exec'd and started its thread: -p takes the threads
                rec_p = subprocess.Popen(["perf", "record", "-q", "-g", "-o", profile, "-p",
                                          ",".join(str(p) for p in [proc.pid, *nginx])],
                                         stderr=subprocess.DEVNULL)
            out = proc.communicate(timeout=seconds + 60)[0]
            wall = time.monotonic() - t0
            if rec_p is not None:
                rec_p.send_signal(signal.SIGINT)
                rec_p.wait(timeout=60)
            busy1, ng1, bpf1 = _cpu_busy(), nginx_cpu(), {k: fdinfo(f) for k, f in progs.items()}
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            m = re.search(r"Requests/sec:\s*([\d.]+)", out)
            n = re.search(r"(\d+) requests in", out)
            lat = re.search(r"Latency\s+([\d.]+)(us|ms|s)", out)
            if not m or not n or not lat or "Non-2xx" in out or "Socket errors" in out:
                raise SystemExit(f"{way}: wrk said: {out[-400:]}")
            conns = int(n.group(1))
            us = 1e6 / conns
            row = {"rate": float(m.group(1)),
                   "machine": (sum(busy1) - sum(busy0)) * us,
                   "cpu0": (busy1[0] - busy0[0]) / wall, "cpu1": (busy1[1] - busy0[1]) / wall,
                   "wrk": (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) * us,
                   "nginx": (ng1 - ng0) * us,
                   "latency": float(lat.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[lat.group(2)]}
            for k in progs:
                runs = bpf1[k]["run_cnt"] - bpf0[k]["run_cnt"]
                row[f"{k}_runs"] = runs / conns
                row[f"{k}_ns"] = (bpf1[k]["run_time_ns"] - bpf0[k]["run_time_ns"]) / conns
            return row

        for w in WRK_WAYS:  # warm up
            one(w)
        for r in range(rounds):
            for w in (WRK_WAYS if r % 2 == 0 else tuple(reversed(WRK_WAYS))):
                rows[w].append(one(w))
            d, x = rows["direct"][-1], rows["nodemesh"][-1]
            print(f"round {r + 1}: direct {d['rate']:,.0f}/s {d['machine']:.1f} us, nodemesh "
                  f"{x['rate']:,.0f}/s {x['machine']:.1f} us machine CPU a connection; rate "
                  f"ratio {x['rate'] / d['rate']:.3f} (load {os.getloadavg()[0]:.1f})",
                  flush=True)
        if perf:
            os.makedirs(perf, exist_ok=True)
            for w in WRK_WAYS:
                data = os.path.join(perf, f"wrk-{w}.data")
                one(w, data)
                print(f"\n--- {w}: wrk + nginx, perf report (self %, symbols >= 0.3 %) ---")
                print(_perf_top(data, 0.3))
    finally:
        bpfsys.close(stats)
        if dp is not None:
            dp.close()
        cleanup(lab.bpffs)
        lab.destroy()
        shutil.rmtree(work, ignore_errors=True)
        try:
            os.rmdir(plain)
        except OSError:
            pass
    med = {w: {k: statistics.median(r[k] for r in rows[w]) for k in rows[w][0]}
           for w in WRK_WAYS}
    ratios = sorted(x["rate"] / d["rate"] for d, x in zip(rows["direct"], rows["nodemesh"]))
    print(f"\nwrk conn workload, {seconds:g} s a run, {rounds} rounds alone in turn (medians); "
          f"load {os.getloadavg()[0]:.1f}")
    labels = [("rate", "connections/s", ",.0f"), ("machine", "busy CPU us a conn (both CPUs)",
              ".2f"), ("wrk", "wrk's CPU us a conn", ".2f"), ("nginx", "nginx's CPU us a conn",
              ".2f"), ("cpu0", "CPU 0 busy share", ".3f"), ("cpu1", "CPU 1 busy share", ".3f"),
              ("latency", "wrk mean latency us", ".0f"), ("connect4_runs", "connect4 runs a conn",
              ".2f"), ("connect4_ns", "connect4 ns a conn", ".0f"), ("sockops_runs",
              "sockops runs a conn", ".2f"), ("sockops_ns", "sockops ns a conn", ".0f")]
    print(f"  {'':32} {'direct':>10} {'nodemesh':>10}")
    for k, label, fmt in labels:
        print(f"  {label:32} {format(med['direct'][k], fmt):>10} "
              f"{format(med['nodemesh'][k], fmt):>10}")
    print(f"  nodemesh/direct rate per round: median {statistics.median(ratios):.3f}, "
          f"{ratios[0]:.3f}..{ratios[-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
