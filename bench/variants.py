"""The variants bench/run.py compares: one class each, registered in VARIANTS.

A variant is a way for a client to reach the measured service. Each has its own client netns
on the lab bridge (its VIP range blackholed) and carries the workloads it supports.

How to add a variant:
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
     and, where the defaults do not fit:
       client_netns()  make the netns its clients run in (default: a veth on the lab bridge)
       server_netns, set_a, set_b
                  the servers' netns and the two endpoint sets a change moves between
                  (default: the lab's shared servers in b1)
       reset_state()   what a run must not inherit beyond conntrack and TIME_WAIT (the TC
                  path's own conntrack map)
  2. Register it: VARIANTS["name"] = YourClass, and list it in ALL (run.py's default set).
A variant that needs more set-up does it in __init__ or program(); the lab, the servers and
the workdir are on self.bench. The nodemesh variants beside "nodemesh" (the socket hooks):
  nodemesh-tc        the packet path (bpf/tc_nodeport.c) from a client OUTSIDE the node: a
                     node netns on the lab bridge (forwarding on, TC on both its interfaces)
                     and a client netns behind it on a veth of its own; the measured
                     service's NodePorts, externalTrafficPolicy Cluster (DNAT + SNAT to the
                     node's address), every run starting with an empty TC conntrack map
  nodemesh+sockmap   --accelerate-local: same-node, so the client AND its backends run in
                     the variant's hooked cgroup (servers of its own, in a netns of its own on
                     the bridge), and sk_msg moves each sendmsg() socket to socket
  nodemesh+policy    10,000 policy rules and 1,000 workload identities (1,000 cgroups) in the
                     maps; the client runs as workload 0, 3 cgroup levels below the hooks, and
                     an ALLOW rule of the measured service admits it
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
PORTS = "1024 65535"  # the client netns' ephemeral ports
TARGET_PORTS = {"http": wl.HTTP_PORT, "dns": wl.DNS_PORT, "iperf": wl.IPERF_PORT}

Changed = Sequence[Tuple[bl.SvcSpec, bl.SvcSpec]]
# what run.py records per workload (Variant.add); a failed workload drops them at that N
WORKLOAD_METRICS = {"conn": ("conn", "conn_stall", "conn_cpu_us", "conn_client_us",
                             "conn_others", "conn_pair", "conn_cpu_pair", "conn_pair_others"),
                    "keepalive": ("ka_max", "ka_rate", "ka_p50", "ka_p99", "ka_errors"),
                    "udp": ("udp_qps", "udp_lost", "udp_rate", "udp_ms", "udp_max_ms"),
                    "bulk": ("bulk1", "bulk8"), "change": ("change", "change_cpu")}


class NotRun(Exception):
    """This variant cannot run at this N; the message says why."""


class Variant:
    name = ""
    workloads = frozenset(WORKLOADS)
    unsupported: Dict[str, str] = {}  # workload -> why this variant cannot run it
    changes = True
    programs = True  # False: its path does not depend on N (direct's kind): warmed up once
    # proof() reads counters that program() has just created at 0 (netfilter rules): no
    # reading them before the conn runs (iptables-save -c takes ~3 min at 100,000 services)
    counts_from_load = False

    def __init__(self, bench) -> None:
        self.bench = bench
        self.cgroup: Optional[str] = None
        self.server_netns: str = bench.server.netns
        self.set_a: List[str] = bench.set_a
        self.set_b: List[str] = bench.set_b
        self.netns = self.client_netns()
        sh(f"ip -n {self.netns} route add blackhole {BENCH_VIPS}")
        # A 5 s conn run makes ~150,000 connections: with the default 28,232 ephemeral ports
        # each client port comes back ~5 times to a 4-tuple the server still holds in
        # TIME_WAIT. Every port there is, in the client's netns only (a per-netns sysctl).
        sh(f"ip netns exec {self.netns} sysctl -qw net.ipv4.ip_local_port_range='{PORTS}'")
        self.new_records()

    def new_records(self) -> None:
        """Empty figures and verdicts (also for the unit checks, which make no netns)."""
        self.specs: List[bl.SvcSpec] = []
        # metric -> N -> values (one per round, or per change)
        self.data: Dict[str, Dict[int, List[float]]] = defaultdict(dict)
        self.load_s: Dict[int, float] = {}
        self.load_over: Dict[int, float] = {}  # N -> the budget its programming ran over
        self.rules: Dict[int, int] = {}
        self.not_run: Dict[int, str] = {}
        self.proofs: Dict[int, str] = {}
        self.notes: List[str] = []
        # (N, workload) -> why a run failed: the workload is reported failed at that N (its
        # rounds dropped), and the rest of the run goes on
        self.failed: Dict[Tuple[int, str], str] = {}

    def add(self, metric: str, n: int, value: float) -> None:
        self.data[metric].setdefault(n, []).append(value)

    def values(self, metric: str, n: int) -> List[float]:
        return self.data.get(metric, {}).get(n, [])

    def client(self, port_name: str) -> wl.Client:
        host, port = self.target(port_name)
        return wl.Client(self.bench.lab, self.netns, self.cgroup, host, port)

    def measured(self, port_name: str) -> bl.SvcSpec:
        return next(s for s in reversed(self.specs) if s.port_name == port_name)

    def client_netns(self) -> str:
        """A client netns on the lab bridge (the lab tears it down, and reaps it after a
        crash)."""
        return self.bench.lab.add_backend().netns

    def resident_netns(self) -> List[str]:
        """The netns whose processes (servers, a proxy) serve this variant's connections:
        their CPU time is part of what a connection costs (workloads.meter)."""
        return [self.netns, self.server_netns]

    def flush_netns(self) -> List[str]:
        """The netns whose conntrack and TIME_WAIT sockets run.py's reset empties before each
        run: the client's and the server's (and a node's between them)."""
        return [self.netns, self.server_netns]

    def reset_state(self) -> None:
        """Connection state of this variant's own that a run must not inherit (run.py's
        reset flushes conntrack and TIME_WAIT in flush_netns())."""

    def fail(self, n: int, workload: str, why: str) -> None:
        """The workload failed at N: its figures at N are dropped, the reason is kept."""
        self.failed[(n, workload)] = why
        for metric in WORKLOAD_METRICS[workload]:
            self.data.get(metric, {}).pop(n, None)

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
    programs = False
    workloads = frozenset(WORKLOADS) - {"change"}
    unsupported = {"change": "no control plane: the client names the backend itself"}

    def __init__(self, bench) -> None:
        super().__init__(bench)
        # A faithful baseline: its clients run in a cgroup of their own with nothing attached,
        # beside the hooked one (the same depth), not in the bench's own (the cgroup v2 root),
        # so that nodemesh's clients differ from direct's by the hooks and the VIP only
        self.cgroup = self.plain_cgroup()

    def plain_cgroup(self) -> str:
        """A cgroup beside the lab's, with no hooks; recorded so that the next run reaps it
        if this one crashes (reap_private_hooks)."""
        lab = self.bench.lab
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        cgroup = f"{lab.cgroup}-plain-{slug}"
        record_private_hooks(lab.prefix, cgroup, None)
        os.makedirs(cgroup, exist_ok=True)
        return cgroup

    def close(self) -> None:
        if getattr(self, "cgroup", None):
            remove_cgroup(self.cgroup)

    def program(self, n: int, specs: List[bl.SvcSpec]) -> Tuple[float, int]:
        self.specs = specs
        return 0.0, 0

    def target(self, port_name: str) -> Tuple[str, int]:
        s = self.measured(port_name)
        return s.endpoints[0], s.target_port


class DirectAgain(Direct):
    """direct once more, from a client netns of its own built the same way: the A/A test. Run
    in the same rounds as the others, its ratio to direct is the method's own spread (what two
    identical paths measure apart), the floor under every other variant's ratio."""
    name = "direct-aa"
    workloads = frozenset({"conn"})
    unsupported = {w: "the A/A test is run on new connections only" for w in WORKLOADS
                   if w != "conn"}


class Nodemesh(Variant):
    """The cgroup socket hooks: N services in the maps, the client inside the hooked cgroup.
    Programming is Reconciler.apply of the whole set; a change is what the agent's core loop
    does for one service (set_service, then a reconcile round)."""
    name = "nodemesh"
    accelerate = False  # --accelerate-local (nodemesh+sockmap)
    translated = "the VIP is blackholed in the client's netns: every answer was translated"

    def __init__(self, bench) -> None:
        super().__init__(bench)
        from nodemesh.datapath.loader import Datapath
        from nodemesh.reconciler import Reconciler
        if self.name == "nodemesh":
            self.cgroup, self.bpffs = bench.lab.cgroup, bench.lab.bpffs
        else:
            self.cgroup, self.bpffs = self.private_hooks()
        self.hook_cgroup: str = self.cgroup  # where the hooks are; clients may run below it
        self.dp = Datapath(self.bpffs, self.hook_cgroup, accelerate=self.accelerate)
        self.rec = Reconciler(self.dp.load())
        self.attach()
        self.conns_before = 0

    def attach(self) -> None:
        self.dp.attach()

    def node_port(self, spec: bl.SvcSpec) -> Optional[int]:
        """The nodePort of one of the measured service's ports (nodemesh-tc's)."""
        return None

    def services(self, specs: Sequence[bl.SvcSpec]) -> list:
        from nodemesh.model import Backend, Service, ServicePort
        by_name: Dict[Tuple[str, str], List[bl.SvcSpec]] = {}
        for s in specs:
            by_name.setdefault((s.namespace, s.name), []).append(s)
        measured = specs[-1].name if specs else ""
        out = []
        for (ns, name), ports in by_name.items():
            out.append(Service(name, ns, ports[0].vip, tuple(
                ServicePort(p.port, p.target_port, p.protocol.upper(), p.port_name,
                            self.node_port(p) if name == measured else None)
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
        return f"svc_stats connections {conns:,} for {requests:,} requests ({self.translated})"

    def close(self) -> None:
        # No apply([]) first: cleanup removes the pins and closing the fds frees the maps,
        # while deleting 100,000 services entry by entry took seconds of the run
        from nodemesh.datapath.loader import cleanup
        self.dp.close()
        cleanup(self.bpffs)
        if self.hook_cgroup != self.bench.lab.cgroup:
            remove_cgroup(self.hook_cgroup)

    def private_hooks(self) -> Tuple[str, str]:
        """A cgroup and a pin folder of this variant's own, beside the lab's; recorded so that
        the next run reaps them if this one crashes (reap_private_hooks)."""
        lab = self.bench.lab
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        cgroup, bpffs = f"{lab.cgroup}-{slug}", f"{lab.bpffs}-{slug}"
        record_private_hooks(lab.prefix, cgroup, bpffs)
        os.makedirs(cgroup, exist_ok=True)
        return cgroup, bpffs


# nodemesh-tc: the node's outer veth and the external client behind it (a subnet of their own,
# inside the two netns only: nothing routes to it, and the client has no other link)
EXT_NODE, EXT_CLIENT = "10.98.0.1", "10.98.0.2"


def external_client(lab, node_addr: str, client_addr: str):
    """A node netns and a client netns outside the node, linked by one veth (ext in the node,
    eth0 in the client) on node_addr/24 and client_addr/24, the node forwarding: nodemesh-tc's
    external client and direct-routed's. Both made as lab backends, so the lab tears them down
    (and reaps them after a crash). Returns the node's lab backend and the client's netns."""
    node = lab.add_backend()
    client = lab.add_backend().netns
    sh(f"ip -n {client} link del eth0")  # off the bridge: the client reaches the node only
    sh(f"ip -n {node.netns} link add ext type veth peer name eth0 netns {client}")
    sh(f"ip -n {node.netns} addr add {node_addr}/24 dev ext")
    sh(f"ip -n {node.netns} link set ext up")
    sh(f"ip -n {client} addr add {client_addr}/24 dev eth0")
    sh(f"ip -n {client} link set eth0 up")
    for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0", "net.ipv4.conf.ext.rp_filter=0"):
        sh(f"ip netns exec {node.netns} sysctl -qw {key}")
    return node, client
NODE_PORTS = {"http": 30080, "dns": 30053, "iperf": 30201}


class NodemeshTc(Nodemesh):
    """The TC packet path (bpf/tc_nodeport.c) for traffic from outside the node.

        [client netns 10.98.0.2] --veth-- [node netns: ext 10.98.0.1, eth0 on the lab bridge]
                                                 --bridge-- [b1: the servers]

    The node forwards (ip_forward on) and has the TC programs on both interfaces: ext, where
    NodePort traffic arrives, and eth0, where the backends' replies come back. The client
    connects to 10.98.0.1:<nodePort> of the measured service (externalTrafficPolicy Cluster,
    kube-proxy's default): DNAT to a backend and SNAT to the node's eth0 address. The socket
    programs are loaded (the TC programs read their pinned service maps) but attached to no
    cgroup anyone runs in: nobody on this node connects. Programming and a change are the
    same Reconciler calls as nodemesh's. Every run starts with an empty TC conntrack map
    (reset_state), as the netfilter variants start with `conntrack -F`."""
    name = "nodemesh-tc"
    translated = ("the client's only link is to the node; svc_stats counts backend choices, "
                  "and a SYN from a client port whose closing conntrack entry still lives "
                  "reuses that entry's translation, bpf/lib/conntrack.h")

    def __init__(self, bench) -> None:
        from nodemesh.datapath.tc import TcPath, TcSettings
        super().__init__(bench)
        self.cgroup = None  # the external client runs in no hooked cgroup
        self.tc = TcPath(self.bpffs, self.dp.sizes, TcSettings())
        self.tc.load()
        with in_netns(self.node):
            self.tc.attach(["ext", "eth0"])

    def client_netns(self) -> str:
        node, client = external_client(self.bench.lab, EXT_NODE, EXT_CLIENT)
        self.node = node.netns
        return client

    def attach(self) -> None:
        """No socket hooks: the TC filters are attached in __init__, in the node's netns."""

    def node_port(self, spec: bl.SvcSpec) -> Optional[int]:
        return NODE_PORTS[spec.port_name]

    def target(self, port_name: str) -> Tuple[str, int]:
        return EXT_NODE, NODE_PORTS[port_name]

    def flush_netns(self) -> List[str]:
        return [*super().flush_netns(), self.node]

    def reset_state(self) -> None:
        from nodemesh.datapath import bpfsys
        from nodemesh.datapath.tc import CtKey
        keys = [k for k, _ in self.tc.conntrack()]
        if keys:
            bpfsys.map_delete_batch(self.tc.map_fds["ct"], (CtKey * len(keys))(*keys),
                                    len(keys))

    def proof(self, n: int, requests: int) -> str:
        from nodemesh.datapath import tc as t
        drops = t.percpu_sum(self.tc.map_fds["tc_drops"], t.u32)
        dropped = ", ".join(f"{t.DROP_REASONS[int(k)]} {v:,}"  # type: ignore[call-overload]
                            for k, v in sorted(drops.items()) if v) or "none"
        return f"{super().proof(n, requests)}; TC drops since the start: {dropped}"

    def close(self) -> None:
        self.tc.close()
        with in_netns(self.node):  # cleanup removes the TC filters of this netns
            super().close()


# direct-routed: the same shape as nodemesh-tc's (a client outside the node, linked to a node
# netns only), on a subnet of its own; the backends' netns routes it back through that node
ROUTED_NODE, ROUTED_CLIENT, ROUTED_SUBNET = "10.98.1.1", "10.98.1.2", "10.98.1.0/24"


class DirectRouted(Direct):
    """direct for a client outside the node: the physical limit nodemesh-tc is judged against.

        [client netns 10.98.1.2] --veth-- [node netns: ext 10.98.1.1, eth0 on the lab bridge]
                                                 --bridge-- [b1: the servers]

    nodemesh-tc's topology (a node netns of its own, forwarding on, rp_filter off), but the
    client connects to the backend's address and the node forwards the packet untouched:
    no TC program, no netfilter rule (proof() checks, after each N's conn runs), no
    NAT (the backends route the client's subnet back through the node, so the server sees
    the client's own address). Its ratio to direct is what the node hop itself costs."""
    name = "direct-routed"
    workloads = frozenset({"conn"})
    unsupported = {w: "the node-hop baseline is run on new connections only (nodemesh-tc's "
                      "target is stated on them)" for w in WORKLOADS if w != "conn"}

    def client_netns(self) -> str:
        node_backend, client = external_client(self.bench.lab, ROUTED_NODE, ROUTED_CLIENT)
        self.node = node_backend.netns
        sh(f"ip -n {client} route add {self.bench.cluster_cidr} via {ROUTED_NODE}")
        sh(f"ip -n {self.bench.server.netns} route replace {ROUTED_SUBNET} "
           f"via {node_backend.ipv4}")
        self.forwarded_before = 0
        return client

    def plain_forwarding(self) -> str:
        """'' when the node netns has no TC filter and no netfilter rule (it forwards every
        packet untouched), else what it found."""
        found = []
        for dev in ("ext", "eth0"):
            for way in ("ingress", "egress"):
                out = sh(f"ip netns exec {self.node} tc filter show dev {dev} {way}",
                         check=False).stdout.strip()
                if out:
                    found.append(f"a TC filter on {dev} {way}")
        if sh(f"ip netns exec {self.node} nft list ruleset", check=False).stdout.strip():
            found.append("an nftables ruleset")
        legacy = sh(f"ip netns exec {self.node} iptables-legacy-save", check=False).stdout
        if re.search(r"^-A ", legacy, re.M):
            found.append("iptables-legacy rules")
        return ", ".join(found)

    def forwarded(self) -> int:
        """Packets the node's IP stack forwarded (IpForwDatagrams, since the netns was made)."""
        out = sh(f"ip netns exec {self.node} nstat -asz IpForwDatagrams", check=False).stdout
        m = re.search(r"^IpForwDatagrams\s+(\d+)", out, re.M)
        return int(m.group(1)) if m else 0

    def flush_netns(self) -> List[str]:
        return [*super().flush_netns(), self.node]

    def proof(self, n: int, requests: int) -> str:
        forwarded = self.forwarded() - self.forwarded_before
        self.forwarded_before += forwarded
        rules = self.plain_forwarding()
        return (f"the node's IP stack forwarded {forwarded:,} packets for {requests:,} requests "
                "(IpForwDatagrams); the node had "
                + (f"{rules}: NOT plain forwarding" if rules else
                   "no TC filter and no netfilter rule: plain forwarding, no NAT"))


class NodemeshSockmap(Nodemesh):
    """--accelerate-local: sockops puts both ends of each TCP connection of the hooked cgroup
    in a sockhash, and sk_msg moves each sendmsg() straight into the peer's receive queue.
    Same-node traffic: the client and its backends both run in the variant's cgroup, so its
    servers are its own (nginx, dnsmasq, iperf3 as in b1, on six addresses of their own, in a
    netns of their own on the bridge). iperf3's accelerated write() can fail with ENOMEM
    (README, Mesh redirection): run.py then reports bulk failed for this variant."""
    name = "nodemesh+sockmap"
    accelerate = True

    def __init__(self, bench) -> None:
        from nodemesh.mesh import MeshOptions, write_mesh_config
        super().__init__(bench)
        write_mesh_config(self.rec.maps, MeshOptions(proxy_uid=None, accelerate_local=True))
        lab, s = bench.lab, bench.lab.subnet
        self.server_netns = lab.add_backend().netns
        self.set_a = [f"198.18.{s}.{207 + j}" for j in range(3)]
        self.set_b = [f"198.18.{s}.{210 + j}" for j in range(3)]
        for ep in self.set_a + self.set_b:
            sh(f"ip -n {self.server_netns} addr add {ep}/24 dev eth0")
        wl.start_servers(lab, self.server_netns, self.set_a + self.set_b,
                         os.path.join(bench.workdir, "sockmap"), cgroup=self.cgroup)
        self.moved_before = 0

    def proof(self, n: int, requests: int) -> str:
        from nodemesh.mesh import accel_counters
        c = accel_counters(self.rec.maps)
        moved = c["redirected_bytes"] - self.moved_before
        self.moved_before = c["redirected_bytes"]
        return (f"{super().proof(n, requests)}; sk_msg moved {moved:,} bytes socket to "
                "socket")


POLICY_RULES, POLICY_IDENTITIES, POLICY_SERVICES = 10_000, 1_000, 200


def policy_mesh(services: Sequence, cgroups: Sequence[str], rules: int = POLICY_RULES):
    """`rules` policy rules (nodemesh.policy.Mesh) over the last min(200, N) of `services`
    (the measured service last), and one workload identity per cgroup: service account
    sa-<i>, label app=a<i % 50>. One rule in five is a DENY, two in three name one of the
    service's ports, each names one random service account other than sa-0; the first rule
    lets sa-0 (the client) reach every port of the measured service, so its connections
    pass, after the lookups every rule set pays. bench/policy.py uses it too."""
    import random

    from nodemesh.datapath.loader import cgroup2_root
    from nodemesh.identity import Workload
    from nodemesh.policy import Mesh, Policy, PolicySource
    root = cgroup2_root()
    workloads = tuple(Workload(os.path.relpath(cg, root), "bench", f"sa-{i}",
                               (("app", f"a{i % 50}"),), name=f"w{i}")
                      for i, cg in enumerate(cgroups))
    targets = list(services)[-POLICY_SERVICES:]
    measured = targets[-1]
    rng = random.Random(7)
    policies = [Policy("measured-allow", measured.namespace, "ALLOW", measured.name, (),
                       (PolicySource(service_accounts=("sa-0",)),))]
    for k in range(rules - 1):
        svc, r = targets[k % len(targets)], k // len(targets)
        ports = (rng.choice(svc.ports).port,) if r % 3 else ()
        sa = f"sa-{rng.randrange(1, max(2, len(cgroups)))}"
        policies.append(Policy(f"{svc.name}-r{r}", svc.namespace, "ALLOW" if r % 5 else "DENY",
                               svc.name, ports, (PolicySource(service_accounts=(sa,)),)))
    return Mesh(workloads, tuple(policies))


class NodemeshPolicy(Nodemesh):
    """10,000 policy rules and 1,000 workload identities loaded (policy_mesh): the client
    runs as workload 0, in wl-0/pod/ctr below the hooked cgroup (the identity lookup walks
    its ancestors), and every connect() pays the policy lookups before the backend choice.
    Programming is the services, then the rules (PolicyTable.apply): both in its time."""
    name = "nodemesh+policy"

    def __init__(self, bench) -> None:
        from nodemesh.datapath.loader import cgroup2_root
        from nodemesh.policy import PolicyTable
        super().__init__(bench)
        self.workload_cgroups = [os.path.join(self.hook_cgroup, f"wl-{i}")
                                 for i in range(POLICY_IDENTITIES)]
        for cg in self.workload_cgroups:
            os.makedirs(cg, exist_ok=True)
        self.cgroup = os.path.join(self.workload_cgroups[0], "pod", "ctr")
        os.makedirs(self.cgroup, exist_ok=True)
        self.table = PolicyTable(self.rec.maps, cgroup2_root())
        self.denied_before = 0

    def program(self, n: int, specs: List[bl.SvcSpec]) -> Tuple[float, int]:
        from nodemesh.policy import Mesh
        self.table.apply(Mesh(), [])
        took, writes = super().program(n, specs)
        services = self.services(specs)
        mesh = policy_mesh(services, self.workload_cgroups)
        t0 = time.perf_counter()
        compiled = self.table.apply(mesh, services)
        policy_s = time.perf_counter() - t0
        if compiled.missing:
            raise NotRun(f"workload cgroups not found: {compiled.missing[:3]}")
        self.notes.append(f"N = {n:,}: {len(mesh.policies):,} rules over "
                          f"{min(n, POLICY_SERVICES):,} services, {len(mesh.workloads):,} "
                          f"identities -> {len(compiled.entries):,} policy entries, compiled "
                          f"and written in {policy_s:.2f} s (part of its programming time)")
        return took + policy_s, writes + len(compiled.entries)

    def denied(self) -> int:
        return sum(v["denied"] for v in self.table.stats().values())

    def proof(self, n: int, requests: int) -> str:
        denied = self.denied() - self.denied_before
        self.denied_before += denied
        return f"{super().proof(n, requests)}; connects denied by policy: {denied:,}"


class Iptables(Variant):
    """kube-proxy's iptables mode; `backend` is iptables-nft or iptables-legacy. Programming
    restores the whole ruleset into empty tables; a change is kube-proxy's partial sync."""
    backend = "nft"
    counts_from_load = True

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


def nft_chain_counters(netns: str, table: str, chains: Sequence[str]) -> List[int]:
    """The packets of the first counter in each chain of an ip table, -1 where none, read
    over netlink (pyroute2): one rule dump per chain, filtered by the kernel. `nft list
    chain` loads the whole ruleset into its cache first: about 19 s a chain at 10,000
    services here, where this takes milliseconds."""
    from pyroute2 import netns as pynetns
    from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_GETRULE, nft_rule_msg
    from pyroute2.nftables.main import NFTables

    pynetns.pushns(netns)
    try:
        nft = NFTables(nfgen_family=socket.AF_INET)
    finally:
        pynetns.popns()
    counts = []
    try:
        for chain in chains:
            msg = nft_rule_msg()
            msg["nfgen_family"] = socket.AF_INET
            msg["attrs"] = [("NFTA_RULE_TABLE", table), ("NFTA_RULE_CHAIN", chain)]
            packets = -1
            for rule in nft.request_get(msg, NFT_MSG_GETRULE):
                for expr in rule.get_attr("NFTA_RULE_EXPRESSIONS") or ():
                    if packets < 0 and expr.get_attr("NFTA_EXPR_NAME") == "counter":
                        packets = expr.get_attr("NFTA_EXPR_DATA").get_attr(
                            "NFTA_COUNTER_PACKETS")
            counts.append(packets)
    finally:
        nft.close()
    return counts


class Nftables(Variant):
    """kube-proxy's nftables mode. Programming is one `nft -f` of the whole table; a change
    is one transaction over the changed service's chains."""
    name = "nftables"
    counts_from_load = True

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
        counts = nft_chain_counters(self.netns, "kube-proxy",
                                    [s.nft_endpoint_chain(ep) for ep in s.endpoints])
        return (f"endpoint-chain DNAT packets {' / '.join(f'{c:,}' for c in counts)} "
                f"(sum {sum(counts):,}) for {requests:,} requests")


class Haproxy(Variant):
    """Debian's haproxy, mode tcp, one listener per service port; no UDP. A change goes
    through its runtime API (`set server ... addr`), as a dynamic control plane does."""
    name = "haproxy"
    workloads = frozenset(WORKLOADS) - {"udp"}
    unsupported = {"udp": "HAProxy proxies TCP only (mode tcp)"}

    def __init__(self, bench) -> None:
        super().__init__(bench)
        self.proc: Optional[subprocess.Popen] = None
        self.socket = os.path.join(bench.workdir, "haproxy.sock")
        self.nr_open_before: Optional[int] = None  # fs.nr_open, when fd_limit raised it

    def program(self, n: int, specs: List[bl.SvcSpec]) -> Tuple[float, int]:
        self.stop()
        wrap = self.fd_limit(bl.haproxy_fds(n), n)
        cfg = os.path.join(self.bench.workdir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(bl.haproxy_config(specs, os.path.join(self.bench.workdir, "haproxy.pid"),
                                      self.socket))
        self.specs = specs
        t0 = time.perf_counter()
        self.proc = self.bench.lab.spawn([*wrap, *wl.pinned("client"), "haproxy", "-db", "-f",
                                          cfg], netns=self.netns,
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

    def fd_limit(self, need: int, n: int) -> List[str]:
        """The command prefix that gives haproxy `need` file descriptors (one per listener,
        two per connection): `prlimit --nofile=need:need` on haproxy's process alone when
        this process's limit is lower, after raising fs.nr_open (the kernel's ceiling for
        any RLIMIT_NOFILE; restored at close) if it is lower still. Where neither can be
        raised (no CAP_SYS_RESOURCE, as in some containers) -> NotRun with the reason."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or need <= soft:
            return []
        nr_open = read_int(NR_OPEN)
        if nr_open is not None and need > nr_open:
            try:
                with open(NR_OPEN, "w") as f:
                    f.write(str(need))
                if self.nr_open_before is None:
                    self.nr_open_before = nr_open
            except OSError as e:
                raise NotRun(f"haproxy needs ~{need:,} file descriptors for {n:,} listeners; "
                             f"fs.nr_open is {nr_open:,} and could not be raised: {e}")
        wrap = nofile_prefix(need)
        failed = try_prefix(wrap)
        if failed:
            raise NotRun(f"haproxy needs ~{need:,} file descriptors for {n:,} listeners; the "
                         f"hard RLIMIT_NOFILE here is {hard:,} and raising it failed "
                         f"({failed[:120]}): this process lacks CAP_SYS_RESOURCE (`capsh "
                         "--print` shows it dropped), as in a container; root on a plain "
                         "host raises it")
        return wrap

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
        if self.nr_open_before is not None:
            with open(NR_OPEN, "w") as f:
                f.write(str(self.nr_open_before))
            self.nr_open_before = None


NR_OPEN = "/proc/sys/fs/nr_open"


def nofile_prefix(need: int) -> List[str]:
    """Runs the command after it with RLIMIT_NOFILE need:need (that process only)."""
    return ["prlimit", f"--nofile={need}:{need}", "--"]


def try_prefix(prefix: List[str]) -> str:
    """'' if `prefix true` succeeds here, else its error (e.g. prlimit's EPERM)."""
    res = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    return "" if res.returncode == 0 else " ".join(res.stderr.split()) or f"exit {res.returncode}"


def read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def in_netns(name: str):
    """This thread inside netns `name` until the with-block ends (tests/tcrun.py's InNetns,
    which bench/tc.py uses too): pyroute2 attaches TC filters in the caller's netns."""
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from tcrun import InNetns
    return InNetns(name)


# -- private hooks: recorded for the crash reaper --------------------------------------------
STATE_DIR = "/run/nodemesh/bench-run"


def record_private_hooks(prefix: str, cgroup: str, bpffs: Optional[str]) -> None:
    import json
    os.makedirs(STATE_DIR, exist_ok=True)
    path = os.path.join(STATE_DIR, f"{prefix}.json")
    state = {"pid": os.getpid(), "cgroups": [], "bpffs": []}
    if os.path.exists(path):
        with open(path) as f:
            state = json.load(f)
    state["cgroups"].append(cgroup)
    if bpffs:  # None: a cgroup with no hooks (direct's)
        state["bpffs"].append(bpffs)
    with open(path, "w") as f:
        json.dump(state, f)


def remove_cgroup(cgroup: str) -> None:
    """Remove a cgroup and the ones below it (nodemesh+policy's workloads), deepest first."""
    from nodemesh.lab.topology import _empty_cgroup
    for folder in sorted((f for f, _, _ in os.walk(cgroup)), key=len, reverse=True):
        _empty_cgroup(folder)
        try:
            os.rmdir(folder)
        except OSError:
            pass


def forget_private_hooks(prefix: str) -> None:
    """Remove what this run's variants recorded and did not remove themselves (a variant
    whose set-up failed half-way is never closed), then the record."""
    import json
    path = os.path.join(STATE_DIR, f"{prefix}.json")
    try:
        with open(path) as f:
            _remove_hooks(json.load(f))
    except (OSError, ValueError):
        pass
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_hooks(state: dict) -> None:
    from nodemesh.datapath.loader import DatapathError, cleanup
    for bpffs in state.get("bpffs", []):
        try:
            cleanup(bpffs, force=True)
        except DatapathError as e:
            print(f"removing {bpffs}: {e}", file=sys.stderr)
    for cgroup in state.get("cgroups", []):
        remove_cgroup(cgroup)


def reap_private_hooks() -> None:
    """Remove the private cgroups and pins of earlier runs whose process is gone."""
    from nodemesh.lab.topology import orphaned_states
    for path, state in orphaned_states(STATE_DIR, "pid"):
        _remove_hooks(state)
        os.unlink(path)


VARIANTS: Dict[str, Type[Variant]] = {
    "direct": Direct,
    "direct-aa": DirectAgain,
    "nodemesh": Nodemesh,
    "iptables-nft": Iptables,
    "iptables-legacy": IptablesLegacy,
    "nftables": Nftables,
    "haproxy": Haproxy,
    "nodemesh-tc": NodemeshTc,
    "direct-routed": DirectRouted,
    "nodemesh+sockmap": NodemeshSockmap,
    "nodemesh+policy": NodemeshPolicy,
}
ALL = list(VARIANTS)
# One line each, for the report's list of variants.
SUMMARY: Dict[str, str] = {
    "direct": "the client connects to the backend address: the limit",
    "direct-aa": "direct again, from a client netns of its own: the A/A test (its ratio to "
                 "direct is the method's spread)",
    "nodemesh": "the cgroup socket hooks (connect/sendmsg) on the client's cgroup",
    "iptables-nft": "kube-proxy's iptables mode, exact shape, loaded with iptables-nft-restore",
    "iptables-legacy": "the same ruleset with iptables-legacy-restore (x_tables)",
    "nftables": "kube-proxy's nftables mode (service-ips vmap, numgen random mod N vmap)",
    "haproxy": "Debian's HAProxy, mode tcp, one listener per service port",
    "nodemesh-tc": "the TC packet path: an external client through the measured service's "
                   "NodePort on a node netns, externalTrafficPolicy Cluster (DNAT + SNAT)",
    "direct-routed": "direct for an external client: nodemesh-tc's client and node shape, the "
                     "backend's address, the node forwarding it untouched (no TC, no rules, "
                     "no NAT): nodemesh-tc's baseline",
    "nodemesh+sockmap": "the socket hooks with --accelerate-local; client and backends on the "
                        "same node, both in the hooked cgroup",
    "nodemesh+policy": "the socket hooks with 10,000 policy rules and 1,000 identities "
                       "loaded; the client is an allowed workload",
}
# What each variant needs installed (run.py checks before it starts).
TOOLS: Dict[str, str] = {"iptables-nft": "iptables-nft-restore",
                         "iptables-legacy": "iptables-legacy-restore", "nftables": "nft",
                         "haproxy": "haproxy"}
