"""The variants bench/run.py compares: one class each, registered in VARIANTS.

A variant is a way for a client to reach the measured service. Each has its own client netns
on the lab bridge (its VIP range blackholed) and carries the workloads it supports.

How to add a variant (e.g. nodemesh-tc, nodemesh-socket+sockmap, nodemesh-socket+policy):
  1. Subclass Variant (or Nodemesh) here:
       workloads  the workloads it can carry (a subset of WORKLOADS); the others are reported
                  "n/a" for it (haproxy has no UDP)
       cgroup     the cgroup its clients run in (None: not hooked); set in __init__. The
                  Nodemesh class below makes the hooks: the variant named "nodemesh" on the
                  lab's cgroup and pins, every other subclass on a cgroup and pin folder of
                  its own (self.private_hooks()), so that features one variant turns on
                  (sockmap, 10,000 policy rules) never touch another's connections
       program(n, specs) -> (seconds, count)
                  make the N service ports of `specs` (bench/baselines.SvcSpec, the measured
                  service's ports last) serve, from whatever the previous N left; return the
                  time it took and what it wrote (rules, map writes, listeners). Raise NotRun
                  (or let a TimeoutExpired through) when it cannot at this N: the point is
                  reported "not run" with the reason and the load time, never hidden.
       target(port_name) -> (host, port)
                  where a client connects for the measured service's port "http", "dns" or
                  "iperf"
       change(specs, changed) -> cpu_seconds
                  move the measured service to other endpoints (`changed`: (old, new) spec per
                  port; `specs` is the whole new set) the way its real control plane would;
                  return the CPU that cost. Leave `changes = False` if it has no backends.
       proof(n, requests) -> str
                  after the conn workload: read its counters that prove the connections went
                  through its rules (optional)
       close()    undo what it set up (the lab's teardown removes the netns anyway)
  2. Register it: VARIANTS["name"] = YourClass, and list it in ALL (run.py's default set).
A variant that needs more set-up (a TC program on the bridge port, sockmap, 10,000 policy
rules) does it in __init__ or program(); the lab, the servers and the workdir are on
self.bench.
"""
from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple, Type

import baselines as bl
import workloads as wl

from nodemesh.lab.topology import sh

WORKLOADS = ("conn", "keepalive", "udp", "bulk", "change")
BENCH_VIPS = "10.96.0.0/15"  # N services' ClusterIPs; blackholed in every client netns
TARGET_PORTS = {"http": wl.HTTP_PORT, "dns": wl.DNS_PORT, "iperf": wl.IPERF_PORT}

Changed = Sequence[Tuple[bl.SvcSpec, bl.SvcSpec]]


class NotRun(Exception):
    """This variant cannot run at this N; the message says why."""


