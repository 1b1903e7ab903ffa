#!/usr/bin/env python3
"""nodemesh benchmarks, each against a baseline measured side by side in the same run.

    .venv/bin/python bench/run.py [--quick] [--services 10000] [--seconds 5] [--rounds 3]

1. New connections per second through a VIP: wrk -H "Connection: close" from a client netns
   against nginx in a backend netns, rounds interleaved so that drift hits every variant alike:
     direct            wrk outside the hooked cgroup straight to the backend (the limit)
     direct-hooked     the same from inside the hooked cgroup (the hooks' cost on traffic that
                       is no service)
     nodemesh-1        through a VIP, 1 service programmed
     nodemesh-N        through a VIP, N services programmed (--services)
     iptables-N        kube-proxy-shaped iptables DNAT ruleset with N services, in the client
                       netns (skipped with --no-iptables)
2. Programming time: N services x 3 backends into empty maps, then one service changed among
   N (cost should follow the change, not N); iptables-restore of the equivalent ruleset.
3. Footprint: agent start-up to ready and RSS, with 1 and with N services (YAML config).

Everything runs in a lab (agent/nodemesh/lab): clients in a netns with no route off the machine, VIP
ranges blackholed, hooks on the lab's own cgroup. Results go to bench/results/latest.md.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nodemesh.datapath.loader import Datapath, cleanup  # noqa: E402
from nodemesh.lab.topology import new_lab, sh  # noqa: E402
from nodemesh.model import Backend, Service, ServicePort  # noqa: E402
from nodemesh.reconciler import Reconciler  # noqa: E402

BENCH_VIPS = "198.19.0.0/16"  # N services live here; blackholed in the client netns


def vip_of(i: int) -> str:
    return f"198.19.{100 + i // 250}.{1 + i % 250}"


def many_services(n: int, backends, first_vip: str = None):
    out = []
    for i in range(n):
        vip = first_vip if (i == 0 and first_vip) else vip_of(i)
        out.append(Service(f"svc-{i}", "bench", vip, (ServicePort(80, 8080, "TCP", "http"),),
                           tuple(Backend(b) for b in backends)))
    return out


def wrk(lab, url: str, seconds: int, hooked: bool) -> float:
    proc = lab.spawn(["wrk", "-t1", "-c32", f"-d{seconds}s", "-H", "Connection: close", url],
                     netns=lab.client_ns, in_cgroup=hooked, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=seconds + 30)
    lab.processes.remove(proc)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not m:
        raise RuntimeError(f"wrk failed: {out}\n{err}")
    if errors or non2xx:
        print(f"    (wrk {url}: {errors.group(0) if errors else ''} "
              f"{non2xx.group(0) if non2xx else ''})")
    return float(m.group(1))


def iptables_ruleset(services) -> str:
    """kube-proxy's iptables mode, trimmed to what a ClusterIP needs: one KUBE-SVC chain per
    service choosing a KUBE-SEP chain with statistic probabilities, each SEP a DNAT."""
    lines = ["*nat", ":KUBE-SERVICES - [0:0]"]
    rules = []
    for i, svc in enumerate(services):
        svc_chain = f"KUBE-SVC-{i:012d}"
        lines.append(f":{svc_chain} - [0:0]")
        rules.append(f"-A KUBE-SERVICES -d {svc.vip}/32 -p tcp -m tcp --dport 80 -j {svc_chain}")
        n = len(svc.backends)
        for j, b in enumerate(svc.backends):
            sep = f"KUBE-SEP-{i:09d}{j:03d}"
            lines.append(f":{sep} - [0:0]")
            if j < n - 1:
                rules.append(f"-A {svc_chain} -m statistic --mode random --probability "
                             f"{1 / (n - j):.11f} -j {sep}")
            else:
                rules.append(f"-A {svc_chain} -j {sep}")
            rules.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {b.address}:8080")
    rules.append("-A OUTPUT -j KUBE-SERVICES")
    return "\n".join(lines + rules + ["COMMIT", ""])


def iptables_available() -> bool:
    return subprocess.run(["sh", "-c", "command -v iptables-restore"],
                          capture_output=True).returncode == 0


def bench_connections(args, lab, workdir, results):
    backend = lab.backends[0]
    lab.start_nginx(backend, 8080, "ok", workdir)
    dp = Datapath(lab.bpffs, lab.cgroup)
    maps = dp.load()
    rec = Reconciler(maps)
    dp.attach()
    one_vip = lab.vip4(10)
    direct_url = f"http://{backend.ipv4}:8080/"
    vip_url = f"http://{one_vip}/"
    variants = {"direct": (direct_url, False, None), "direct-hooked": (direct_url, True, None),
                "nodemesh-1": (vip_url, True, 1), f"nodemesh-{args.services}":
                (vip_url, True, args.services)}
    rulesets = {}
    if args.iptables and iptables_available():
        variants[f"iptables-{args.services}"] = (vip_url, False, "iptables")
        rulesets = {"iptables": iptables_ruleset(many_services(args.services,
                                                               [backend.ipv4], one_vip))}
    sh(f"ip -n {lab.client_ns} route replace blackhole {BENCH_VIPS}")
    rates = {k: [] for k in variants}
    programmed = None
    for rnd in range(args.rounds):
        for name, (url, hooked, n) in variants.items():
            if n == "iptables":
                path = os.path.join(workdir, "rules.txt")
                with open(path, "w") as f:
                    f.write(rulesets["iptables"])
                sh(f"ip netns exec {lab.client_ns} iptables-restore < {path}")
                # iptables DNATs after connect()'s route lookup, which the blackhole would
                # refuse: route this one VIP into the lab bridge (still no way off the machine).
                sh(f"ip -n {lab.client_ns} route replace {one_vip}/32 dev br0")
                rec.apply([])
                programmed = 0
            else:
                sh(f"ip -n {lab.client_ns} route del {one_vip}/32 dev br0", check=False)
                sh(f"ip netns exec {lab.client_ns} iptables -t nat -F", check=False)
                if n is not None and programmed != n:
                    rec.apply(many_services(n, [backend.ipv4], one_vip))
                    programmed = n
            rate = wrk(lab, url, args.seconds, hooked)
            rates[name].append(rate)
            print(f"  round {rnd + 1} {name:>16}: {rate:10.0f} conn/s")
    sh(f"ip netns exec {lab.client_ns} iptables -t nat -F", check=False)
    rec.apply([])
    dp.close()
    cleanup(lab.bpffs)
    base = statistics.median(rates["direct"])
    rows = []
    for name, rs in rates.items():
        med = statistics.median(rs)
        rows.append(f"| {name} | {med:,.0f} | {min(rs):,.0f}–{max(rs):,.0f} | "
                    f"{med / base:.2f}× |")
    results.append("## New connections per second (wrk -t1 -c32 -H 'Connection: close', nginx "
                   f"1 worker; median of {args.rounds} interleaved {args.seconds}s rounds)\n\n"
                   "| variant | conn/s | range | vs direct |\n|---|---|---|---|\n" +
                   "\n".join(rows) + "\n")


def bench_programming(args, lab, workdir, results):
    dp = Datapath(lab.bpffs, lab.cgroup)
    maps = dp.load()
    rec = Reconciler(maps)
    backends = [b.ipv4 for b in lab.backends[:3]]
    services = many_services(args.services, backends)
    t0 = time.perf_counter()
    r = rec.apply(services)
    full = time.perf_counter() - t0
    assert r.failed == 0, r.errors
    changed = list(services)
    changed[len(changed) // 2] = Service(changed[len(changed) // 2].name, "bench",
                                         changed[len(changed) // 2].vip,
                                         changed[len(changed) // 2].ports,
                                         tuple(Backend(b) for b in backends[:2]))
    t0 = time.perf_counter()
    r1 = rec.apply(changed)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    r0 = rec.apply(changed)
    none = time.perf_counter() - t0
    rows = [f"| nodemesh: {args.services} services × 3 backends into empty maps | {full:.3f} s |"
            f" {r.writes:,} |",
            f"| nodemesh: 1 service changed among {args.services} | {one * 1000:.1f} ms | "
            f"{r1.writes} |",
            f"| nodemesh: nothing changed among {args.services} | {none * 1000:.1f} ms | "
            f"{r0.writes} |"]
    rec.apply([])
    dp.close()
    cleanup(lab.bpffs)
    if args.iptables and iptables_available():
        path = os.path.join(workdir, "rules-prog.txt")
        with open(path, "w") as f:
            f.write(iptables_ruleset(many_services(args.services, backends)))
        sh(f"ip netns exec {lab.client_ns} iptables -t nat -F", check=False)
        t0 = time.perf_counter()
        sh(f"ip netns exec {lab.client_ns} iptables-restore < {path}")
        ipt = time.perf_counter() - t0
        nrules = sum(1 for line in open(path) if line.startswith("-A"))
        rows.append(f"| iptables-restore: the same {args.services} services (kube-proxy "
                    f"shape) | {ipt:.3f} s | {nrules:,} rules |")
        sh(f"ip netns exec {lab.client_ns} iptables -t nat -F", check=False)
        sh(f"ip netns exec {lab.client_ns} iptables -t nat -X", check=False)
    results.append("## Programming time\n\n| what | time | map writes |\n|---|---|---|\n" +
                   "\n".join(rows) + "\n")


def bench_footprint(args, lab, workdir, results):
    import psutil

    rows = []
    for n in (1, args.services):
        cfg = os.path.join(workdir, f"svc-{n}.yaml")
        with open(cfg, "w") as f:
            f.write("services:\n")
            for s in many_services(n, [b.ipv4 for b in lab.backends[:3]]):
                f.write(f"  - {{name: {s.name}, namespace: bench, vip: {s.vip}, ports: "
                        f"[{{port: 80, targetPort: 8080}}], backends: ["
                        + ", ".join(f"{{address: {b.address}}}" for b in s.backends) + "]}\n")
        for phase in ("cold", "restart"):
            port = 19464
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "nodemesh.cli", "--log-level",
                                     "warning", "run", "--config", cfg, "--cgroup", lab.cgroup,
                                     "--bpffs", lab.bpffs, "--admin-socket", lab.admin_socket,
                                     "--metrics-addr", f"127.0.0.1:{port}"], cwd=ROOT)
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz",
                                                timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.perf_counter() - t0 > 300:
                    raise RuntimeError("agent did not get ready")
                time.sleep(0.05)
            ready = time.perf_counter() - t0
            rss = psutil.Process(proc.pid).memory_info().rss / 2 ** 20
            t1 = time.perf_counter()
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
            scrape = time.perf_counter() - t1
            proc.terminate()
            proc.wait(timeout=30)
            rows.append(f"| {n} | {phase} | {ready:.2f} s | {rss:.0f} MiB | "
                        f"{scrape * 1000:.0f} ms |")
            print(f"  {n} services, {phase}: ready in {ready:.2f}s, RSS {rss:.0f} MiB")
        cleanup(lab.bpffs)
    results.append("## Agent footprint (start to /readyz 200, RSS when ready, one /metrics "
                   "scrape)\n\ncold: no pins (compiles, creates maps, programs all); restart: "
                   "pins adopted, nothing rewritten\n\n| services | start | to ready | RSS | "
                   "scrape |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1,000 services, 2 s, 2 rounds")
    ap.add_argument("--no-iptables", dest="iptables", action="store_false")
    ap.add_argument("--only", choices=["connections", "programming", "footprint"])
    args = ap.parse_args()
    if args.quick:
        args.services, args.seconds, args.rounds = 1000, 2, 2
    if os.geteuid() != 0:
        print("benchmarks need root (netns, cgroups, BPF)", file=sys.stderr)
        return 1
    results = [f"# nodemesh benchmarks\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
               f", kernel {os.uname().release}, {os.cpu_count()} CPUs; "
               f"`bench/run.py --services {args.services} --seconds {args.seconds} --rounds "
               f"{args.rounds}`\n"]
    lab = new_lab("nmb", backends=3)
    workdir = tempfile.mkdtemp(prefix="nodemesh-bench-")
    try:
        if args.only in (None, "programming"):
            print("programming time ...")
            bench_programming(args, lab, workdir, results)
        if args.only in (None, "connections"):
            print("connection rate ...")
            bench_connections(args, lab, workdir, results)
        if args.only in (None, "footprint"):
            print("footprint ...")
            bench_footprint(args, lab, workdir, results)
    finally:
        cleanup(lab.bpffs)
        lab.destroy()
    text = "\n".join(results)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "latest.md"), "w") as f:
        f.write(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
