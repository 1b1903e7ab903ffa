#!/usr/bin/env python3
"""nodemesh's dataplane benchmark: a service VIP's cost side by side with the baselines a user
would compare it with, from 1 to 100,000 services, for five workloads.

    .venv/bin/python bench/run.py --quick      # `make bench` (< 10 min on 2 cores): N = 1
                                               # and 10,000, and 100,000 for the socket path
    .venv/bin/python bench/run.py --full       # `make bench FULL=1`: N = 1 ... 100,000
    .venv/bin/python bench/run.py --sizes 1,10000 --reps 7 --seconds 5 \\
        --variants direct,nodemesh --workloads conn,keepalive
    .venv/bin/python bench/run.py --sizes 1 --reps 1 --seconds 1 --output /tmp/smoke.md

Variants (bench/variants.py, one class each; its docstring says how to add one):
  direct            the client connects to the backend address (the limit)
  nodemesh          through the VIP; N services in the maps, the cgroup hooks on the lab cgroup
  iptables-nft      kube-proxy's iptables mode, N services, loaded with iptables-nft-restore
  iptables-legacy   the same ruleset with iptables-legacy-restore (x_tables)
  nftables          kube-proxy's nftables mode (service-ips vmap, numgen random mod N vmap)
  haproxy           Debian's haproxy, mode tcp, one listener per service (user-space proxy)
  nodemesh-tc       the TC packet path: a client outside the node (its own netns, linked to
                    a node netns only) calls the measured service's NodePorts on the node;
                    TC on the node's two interfaces, externalTrafficPolicy Cluster
  direct-routed     nodemesh-tc's baseline: the same client outside the node and node netns,
                    the client connecting to the backend's address, the node forwarding it
                    untouched (no TC filter, no netfilter rule, no NAT; proved after the
                    conn runs)
  nodemesh+sockmap  the cgroup hooks with --accelerate-local (sockops + sk_msg); same-node:
                    the client and its own servers both run in the hooked cgroup
  nodemesh+policy   the cgroup hooks with 10,000 policy rules and 1,000 workload identities
                    loaded; the client is workload 0, 3 cgroups below the hooks, allowed
Every variant says which workloads it runs (direct has no change; haproxy no UDP); the
report lists them with the reason for each one not run. A workload that fails for a variant
(a tool's error, e.g. iperf3's ENOMEM under sockmap) is reported failed at that N with the
error, its rounds dropped, and the run goes on.
bench/baselines.py generates the rulesets the way kube-proxy does. In every ruleset the
measured service is the LAST of the N: its ports dns (UDP 53), iperf (TCP 5201) and, last of
all, http (TCP 80); the other N-1 services have one port, http, and endpoints that do not exist.

Workloads (--workloads, comma-separated; bench/workloads.py runs them):
  conn       new connections/s: wrk -t1 -c32 -H "Connection: close" against nginx
  keepalive  wrk -t1 -c32 over kept-alive connections: the maximum requests/s, then p50 and
             p99 at a fixed rate of 50% of direct's maximum (direct's maximum is measured
             first in the same run: the median of 3 runs). wrk has no fixed-rate mode and
             wrk2 is not packaged, so bench/pace.lua paces wrk's requests with delay(); its
             limits (1 ms release batches; coordinated omission: a request held back while
             every connection is busy is timed from its actual send) are in the report.
  udp        dnsperf against dnsmasq (one socket, 64 queries outstanding): the maximum
             queries/s, then the mean and maximum latency paced (-Q) at 50% of direct's
             maximum, measured first like keepalive's (dnsperf 2.10 prints no percentiles).
             haproxy has no UDP: n/a.
  bulk       iperf3, one stream and eight (-P 8): Gbit/s received
  change     one backend change with N services loaded: the measured service moves to three
             other endpoints, the way each variant's control plane does it (nodemesh: one
             service's set_service + reconcile round, as the agent's core loop; iptables:
             kube-proxy's partial `iptables-restore --noflush`; nftables: kube-proxy's one
             `nft -f` transaction; haproxy: its runtime API `set server ... addr`). Timed from
             just before the command to the first connection of a probe (every 2 ms, in the
             variant's client netns, bench/controlplane.py's probe) answered by a new endpoint
             (nginx answers with its address); also the command's CPU time.
Programming time (empty -> N services × 3 endpoints) is measured for every N and variant.

Method. The lab (agent/nodemesh/lab): servers in the backend netns b1, on six endpoint
addresses (two sets of three: a change moves between them); every variant has a client netns
of its own (a veth on the lab bridge, no route off the machine, torn down and crash-reaped
with the lab), so each path is the same veth -> bridge -> veth, rules stay loaded across
repetitions, and conntrack runs only where a variant's rules need it. Two exceptions, by
what they measure: nodemesh-tc's client sits behind a node netns (client -> veth -> node,
TC, forwarding -> bridge -> b1: the NodePort hop is part of its cost), and
nodemesh+sockmap's servers are its own (the same three servers on addresses of their own, in
a netns of its own on the bridge, inside its hooked cgroup: acceleration needs both ends
there). The VIP range
(10.96.0.0/15) is blackholed in every client netns; the netfilter variants route only the
measured VIP /32 onto the lab bridge, as a node routes its service CIDR, because their DNAT
comes after connect()'s route lookup. For each N and workload: every variant once as warm-up
(1 s, not counted), then --reps rounds of all variants in the same order (A B C A B C ...);
before every run conntrack is flushed (`conntrack -F`) and TIME_WAIT sockets are destroyed
(`ss -K state time-wait`, sock_diag) in the client's netns and the server's, and
nodemesh-tc's own conntrack (the pinned `ct` map) is emptied. Reported: median
and min-max of the rounds, ratios of medians to direct.

The connection-rate targets (issue 13) need a ratio known to within a few per cent, on a
machine others share. So conn's rounds also pair each variant with a target against a
baseline with that baseline (PAIRED_WITH: nodemesh and direct-aa, direct again from a netns
of its own, the A/A test, with direct; nodemesh-tc with direct-routed): by default side by
side (--order concurrent: two wrk at once, 16 connections each, on the client CPU; the ratio
of their rates in the same seconds), or bracketed (D A D B ... D: each run against the mean
of the baseline runs around it), or not at all (--order rounds, the method before). The
paired rounds (--pair-rounds; the quick mode 12) are spread evenly over conn's rounds alone
(--reps; the quick mode 5), which give every variant's absolute rate. Every conn run
records its CPU a connection (wrk's by rusage, the netns' servers' and proxies' by
schedstat, softirq in their context) and the other work on the machine meanwhile
(/proc/stat busy time not ours, plus steal); a pair where other work took over 10% of the
CPUs is disturbed and left out when 5 others remain.
The Targets table judges a rate target on a distribution-free interval of the median paired
ratio (>= 90% coverage; 5 pairs or more), widened by the A/A test's distance from 1: met,
missed, or cannot be judged when the interval straddles the target. Flat within 5%: the
paired ratio at N over the one at 1, its interval from the two intervals (flat_bounds).
The quick mode runs only direct, direct-aa and nodemesh at 100,000 (QUICK_AT_LARGEST: the
socket path's rate, flatness, programming and change targets); every other variant is
reported not run there, with its load time at 10,000 scaled to 100,000. Each log line starts
with the minutes and seconds since the run began, and the report ends with where the time
went, phase by phase.

Traversal is proved after each N's conn rounds: the packet counters of the measured service's
KUBE-SEP DNAT rules (iptables), of its endpoint chains (nftables), and nodemesh's svc_stats
map, against the requests wrk made.
Where a variant cannot be programmed at some N (over --load-timeout; or predicted over it
from a smaller N's load time scaled linearly, then not tried; or haproxy's file descriptors
where RLIMIT_NOFILE cannot be raised for it), its load time and the reason are reported and
the point is "not run". Placement (--cpus, default 0,1): every client tool and haproxy on
one CPU, every server on the other, with taskset, for every variant; each conn run records
the CPU pressure (PSI) it met, reported per table. Client netns use ports 1024-65535.

Parts: every run also writes its figures as <report>.json; --append <report>.md runs more
(other --sizes, --variants, --workloads) and rewrites the report from all the parts, e.g.
    bench/run.py --full --sizes 1,100,1000 --append bench/results/full.md
    bench/run.py --full --sizes 10000,100000 --append bench/results/full.md
Each report has a Targets table: the README's targets, met / missed / not measured.

Results: bench/results/<date>-<host>.md (and a copy in latest.md; not with --output), with
matplotlib PNGs beside it: connection rate, keep-alive p99, programming time and change
latency vs N, every variant on each. The agent's own RSS and CPU per change (the real agent
with its sources) are bench/controlplane.py's.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baselines as bl  # noqa: E402
import variants as vr  # noqa: E402
import workloads as wl  # noqa: E402

from nodemesh.datapath.loader import cleanup  # noqa: E402
from nodemesh.lab.topology import Lab, new_lab, sh  # noqa: E402
from nodemesh.model import Backend, Service, ServicePort  # noqa: E402

FAKE_PODS = "10.240.0.1"  # endpoints of the services not measured start here
WORKLOADS = ("conn", "keepalive", "udp", "bulk", "change")
# The quick mode runs the workloads the issue's targets are stated on (connection rate,
# keep-alive p99, programming and change time), to keep nine variants in 10 minutes; udp and
# bulk have no target and hardly depend on N (`make bench WORKLOADS=conn,keepalive,udp,bulk,
# change` adds them back, about 4 minutes more).
QUICK_WORKLOADS = ("conn", "keepalive", "change")
QUICK_SIZES = [1, 10000, 100000]
# At 100,000 the quick mode runs the socket path's targets only (rate, flatness, programming,
# one change): direct, the A/A test and nodemesh. The baselines' loads alone would take
# minutes there (iptables-nft 436 s, iptables-legacy and nftables over 600 s on the 2-CPU VM)
# and the other nodemesh variants' two more (each programs 100,000 services, ~10 s, twice);
# they are reported not run at 100,000 with that reason, and `make bench FULL=1` runs them.
QUICK_LARGEST, QUICK_AT_LARGEST = 100000, ("direct", "direct-aa", "nodemesh")
# Keep-alive in the quick mode: its target (nodemesh's p99 against HAProxy's), direct (the
# fixed rate and the ratios), and the paths that touch every packet (TC, sk_msg). The
# netfilter rulesets and the policy rules act on a connection's first packet only, so their
# keep-alive is direct's plus conntrack's lookup: the full mode measures it.
QUICK_KEEPALIVE = ("direct", "nodemesh", "haproxy", "nodemesh-tc", "nodemesh+sockmap")
QUICK_SKIPPED_WHY = {"keepalive": "the quick mode runs keep-alive for "
                     + ", ".join(QUICK_KEEPALIVE) + " only: the rest act on a connection's "
                     "first packet; `make bench FULL=1` runs it"}
# 8 paired rounds: the median's >= 90% interval is then x(2)..x(7) (93%), about ±0.85 of one
# pair's standard deviation; 6 gave only min..max (±1.3), and 9 to 12 are no tighter for
# their cost (10: x(2)..x(9), ±1.0; 12: ±0.8); 13 gives x(4)..x(10), ±0.6 (PAIRS=13, ~1 min more)
QUICK_CONN_SECONDS, QUICK_CONN_ROUNDS, QUICK_PAIR_ROUNDS = 1, 5, 8
FULL_SIZES = [1, 100, 1000, 10000, 100000]
# keepalive, udp and bulk hardly depend on N (netfilter sees a connection's first packet
# only): the quick mode runs them at its largest N, the full mode at every N.
PER_N_WORKLOADS = ("keepalive", "udp", "bulk")
WORKLOAD_FIRST = {w: vr.WORKLOAD_METRICS[w][0] for w in WORKLOADS}  # what a run records first
PROBE_INTERVAL = 0.002  # the change probe's pause between connections (as controlplane.py's)


def vip_of(i: int) -> str:
    import ipaddress
    return str(ipaddress.IPv4Address("10.96.0.1") + i)


STARTED = time.monotonic()


def log(msg: str) -> None:
    """A line of the run's log, after the minutes and seconds since the run started (where
    the time goes: the report's "Where the time went" sums it per phase)."""
    took = time.monotonic() - STARTED
    print(f"[{int(took // 60):02d}:{took % 60:04.1f}] {msg}", flush=True)