class Variant:
    name = ""
    workloads = frozenset(WORKLOADS)
    changes = True

    def __init__(self, bench) -> None:
        self.bench = bench
        self.cgroup: Optional[str] = None
        self.netns = bench.lab.add_backend().netns  # a client netns on the lab bridge
        sh(f"ip -n {self.netns} route add blackhole {BENCH_VIPS}")
        self.specs: List[bl.SvcSpec] = []
        # metric -> N -> values (one per round, or per change)
        self.data: Dict[str, Dict[int, List[float]]] = defaultdict(dict)
        self.load_s: Dict[int, float] = {}
        self.load_over: Dict[int, float] = {}  # N -> the budget its programming ran over
        self.rules: Dict[int, int] = {}
        self.not_run: Dict[int, str] = {}
        self.proofs: Dict[int, str] = {}
        self.notes: List[str] = []

    def add(self, metric: str, n: int, value: float) -> None:
        self.data[metric].setdefault(n, []).append(value)

    def values(self, metric: str, n: int) -> List[float]:
        return self.data.get(metric, {}).get(n, [])

    def client(self, port_name: str) -> wl.Client:
        host, port = self.target(port_name)
        return wl.Client(self.bench.lab, self.netns, self.cgroup, host, port)

    def measured(self, port_name: str) -> bl.SvcSpec:
        return next(s for s in reversed(self.specs) if s.port_name == port_name)

    # -- to implement ---------------------------------------------------------------------
    def program(self, n: int, specs: List[bl.SvcSpec]) -> Tuple[float, int]:
        raise NotImplementedError

    def target(self, port_name: str) -> Tuple[str, int]:
        s = self.measured(port_name)
        return s.vip, s.port

    def change(self, specs: List[bl.SvcSpec], changed: Changed) -> float:
        raise NotImplementedError

    def proof(self, n: int, requests: int) -> str:
        return ""

    def close(self) -> None:
        pass

    # -- helpers --------------------------------------------------------------------------
    def run_in(self, argv: List[str], stdin: str = "", timeout: float = 600) -> Tuple[float,
                                                                                    float]:
        """Run argv in this variant's netns: (wall seconds, CPU seconds of the command)."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        res = subprocess.run(["ip", "netns", "exec", self.netns, *argv], input=stdin,
                             text=True, capture_output=True, timeout=timeout)
        took = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()[:300]}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return took, cpu

    def route_vips(self) -> None:
        """Netfilter's DNAT comes after connect()'s route lookup: route the measured VIP
        onto the lab bridge, as a node routes its service CIDR (the rest stays blackholed)."""
        for vip in {s.vip for s in self.specs if s.name == self.specs[-1].name}:
            sh(f"ip -n {self.netns} route replace {vip}/32 dev eth0")


class Direct(Variant):
    """The client connects to the first endpoint itself: the physical limit."""
    name = "direct"
    changes = False

    def program(self, n: int, specs: List[bl.SvcSpec]) -> Tuple[float, int]:
        self.specs = specs
        return 0.0, 0

    def target(self, port_name: str) -> Tuple[str, int]:
        s = self.measured(port_name)
        return s.endpoints[0], s.target_port


class Nodemesh(Variant):
    """The cgroup socket hooks: N services in the maps, the client inside the hooked cgroup.
    Programming is Reconciler.apply of the whole set; a change is what the agent's core loop
    does for one service (set_service, then a reconcile round)."""
    name = "nodemesh"

    def __init__(self, bench) -> None:
        super().__init__(bench)
        from nodemesh.datapath.loader import Datapath
        from nodemesh.reconciler import Reconciler
        if self.name == "nodemesh":
            self.cgroup, self.bpffs = bench.lab.cgroup, bench.lab.bpffs
        else:
            self.cgroup, self.bpffs = self.private_hooks()
        self.dp = Datapath(self.bpffs, self.cgroup)
        self.rec = Reconciler(self.dp.load())
        self.dp.attach()
        self.conns_before = 0

    @staticmethod
    def services(specs: Sequence[bl.SvcSpec]) -> list:
        from nodemesh.model import Backend, Service, ServicePort
        by_name: Dict[Tuple[str, str], List[bl.SvcSpec]] = {}
        for s in specs:
            by_name.setdefault((s.namespace, s.name), []).append(s)
        out = []
        for (ns, name), ports in by_name.items():
            out.append(Service(name, ns, ports[0].vip, tuple(
                ServicePort(p.port, p.target_port, p.protocol.upper(), p.port_name)
                for p in ports), tuple(Backend(e) for e in ports[0].endpoints)))
        return out

    def program(self, n: int, specs: List[bl.SvcSpec]) -> Tuple[float, int]:
        self.rec.apply([])
        svcs = self.services(specs)
        t0 = time.perf_counter()
        r = self.rec.apply(svcs)
        took = time.perf_counter() - t0
        if r.failed:
            raise NotRun(f"{r.failed} frontends failed: {r.errors[:3]}")
        self.specs = specs
        self.conns_before = self.connections()
        return took, r.writes

    def change(self, specs: List[bl.SvcSpec], changed: Changed) -> float:
        from nodemesh.reconciler import service_frontends, watched_endpoints
        name = changed[0][1].name
        svc = next(s for s in self.services([s for s in specs if s.name == name]))
        cpu0 = time.process_time()
        self.rec.set_service(svc.key, service_frontends(svc), watched_endpoints(svc))
        r = self.rec.reconcile()
        cpu = time.process_time() - cpu0
        if r.failed:
            raise RuntimeError(f"change failed: {r.errors[:3]}")
        self.specs = specs
        return cpu

    def connections(self) -> int:
        return sum(s["connections"] for s in self.rec.maps.percpu_sums("svc_stats").values())

    def proof(self, n: int, requests: int) -> str:
        conns = self.connections() - self.conns_before
        self.conns_before += conns
        return (f"svc_stats connections {conns:,} for {requests:,} requests (the VIP is "
                "blackholed: every answer was translated)")

    def close(self) -> None:
        from nodemesh.datapath.loader import cleanup
        try:
            self.rec.apply([])
        except Exception:  # noqa: BLE001 - teardown goes on
            pass
        self.dp.close()
        cleanup(self.bpffs)
        if self.cgroup != self.bench.lab.cgroup:
            remove_cgroup(self.cgroup)

    def private_hooks(self) -> Tuple[str, str]:
        """A cgroup and a pin folder of this variant's own, beside the lab's; recorded so that
        the next run reaps them if this one crashes (reap_private_hooks)."""
        lab = self.bench.lab
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        cgroup, bpffs = f"{lab.cgroup}-{slug}", f"{lab.bpffs}-{slug}"
        record_private_hooks(lab.prefix, cgroup, bpffs)
        os.makedirs(cgroup, exist_ok=True)
        return cgroup, bpffs


class Iptables(Variant):
    """kube-proxy's iptables mode; `backend` is iptables-nft or iptables-legacy. Programming
    restores the whole ruleset into empty tables; a change is kube-proxy's partial sync."""
    backend = "nft"

    def __init__(self, bench) -> None:
        super().__init__(bench)
        self.name = f"iptables-{self.backend}"
        self.restore = f"iptables-{self.backend}-restore"

    def program(self, n: int, specs: List[bl.SvcSpec]) -> Tuple[float, int]:
        budget = self.bench.args.load_timeout
        self.run_in([self.restore], stdin="*filter\nCOMMIT\n*nat\nCOMMIT\n", timeout=budget)
        text, count = bl.iptables_ruleset(specs, self.bench.cluster_cidr)
        took, _ = self.run_in([self.restore], stdin=text, timeout=budget)
        self.specs = specs
        self.route_vips()
        return took, count

    def change(self, specs: List[bl.SvcSpec], changed: Changed) -> float:
        text = bl.iptables_change(specs, changed, self.bench.cluster_cidr)
        _, cpu = self.run_in([self.restore, "--noflush"], stdin=text,
                             timeout=self.bench.args.load_timeout)
        self.specs = specs
        return cpu

    def proof(self, n: int, requests: int) -> str:
        save = f"iptables-{self.backend}-save"
        out = subprocess.run(["ip", "netns", "exec", self.netns, save, "-c", "-t", "nat"],
                             capture_output=True, text=True).stdout
        s = self.measured("http")
        counts = []
        for ep in s.endpoints:
            m = re.search(rf"^\[(\d+):\d+\] -A {s.sep_chain(ep)} .*-j DNAT", out, re.M)
            counts.append(int(m.group(1)) if m else -1)
        return (f"KUBE-SEP DNAT rule packets {' / '.join(f'{c:,}' for c in counts)} "
                f"(sum {sum(counts):,}) for {requests:,} requests")


