#!/usr/bin/env python3
"""nodemesh's dataplane benchmark: new connections per second through a service VIP, and the
time to program N services, side by side with the baselines a user would compare it with.

    .venv/bin/python bench/run.py --quick      # `make bench`: N = 1, 1,000, 10,000 (< 10 min)
    .venv/bin/python bench/run.py --full       # `make bench FULL=1`: N = 1 ... 100,000
    .venv/bin/python bench/run.py --sizes 1,10000 --reps 7 --seconds 5 --variants direct,nodemesh

Variants (bench/baselines.py generates the rulesets the way kube-proxy does):
  direct           wrk straight to the backend (the limit; no service in between)
  nodemesh         through the VIP; N services programmed in the maps, hooks on the lab cgroup
  iptables-nft     kube-proxy's iptables mode, N services, loaded with iptables-nft-restore
  iptables-legacy  the same ruleset with iptables-legacy-restore (x_tables)
  nftables         kube-proxy's nftables mode (service-ips vmap, numgen random mod N vmap)
  haproxy          Debian's haproxy, mode tcp, one listener per service (user-space proxy)
In every netfilter variant the measured service is the LAST one of the N.

Method. One nginx (1 worker) in the lab's backend netns b1 answers on three addresses, the
three endpoints of the measured service (the direct variant uses the first). Every variant
has a client netns of its own (made with Lab.add_backend: a veth on the lab bridge, no
route off the machine, torn down and crash-reaped with the lab), so each path is the same
veth -> bridge -> veth, rules stay loaded across repetitions, and conntrack runs only where a
variant's rules need it. The VIP range (10.96.0.0/15) is blackholed in every client netns;
the netfilter variants route only the measured VIP /32 onto the lab bridge, as a node routes
its service CIDR, because their DNAT comes after connect()'s route lookup. Load: wrk -t1
-c32 -H "Connection: close" (one new TCP connection per request). For each N: every
variant once as warm-up (1 s, not counted), then --reps rounds of all variants in the same
order (A B C A B C ...); before every run conntrack is flushed (`conntrack -F`) and TIME_WAIT
sockets are destroyed (`ss -K state time-wait`, sock_diag) in every lab netns. Reported:
median and min-max of the rounds, ratio of medians to direct. Traversal is proved after each
N: the packet counters of the measured service's KUBE-SEP DNAT rules (iptables), of its
endpoint chains (nftables), and nodemesh's svc_stats map, against the requests wrk made.

Results: bench/results/<date>-<host>.md (and a copy in latest.md) and, with matplotlib in the
venv, <date>-<host>-rate.png and <date>-<host>-programming.png.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baselines as bl  # noqa: E402

from nodemesh.datapath.loader import Datapath, cleanup  # noqa: E402
from nodemesh.lab.topology import Lab, new_lab, sh  # noqa: E402
from nodemesh.model import Backend, Service, ServicePort  # noqa: E402
from nodemesh.reconciler import Reconciler  # noqa: E402

BENCH_VIPS = "10.96.0.0/15"  # N services' ClusterIPs; blackholed in every client netns
FAKE_PODS = ipaddress.IPv4Address("10.240.0.1")  # endpoints of the services not measured
ALL_VARIANTS = ["direct", "nodemesh", "iptables-nft", "iptables-legacy", "nftables", "haproxy"]
QUICK_SIZES = [1, 1000, 10000]
FULL_SIZES = [1, 100, 1000, 10000, 100000]


def vip_of(i: int) -> str:
    return str(ipaddress.IPv4Address("10.96.0.1") + i)


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Variant:
    name: str
    netns: str = ""
    url: str = ""
    hooked: bool = False
    rates: Dict[int, List[float]] = field(default_factory=dict)
    requests: Dict[int, int] = field(default_factory=dict)  # wrk requests, warm-up included
    load_s: Dict[int, float] = field(default_factory=dict)
    rules: Dict[int, int] = field(default_factory=dict)
    not_run: Dict[int, str] = field(default_factory=dict)
    proof: Dict[int, str] = field(default_factory=dict)


class Bench:
    def __init__(self, args, lab: Lab, workdir: str):
        self.args, self.lab, self.workdir = args, lab, workdir
        self.server = lab.backends[0]
        s = lab.subnet
        self.endpoints = [f"198.18.{s}.{201 + j}" for j in range(3)]
        self.cluster_cidr = f"198.18.{s}.0/24"  # the client counts as a pod: no masquerade
        self.variants: Dict[str, Variant] = {}
        self.dp: Optional[Datapath] = None
        self.rec: Optional[Reconciler] = None
        self.haproxy: Optional[subprocess.Popen] = None
        self.nm_before = 0
        self.load: Dict[int, tuple] = {}  # 1-min load average before / after each N

    # -- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        b1 = self.server.netns
        for ep in self.endpoints:
            sh(f"ip -n {b1} addr add {ep}/24 dev eth0")
        self.start_nginx()
        for name in self.args.variants:
            v = Variant(name)
            ns = self.lab.add_backend().netns  # a client netns on the lab bridge
            v.netns = ns
            sh(f"ip -n {ns} route add blackhole {BENCH_VIPS}")
            if name == "direct":
                v.url = f"http://{self.endpoints[0]}:8080/"
            elif name == "haproxy":
                v.url = ""  # set per N: the last service's listener
            else:
                v.url = ""  # the last service's VIP, per N
            v.hooked = name == "nodemesh"
            self.variants[name] = v
        if "nodemesh" in self.variants:
            self.dp = Datapath(self.lab.bpffs, self.lab.cgroup)
            self.rec = Reconciler(self.dp.load())
            self.dp.attach()

    def start_nginx(self) -> None:
        tmp = os.path.join(self.workdir, "nginx")
        os.makedirs(tmp, exist_ok=True)
        listens = "\n".join(f"    listen {ep}:8080 reuseport backlog=4096;"
                            for ep in self.endpoints)
        conf = os.path.join(self.workdir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
worker_processes 1;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}; proxy_temp_path {tmp};
  fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{
{listens}
    location / {{ return 200 "ok\\n"; }}
  }}
}}
""")
        proc = self.lab.spawn(["nginx", "-c", conf, "-g", "daemon off;"],
                              netns=self.server.netns)
        deadline = time.monotonic() + 10
        while not os.path.exists(f"{tmp}/nginx.pid"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start ({tmp}/error.log)")
            time.sleep(0.05)

    def services(self, n: int) -> List[bl.SvcSpec]:
        out = []
        for i in range(n):
            if i == n - 1:
                eps = self.endpoints  # the measured service: last
            else:
                eps = [str(FAKE_PODS + 3 * i + j) for j in range(3)]
            out.append(bl.SvcSpec("bench", f"svc-{i}", "http", vip_of(i), 80, eps, 8080))
        return out

    # -- programming --------------------------------------------------------------------------
    def program(self, n: int) -> None:
        specs = self.services(n)
        measured = specs[-1]
        for name, v in self.variants.items():
            if name == "direct":
                continue
            budget = self.args.load_timeout
            try:
                if name == "nodemesh":
                    self.rec.apply([])
                    svcs = [Service(s.name, s.namespace, s.vip, (ServicePort(80, 8080, "TCP",
                                    "http"),), tuple(Backend(e) for e in s.endpoints))
                            for s in specs]
                    t0 = time.perf_counter()
                    r = self.rec.apply(svcs)
                    v.load_s[n] = time.perf_counter() - t0
                    if r.failed:
                        raise RuntimeError(f"{r.failed} failed: {r.errors[:3]}")
                    v.rules[n] = r.writes
                    v.url = f"http://{measured.vip}/"
                elif name.startswith("iptables-"):
                    backend = name.split("-", 1)[1]
                    restore = f"iptables-{backend}-restore"
                    empty = "*filter\nCOMMIT\n*nat\nCOMMIT\n"
                    self.run_in(v.netns, [restore], stdin=empty, timeout=budget)
                    text, count = bl.iptables_ruleset(specs, self.cluster_cidr)
                    v.load_s[n] = self.run_in(v.netns, [restore], stdin=text, timeout=budget)
                    v.rules[n] = count
                    self.route_vip(v.netns, measured.vip)
                    v.url = f"http://{measured.vip}/"
                elif name == "nftables":
                    sh(f"ip netns exec {v.netns} nft delete table ip kube-proxy", check=False)
                    text, count = bl.nftables_ruleset(specs, self.cluster_cidr, [measured])
                    v.load_s[n] = self.run_in(v.netns, ["nft", "-f", "-"], stdin=text,
                                              timeout=budget)
                    v.rules[n] = count
                    self.route_vip(v.netns, measured.vip)
                    v.url = f"http://{measured.vip}/"
                elif name == "haproxy":
                    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                    if hard != resource.RLIM_INFINITY and bl.haproxy_fds(n) > hard:
                        self.stop_haproxy()
                        v.not_run[n] = (f"haproxy needs ~{bl.haproxy_fds(n):,} file descriptors"
                                        f" for {n:,} listeners; the hard RLIMIT_NOFILE here is "
                                        f"{hard:,} and root may not raise it")
                        log(f"  {name:>16}: NOT RUN at N={n:,}: {v.not_run[n]}")
                        continue
                    v.load_s[n] = self.start_haproxy(v, specs, budget)
                    v.rules[n] = n
                    v.url = f"http://{bl.haproxy_frontend(n - 1)}/"
                log(f"  {name:>16}: {n:,} services programmed in {v.load_s[n]:.3f} s")
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                why = " ".join(str(e).split())[:200]
                v.not_run[n] = f"programming failed or took over {budget:.0f} s: {why}"
                log(f"  {name:>16}: NOT RUN at N={n:,}: {v.not_run[n]}")

    def run_in(self, netns: str, argv: List[str], stdin: str = "", timeout: float = 600,
               check: bool = True) -> float:
        t0 = time.perf_counter()
        res = subprocess.run(["ip", "netns", "exec", netns, *argv], input=stdin, text=True,
                             capture_output=True, timeout=timeout)
        took = time.perf_counter() - t0
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()[:300]}")
        return took

    def route_vip(self, netns: str, vip: str) -> None:
        sh(f"ip -n {netns} route replace {vip}/32 dev eth0")

    def start_haproxy(self, v: Variant, specs: List[bl.SvcSpec], budget: float) -> float:
        self.stop_haproxy()
        cfg = os.path.join(self.workdir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(bl.haproxy_config(specs, os.path.join(self.workdir, "haproxy.pid")))
        t0 = time.perf_counter()
        self.haproxy = self.lab.spawn(["haproxy", "-db", "-f", cfg], netns=v.netns,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
        last = bl.haproxy_frontend(len(specs) - 1)
        probe = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1],80),1)"
                 ".close()\nexcept OSError:\n sys.exit(1)\n")
        while True:
            if self.haproxy.poll() is not None:
                raise RuntimeError(f"haproxy exited: {self.haproxy.stderr.read()[-300:]}")
            ok = subprocess.run(["ip", "netns", "exec", v.netns, sys.executable, "-c", probe,
                                 last], capture_output=True).returncode == 0
            if ok:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > budget:
                raise RuntimeError("haproxy did not listen in time")
            time.sleep(0.05)

    def stop_haproxy(self) -> None:
        if self.haproxy is None:
            return
        try:
            os.killpg(self.haproxy.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.haproxy.wait(timeout=10)
        self.lab.processes.remove(self.haproxy)
        self.haproxy = None

    # -- measuring ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Fresh connection state for the next run: conntrack flushed and TIME_WAIT sockets
        destroyed in every lab netns (clients and the server)."""
        for ns in [b.netns for b in self.lab.backends]:
            sh(f"ip netns exec {ns} conntrack -F", check=False)
            sh(f"ip netns exec {ns} ss -K -t state time-wait", check=False)

    def wrk(self, v: Variant, seconds: int) -> tuple:
        proc = self.lab.spawn(["wrk", "-t1", "-c32", f"-d{seconds}s", "-H", "Connection: close",
                               v.url], netns=v.netns, in_cgroup=v.hooked,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            self.lab.processes.remove(proc)
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        reqs = re.search(r"(\d+) requests in", out)
        if not m or not reqs:
            raise RuntimeError(f"wrk {v.url} failed: {out}\n{err}")
        errors = re.search(r"Socket errors: (.*)", out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if errors or non2xx:
            log(f"    (wrk {v.name}: {errors.group(0) if errors else ''} "
                f"{non2xx.group(0) if non2xx else ''})")
        return float(m.group(1)), int(reqs.group(1))

    def measure(self, n: int) -> None:
        active = [v for v in self.variants.values() if n not in v.not_run]
        for v in active:
            v.rates[n], v.requests[n] = [], 0
        self.nm_before = self.nodemesh_connections() if "nodemesh" in self.variants else 0
        load_before = os.getloadavg()[0]
        for v in active:  # warm-up, not counted
            self.reset()
            _, reqs = self.wrk(v, 1)
            v.requests[n] += reqs
        for rep in range(self.args.reps):
            for v in active:
                self.reset()
                rate, reqs = self.wrk(v, self.args.seconds)
                v.rates[n].append(rate)
                v.requests[n] += reqs
                log(f"  N={n:<7,} round {rep + 1} {v.name:>16}: {rate:10.0f} conn/s")
        self.load[n] = (load_before, os.getloadavg()[0])
        for v in active:
            v.proof[n] = self.traversal(v, n)
            if v.proof[n]:
                log(f"  {v.name:>16}: {v.proof[n]}")

    def nodemesh_connections(self) -> int:
        sums = self.rec.maps.percpu_sums("svc_stats")
        return sum(s["connections"] for s in sums.values())

    def traversal(self, v: Variant, n: int) -> str:
        measured = self.services(n)[-1]
        reqs = v.requests[n]
        if v.name.startswith("iptables-"):
            save = f"iptables-{v.name.split('-', 1)[1]}-save"
            out = subprocess.run(["ip", "netns", "exec", v.netns, save, "-c", "-t", "nat"],
                                 capture_output=True, text=True).stdout
            counts = []
            for ep in measured.endpoints:
                sep = measured.sep_chain(ep)
                m = re.search(rf"^\[(\d+):\d+\] -A {sep} .*-j DNAT", out, re.M)
                counts.append(int(m.group(1)) if m else -1)
            return (f"KUBE-SEP DNAT rule packets {' / '.join(f'{c:,}' for c in counts)} "
                    f"(sum {sum(counts):,}) for {reqs:,} requests")
        if v.name == "nftables":
            counts = []
            for ep in measured.endpoints:
                out = subprocess.run(["ip", "netns", "exec", v.netns, "nft", "list", "chain",
                                      "ip", "kube-proxy", measured.nft_endpoint_chain(ep)],
                                     capture_output=True, text=True).stdout
                m = re.search(r"counter packets (\d+)", out)
                counts.append(int(m.group(1)) if m else -1)
            return (f"endpoint-chain DNAT packets {' / '.join(f'{c:,}' for c in counts)} "
                    f"(sum {sum(counts):,}) for {reqs:,} requests")
        if v.name == "nodemesh":
            conns = self.nodemesh_connections() - self.nm_before
            return (f"svc_stats connections {conns:,} for {reqs:,} "
                    "requests (the VIP is blackholed: every answer was translated)")
        if v.name == "haproxy":
            return f"{reqs:,} requests through the listener of the last of {n:,} services"
        return ""

    def close(self) -> None:
        self.stop_haproxy()
        if self.rec is not None:
            try:
                self.rec.apply([])
            except Exception:  # noqa: BLE001 - teardown goes on
                pass
        if self.dp is not None:
            self.dp.close()
        self.rec = self.dp = None
        cleanup(self.lab.bpffs)


# -- the other two benchmarks (nodemesh alone) ------------------------------------------------
def nodemesh_services(n: int, backends: List[str]) -> List[Service]:
    return [Service(f"svc-{i}", "bench", vip_of(i), (ServicePort(80, 8080, "TCP", "http"),),
                    tuple(Backend(b) for b in backends)) for i in range(n)]


def bench_change(args, lab, n: int) -> str:
    dp = Datapath(lab.bpffs, lab.cgroup)
    rec = Reconciler(dp.load())
    backends = [f"198.18.{lab.subnet}.{201 + j}" for j in range(3)]
    services = nodemesh_services(n, backends)
    r = rec.apply(services)
    assert r.failed == 0, r.errors
    changed = list(services)
    mid = changed[n // 2]
    changed[n // 2] = Service(mid.name, "bench", mid.vip, mid.ports,
                              tuple(Backend(b) for b in backends[:2]))
    t0 = time.perf_counter()
    r1 = rec.apply(changed)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    r0 = rec.apply(changed)
    none = time.perf_counter() - t0
    rec.apply([])
    dp.close()
    cleanup(lab.bpffs)
    return ("## nodemesh: a change among N (Reconciler.apply of the whole set)\n\n"
            "| what | time | map writes |\n|---|---|---|\n"
            f"| 1 service changed among {n:,} | {one * 1000:.1f} ms | {r1.writes} |\n"
            f"| nothing changed among {n:,} | {none * 1000:.1f} ms | {r0.writes} |\n")


def bench_footprint(args, lab, workdir, sizes: List[int]) -> str:
    import psutil

    rows = []
    for n in sizes:
        cfg = os.path.join(workdir, f"svc-{n}.yaml")
        with open(cfg, "w") as f:
            f.write("services:\n")
            for s in nodemesh_services(n, [f"198.18.{lab.subnet}.{201 + j}" for j in range(3)]):
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
            try:
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
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            rows.append(f"| {n:,} | {phase} | {ready:.2f} s | {rss:.0f} MiB | "
                        f"{scrape * 1000:.0f} ms |")
            log(f"  {n:,} services, {phase}: ready in {ready:.2f}s, RSS {rss:.0f} MiB")
        cleanup(lab.bpffs)
    return ("## nodemesh agent footprint (start to /readyz 200, RSS when ready, one /metrics "
            "scrape)\n\ncold: no pins (compiles, creates maps, programs all); restart: "
            "pins adopted, nothing rewritten\n\n| services | start | to ready | RSS | "
            "scrape |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


# -- report ---------------------------------------------------------------------------------
def tool_versions() -> str:
    def first(cmd: str) -> str:
        res = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        return (res.stdout + res.stderr).strip().splitlines()[0] if res.returncode == 0 \
            or res.stdout or res.stderr else "?"
    return ", ".join(first(c) for c in ("iptables-nft -V", "iptables-legacy -V",
                                        "nft --version", "haproxy -v", "nginx -v",
                                        "wrk -v 2>&1 | head -1"))


def fmt_n(n: int) -> str:
    return f"{n:,}"


def report(bench: Bench, sizes: List[int], args, extra: List[str], command: str) -> str:
    vs = list(bench.variants.values())
    now = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    head = (f"# nodemesh dataplane benchmark\n\n{now}"
            f", host {socket.gethostname()}, kernel {os.uname().release}, {os.cpu_count()} CPUs"
            f"; `{command}`\n\n{tool_versions()}\n\n"
            f"Method: bench/run.py's docstring. wrk -t1 -c32 -H 'Connection: close' for "
            f"{args.seconds} s per run; per N a 1 s warm-up of every variant, then {args.reps} "
            "rounds of all variants in turn (A B C ... A B C ...); conntrack flushed and "
            "TIME_WAIT sockets destroyed in every lab netns before every run. The measured "
            "service is the last of N in every ruleset. nginx: 1 worker; haproxy: nbthread 1.\n")
    out = [head]
    # summary: ratio of medians vs direct
    out.append("## New connections per second vs direct (ratio of medians)\n")
    out.append("| N | " + " | ".join(v.name for v in vs) + " |")
    out.append("|---|" + "---|" * len(vs))
    for n in sizes:
        d = bench.variants.get("direct")
        base = statistics.median(d.rates[n]) if d and d.rates.get(n) else None
        cells = []
        for v in vs:
            if n in v.not_run or not v.rates.get(n):
                cells.append("not run")
            elif base:
                cells.append(f"{statistics.median(v.rates[n]) / base:.2f}×")
            else:
                cells.append("–")
        out.append(f"| {fmt_n(n)} | " + " | ".join(cells) + " |")
    out.append("")
    nm = bench.variants.get("nodemesh")
    if nm:
        out.append("nodemesh ÷ baseline (ratio of medians):\n")
        others = [v for v in vs if v.name not in ("direct", "nodemesh")]
        out.append("| N | " + " | ".join(f"nodemesh ÷ {v.name}" for v in others) + " |")
        out.append("|---|" + "---|" * len(others))
        for n in sizes:
            cells = []
            for v in others:
                if nm.rates.get(n) and v.rates.get(n):
                    ratio = statistics.median(nm.rates[n]) / statistics.median(v.rates[n])
                    cells.append(f"{ratio:.2f}×")
                else:
                    cells.append("not run")
            out.append(f"| {fmt_n(n)} | " + " | ".join(cells) + " |")
        out.append("")
    for n in sizes:
        out.append(f"### N = {fmt_n(n)}: conn/s, median and min–max of {args.reps} rounds\n")
        if n in bench.load:
            out.append("1-min load average before / after: {:.2f} / {:.2f} ({} CPUs; other "
                       "processes on this machine count too)\n".format(*bench.load[n],
                                                                      os.cpu_count()))
        out.append("| variant | conn/s | min–max | vs direct | per-round ratio to direct, "
                   "median (min–max) |\n|---|---|---|---|---|")
        d = bench.variants.get("direct")
        base = statistics.median(d.rates[n]) if d and d.rates.get(n) else None
        for v in vs:
            rs = v.rates.get(n)
            if n in v.not_run or not rs:
                out.append(f"| {v.name} | not run | | | {v.not_run.get(n, '')} |")
                continue
            med = statistics.median(rs)
            ratio = f"{med / base:.2f}×" if base else "–"
            paired = "–"
            if base and len(d.rates[n]) == len(rs):
                pr = [a / b for a, b in zip(rs, d.rates[n])]
                paired = f"{statistics.median(pr):.2f}× ({min(pr):.2f}–{max(pr):.2f})"
            out.append(f"| {v.name} | {med:,.0f} | {min(rs):,.0f}–{max(rs):,.0f} | {ratio} | "
                       f"{paired} |")
        out.append("")
    out.append("## Programming time: N services × 3 endpoints, into an empty state\n")
    out.append("nodemesh: Reconciler.apply into empty maps (map writes); iptables: "
               "iptables-restore of the whole ruleset into empty tables (rules); nftables: "
               "`nft -f` of the whole table (rules + map elements); haproxy: process start "
               "until the last service's listener accepts (listeners).\n")
    prog = [v for v in vs if v.name != "direct"]
    out.append("| N | " + " | ".join(v.name for v in prog) + " |")
    out.append("|---|" + "---|" * len(prog))
    for n in sizes:
        cells = []
        for v in prog:
            if n in v.load_s and n not in v.not_run:
                cells.append(f"{v.load_s[n]:.3f} s ({v.rules[n]:,})")
            elif n in v.load_s:
                cells.append(f"{v.load_s[n]:.3f} s, then not run")
            else:
                cells.append("not run")
        out.append(f"| {fmt_n(n)} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("## Proof of traversal (counters read after each N's runs, warm-up included)\n")
    out.append("| N | variant | what was counted |\n|---|---|---|")
    for n in sizes:
        for v in vs:
            if v.proof.get(n):
                out.append(f"| {fmt_n(n)} | {v.name} | {v.proof[n]} |")
    out.append("")
    notes = [f"- {v.name}, N = {fmt_n(n)}: {why}" for v in vs for n, why in v.not_run.items()]
    if notes:
        out.append("## Not run\n\n" + "\n".join(notes) + "\n")
    out.extend(extra)
    return "\n".join(out)


def plots(bench: Bench, sizes: List[int], stem: str) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed in the venv: no plots (.venv/bin/pip install "
            "matplotlib, then run again)")
        return []
    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in bench.variants.values():
        ns = [n for n in sizes if v.rates.get(n)]
        if not ns:
            continue
        med = [statistics.median(v.rates[n]) for n in ns]
        lo = [med[i] - min(v.rates[n]) for i, n in enumerate(ns)]
        hi = [max(v.rates[n]) - med[i] for i, n in enumerate(ns)]
        ax.errorbar(ns, med, yerr=[lo, hi], marker="o", capsize=3, label=v.name)
    ax.set_xscale("log")
    ax.set_xlabel("services (N)")
    ax.set_ylabel("new connections / s (median, min–max)")
    ax.set_ylim(bottom=0)
    ax.set_title("Connection rate vs N (measured service last)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + "-rate.png", dpi=110)
    plt.close(fig)
    made.append(stem + "-rate.png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in bench.variants.values():
        ns = [n for n in sizes if n in v.load_s]
        if ns:
            ax.plot(ns, [v.load_s[n] for n in ns], marker="o", label=v.name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("services (N)")
    ax.set_ylabel("seconds")
    ax.set_title("Programming time vs N (empty -> N services × 3 endpoints)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + "-programming.png", dpi=110)
    plt.close(fig)
    made.append(stem + "-programming.png")
    return made


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help=f"N = {QUICK_SIZES}, 3 s runs, 5 rounds (the default)")
    mode.add_argument("--full", action="store_true",
                      help=f"N = {FULL_SIZES}, 5 s runs, 5 rounds, footprint at 100,000")
    ap.add_argument("--sizes", help="comma-separated N (overrides the mode's)")
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS))
    ap.add_argument("--seconds", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--load-timeout", type=float,
                    help="seconds a baseline may take to program N before it is marked not "
                    "run at that N (quick 120, full 900)")
    ap.add_argument("--skip-extra", action="store_true",
                    help="no change-among-N and footprint tables")
    ap.add_argument("--output", help="results file (default bench/results/<date>-<host>.md)")
    args = ap.parse_args()
    full = args.full
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else \
        (FULL_SIZES if full else QUICK_SIZES)
    args.seconds = args.seconds or (5 if full else 3)
    args.reps = args.reps or 5
    args.load_timeout = args.load_timeout or (900 if full else 120)
    args.variants = [v for v in args.variants.split(",") if v]
    if args.reps < 5:
        log("note: fewer than 5 rounds; the issue asks for at least 5")
    unknown = set(args.variants) - set(ALL_VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {ALL_VARIANTS}")
    if os.geteuid() != 0:
        print("benchmarks need root (netns, cgroups, BPF)", file=sys.stderr)
        return 1
    need = {"iptables-nft": "iptables-nft-restore", "iptables-legacy":
            "iptables-legacy-restore", "nftables": "nft", "haproxy": "haproxy"}
    missing = [f"{v} ({need[v]})" for v in args.variants if v in need and
               not shutil.which(need[v])]
    for tool in ("wrk", "nginx", "conntrack", "ss"):
        if not shutil.which(tool):
            missing.append(tool)
    if missing:
        print(f"missing tools: {', '.join(missing)}; `make setup` installs them",
              file=sys.stderr)
        return 1
    command = "bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = time.monotonic()
    lab = new_lab("nmb", backends=1)
    workdir = tempfile.mkdtemp(prefix="nodemesh-bench-")
    bench = Bench(args, lab, workdir)
    extra: List[str] = []
    try:
        bench.setup()
        for n in sizes:
            log(f"N = {n:,}: programming ...")
            bench.program(n)
            log(f"N = {n:,}: measuring ...")
            bench.measure(n)
        bench.close()
        if not args.skip_extra:
            big = max(sizes)
            log("nodemesh change among N ...")
            extra.append(bench_change(args, lab, big))
            log("nodemesh agent footprint ...")
            extra.append(bench_footprint(args, lab, workdir, sorted({1, big})))
    finally:
        bench.close()
        cleanup(lab.bpffs)
        lab.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    took = time.monotonic() - started
    text = report(bench, sizes, args, extra, command) + \
        f"\nWhole run: {took / 60:.1f} min.\n"
    outdir = os.path.join(ROOT, "bench", "results")
    os.makedirs(outdir, exist_ok=True)
    stem = os.path.join(outdir, f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}")
    path = args.output or stem + ".md"
    made = plots(bench, sizes, os.path.splitext(path)[0])
    if made:
        text += "\nPlots: " + ", ".join(os.path.basename(p) for p in made) + "\n"
    with open(path, "w") as f:
        f.write(text)
    if not args.output:
        shutil.copyfile(path, os.path.join(outdir, "latest.md"))
    log("\n" + text)
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