PREDICT_STEP, PREDICT_MIN_S = 10, 1.0


def predicted_over(load_s: Dict[int, float], load_over: Dict[int, float], n: int,
                   limit: float) -> Optional[Tuple[float, str]]:
    """A variant's programming at N skipped before it is tried, when a smaller N already
    shows it would take over `limit` seconds: it ran over the limit at a smaller N, or its
    load time there, scaled linearly to N (a lower bound: no loader here is sub-linear), is
    over it. -> (the predicted seconds, the reason reported), or None: try it."""
    for m in sorted((m for m in load_over if m < n), reverse=True):
        return (load_over[m] * n / m,
                f"programming ran over the {limit:.0f} s limit at N = {m:,} already: not "
                f"tried at {n:,} (it would take over {load_over[m] * n / m:,.0f} s)")
    # Only from a load that per-service work dominates (a second or more; below, process
    # start and fixed work such as nodemesh+policy's 10,000 rules dominate) and at most one
    # full-mode step (×10) below N: 0.1 s at 1 service says nothing about 10,000.
    done = [m for m in load_s if n / PREDICT_STEP <= m < n and load_s[m] >= PREDICT_MIN_S]
    if not done:
        return None
    m = max(done)
    predicted = load_s[m] * n / m
    if predicted <= limit:
        return None
    return (predicted, f"programming {m:,} services took {load_s[m]:.1f} s: {n:,} would take "
            f"at least {predicted:,.0f} s (scaled linearly), over the {limit:.0f} s limit "
            "(--load-timeout): not tried")


def not_in_quick_mode(v: vr.Variant, n: int) -> str:
    """Why the quick mode does not run v at its largest N, with v's load time at the largest
    N it did program in this run, scaled linearly to N (a lower bound)."""
    done = [m for m in v.load_s if m < n and m not in v.not_run]
    why = f"the quick mode runs only {', '.join(QUICK_AT_LARGEST)} at N = {n:,}"
    if done and v.name not in ("direct", "direct-aa", "direct-routed"):
        m = max(done)
        why += (f"; programming {m:,} services took {v.load_s[m]:.1f} s here, so {n:,} would "
                f"take at least {v.load_s[m] * n / m:,.0f} s (scaled linearly)")
    return why + "; `make bench FULL=1` runs it"


def spread(i: int, k: int, total: int) -> bool:
    """Whether round i of `total` is one of k rounds spread evenly over them."""
    return (i + 1) * k // total > i * k // total if total else False


def cpu_stall() -> float:
    """Seconds some runnable task has waited for a CPU since boot (PSI, /proc/pressure/cpu
    "some" total; 0 where the kernel has no PSI). Its growth over a run divided by the run's
    length is the share of that run during which a task (the bench's or anyone's) waited:
    about 0 when the client and the server have a CPU each and nothing else runs, and the
    signature of other work on the machine when the rounds scatter."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class Run:
    """One conn run's figures, for pairing it with the direct runs around it."""
    rate: float     # connections/s
    cpu_us: float   # CPU µs a connection (client + servers + softirq in their context)
    others: float   # the share of the machine's CPUs other work used meanwhile


# The variants whose conn runs are paired, each with its baseline: those with a target stated
# against a baseline (nodemesh against direct; nodemesh-tc, whose client is outside the node,
# against direct-routed: the same client and node hop, the node forwarding untouched), the A/A
# test. The others (targets against HAProxy, or none; direct-routed, whose ratio to direct is
# the node hop's cost) run in turn after them in each round. A variant is paired only when
# its baseline runs too.
PAIRED_WITH: Dict[str, str] = {"direct-aa": "direct", "nodemesh": "direct",
                               "nodemesh-tc": "direct-routed"}
BRACKETED = tuple(PAIRED_WITH)


def pairs_text() -> str:
    """'direct-aa and nodemesh beside direct, nodemesh-tc beside direct-routed'."""
    by_base: Dict[str, List[str]] = {}
    for v, b in PAIRED_WITH.items():
        by_base.setdefault(b, []).append(v)
    return ", ".join(f"{' and '.join(vs)} beside {b}" for b, vs in by_base.items())


def baseline(name: str) -> str:
    """The variant `name`'s conn runs are paired with (and its rate target is stated
    against): direct, or direct-routed for nodemesh-tc."""
    return PAIRED_WITH.get(name, "direct")