class IptablesLegacy(Iptables):
    backend = "legacy"


class Nftables(Variant):
    """kube-proxy's nftables mode. Programming is one `nft -f` of the whole table; a change
    is one transaction over the changed service's chains."""
    name = "nftables"

    def counted(self, specs: Sequence[bl.SvcSpec]) -> List[bl.SvcSpec]:
        return [s for s in specs if s.name == specs[-1].name]

    def program(self, n: int, specs: List[bl.SvcSpec]) -> Tuple[float, int]:
        sh(f"ip netns exec {self.netns} nft delete table ip kube-proxy", check=False)
        text, count = bl.nftables_ruleset(specs, self.bench.cluster_cidr, self.counted(specs))
        took, _ = self.run_in(["nft", "-f", "-"], stdin=text,
                              timeout=self.bench.args.load_timeout)
        self.specs = specs
        self.route_vips()
        return took, count

    def change(self, specs: List[bl.SvcSpec], changed: Changed) -> float:
        text = bl.nftables_change(changed, self.bench.cluster_cidr, [new for _, new in changed])
        _, cpu = self.run_in(["nft", "-f", "-"], stdin=text,
                             timeout=self.bench.args.load_timeout)
        self.specs = specs
        return cpu

    def proof(self, n: int, requests: int) -> str:
        s = self.measured("http")
        counts = []
        for ep in s.endpoints:
            out = subprocess.run(["ip", "netns", "exec", self.netns, "nft", "list", "chain",
                                  "ip", "kube-proxy", s.nft_endpoint_chain(ep)],
                                 capture_output=True, text=True).stdout
            m = re.search(r"counter packets (\d+)", out)
            counts.append(int(m.group(1)) if m else -1)
        return (f"endpoint-chain DNAT packets {' / '.join(f'{c:,}' for c in counts)} "
                f"(sum {sum(counts):,}) for {requests:,} requests")


class Haproxy(Variant):
    """Debian's haproxy, mode tcp, one listener per service port; no UDP. A change goes
    through its runtime API (`set server ... addr`), as a dynamic control plane does."""
    name = "haproxy"
    workloads = frozenset(WORKLOADS) - {"udp"}

    def __init__(self, bench) -> None:
        super().__init__(bench)
        self.proc: Optional[subprocess.Popen] = None
        self.socket = os.path.join(bench.workdir, "haproxy.sock")

    def program(self, n: int, specs: List[bl.SvcSpec]) -> Tuple[float, int]:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and bl.haproxy_fds(n) > hard:
            self.stop()
            raise NotRun(f"haproxy needs ~{bl.haproxy_fds(n):,} file descriptors for {n:,} "
                         f"listeners; the hard RLIMIT_NOFILE here is {hard:,} and root may "
                         "not raise it")
        self.stop()
        cfg = os.path.join(self.bench.workdir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(bl.haproxy_config(specs, os.path.join(self.bench.workdir, "haproxy.pid"),
                                      self.socket))
        self.specs = specs
        t0 = time.perf_counter()
        self.proc = self.bench.lab.spawn(["haproxy", "-db", "-f", cfg], netns=self.netns,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True)
        host, port = self.target("http")
        probe = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1],"
                 "int(sys.argv[2])),1).close()\nexcept OSError:\n sys.exit(1)\n")
        while True:
            if self.proc.poll() is not None:
                raise NotRun(f"haproxy exited: {self.proc.stderr.read()[-300:]}")
            if subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c", probe,
                               host, str(port)], capture_output=True).returncode == 0:
                return time.perf_counter() - t0, sum(1 for s in specs if s.protocol == "tcp")
            if time.perf_counter() - t0 > self.bench.args.load_timeout:
                raise subprocess.TimeoutExpired("haproxy", self.bench.args.load_timeout)
            time.sleep(0.05)

    def target(self, port_name: str) -> Tuple[str, int]:
        s = self.measured(port_name)
        services = list(dict.fromkeys((x.namespace, x.name) for x in self.specs))
        return bl.haproxy_frontend(services.index((s.namespace, s.name))), s.port

    def cpu(self) -> float:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def change(self, specs: List[bl.SvcSpec], changed: Changed) -> float:
        cpu0 = self.cpu()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.socket)
            s.sendall(bl.haproxy_change(changed).encode())
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        text = answer.decode(errors="replace").strip()
        if text and not all(line.startswith("IP changed") or "no need to change" in line
                            or not line.strip() for line in text.splitlines()):
            raise RuntimeError(f"haproxy runtime API: {text[:300]}")
        self.specs = specs
        return self.cpu() - cpu0

    def proof(self, n: int, requests: int) -> str:
        return f"{requests:,} requests through the listener of the last of {n:,} services"

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.bench.lab.processes.remove(self.proc)
        self.proc = None

    def close(self) -> None:
        self.stop()


# -- private hooks: recorded for the crash reaper --------------------------------------------
STATE_DIR = "/run/nodemesh/bench-run"


def record_private_hooks(prefix: str, cgroup: str, bpffs: str) -> None:
    import json
    os.makedirs(STATE_DIR, exist_ok=True)
    path = os.path.join(STATE_DIR, f"{prefix}.json")
    state = {"pid": os.getpid(), "cgroups": [], "bpffs": []}
    if os.path.exists(path):
        with open(path) as f:
            state = json.load(f)
    state["cgroups"].append(cgroup)
    state["bpffs"].append(bpffs)
    with open(path, "w") as f:
        json.dump(state, f)


def remove_cgroup(cgroup: str) -> None:
    from nodemesh.lab.topology import _empty_cgroup
    if os.path.isdir(cgroup):
        _empty_cgroup(cgroup)
        try:
            os.rmdir(cgroup)
        except OSError:
            pass


def forget_private_hooks(prefix: str) -> None:
    try:
        os.unlink(os.path.join(STATE_DIR, f"{prefix}.json"))
    except FileNotFoundError:
        pass


def reap_private_hooks() -> None:
    """Remove the private cgroups and pins of earlier runs whose process is gone."""
    from nodemesh.datapath.loader import DatapathError, cleanup
    from nodemesh.lab.topology import orphaned_states
    for path, state in orphaned_states(STATE_DIR, "pid"):
        for bpffs in state.get("bpffs", []):
            try:
                cleanup(bpffs, force=True)
            except DatapathError as e:
                print(f"reaping {bpffs}: {e}", file=sys.stderr)
        for cgroup in state.get("cgroups", []):
            remove_cgroup(cgroup)
        os.unlink(path)


VARIANTS: Dict[str, Type[Variant]] = {
    "direct": Direct,
    "nodemesh": Nodemesh,
    "iptables-nft": Iptables,
    "iptables-legacy": IptablesLegacy,
    "nftables": Nftables,
    "haproxy": Haproxy,
}
ALL = list(VARIANTS)
# What each variant needs installed (run.py checks before it starts).
TOOLS: Dict[str, str] = {"iptables-nft": "iptables-nft-restore",
                         "iptables-legacy": "iptables-legacy-restore", "nftables": "nft",
                         "haproxy": "haproxy"}