class Bench:
    def __init__(self, args, lab: Lab, workdir: str):
        self.args, self.lab, self.workdir = args, lab, workdir
        self.server = lab.backends[0]
        s = lab.subnet
        self.set_a = [f"198.18.{s}.{201 + j}" for j in range(3)]
        self.set_b = [f"198.18.{s}.{204 + j}" for j in range(3)]
        self.cluster_cidr = f"198.18.{s}.0/24"  # the client counts as a pod: no masquerade
        self.variants: Dict[str, vr.Variant] = {}
        self.queries = wl.write_queries(os.path.join(workdir, "queries.txt"))
        # workload -> its fixed rate (50% of direct's maximum), and direct's maximum's runs
        self.rate: Dict[str, float] = {}
        self.direct_max: Dict[str, List[float]] = {}
        self.load: Dict[int, Tuple[float, float]] = {}  # 1-min load average around each N
        self.requests: Dict[Tuple[str, int], int] = {}  # conn requests per (variant, N)
        self.closed = False
        self.last: Optional[Run] = None  # the latest conn run's figures (attempt)
        self.phases: List[Tuple[str, float]] = []  # (what, seconds), in order (timed)

    @contextlib.contextmanager
    def timed(self, what: str):
        """Adds (what, its seconds) to self.phases: the report says where the time went."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.__dict__.setdefault("phases", []).append((what, time.monotonic() - t0))
            log(f"  ({what}: {time.monotonic() - t0:.1f} s)")

    # -- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        b1 = self.server.netns
        for ep in self.set_a + self.set_b:
            sh(f"ip -n {b1} addr add {ep}/24 dev eth0")
        wl.start_servers(self.lab, b1, self.set_a + self.set_b, self.workdir)
        for name in self.args.variants:
            self.variants[name] = vr.VARIANTS[name](self)

    def services(self, n: int, endpoints: Optional[List[str]] = None,
                 measured_only: bool = False) -> List[bl.SvcSpec]:
        """The N services' ports, the measured service's last; measured_only: its ports
        alone (direct's kind names the backend itself: building 100,000 specs for it took
        seconds of the quick mode)."""
        import ipaddress
        fake = ipaddress.IPv4Address(FAKE_PODS)
        out = []
        for i in range(0 if measured_only else n - 1):
            eps = [str(fake + 3 * i + j) for j in range(3)]
            out.append(bl.SvcSpec("bench", f"svc-{i}", "http", vip_of(i), 80, eps, 8080))
        eps = endpoints or self.set_a
        vip, name = vip_of(n - 1), f"svc-{n - 1}"
        out.append(bl.SvcSpec("bench", name, "dns", vip, 53, eps, wl.DNS_PORT, "udp"))
        out.append(bl.SvcSpec("bench", name, "iperf", vip, wl.IPERF_PORT, eps, wl.IPERF_PORT))
        out.append(bl.SvcSpec("bench", name, "http", vip, 80, eps, wl.HTTP_PORT))
        return out

    # -- programming --------------------------------------------------------------------------
    def program(self, n: int) -> None:
        only = getattr(self.args, "only_at", {}).get(n)
        for v in self.variants.values():
            if only is not None and v.name not in only:
                v.not_run[n] = not_in_quick_mode(v, n)
                log(f"  {v.name:>16}: NOT RUN at N={n:,}: {v.not_run[n]}")
                continue
            over = predicted_over(v.load_s, v.load_over, n, self.args.load_timeout)
            if over:
                v.load_over[n], why = over
                v.not_run[n] = why
                log(f"  {v.name:>16}: NOT RUN at N={n:,}: {why}")
                continue
            try:
                v.load_s[n], v.rules[n] = v.program(
                    n, self.services(n, v.set_a, measured_only=not v.programs))
                if v.name != "direct":
                    log(f"  {v.name:>16}: {n:,} services programmed in {v.load_s[n]:.3f} s")
            except (vr.NotRun, RuntimeError, subprocess.TimeoutExpired) as e:
                why = " ".join(str(e).split())[:300]
                if isinstance(e, subprocess.TimeoutExpired):
                    v.load_over[n] = self.args.load_timeout  # its load time: more than this
                if not isinstance(e, vr.NotRun):
                    why = (f"programming failed or took over {self.args.load_timeout:.0f} s: "
                           f"{why}")
                v.not_run[n] = why
                log(f"  {v.name:>16}: NOT RUN at N={n:,}: {why}")

    # -- measuring ----------------------------------------------------------------------------
    def reset(self, *vs: vr.Variant) -> None:
        """Fresh connection state for the next run of vs (one, or a pair side by side):
        conntrack flushed and TIME_WAIT sockets destroyed in each client's netns, the
        server's, and a node's between them (flush_netns), all at once from one shell (a
        process start costs ~0.2-0.4 s on the loaded 2-CPU VM; one each was most of a 1 s
        run's overhead); then each variant's own state (the TC path's conntrack map)."""
        netns = list(dict.fromkeys(ns for v in vs for ns in v.flush_netns()))
        sh(" ".join(f"ip netns exec {ns} sh -c 'conntrack -F; ss -K -t state time-wait' "
                    ">/dev/null 2>&1 &" for ns in netns) + " wait", check=False)
        for v in vs:
            v.reset_state()

    def active(self, n: int, workload: str) -> List[vr.Variant]:
        only = getattr(getattr(self, "args", None), "workload_only", {}).get(workload)
        return [v for v in self.variants.values()
                if n not in v.not_run and workload in v.workloads
                and (n, workload) not in v.failed and (only is None or v.name in only)]

    def attempt(self, v: vr.Variant, n: int, workload: str, seconds: float,
                counted: bool = True) -> Optional[Run]:
        """run_workload, but a failure (a tool's error, a hang past its bound) marks this
        workload failed for this variant at this N, with the reason, and the run goes on
        (nodemesh+sockmap's iperf3 can get ENOMEM from an accelerated write()). -> a conn
        run's figures (None for the other workloads, or when it failed)."""
        self.last = None
        try:
            self.run_workload(v, n, workload, seconds, counted)
            return self.last
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
            done = len(v.values(vr.WORKLOAD_METRICS[workload][0], n))
            why = (f"failed in {'the warm-up' if not counted else f'round {done + 1}'}: "
                   f"{' '.join(str(e).split())[:300]}")
            v.fail(n, workload, why)
            log(f"  N={n:<7,} {workload:>9} {v.name:>16}: FAILED, not run further at this "
                f"N: {why}")

    def run_workload(self, v: vr.Variant, n: int, workload: str, seconds: float,
                     counted: bool = True) -> None:
        """One run of one workload for one variant; its figures are added to v.data."""
        self.reset(v)
        if workload == "conn":
            stall0, t0 = cpu_stall(), time.monotonic()
            meter = wl.meter(v.resident_netns())
            rate, reqs, note = wl.conn(v.client("http"), seconds)
            spent = wl.cost(meter)
            stall = (cpu_stall() - stall0) / (time.monotonic() - t0)
            self.requests[(v.name, n)] = self.requests.get((v.name, n), 0) + reqs
            if note:
                log(f"    ({v.name}: {note})")
            cpu_us = spent.own / max(reqs, 1) * 1e6
            others = spent.others_share(os.cpu_count() or 1)
            if counted:
                v.add("conn", n, rate)
                v.add("conn_stall", n, stall)
                v.add("conn_cpu_us", n, cpu_us)
                v.add("conn_client_us", n, spent.client / max(reqs, 1) * 1e6)
                v.add("conn_others", n, others)
            self.last = Run(rate, cpu_us, others)
            shown = (f"{rate:10,.0f} conn/s, {cpu_us:5.1f} µs CPU a connection (other work "
                     f"{others:.0%} of the CPUs, CPU pressure {stall:.0%})")
        elif workload == "keepalive":
            rate, _, note = wl.keepalive_max(v.client("http"), seconds)
            if note:
                log(f"    ({v.name}: {note})")
            # no reset before the paced run: 32 kept-alive connections leave nothing that
            # matters, and a reset costs a process start (the quick mode runs 45 of these)
            p = wl.keepalive_paced(v.client("http"), seconds, self.rate["keepalive"])
            if counted:
                v.add("ka_max", n, rate)
                v.add("ka_rate", n, p.rate)
                v.add("ka_p50", n, p.p50_ms)
                v.add("ka_p99", n, p.p99_ms)
                v.add("ka_errors", n, p.errors)
            shown = (f"max {rate:9,.0f} req/s; at {p.rate:,.0f}/s p50 {p.p50_ms:.3f} ms "
                     f"p99 {p.p99_ms:.3f} ms")
        elif workload == "udp":
            u = wl.udp(v.client("dns"), seconds, self.queries)
            p = wl.udp(v.client("dns"), seconds, self.queries, self.rate["udp"])
            if counted:
                v.add("udp_qps", n, u.qps)
                v.add("udp_lost", n, u.lost / max(u.sent, 1) * 100)
                v.add("udp_rate", n, p.qps)
                v.add("udp_ms", n, p.mean_ms)
                v.add("udp_max_ms", n, p.max_ms)
            shown = (f"max {u.qps:10,.0f} q/s (lost {u.lost}/{u.sent}); at {p.qps:,.0f} q/s "
                     f"mean {p.mean_ms:.3f} ms, max {p.max_ms:.3f} ms")
        elif workload == "bulk":
            one = wl.bulk(v.client("iperf"), seconds, 1)
            eight = wl.bulk(v.client("iperf"), seconds, 8)
            if counted:
                v.add("bulk1", n, one)
                v.add("bulk8", n, eight)
            shown = f"{one:6.2f} Gbit/s (1 stream), {eight:6.2f} Gbit/s (8 streams)"
        else:
            raise ValueError(workload)
        if counted:
            log(f"  N={n:<7,} {workload:>9} {v.name:>16}: {shown}")

    def calibrate(self, workload: str) -> None:
        """The fixed rate of keepalive or udp: 50% of direct's maximum, measured first in
        this run (the median of 3 runs), or --ka-rate / --udp-rate."""
        if workload in self.rate:
            return
        given = self.args.ka_rate if workload == "keepalive" else self.args.udp_rate
        if given:
            self.rate[workload] = given
            return
        d = self.variants["direct"]
        runs = self.direct_max.setdefault(workload, [])
        for _ in range(3):
            self.reset(d)
            if workload == "keepalive":
                runs.append(wl.keepalive_max(d.client("http"),
                                             self.args.seconds_of[workload])[0])
            else:
                runs.append(wl.udp(d.client("dns"), self.args.seconds_of[workload],
                                   self.queries).qps)
        self.rate[workload] = statistics.median(runs) / 2
        log(f"  {workload}: direct's maximum {statistics.median(runs):,.0f}/s (median of 3): "
            f"the fixed rate is {self.rate[workload]:,.0f}/s")

    def measure(self, n: int) -> None:
        load_before = os.getloadavg()[0]
        for workload in self.args.workloads:
            if workload == "change" or n not in self.args.sizes_of[workload]:
                continue
            active = self.active(n, workload)
            if not active:
                continue
            with self.timed(f"N = {fmt_n(n)}: {workload}"):
                self.measure_workload(n, workload, active)
        if "change" in self.args.workloads and n in self.args.sizes_of["change"]:
            with self.timed(f"N = {fmt_n(n)}: change"):
                self.measure_changes(n)
        self.load[n] = (load_before, os.getloadavg()[0])

    def measure_workload(self, n: int, workload: str, active: List[vr.Variant]) -> None:
        """Warm-up, rounds (conn's paired and alone), and conn's traversal proof."""
        if workload in ("keepalive", "udp"):
            self.calibrate(workload)
        if workload == "conn":
            for v in active:
                # counters from here on; the netfilter rules' start at 0 when loaded,
                # and reading them back takes minutes at 100,000 (iptables-save -c)
                if not v.counts_from_load:
                    v.proof(n, 0)
        if workload in self.args.warm_up:
            for v in active:  # warm-up, not counted
                if v.programs or not self.warmed(v, workload, n):
                    self.attempt(v, n, workload, 1, counted=False)
        rounds = self.args.reps_of[workload]
        pair_rounds = self.args.pair_rounds if workload == "conn" and \
            self.args.order != "rounds" else 0
        total = max(rounds, pair_rounds)
        for i in range(total):
            # conn's paired rounds and its rounds alone may differ in number: each kind
            # is spread evenly over the rounds
            pair_now, alone_now = spread(i, pair_rounds, total), spread(i, rounds, total)
            if pair_now and self.args.order == "bracketed":
                self.bracketed_round(n, alone=alone_now)
                continue
            if pair_now:
                self.concurrent_pairs(n)
            if alone_now:
                for v in self.active(n, workload):
                    self.attempt(v, n, workload, self.args.seconds_of[workload])
        if workload == "conn":
            for v in self.active(n, workload):
                v.proofs[n] = v.proof(n, self.requests.get((v.name, n), 0))
                if v.proofs[n]:
                    log(f"  {v.name:>16}: {v.proofs[n]}")

    def warmed(self, v: vr.Variant, workload: str, n: int) -> bool:
        """v has run `workload` at a smaller N already (a variant that programs nothing,
        direct's kind, needs no warm-up after its first: nothing changed on its path)."""
        return any(v.values(WORKLOAD_FIRST[workload], m) for m in self.args.sizes if m < n)

    def pairs(self, n: int) -> List[Tuple[vr.Variant, vr.Variant]]:
        """(baseline, variant) for each PAIRED_WITH variant running conn at N whose baseline
        runs too, in the variants' order."""
        active = {v.name: v for v in self.active(n, "conn")}
        return [(active[baseline(name)], v) for name, v in active.items()
                if name in PAIRED_WITH and baseline(name) in active]

    def bracketed_round(self, n: int, alone: bool = True) -> None:
        """One round of conn runs with each baseline between every two of the variants paired
        with it (D A D B D ..., then R T R for direct-routed's), then the others in turn
        (alone: False leaves them out): each paired run is paired with the mean of the two
        baseline runs around it, seconds apart, so a drift of the machine's load between
        rounds cancels in its ratio. The pair keeps the most other work any of its three
        runs met (paired() leaves the disturbed ones out)."""
        seconds = self.args.seconds_of["conn"]
        pairs = self.pairs(n)
        ran = set()
        for base in dict.fromkeys(b for b, _ in pairs):
            before = self.attempt(base, n, "conn", seconds)
            ran.add(base.name)
            for v in [v for b, v in pairs if b is base]:
                run = self.attempt(v, n, "conn", seconds)
                ran.add(v.name)
                after = self.attempt(base, n, "conn", seconds)
                if run and before and after:
                    v.add("conn_pair", n, run.rate / ((before.rate + after.rate) / 2))
                    v.add("conn_cpu_pair", n,
                          run.cpu_us / ((before.cpu_us + after.cpu_us) / 2))
                    v.add("conn_pair_others", n, max(before.others, run.others, after.others))
                before = after
        if alone:
            for v in [v for v in self.active(n, "conn") if v.name not in ran]:  # in turn
                self.attempt(v, n, "conn", seconds)

    def concurrent_pairs(self, n: int) -> None:
        """Each paired variant side by side with its baseline (PAIRED_WITH), at the same time
        (workloads.conn_side_by_side): its ratio per round is the two rates of the same
        seconds. The round's runs in turn follow (measure), for the absolute rates."""
        for d, v in self.pairs(n):
            self.reset(d, v)
            meter = wl.meter(sorted(set(d.resident_netns() + v.resident_netns())))
            try:
                (rd, nd, _), (rv, nv, _) = wl.conn_side_by_side(
                    d.client("http"), v.client("http"), self.args.seconds_of["conn"])
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                log(f"  N={n:<7,}      conn {v.name:>16}: side by side with {d.name} failed: "
                    f"{' '.join(str(e).split())[:200]}")
                continue
            others = wl.cost(meter).others_share(os.cpu_count() or 1)
            for name, reqs in ((d.name, nd), (v.name, nv)):
                self.requests[(name, n)] = self.requests.get((name, n), 0) + reqs
            v.add("conn_pair", n, rv / rd)
            v.add("conn_pair_others", n, others)
            log(f"  N={n:<7,}      conn {v.name:>16}: {rv:10,.0f} conn/s beside {d.name}'s "
                f"{rd:,.0f}: {rv / rd:.3f}× (other work {others:.0%} of the CPUs)")

    def measure_changes(self, n: int) -> None:
        from controlplane import Probe
        # N services' specs per endpoint set, built once for every variant and change (at
        # 100,000 each build took seconds: 45 s for nodemesh's 3 changes on the loaded VM)
        built: Dict[Tuple[str, ...], List[bl.SvcSpec]] = {}
        for v in self.active(n, "change"):
            if not v.changes:
                continue
            host, port = v.target("http")
            probe = Probe(self.lab, PROBE_INTERVAL, netns=v.netns, cgroup=v.cgroup or "",
                          port=port)
            cur, other = v.set_a, v.set_b
            try:
                for _ in range(self.args.changes):
                    old_specs = [s for s in v.specs if s.name == v.specs[-1].name]
                    new_specs = built.get(tuple(other)) or built.setdefault(
                        tuple(other), self.services(n, other))
                    changed = list(zip(old_specs, new_specs[-3:]))
                    # a change may take as long as programming may (kube-proxy's partial
                    # iptables-nft restore at 10,000 services takes seconds)
                    bound = self.args.load_timeout
                    # nodemesh-tc: a probe SYN on a client port whose closing conntrack entry
                    # (from the change before) still lives would reuse its translation and
                    # "land" on the new set before the change: each change starts empty
                    v.reset_state()
                    probe.arm(host, other, cur, bound, int(bound / PROBE_INTERVAL) + 1000)
                    t0 = time.monotonic()
                    cpu = v.change(new_specs, changed)
                    res = probe.result(timeout=bound + 15)
                    if "landed" not in res:
                        raise RuntimeError(f"probe: {res}")
                    v.add("change", n, res["landed"] - t0)
                    v.add("change_cpu", n, cpu)
                    cur, other = other, cur
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                v.notes.append(f"change at N = {n:,}: {' '.join(str(e).split())[:300]}")
                log(f"  {v.name:>16}: change failed at N={n:,}: {e}")
            finally:
                probe.close()
                if probe.proc in self.lab.processes:
                    self.lab.processes.remove(probe.proc)
            ch = v.values("change", n)
            if ch:
                log(f"  N={n:<7,}    change {v.name:>16}: {statistics.median(ch) * 1000:8.1f} "
                    f"ms to the first connection on the new endpoints (median of {len(ch)}), "
                    f"CPU {statistics.median(v.values('change_cpu', n)) * 1000:.1f} ms")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for v in self.variants.values():
            try:
                v.close()
            except Exception as e:  # noqa: BLE001 - teardown goes on
                log(f"  {v.name}: close failed: {e}")
        cleanup(self.lab.bpffs)


# -- the agent alone --------------------------------------------------------------------------
def nodemesh_services(n: int, backends: List[str]) -> List[Service]:
    return [Service(f"svc-{i}", "bench", vip_of(i), (ServicePort(80, 8080, "TCP", "http"),),
                    tuple(Backend(b) for b in backends)) for i in range(n)]


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




# -- results kept for --append ----------------------------------------------------------------
# A run's figures are also written beside its report, as <report>.json; `--append <report>.md`
# reads them back, keeps every (variant, metric, N) the new run did not measure, and rewrites
# the report from the union: parts of the full mode (--sizes, --variants, --workloads) run one
# after another end in one results file. The fixed keep-alive and UDP rates of the first part
# are reused by the later ones, so every part is paced alike.
RECORD_DICTS = ("load_s", "load_over", "rules", "not_run", "proofs")


def record(bench: "Bench", args, commands: List[str], minutes: float) -> dict:
    """Everything report() reads, as JSON (N keys as strings)."""
    def keyed(d: dict) -> dict:
        return {str(k): v for k, v in d.items()}
    return {
        "commands": commands, "parts": getattr(args, "parts", []), "minutes": minutes,
        "reps": args.reps,
        "seconds_of": args.seconds_of, "changes": args.changes, "warm_up": args.warm_up,
        "sizes_of": args.sizes_of, "workloads": args.workloads,
        "rate": bench.rate, "direct_max": bench.direct_max, "load": keyed(bench.load),
        "variants": {v.name: {
            "data": {m: keyed(by_n) for m, by_n in v.data.items() if by_n},
            **{f: keyed(getattr(v, f)) for f in RECORD_DICTS},
            "failed": [[n, w, why] for (n, w), why in v.failed.items()],
            "notes": v.notes} for v in bench.variants.values()},
    }


def bare_variant(name: str) -> vr.Variant:
    """A variant with records only (no netns, no kernel state): a part of the results that
    an earlier run measured."""
    v = object.__new__(vr.VARIANTS[name])
    v.new_records()
    v.name = name
    return v


def merge(bench: "Bench", args, old: dict) -> None:
    """Add an earlier part's figures (`old`, from record()) to this run's, in place: what
    this run measured wins, (variant, metric, N) by (variant, metric, N); a variant or N
    only the earlier part has is kept as it was. args' sizes and workloads become the
    union; the commands of every part are kept, in order, in args.commands."""
    def ints(d: dict) -> dict:
        return {int(k): v for k, v in d.items()}
    for name, rec in old.get("variants", {}).items():
        if name not in vr.VARIANTS:
            continue
        v = bench.variants.get(name)
        if v is None:
            v = bench.variants[name] = bare_variant(name)
        measured = set(v.load_s) | set(v.load_over) | set(v.not_run)
        for metric, by_n in rec.get("data", {}).items():
            for n, xs in ints(by_n).items():
                if not v.values(metric, n):
                    v.data[metric][n] = list(xs)
        for f in RECORD_DICTS:
            mine = getattr(v, f)
            for n, value in ints(rec.get(f, {})).items():
                if n not in measured and n not in mine:
                    mine[n] = value
        for n, w, why in rec.get("failed", []):
            if (n, w) not in v.failed and not any(v.values(m, n)
                                                  for m in vr.WORKLOAD_METRICS[w]):
                v.failed[(n, w)] = why
        v.notes += [note for note in rec.get("notes", []) if note not in v.notes]
    bench.variants = {name: bench.variants[name] for name in vr.VARIANTS
                      if name in bench.variants}
    for w, rate in old.get("rate", {}).items():
        bench.rate.setdefault(w, rate)
    for w, runs in old.get("direct_max", {}).items():
        bench.direct_max.setdefault(w, runs)
    for n, la in ints(old.get("load", {})).items():
        bench.load.setdefault(n, tuple(la))
    for w, ns in old.get("sizes_of", {}).items():
        if w in args.sizes_of:
            args.sizes_of[w] = sorted(set(args.sizes_of[w]) | set(ns))
    args.workloads = [w for w in WORKLOADS
                      if w in args.workloads or w in old.get("workloads", [])]
    args.sizes = sorted({n for w in args.workloads for n in args.sizes_of[w]}
                        | set(args.sizes))
    earlier = old.get("parts") or [{"command": c} for c in old.get("commands", [])]
    mine = getattr(args, "parts", None) or [{"command": c} for c in
                                            getattr(args, "commands", [])]
    args.parts = list(earlier) + list(mine)
    args.commands = list(old.get("commands", [])) + list(getattr(args, "commands", []))


def load_record(path: str) -> Optional[dict]:
    """The figures of an existing results file (its .json), or None when there are none."""
    import json
    try:
        with open(os.path.splitext(path)[0] + ".json") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


# -- targets --------------------------------------------------------------------------------
# The README's targets (Performance), checked against the figures of the run.
TARGET_SOCKET, TARGET_FLAT, TARGET_TC = 0.97, 0.05, 0.85
TARGET_VS_HAPROXY, TARGET_P99_VS_HAPROXY = 2.0, 0.5
TARGET_PROGRAM_S, TARGET_CHANGE_S, TARGET_N = 10.0, 0.050, 100_000


# -- paired rounds: how sure a ratio is ---------------------------------------------------------
# Each variant's conn run is paired with the two direct runs around it (Bench.bracketed_round):
# its ratio per round is steady against slow drifts of the machine's load but not against a
# burst inside one run. A pair is disturbed when other work used more than DISTURBED of the
# CPUs during any of its three runs (workloads.Cost); the figures come from the undisturbed
# pairs when there are MIN_PAIRS of them, else from all, and say so. The tolerance of a median
# ratio is a distribution-free interval of the median (order statistics, at least CI_LEVEL
# coverage where there are enough pairs), widened by the A/A test's own bias at that N
# (direct-aa's median ratio to direct, which should be 1.00): a target is met when the whole
# interval clears it, missed when the whole interval falls short, and cannot be judged when
# the interval straddles it.
DISTURBED, MIN_PAIRS, CI_LEVEL = 0.10, 5, 0.90


def median_interval(xs: List[float]) -> Tuple[float, float, float]:
    """(low, high, coverage): the widest-inward order statistics x(j), x(k+1-j) around the
    median of xs whose coverage, 1 - 2 P(Binomial(k, 1/2) <= j - 1), is at least CI_LEVEL;
    min and max, with their lower coverage, when there are too few values for that."""
    import math
    ys = sorted(xs)
    k = len(ys)
    best = (ys[0], ys[-1], 1 - 2 * 0.5 ** k)
    for j in range(2, (k + 1) // 2 + 1):
        coverage = 1 - 2 * sum(math.comb(k, i) for i in range(j)) / 2 ** k
        if coverage < CI_LEVEL:
            break
        best = (ys[j - 1], ys[k - j], coverage)
    return best


@dataclass
class Paired:
    """A variant's per-round ratios to the direct runs around it, at one N."""
    median: float
    low: float          # the median's interval (median_interval), before any A/A widening
    high: float
    coverage: float
    used: int           # pairs the figures come from
    total: int          # pairs measured
    disturbed: int      # pairs with other work over DISTURBED in one of their runs
    spread: Tuple[float, float]  # min and max of the pairs used

    def describe(self) -> str:
        sure = f"{self.coverage:.0%} interval {self.low:.3f}–{self.high:.3f}"
        rounds = f"{self.used} of {self.total} rounds"
        if self.disturbed:
            rounds += (f"; {self.disturbed} disturbed, "
                       + ("left out" if self.used < self.total else "kept: too few others"))
        return (f"{self.median:.3f}× ({sure}; range {self.spread[0]:.2f}–"
                f"{self.spread[1]:.2f}; {rounds})")


def paired(v: Optional[vr.Variant], n: int, metric: str = "conn_pair") -> Optional[Paired]:
    """The paired figures of v at N from its per-round ratios `metric` (conn_pair: rate,
    conn_cpu_pair: CPU a connection), or None where v ran no paired rounds."""
    xs = v.values(metric, n) if v else []
    if not v or not xs:
        return None
    others = v.values("conn_pair_others", n)
    if len(others) != len(xs):
        others = [0.0] * len(xs)
    quiet = [x for x, o in zip(xs, others) if o <= DISTURBED]
    use = quiet if len(quiet) >= MIN_PAIRS else list(xs)
    low, high, coverage = median_interval(use)
    return Paired(med(use), low, high, coverage, len(use), len(xs), len(xs) - len(quiet),
                  (min(use), max(use)))


def in_turn(v: Optional[vr.Variant], d: Optional[vr.Variant], n: int,
            metric: str = "conn") -> Optional[Paired]:
    """Rounds run in turn (--order rounds, or a part recorded before bracketing): round i's
    run against direct's run i of the same round, where both have as many rounds."""
    xs, base = (v.values(metric, n) if v else []), (d.values(metric, n) if d else [])
    if not xs or len(xs) != len(base) or v is d:
        return None
    rs = [a / b for a, b in zip(xs, base)]
    low, high, coverage = median_interval(rs)
    return Paired(med(rs), low, high, coverage, len(rs), len(rs), 0, (min(rs), max(rs)))


def aa_bias(bench: "Bench", n: int, metric: str = "conn_pair") -> float:
    """How far the A/A test's median ratio is from 1 at N (0 where it was not run)."""
    aa_v = bench.variants.get("direct-aa")
    alone = "conn_cpu_us" if metric == "conn_cpu_pair" else "conn"
    aa = paired(aa_v, n, metric) or in_turn(aa_v, bench.variants.get("direct"), n, alone)
    return abs(aa.median - 1) if aa else 0.0


FEW = f"**cannot be judged** (too few rounds for a {CI_LEVEL:.0%} interval)"


def judge_at_least(low: float, high: float, want: float) -> str:
    if low >= want:
        return "**met**"
    if high < want:
        return "**missed**"
    return "**cannot be judged** (the interval straddles the target)"


def flat_bounds(at_n: Paired, at_1: Paired) -> Tuple[float, float, float, float]:
    """nodemesh's paired ratio at N over its ratio at 1: (the quotient of the medians, its
    low and high bound from the two intervals, low_N / high_1 and high_N / low_1, and their
    coverage: at least the product of the two, the rounds at the two N being independent).
    Not widened by the A/A bias: a bias of the method common to every N cancels in it."""
    return (at_n.median / at_1.median, at_n.low / at_1.high, at_n.high / at_1.low,
            at_n.coverage * at_1.coverage)


def judge_flat(quotients: Dict[int, Tuple[float, float, float, float]], most: float) -> str:
    """Flat within `most` from each N's (quotient, low, high, coverage) over N = 1: met when
    every interval lies within 1 ± most, missed when one lies wholly outside, else cannot be
    judged; too few rounds for a CI_LEVEL interval at 1 or at an N cannot be judged either."""
    states = []
    for _, low, high, coverage in quotients.values():
        if low >= 1 - most and high <= 1 + most:
            states.append("met")
        elif low > 1 + most or high < 1 - most:
            states.append("missed")
        else:
            states.append("cannot")
    if "missed" in states:
        return "**missed**"
    if any(c < CI_LEVEL ** 2 for *_, c in quotients.values()):
        return FEW
    if states and all(x == "met" for x in states):
        return "**met**"
    return "**cannot be judged** (an interval straddles the target)"


def flat_row(bench: "Bench", sizes: List[int]) -> str:
    """The Targets row of "flat within 5% from 1 to 100,000": nodemesh's paired ratio to
    direct at each N over its ratio at N = 1, with the quotient's interval (flat_bounds)."""
    nm, d = bench.variants.get("nodemesh"), bench.variants.get("direct")
    label = (f"nodemesh flat within {TARGET_FLAT:.0%} from 1 to {fmt_n(TARGET_N)} (its paired "
             "ratio to direct at N over its ratio at 1, with the interval from both "
             "medians' intervals, at least their coverages' product)")
    at = {n: p for n in sizes if (p := paired(nm, n) or in_turn(nm, d, n)) is not None}
    if 1 not in at or TARGET_N not in at:
        return (f"| {label} | needs N = 1 and {fmt_n(TARGET_N)}; measured "
                f"{', '.join(fmt_n(n) for n in at) or 'neither'} | not measured |")
    quotients = {n: flat_bounds(p, at[1]) for n, p in at.items() if n != 1}
    shown = "; ".join(f"{fmt_n(n)} over 1: {q:.3f} (interval {lo:.3f}–{hi:.3f}, "
                      f"{c:.0%} coverage)" for n, (q, lo, hi, c) in quotients.items())
    return f"| {label} | {shown} | {judge_flat(quotients, TARGET_FLAT)} |"


def targets(bench: "Bench", sizes: List[int]) -> List[str]:
    """One row per target: what it asks, the measured figures, met / missed / not measured
    (a target stated at some N that this run did not measure is not measured, never met)."""
    vs = bench.variants
    nm, tc, hap, d = (vs.get(k) for k in ("nodemesh", "nodemesh-tc", "haproxy", "direct"))
    routed = vs.get(baseline("nodemesh-tc"))

    def ratio(a, b, metric: str, n: int) -> Optional[float]:
        if not a or not b:
            return None
        x, y = a.values(metric, n), b.values(metric, n)
        return med(x) / med(y) if x and y else None

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    rows = []

    def at_every_n(label: str, v, least: float, metric: str = "conn_pair",
                   cost: bool = False, base=d) -> None:
        """A ratio to direct that should be at least `least` at every N: judged on the paired
        rounds' interval (widened by the A/A bias) where there are paired rounds, else on the
        ratio of medians, with no tolerance to judge by. cost: the companion figure, CPU a
        connection, whose ratio should be at most 1/least (the rate's target, as a cost)."""
        shown, states = [], []
        for n in sizes:
            # side by side, CPU is not split between the two wrk: the runs alone, in turn
            p = paired(v, n, metric) or in_turn(v, base, n, "conn_cpu_us" if cost else "conn")
            if p is not None:
                bias = aa_bias(bench, n, metric)
                low, high = p.low - bias, p.high + bias
                if cost:  # rate ratio ≈ 1 / cost ratio where the CPUs are the limit
                    low, high = 1 / high, 1 / low
                shown.append(f"{fmt_n(n)}: {p.describe()}"
                             + (f", ± {bias:.3f} A/A bias" if bias else ""))
                states.append(judge_at_least(low, high, least) if p.coverage >= CI_LEVEL
                              else FEW)
                continue
            r = None if cost else ratio(v, base, "conn", n)
            if r is not None:
                shown.append(f"{fmt_n(n)}: {r:.2f}× (ratio of medians, no paired rounds)")
                states.append("**cannot be judged** (no paired rounds: no tolerance)")
        missing = [fmt_n(n) for n in [1, TARGET_N] if n not in
                   [m for m in sizes if paired(v, m, metric) or ratio(v, base, "conn", m)]]
        if not states:
            state = "not measured"
        elif "**missed**" in states:
            state = "**missed**"
        elif all(s == "**met**" for s in states):
            state = "**met**"
        else:
            state = next(s for s in states if s.startswith("**cannot"))
        if states and missing and state == "**met**":
            state = f"met where measured; not measured at N = {', '.join(missing)}"
        rows.append(f"| {label} | {'; '.join(shown) or '–'} | {state} |")

    at_every_n(f"nodemesh ≥ {TARGET_SOCKET:.2f}× direct, new connections, every N", nm,
               TARGET_SOCKET)
    at_every_n(f"companion: nodemesh's CPU a connection ≤ 1/{TARGET_SOCKET:.2f} of direct's "
               "(shown: its ratio to direct's, per N)", nm, TARGET_SOCKET, "conn_cpu_pair",
               cost=True)
    rows.append(flat_row(bench, sizes))
    at_every_n(f"nodemesh-tc ≥ {TARGET_TC:.2f}× direct-routed (the node forwarding "
               "untouched), every N", tc, TARGET_TC, base=routed)
    no_hop = []
    for n in sizes:
        r, hop = ratio(tc, d, "conn", n), ratio(routed, d, "conn", n)
        if r is not None:
            no_hop.append(f"{fmt_n(n)}: {r:.2f}×" + (f" (direct-routed {hop:.2f}×)"
                                                      if hop is not None else ""))
    if no_hop:
        rows.append("| reference, no target: nodemesh-tc ÷ direct, no node hop (ratios of "
                    "medians of the runs alone: the node's forwarding counts against it; "
                    "direct-routed's own ratio is what that hop costs) | "
                    f"{'; '.join(no_hop)} | – |")
    for label, metric, want, cmp in (
            (f"nodemesh ≥ {TARGET_VS_HAPROXY:g}× HAProxy's connection rate", "conn",
             TARGET_VS_HAPROXY, lambda r, w: r >= w),
            (f"nodemesh's keep-alive p99 ≤ {TARGET_P99_VS_HAPROXY:g}× HAProxy's", "ka_p99",
             TARGET_P99_VS_HAPROXY, lambda r, w: r <= w)):
        got = {n: ratio(nm, hap, metric, n) for n in sizes}
        got = {n: r for n, r in got.items() if r is not None}
        shown = ", ".join(f"{fmt_n(n)}: {r:.2f}×" for n, r in got.items())
        unrun = [fmt_n(n) for n in sizes if hap and n in hap.not_run]
        if unrun:
            shown += f"{'; ' if shown else ''}HAProxy not run at N = {', '.join(unrun)}"
        state = verdict(all(cmp(r, want) for r in got.values())) if got else "not measured"
        rows.append(f"| {label} | {shown or '–'} | {state} |")
    load = nm.load_s.get(TARGET_N) if nm else None
    rows.append(f"| nodemesh programs {fmt_n(TARGET_N)} services in ≤ {TARGET_PROGRAM_S:g} s | "
                + (f"{load:.2f} s | {verdict(load <= TARGET_PROGRAM_S)} |" if load is not None
                   else f"– | not measured (N = {fmt_n(TARGET_N)} not run) |"))
    ch = nm.values("change", TARGET_N) if nm else []
    rows.append(f"| one change at {fmt_n(TARGET_N)} takes effect in ≤ "
                f"{TARGET_CHANGE_S * 1000:g} ms end to end (median) | "
                + (f"{fms(med(ch))} ms ({fms(min(ch))}–{fms(max(ch))}) | "
                   f"{verdict(med(ch) <= TARGET_CHANGE_S)} |" if ch
                   else f"– | not measured (N = {fmt_n(TARGET_N)} not run) |"))
    return ["## Targets (README, Performance): met, missed or cannot be judged\n",
            "Connection-rate targets: the median of the per-round ratios to the variant's "
            "baseline (direct; direct-routed for nodemesh-tc: the same node hop, forwarded "
            "untouched) (to the baseline's runs around each run, bracketed; or to its run "
            "beside it, --order concurrent), with a distribution-free interval of that "
            "median (at least "
            f"{CI_LEVEL:.0%} coverage where there are enough rounds; the coverage is shown), "
            "widened by the A/A test's bias (direct-aa's distance from 1.00 at that N): met "
            "when the whole interval clears the target, missed when it falls short, cannot be "
            "judged when it straddles it. Rounds where other work used more than "
            f"{DISTURBED:.0%} of the CPUs are left out when {MIN_PAIRS} others remain. "
            "HAProxy's rows: ratios of medians. A target stated for every N is judged on the "
            "N this run measured. Flatness: the paired ratio at each N over the one at 1, "
            "its interval from the two medians' intervals (not widened by the A/A bias, "
            "which cancels in the quotient).\n",
            "| target | measured | verdict |", "|---|---|---|", *rows, ""]


# -- report ---------------------------------------------------------------------------------
def tool_versions() -> str:
    def first(cmd: str) -> str:
        res = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        text = (res.stdout + res.stderr).strip()
        return text.splitlines()[0] if text else "?"
    return ", ".join(first(c) for c in ("iptables-nft -V", "iptables-legacy -V",
                                        "nft --version", "haproxy -v", "nginx -v",
                                        "wrk -v 2>&1 | head -1", "dnsperf -h 2>&1 | grep Version",
                                        "dnsmasq --version", "iperf3 --version"))


def fmt_n(n: int) -> str:
    return f"{n:,}"


def med(values: List[float]) -> float:
    return statistics.median(values)


# One column of a per-N table: (header, metric, formatter of one value, ratio to direct?)
Column = Tuple[str, str, Callable[[float], str], bool]


def per_n_table(bench: Bench, n: int, workload: str, columns: List[Column],
                pairs: bool = False) -> List[str]:
    vs = list(bench.variants.values())
    d = bench.variants.get("direct")
    head = "| variant | " + " | ".join(
        f"{h} median (min–max)" + (" | vs direct" if ratio else "")
        for h, _, _, ratio in columns) + " |"
    width = sum(2 if c[3] else 1 for c in columns)
    out = [head, "|---|" + "---|" * width]
    for v in vs:
        if workload not in v.workloads:
            out.append(f"| {v.name} | n/a" + " |" * width)
            continue
        if (n, workload) in v.failed:
            out.append(f"| {v.name} | failed (see Not run)" + " |" * width)
            continue
        if n in v.not_run or not v.values(columns[0][1], n):
            out.append(f"| {v.name} | not run" + " |" * width)
            continue
        cells = []
        for _, metric, f, ratio in columns:
            xs = v.values(metric, n)
            cells.append(f"{f(med(xs))} ({f(min(xs))}–{f(max(xs))})" if xs else "–")
            if ratio:
                base = d.values(metric, n) if d else []
                cell = f"{med(xs) / med(base):.2f}×" if xs and base else "–"
                pair = paired(v, n) if pairs else None
                if pair is not None:
                    # each run beside its baseline's (Bench.concurrent_pairs)
                    cell += (f" (paired with {baseline(v.name)} {pair.median:.2f}×, "
                             f"interval {pair.low:.2f}–"
                             f"{pair.high:.2f}, range {pair.spread[0]:.2f}–{pair.spread[1]:.2f}"
                             f", {pair.used} rounds)")
                elif pairs and base and len(base) == len(xs) > 1 and v is not d:
                    # rounds run side by side: each round's ratio cancels slow drifts of load
                    pr = [a / b for a, b in zip(xs, base)]
                    cell += f" (per round {med(pr):.2f}×, {min(pr):.2f}–{max(pr):.2f})"
                cells.append(cell)
        out.append(f"| {v.name} | " + " | ".join(cells) + " |")
    return out


def ratio_summary(bench: Bench, sizes: List[int], metric: str, workload: str) -> List[str]:
    vs = list(bench.variants.values())
    d = bench.variants.get("direct")
    out = ["| N | " + " | ".join(v.name for v in vs) + " |", "|---|" + "---|" * len(vs)]
    for n in sizes:
        base = d.values(metric, n) if d else []
        cells = []
        for v in vs:
            xs = v.values(metric, n)
            if workload not in v.workloads:
                cells.append("n/a")
            elif (n, workload) in v.failed:
                cells.append("failed")
            elif not xs:
                cells.append("not run")
            else:
                cells.append(f"{med(xs) / med(base):.2f}×" if base else "–")
        out.append(f"| {fmt_n(n)} | " + " | ".join(cells) + " |")
    return out + [""]


def f0(x: float) -> str:
    return f"{x:,.0f}"


def f3(x: float) -> str:
    return f"{x:.3f}"


def f2(x: float) -> str:
    return f"{x:.2f}"


def fms(x: float) -> str:
    return f"{x * 1000:.1f}"


def rounds(bench: Bench, metric: str, n: int) -> int:
    """Rounds behind a per-N table (parts appended with --append may differ from --reps);
    the baselines (direct, direct-routed), which run between every two of their variants
    in a bracketed round, count only where they ran alone."""
    bracketed = any(v.values("conn_pair", n) for v in bench.variants.values())
    return max((len(v.values(metric, n)) for v in bench.variants.values()
                if not (bracketed and v.name in PAIRED_WITH.values())), default=0)


def conn_method(bench: Bench, n: int) -> List[str]:
    """Under a conn table: other work during its runs, the A/A test, and CPU a connection."""
    vs = [v for v in bench.variants.values() if v.values("conn", n)]
    out = []
    others = [x for v in vs for x in v.values("conn_others", n)]
    pairs = [x for v in vs for x in v.values("conn_pair_others", n)]
    if others:
        out.append(f"\nOther work during these runs (the machine's busy CPU time outside the "
                   f"bench's client and servers, plus steal, as a share of its "
                   f"{os.cpu_count()} CPUs): median {med(others):.0%}, {min(others):.0%}–"
                   f"{max(others):.0%}; {sum(1 for x in pairs if x > DISTURBED)} of "
                   f"{len(pairs)} paired rounds disturbed (over {DISTURBED:.0%} in one of "
                   "their three runs).")
    d = bench.variants.get("direct")
    order = getattr(bench.args, "order", "bracketed")
    if d and any(v.values("conn_pair", n) for v in vs) and order == "concurrent":
        out.append(f"\nRounds paired side by side (--order concurrent): {pairs_text()}, "
                   "each at the same time as its baseline (two wrk, 16 connections each, on "
                   "the client CPU), their ratio per round from the same seconds; and every "
                   "variant alone, in turn, for the absolute rates above.")
    elif d and any(v.values("conn_pair", n) for v in vs):
        out.append(f"\nRounds bracketed ({pairs_text()}): each baseline ran before the first "
                   "of its variants and after every one (D A D B ... D); each one's ratio per "
                   "round is to the mean of the two baseline runs around it; the other "
                   "variants ran after them, in turn.")
    aa = paired(bench.variants.get("direct-aa"), n)
    if aa:
        out.append(f"\nA/A test (direct-aa, the same path from a netns of its own, paired like "
                   f"the others): {aa.describe()}. Its distance from 1.000 and its interval "
                   "are the method's own error at this N.")
    cpu = [v for v in vs if v.values("conn_cpu_us", n)]
    if cpu:
        out.append("\nCPU a connection (µs: wrk, the servers and any proxy in the variant's "
                   "netns, softirq in their context; workloads.Cost), a companion figure: "
                   "direct-aa's against direct's shows how far other work moved it:\n")
        out.append("| variant | CPU µs a connection median (min–max) | of which the client "
                   "(wrk) | ratio to its baseline, round by round |")
        out.append("|---|---|---|---|")
        for v in dict.fromkeys(cpu):  # one row a variant
            xs, cl = v.values("conn_cpu_us", n), v.values("conn_client_us", n)
            # bracketed: each run against its baseline's around it; side by side, two wrk
            # share their CPU time, so the runs alone, each against its baseline's run alone
            # in the same round (in_turn)
            base = bench.variants.get(baseline(v.name))
            p = paired(v, n, "conn_cpu_pair") or in_turn(v, base, n, "conn_cpu_us")
            out.append(f"| {v.name} | {med(xs):.1f} ({min(xs):.1f}–{max(xs):.1f}) | "
                       + (f"{med(cl):.1f} ({min(cl):.1f}–{max(cl):.1f})" if cl else "–")
                       + " | " + (f"to {base.name}: {p.describe()}" if p and base else "–")
                       + " |")
    return out


def this_part(args, command: str, started: float) -> dict:
    """What report() says of one part of a results file: its command, its start (UTC) and
    its method (--append keeps one per part)."""
    return {"command": command,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "method": f"conn {args.reps_of['conn']} rounds of {args.seconds_of['conn']} s "
                      "runs, "
                      + {"bracketed": "bracketed (D A D B ... D)", "concurrent":
                         "side by side with direct"}.get(args.order, "in turn")
                      + f", CPUs {','.join(args.cpu_roles.values()) or 'unpinned'}"}


def parts_text(args) -> str:
    """Every part appended into the results file, in order, each with its date, command and
    method (a part recorded before parts had dates says so)."""
    parts = getattr(args, "parts", None) or [{"command": c} for c in
                                              getattr(args, "commands", [])]
    if len(parts) < 2:
        return ""
    return ("Parts appended into this file (--append), in order:\n\n" + "".join(
        f"{i}. {p.get('date') or 'date not recorded'}: `{p['command']}`"
        + (f" ({p['method']})" if p.get("method") else "") + "\n"
        for i, p in enumerate(parts, 1)) + "\n")


def report(bench: Bench, args, extra: List[str], command: str) -> str:
    vs = list(bench.variants.values())
    sizes = args.sizes
    now = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    out = [f"# nodemesh dataplane benchmark\n\n{now}, host {socket.gethostname()}, kernel "
           f"{os.uname().release}, {os.cpu_count()} CPUs; `{command}`\n\n"
           + parts_text(args)
           + f"{tool_versions()}\n\n"
           f"Method: bench/run.py's docstring. Seconds per run: "
           f"{', '.join(f'{w} {args.seconds_of[w]}' for w in args.workloads if w != 'change')}"
           f" (change: {args.changes} changes); per N and workload "
           f"({', '.join(w for w in args.warm_up if w in args.workloads) or 'none'}) a 1 s "
           "warm-up of every variant, then "
           f"{args.reps} rounds of all variants in turn (conn {args.reps_of['conn']}) "
           "(A B C ... A B C ...; "
           + {"bracketed": f"conn's rounds bracketed ({pairs_text()}): the baseline "
              "before the first and after every one, D A D B ... D, each run paired with the "
              "baseline runs around it, the others after them in turn",
              "concurrent": f"conn's paired rounds run {pairs_text()}, side by side, at the "
              "same time, for their paired ratio; its rounds alone run every variant in "
              "turn"}.get(getattr(args, "order", "rounds"), "conn's too, unpaired")
           + (f"; conn: {getattr(args, 'pair_rounds', 0)} paired rounds spread over its "
              f"{args.reps_of['conn']} rounds alone" if getattr(args, "order", "rounds")
              != "rounds" else "")
           + "); conntrack flushed and TIME_WAIT sockets destroyed in the "
           "client's and the server's netns before every run. The measured service is the "
           "last of N in every ruleset. nginx: 1 worker; haproxy: nbthread 1; every client "
           f"tool runs one thread. Workloads: {', '.join(args.workloads)}. CPU placement: "
           + (f"every client tool (and haproxy) on CPU {wl.CPUS['client']}, every server on "
              f"CPU {wl.CPUS['server']} (taskset), for every variant.\n"
              if wl.CPUS else "none (the scheduler's).\n")]
    for n in sizes:
        if n in bench.load:
            out.append(f"N = {fmt_n(n)}: 1-min load average {bench.load[n][0]:.2f} before, "
                       f"{bench.load[n][1]:.2f} after ({os.cpu_count()} CPUs; other "
                       "processes on this machine count too)  ")
    out.append("")
    out.append("## Variants\n")
    out.append("| variant | what | workloads | not run (why) |")
    out.append("|---|---|---|---|")
    for v in vs:
        skipped = {w for w, only in getattr(args, "workload_only", {}).items()
                   if v.name not in only}
        runs = [w for w in args.workloads if w in v.workloads and w not in skipped]
        why = [f"{w} ({v.unsupported.get(w, 'not supported')})" for w in args.workloads
               if w not in v.workloads]
        why += [f"{w} ({QUICK_SKIPPED_WHY[w]})" for w in args.workloads
                if w in v.workloads and w in skipped]
        out.append(f"| {v.name} | {vr.SUMMARY.get(v.name, '')} | {', '.join(runs)} | "
                   f"{'; '.join(why) or '–'} |")
    out.append("")
    out += targets(bench, sizes)
    conn_sizes = [n for n in sizes if n in args.sizes_of["conn"]]
    if "conn" in args.workloads:
        out.append("## New connections per second vs direct (ratio of medians)\n")
        out += ratio_summary(bench, conn_sizes, "conn", "conn")
        nm = bench.variants.get("nodemesh")
        others = [v for v in vs if not v.name.startswith(("direct", "nodemesh"))]
        if nm and others:
            out.append("nodemesh ÷ baseline (ratio of medians):\n")
            out.append("| N | " + " | ".join(f"nodemesh ÷ {v.name}" for v in others) + " |")
            out.append("|---|" + "---|" * len(others))
            for n in conn_sizes:
                cells = []
                for v in others:
                    a, b = nm.values("conn", n), v.values("conn", n)
                    cells.append(f"{med(a) / med(b):.2f}×" if a and b else "not run")
                out.append(f"| {fmt_n(n)} | " + " | ".join(cells) + " |")
            out.append("")
        for n in conn_sizes:
            out.append(f"### N = {fmt_n(n)}: new connections/s, "
                       f"{rounds(bench, 'conn', n)} rounds\n")
            out += per_n_table(bench, n, "conn", [("conn/s", "conn", f0, True)], pairs=True)
            stalls = [x for v in vs for x in v.values("conn_stall", n)]
            if stalls:
                out.append(f"\nCPU pressure during these runs (PSI: share of the run some "
                           f"task waited for a CPU): median {med(stalls):.0%}, "
                           f"{min(stalls):.0%}–{max(stalls):.0%}; near 0 on an otherwise idle "
                           "machine with the client and the server pinned apart, high where "
                           "other work shared the CPUs (and the rounds scatter).")
            out += conn_method(bench, n)
            out.append("")
    if "keepalive" in bench.rate:
        ka_sizes = [n for n in sizes if n in args.sizes_of["keepalive"]]
        runs = bench.direct_max.get("keepalive")
        direct_max = (f"direct's maximum {med(runs):,.0f} req/s (median of 3 runs before "
                      "the rounds), " if runs else "")
        out.append("## Keep-alive: maximum requests/s, and latency at a fixed rate\n")
        out.append(f"wrk -t1 -c32 over kept-alive connections. Fixed rate: {direct_max}half "
                   f"of it: {bench.rate['keepalive']:,.0f} req/s for every variant. Limits of the "
                   "method: wrk has no fixed-rate mode (wrk2 is not packaged), so "
                   "bench/pace.lua schedules each request at start + k/rate through wrk's "
                   "delay(), which releases requests in 1 ms batches; and wrk times a "
                   "request from its actual send, so a request held back while all 32 "
                   "connections were busy is not charged for its wait (coordinated omission): "
                   "a variant that falls behind shows it as an achieved rate below the fixed "
                   "one, not as latency. Latencies in ms.\n")
        out.append("p99 at the fixed rate vs direct (ratio of medians):\n")
        out += ratio_summary(bench, ka_sizes, "ka_p99", "keepalive")
        for n in ka_sizes:
            out.append(f"### N = {fmt_n(n)}: keep-alive, {rounds(bench, 'ka_max', n)} rounds\n")
            out += per_n_table(bench, n, "keepalive", [
                ("max req/s", "ka_max", f0, True), ("achieved rate", "ka_rate", f0, False),
                ("p50 ms", "ka_p50", f3, True), ("p99 ms", "ka_p99", f3, True)])
            out.append("")
    if "udp" in bench.rate:
        udp_sizes = [n for n in sizes if n in args.sizes_of["udp"]]
        runs = bench.direct_max.get("udp")
        direct_max = (f"direct's maximum {med(runs):,.0f} queries/s (median of 3 runs before "
                      "the rounds), " if runs else "")
        out.append("## UDP request/response: dnsperf against dnsmasq\n")
        out.append("dnsperf -c1 -T1 -q64 (one socket, up to 64 queries outstanding), "
                   "`bench.test A` answered by dnsmasq itself. Maximum: queries/s, and lost = "
                   "queries without an answer within 1 s. Latency: a second run paced with "
                   f"`-Q` at a fixed rate, {direct_max}half of it: "
                   f"{bench.rate['udp']:,.0f} queries/s for every variant; dnsperf 2.10 "
                   "prints the mean and the maximum, no percentiles. haproxy has no UDP: "
                   "n/a.\n")
        out.append("queries/s vs direct (ratio of medians):\n")
        out += ratio_summary(bench, udp_sizes, "udp_qps", "udp")
        for n in udp_sizes:
            out.append(f"### N = {fmt_n(n)}: UDP, {rounds(bench, 'udp_qps', n)} rounds\n")
            out += per_n_table(bench, n, "udp", [
                ("max queries/s", "udp_qps", f0, True), ("lost %", "udp_lost", f2, False),
                ("achieved rate", "udp_rate", f0, False), ("mean ms", "udp_ms", f3, True),
                ("max ms", "udp_max_ms", f3, False)])
            out.append("")
    if "bulk" in args.workloads:
        bulk_sizes = [n for n in sizes if n in args.sizes_of["bulk"]]
        out.append("## Bulk throughput: iperf3, Gbit/s received\n")
        for n in bulk_sizes:
            out.append(f"### N = {fmt_n(n)}: bulk, {rounds(bench, 'bulk1', n)} rounds\n")
            out += per_n_table(bench, n, "bulk", [("1 stream", "bulk1", f2, True),
                                                  ("8 streams", "bulk8", f2, True)])
            out.append("")
    out.append("## Programming time: N services × 3 endpoints, into an empty state\n")
    out.append("nodemesh: Reconciler.apply into empty maps (map writes); iptables: "
               "iptables-restore of the whole ruleset into empty tables (rules); nftables: "
               "`nft -f` of the whole table (rules + map elements); haproxy: process start "
               "until the measured service's listener accepts (listeners). The measured "
               "service has 3 ports, the others 1.\n")
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
            elif n in v.load_over:
                cells.append(f"> {v.load_over[n]:.0f} s: not run")
            else:
                cells.append("not run")
        out.append(f"| {fmt_n(n)} | " + " | ".join(cells) + " |")
    out.append("")
    if "change" in args.workloads:
        out.append("## One backend change with N services loaded\n")
        out.append(f"{args.changes} changes per N and variant, each moving the measured "
                   "service (all 3 ports) to the other 3 endpoints. Time: just before the "
                   "change command -> the first connection of the probe (one every "
                   f"{PROBE_INTERVAL * 1000:g} ms from the variant's client netns) answered "
                   "by a new endpoint, in ms; CPU: the command's own, in ms (the "
                   "iptables-restore / nft processes; haproxy's process, from /proc in 10 ms "
                   "ticks; nodemesh's set_service + reconcile round in this process). What each "
                   "variant runs is in bench/run.py's docstring; the whole agent (sources, "
                   "RSS, CPU per change) is bench/controlplane.py's.\n")
        ch = [v for v in vs if v.changes]
        out.append("| N | " + " | ".join(f"{v.name} ms | {v.name} CPU ms" for v in ch) + " |")
        out.append("|---|" + "---|---|" * len(ch))
        for n in [n for n in sizes if n in args.sizes_of["change"]]:
            cells = []
            for v in ch:
                xs, cpu = v.values("change", n), v.values("change_cpu", n)
                if xs:
                    cells.append(f"{fms(med(xs))} ({fms(min(xs))}–{fms(max(xs))})")
                    cells.append(fms(med(cpu)))
                else:
                    cells += ["not run", ""]
            out.append(f"| {fmt_n(n)} | " + " | ".join(cells) + " |")
        out.append("")
    proofs = [f"| {fmt_n(n)} | {v.name} | {v.proofs[n]} |" for n in sizes for v in vs
              if v.proofs.get(n)]
    if proofs:
        out.append("## Proof of traversal (counters read after each N's conn runs, warm-up "
                   "included)\n")
        out += ["| N | variant | what was counted |", "|---|---|---|", *proofs, ""]
    if getattr(bench, "phases", None):
        out.append("## Where the time went (this run's phases, wall seconds)\n")
        out += ["| phase | seconds |", "|---|---|",
                *[f"| {what} | {took:.1f} |" for what, took in bench.phases], ""]
    notes = [f"- {v.name}, N = {fmt_n(n)}: {why}" for v in vs for n, why in v.not_run.items()]
    notes += [f"- {v.name}, N = {fmt_n(n)}, {w}: {why}" for v in vs
              for (n, w), why in v.failed.items()]
    notes += [f"- {v.name}: {note}" for v in vs for note in v.notes]
    if notes:
        out.append("## Not run, failures and notes\n\n" + "\n".join(notes) + "\n")
    out.extend(extra)
    return "\n".join(out)


def plots(bench: Bench, sizes: List[int], stem: str) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed in the venv: no plots (`make setup` installs it)")
        return []
    made = []
    charts = [("rate", "conn", 1, "new connections / s (median, min–max)", False,
               "Connection rate vs N (measured service last)"),
              ("p99", "ka_p99", 1, "ms (median, min–max)", False,
               "Keep-alive p99 latency at a fixed rate vs N"),
              ("programming", "", 1, "seconds", True,
               "Programming time vs N (empty -> N services × 3 endpoints)"),
              ("change", "change", 1000, "ms (median, min–max)", True,
               "One backend change vs N: to the first connection on the new endpoints")]
    for suffix, metric, scale, ylabel, logy, title in charts:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for v in bench.variants.values():
            if not metric:
                if v.name == "direct":
                    continue
                ns = [n for n in sizes if n in v.load_s]
                if ns:
                    line, = ax.plot(ns, [max(v.load_s[n], 1e-4) for n in ns], marker="o",
                                    label=v.name)
                    drawn = True
                over = [n for n in sizes if n in v.load_over]
                if over:  # ran over the budget: drawn at the budget, an x, not run
                    ax.plot(over, [v.load_over[n] for n in over], marker="x", linestyle="",
                            markersize=9, color=line.get_color() if ns else None,
                            label=f"{v.name}: over the budget, not run")
                    drawn = True
                continue
            ns = [n for n in sizes if v.values(metric, n)]
            if not ns:
                continue
            mid = [med(v.values(metric, n)) * scale for n in ns]
            lo = [mid[i] - min(v.values(metric, n)) * scale for i, n in enumerate(ns)]
            hi = [max(v.values(metric, n)) * scale - mid[i] for i, n in enumerate(ns)]
            ax.errorbar(ns, mid, yerr=[lo, hi], marker="o", capsize=3, label=v.name)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("services (N)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}-{suffix}.png", dpi=110)
        plt.close(fig)
        made.append(f"{stem}-{suffix}.png")
    return made


OVERHEAD_S = 0.4  # a run's resets, meters and process start (estimate)


def estimate(args) -> float:
    """Seconds of measuring, roughly (programming, set-up and the footprint not included)."""
    runs_per_round = {"conn": 1, "keepalive": 2, "udp": 2, "bulk": 2}
    overhead = OVERHEAD_S
    total = 0.0
    for w, k in runs_per_round.items():
        if w not in args.workloads:
            continue
        per_variant = args.reps_of[w] * k * (args.seconds_of[w] + overhead)
        if w in args.warm_up:
            per_variant += k * (1 + overhead)
        only = getattr(args, "workload_only", {}).get(w)
        for n in args.sizes_of[w]:
            here = [v for v in running_at(args, n) if w in vr.VARIANTS[v].workloads
                    and (only is None or v in only)]
            total += len(here) * per_variant
            if w in args.warm_up and n != args.sizes_of[w][0]:  # warmed once: direct's kind
                total -= sum(k * (1 + overhead) for v in here if not vr.VARIANTS[v].programs)
            if w == "conn" and args.order != "rounds":
                # concurrent: each paired variant beside its baseline; bracketed: the
                # baseline after each
                pairs = sum(1 for v in here if v in PAIRED_WITH and baseline(v) in here)
                total += args.pair_rounds * pairs * (args.seconds_of[w] + overhead)
        if w in ("keepalive", "udp"):
            total += 3 * (args.seconds_of[w] + overhead)
    if "change" in args.workloads:
        total += sum(sum(1 for v in running_at(args, n) if vr.VARIANTS[v].changes)
                     for n in args.sizes_of["change"]) * args.changes * 0.5
    return total


def running_at(args, n: int) -> List[str]:
    """The variants the run programs and measures at N (the quick mode's largest N: a few)."""
    return list(getattr(args, "only_at", {}).get(n, args.variants))


# What the estimate scales from: seconds to program N services on the 2-CPU VM at 10,000
# (bench/results/2026-11-29-vm.md; nftables from the quiet latest.md, 84 s) and 100,000 (the
# smokes of bench/results/full-smoke-2026-11-29.md, nodemesh from the quiet
# full-part-2026-11-29.md; iptables-legacy ran over 600 s there and nftables is only known to
# be over 488 s: both counted as over the full mode's 900 s); between and beyond, a power law
# through the two.
REF_LOAD: Dict[str, Tuple[float, float]] = {
    "nodemesh": (0.7, 9.1), "iptables-nft": (3.0, 436.3), "iptables-legacy": (1.7, 901.0),
    "nftables": (84.2, 901.0), "haproxy": (1.0, 10.0), "nodemesh-tc": (0.9, 12.0),
    "nodemesh+sockmap": (0.7, 11.6), "nodemesh+policy": (0.7, 12.0)}
# seconds one change takes at 10,000 and 100,000 (the netfilter ones rewrite per N)
REF_CHANGE: Dict[str, Tuple[float, float]] = {
    "iptables-nft": (2.1, 21.0), "iptables-legacy": (1.4, 14.0), "nftables": (0.3, 3.0)}
SETUP_S = 15.0  # a nodemesh variant's BPF compile and load; the others' netns take ~1 s


def scaled(ref: Tuple[float, float], n: int) -> float:
    """Seconds at N from the two reference points (10,000 and 100,000), power law."""
    import math
    a, b = ref
    k = math.log10(b / a) if a > 0 and b > 0 else 1.0
    return a * (n / 10_000) ** k


def estimate_parts(args) -> Dict[str, float]:
    """The whole run's wall time, in seconds per part: set-up, programming (every variant
    at every N: a load predicted over --load-timeout is tried once, counted at the limit,
    and the larger N skip it, as run.py does), measuring (estimate()), the changes
    (--changes per N and variant, each its command's time plus the probe's landing) and
    the agent's footprint. Scaled from the 2-CPU VM's figures (REF_LOAD, REF_CHANGE)."""
    setup = 5.0 + sum(SETUP_S if v.startswith("nodemesh") else 1.0 for v in args.variants)
    programming = changes = 0.0
    for v in args.variants:
        over, before = False, 0.0
        for n in args.sizes:
            if over or v not in REF_LOAD or v not in running_at(args, n):
                continue
            t = scaled(REF_LOAD[v], n)
            if t > args.load_timeout:
                programming += args.load_timeout
                over = True
                continue
            # nodemesh empties the previous N's services first, then loads N
            programming += t + (before if v.startswith("nodemesh") else 0.0)
            before = t
            if "change" in args.workloads and vr.VARIANTS[v].changes and \
                    n in args.sizes_of["change"]:
                per = scaled(REF_CHANGE[v], n) if v in REF_CHANGE else 0.01
                changes += args.changes * (per + 0.3)  # + the probe's arming and landing
    footprint = 0.0
    if not args.quick and not args.skip_extra:
        footprint = sum(2 * (10 + 30 * n / 100_000) for n in sorted({1, max(args.sizes)}))
    return {"set-up": setup, "programming": programming, "measuring": estimate(args),
            "changes": changes, "footprint": footprint}


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line, with the mode's defaults filled in (no root needed)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Method and workloads: the module docstring.")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help=f"N = {QUICK_SIZES} (at {QUICK_LARGEST:,} only "
                      f"{', '.join(QUICK_AT_LARGEST)}); workloads {','.join(QUICK_WORKLOADS)} "
                      "(udp and bulk only when --workloads names them), keepalive, udp and "
                      "bulk at 10,000 only (keepalive for "
                      f"{', '.join(QUICK_KEEPALIVE)}); 1 s runs, conn the only one warmed "
                      f"up; 5 rounds (conn: {QUICK_CONN_ROUNDS} alone and {QUICK_PAIR_ROUNDS} "
                      "paired), 3 changes; no agent footprint (the default)")
    mode.add_argument("--full", action="store_true",
                      help=f"N = {FULL_SIZES}, every workload at every N, 5 s runs, 5 "
                      "rounds, 10 changes, the agent's footprint at 1 and 100,000")
    ap.add_argument("--sizes", help="comma-separated N (overrides the mode's; every workload "
                    "runs at every one)")
    ap.add_argument("--variants", default=",".join(vr.ALL),
                    help=f"comma-separated, of {', '.join(vr.VARIANTS)}")
    ap.add_argument("--workloads", help=f"comma-separated, of {', '.join(WORKLOADS)} "
                    f"(default: all; the quick mode {','.join(QUICK_WORKLOADS)})")
    ap.add_argument("--seconds", type=int, help="seconds per run, every workload")
    ap.add_argument("--reps", type=int, help="rounds per N and workload (at least 5 to "
                    "publish)")
    ap.add_argument("--pair-rounds", type=int, help="conn's paired rounds per N (each paired "
                    "variant beside its baseline), spread over the rounds alone (default: as "
                    f"many as --reps; the quick mode {QUICK_PAIR_ROUNDS})")
    ap.add_argument("--changes", type=int, help="backend changes per N and variant")
    ap.add_argument("--ka-rate", type=float, help="fixed keep-alive rate (req/s) instead of "
                    "half of direct's measured maximum")
    ap.add_argument("--udp-rate", type=float, help="fixed dnsperf rate (queries/s) instead "
                    "of half of direct's measured maximum")
    ap.add_argument("--load-timeout", type=float,
                    help="seconds a variant may take to program N before it is marked not "
                    "run at that N (quick 120, full 900)")
    ap.add_argument("--skip-extra", action="store_true", help="no agent footprint table (the "
                    "quick mode has none)")
    ap.add_argument("--output", help="results file (default bench/results/<date>-<host>.md, "
                    "copied to latest.md)")
    ap.add_argument("--append", metavar="FILE.md", help="add this run's figures to an "
                    "earlier run's results file (its figures are in FILE.json beside it): "
                    "the report is rewritten from both, this run's figures winning where "
                    "both measured the same variant, metric and N, and the earlier part's "
                    "fixed keep-alive/UDP rates are reused. For running the full mode in "
                    "parts (--sizes, --variants, --workloads); FILE.md may not exist yet")
    ap.add_argument("--order", choices=("concurrent", "bracketed", "rounds"),
                    default="concurrent",
                    help="conn runs per round: bracketed runs direct before "
                    "the first variant and after every one (D A D B ... D) and pairs each run "
                    "with the direct runs around it; rounds runs every variant once in turn "
                    "(A B C ..., the method before bracketing), ratios of medians only; "
                    "concurrent (the default) runs each of those variants side by side with "
                    "direct (two wrk at once, 16 connections each) for its ratio, then every "
                    "variant alone in turn for the absolute rates: its A/A interval was half "
                    "bracketed's under load (bench/results/method-2026-11-29.md)")
    ap.add_argument("--cpus", help="CLIENT,SERVER: the CPUs every client tool (and haproxy) "
                    "and every server are pinned to with taskset, for every variant; 'none' "
                    "to leave placement to the scheduler (default 0,1 on 2 CPUs or more)")
    args = ap.parse_args(argv)
    full = args.full
    try:
        explicit = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    except ValueError:
        ap.error(f"--sizes: {args.sizes!r} is not a comma-separated list of numbers")
    args.sizes = sorted(set(explicit or (FULL_SIZES if full else QUICK_SIZES)))
    if any(not 1 <= n <= 131071 for n in args.sizes):
        ap.error("--sizes: 1 to 131,071 services (the VIP range 10.96.0.0/15)")
    quick = not full and explicit is None
    # The quick mode (`make bench`, < 10 min on 2 cores) runs the workloads that hardly
    # depend on N at its largest N only, 1 s each, and warms up the HTTP workloads only.
    args.seconds_of = {w: args.seconds or (5 if full else 2) for w in WORKLOADS}
    args.warm_up = [w for w in WORKLOADS if w != "change"]
    if quick:
        # nine variants in under 10 minutes on 2 CPUs (measured: the README's Performance)
        args.warm_up = ["conn"]
        args.seconds_of = {w: args.seconds or 1 for w in WORKLOADS}
        # conn carries three of the targets: more, shorter rounds (6 of 1 s, about 20,000
        # connections each when quiet), each of nodemesh, nodemesh-tc and the A/A test
        # paired with direct (BRACKETED), in the time 5 rounds of 2 s in turn took
        args.seconds_of["conn"] = args.seconds or QUICK_CONN_SECONDS
    args.reps_of = {w: args.reps or 5 for w in WORKLOADS}
    if quick and not args.reps:
        args.reps_of["conn"] = QUICK_CONN_ROUNDS
    args.pair_rounds = args.pair_rounds or (QUICK_PAIR_ROUNDS if quick and not args.reps
                                            else args.reps_of["conn"])
    args.reps = args.reps or 5
    args.changes = args.changes or (10 if full else 3)
    args.load_timeout = args.load_timeout or (900 if full else 120)
    args.variants = [v for v in args.variants.split(",") if v]
    if args.workloads is None:
        args.workloads = ",".join(QUICK_WORKLOADS if quick else WORKLOADS)
    args.workloads = [w for w in args.workloads.split(",") if w]
    for what, given, known in (("variants", args.variants, list(vr.VARIANTS)),
                               ("workloads", args.workloads, list(WORKLOADS))):
        unknown = [x for x in given if x not in known]
        if unknown:
            ap.error(f"--{what}: unknown {unknown}; known: {', '.join(known)}")
    if not args.workloads or not args.variants:
        ap.error("--workloads and --variants: name at least one")
    # conn first, whatever the order given: the traversal proof counts its connections only
    args.workloads = [w for w in WORKLOADS if w in args.workloads]
    for w, given in (("keepalive", args.ka_rate), ("udp", args.udp_rate)):
        if w in args.workloads and "direct" not in args.variants and not given:
            ap.error(f"--workloads {w} needs the direct variant (its maximum sets the fixed "
                     f"rate) or --{'ka' if w == 'keepalive' else 'udp'}-rate")
    args.sizes_of = {w: list(args.sizes) for w in WORKLOADS}
    # N -> the only variants that run there (the quick mode's largest N); the others are
    # reported not run at that N, with the reason (Bench.program)
    args.only_at = {QUICK_LARGEST: [v for v in args.variants if v in QUICK_AT_LARGEST]} \
        if quick else {}
    # workload -> the only variants that run it (the quick mode's keep-alive)
    args.workload_only = {"keepalive": list(QUICK_KEEPALIVE)} if quick else {}
    if quick:
        every = [n for n in args.sizes if n not in args.only_at] or args.sizes
        for w in PER_N_WORKLOADS:
            args.sizes_of[w] = [max(every)]
    args.quick = quick
    if args.append and args.output and os.path.abspath(args.append) != \
            os.path.abspath(args.output):
        ap.error("--append FILE writes FILE: give no other --output")
    cpus = args.cpus or ("0,1" if (os.cpu_count() or 1) >= 2 else "none")
    if cpus == "none":
        args.cpu_roles = {}
    else:
        parts = cpus.split(",")
        if len(parts) != 2 or not all(p.isdigit() and int(p) < (os.cpu_count() or 1)
                                      for p in parts):
            ap.error(f"--cpus: {cpus!r} is not CLIENT,SERVER (two CPU numbers below "
                     f"{os.cpu_count()}) or none")
        args.cpu_roles = {"client": parts[0], "server": parts[1]}
    return args


def main() -> int:
    args = parse()
    if args.reps < 5:
        log("note: fewer than 5 rounds; the issue asks for at least 5 to publish")
    if os.geteuid() != 0:
        print("benchmarks need root (netns, cgroups, BPF)", file=sys.stderr)
        return 1
    missing = [f"{v} ({vr.TOOLS[v]})" for v in args.variants if v in vr.TOOLS and
               not shutil.which(vr.TOOLS[v])]
    tools = {"conn": ["wrk", "nginx"], "keepalive": ["wrk", "nginx"],
             "udp": ["dnsperf", "dnsmasq"], "bulk": ["iperf3"], "change": ["nginx"]}
    needed = {"conntrack", "ss", "nginx", "dnsmasq", "iperf3"}  # the servers start anyway
    for w in args.workloads:
        needed.update(tools[w])
    missing += sorted(t for t in needed if not shutil.which(t))
    if missing:
        print(f"missing tools: {', '.join(missing)}; `make setup` installs them",
              file=sys.stderr)
        return 1
    old = load_record(args.append) if args.append else None
    if args.append and old is None and os.path.exists(args.append):
        print(f"--append: {args.append} has no {os.path.splitext(args.append)[0]}.json "
              "beside it (written by every run since --append exists): nothing to add to",
              file=sys.stderr)
        return 1
    wl.CPUS.clear()
    wl.CPUS.update(args.cpu_roles)
    parts = estimate_parts(args)
    log(f"sizes {args.sizes}; workloads {args.workloads}; variants {args.variants}; "
        f"CPUs {args.cpu_roles or 'unpinned'}\nestimate: about "
        f"{sum(parts.values()) / 60:.0f} min in all: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in parts.items() if v)
        + f" (programming and changes scaled from the 2-CPU VM's; a baseline over "
        f"--load-timeout {args.load_timeout:.0f} s counts that long once, then is skipped)")
    command = "bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    args.commands = [command]
    args.parts = [this_part(args, command, time.time())]
    started = time.monotonic()
    vr.reap_private_hooks()
    import sigterm  # bench/: a kill tears the lab down too
    sigterm.exit_on_sigterm()
    lab = new_lab("nmb", backends=1)
    workdir = tempfile.mkdtemp(prefix="nodemesh-bench-")
    bench = Bench(args, lab, workdir)
    if old:  # the earlier parts' fixed rates, unless given: every part paced alike
        given = {"keepalive": args.ka_rate, "udp": args.udp_rate}
        bench.rate.update({w: r for w, r in old.get("rate", {}).items() if not given.get(w)})
        bench.direct_max.update({w: r for w, r in old.get("direct_max", {}).items()
                                 if w in bench.rate and not given.get(w)})
    extra: List[str] = []
    try:
        with bench.timed("set-up: servers and variants (netns, BPF compiled and loaded)"):
            bench.setup()
        for n in args.sizes:
            log(f"N = {n:,}: programming ...")
            with bench.timed(f"N = {fmt_n(n)}: programming"):
                bench.program(n)
            log(f"N = {n:,}: measuring ...")
            bench.measure(n)
        with bench.timed("teardown of the variants"):
            bench.close()
        if not args.skip_extra and not args.quick:
            log("nodemesh agent footprint ...")
            extra.append(bench_footprint(args, lab, workdir, sorted({1, max(args.sizes)})))
    finally:
        bench.close()
        cleanup(lab.bpffs)
        lab.destroy()
        vr.forget_private_hooks(lab.prefix)
        shutil.rmtree(workdir, ignore_errors=True)
    took = time.monotonic() - started
    minutes = took / 60
    if old:
        merge(bench, args, old)
        minutes += old.get("minutes", 0)
        extra += old.get("extra", []) if not extra else []
    text = report(bench, args, extra, command) + (
        f"\nWhole run: {minutes:.1f} min" + (f" in {len(args.commands)} parts (this one "
                                              f"{took / 60:.1f} min)" if old else "") + ".\n")
    outdir = os.path.join(ROOT, "bench", "results")
    os.makedirs(outdir, exist_ok=True)
    stem = os.path.join(outdir, f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}")
    path = args.append or args.output or stem + ".md"
    made = plots(bench, args.sizes, os.path.splitext(path)[0])
    if made:
        text += "\nPlots: " + ", ".join(os.path.basename(p) for p in made) + "\n"
    with open(path, "w") as f:
        f.write(text)
    import json
    rec = record(bench, args, args.commands, minutes)
    rec["extra"] = extra
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(rec, f, indent=1)
    if not args.output and not args.append:
        shutil.copyfile(path, os.path.join(outdir, "latest.md"))
    log("\n" + text)
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
