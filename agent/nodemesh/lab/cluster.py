"""A lab of several nodes that stands in for a cluster: the TC packet path's tests, demo and
benchmarks run against it.

    [fabric netns: bridge br0, 10.77.0.1 (the Kubernetes API)] ── the machine never sees it
        │ 10.77.0.11        │ 10.77.0.12        │ 10.77.0.13        │ 10.77.0.100
        │ fd77::11          │ fd77::12          │ fd77::13          │ fd77::100
    [node n1: eth0]     [node n2: eth0]     [node n3: eth0]     [client netns]
        │ 10.77.1.1         │ 10.77.2.1         │ 10.77.3.1
        │ fd77:1::1         │ fd77:2::1         │ fd77:3::1
    [pod p1 10.77.1.2]  [pod p2 10.77.2.2]  [pod p3 10.77.3.2]
    [   fd77:1::2    ]  [   fd77:2::2    ]  [   fd77:3::2    ]

Every link has an IPv4 and an IPv6 (ULA, fd77::/16) address, added without duplicate address
detection so that they are usable at once. Each node is a network namespace with forwarding
on for both families (the only ones), a route to every other node's pod subnets through that
node, and its own agent: its bpffs folder, its cgroup, its admin socket, its metrics on the
node's own loopback, fed by one Kubernetes API. Pods run a real nginx (access log with the
client's address) and dnsmasq, on both families. The client has no route but the fabric's
(tests add host routes to service addresses through a node, as ECMP would): nothing here can
leave the machine, and no namespace has a default route to it.

Names carry `nmk<pid>` so that a later run reaps what a crashed one left (reap_stale()).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..datapath.loader import DatapathError, cgroup2_root
from ..datapath.loader import cleanup as datapath_cleanup
from .topology import _alive, kill_all, reaping, remove_netns, sh

FABRIC_GW = "10.77.0.1"
CLIENT_ADDR = "10.77.0.100"
FABRIC_GW6 = "fd77::1"
CLIENT_ADDR6 = "fd77::100"
PREFIX = "nmk"
BIG_FILE_BYTES = 50 * 1024 * 1024


def node_addr(i: int) -> str:
    return f"10.77.0.{10 + i}"


def pod_addr(i: int) -> str:
    return f"10.77.{i}.2"


def node_addr6(i: int) -> str:
    return f"fd77::{10 + i}"


def pod_addr6(i: int) -> str:
    return f"fd77:{i}::2"


@dataclass
class Node:
    index: int
    name: str        # the Kubernetes node name: node-1 ...
    netns: str
    pod_netns: str
    bpffs: str
    cgroup: str
    admin_socket: str
    metrics_port: int = 9464
    agent: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return node_addr(self.index)

    @property
    def pod(self) -> str:
        return pod_addr(self.index)

    @property
    def address6(self) -> str:
        return node_addr6(self.index)

    @property
    def pod6(self) -> str:
        return pod_addr6(self.index)


@dataclass
class Cluster:
    prefix: str
    workdir: str
    nodes: List[Node] = field(default_factory=list)
    processes: List[subprocess.Popen] = field(default_factory=list)

    @property
    def fabric(self) -> str:
        return f"{self.prefix}-fab"

    @property
    def client(self) -> str:
        return f"{self.prefix}-cli"

    def namespaces(self) -> List[str]:
        return [self.fabric, self.client] + [n for node in self.nodes
                                             for n in (node.netns, node.pod_netns)]

    # -- build ---------------------------------------------------------------------------
    def create(self, count: int = 3) -> "Cluster":
        try:
            self._create(count)
        except BaseException:
            self.destroy()
            raise
        return self

    def _create(self, count: int) -> None:
        fab = self.fabric
        sh(f"ip netns add {fab}")
        sh(f"ip -n {fab} link set lo up")
        sh(f"ip -n {fab} link add br0 type bridge")
        sh(f"ip -n {fab} addr add {FABRIC_GW}/24 dev br0")
        sh(f"ip -n {fab} addr add {FABRIC_GW6}/64 dev br0 nodad")
        sh(f"ip -n {fab} link set br0 up")
        self._attach(self.client, "cli", CLIENT_ADDR, CLIENT_ADDR6)
        root = cgroup2_root()
        for i in range(1, count + 1):
            node = Node(i, f"node-{i}", f"{self.prefix}-n{i}", f"{self.prefix}-p{i}",
                        f"/sys/fs/bpf/{self.prefix}-n{i}",
                        os.path.join(root, f"{self.prefix}-n{i}"),
                        os.path.join(self.workdir, f"n{i}.sock"))
            self.nodes.append(node)
            self._attach(node.netns, f"n{i}", node.address, node.address6)
            for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                        "net.ipv4.conf.eth0.rp_filter=0", "net.ipv6.conf.all.forwarding=1"):
                sh(f"ip netns exec {node.netns} sysctl -qw {key}")
            sh(f"ip netns add {node.pod_netns}")
            sh(f"ip -n {node.pod_netns} link set lo up")
            sh(f"ip -n {node.netns} link add pod type veth peer name eth0 netns "
               f"{node.pod_netns}")
            sh(f"ip -n {node.netns} addr add 10.77.{i}.1/24 dev pod")
            sh(f"ip -n {node.netns} addr add fd77:{i}::1/64 dev pod nodad")
            sh(f"ip -n {node.netns} link set pod up")
            sh(f"ip -n {node.pod_netns} addr add {node.pod}/24 dev eth0")
            sh(f"ip -n {node.pod_netns} addr add {node.pod6}/64 dev eth0 nodad")
            sh(f"ip -n {node.pod_netns} link set eth0 up")
            sh(f"ip -n {node.pod_netns} route add default via 10.77.{i}.1")
            sh(f"ip -n {node.pod_netns} -6 route add default via fd77:{i}::1")
            os.makedirs(node.cgroup, exist_ok=True)
        for node in self.nodes:
            for other in self.nodes:
                if other is not node:
                    sh(f"ip -n {node.netns} route add 10.77.{other.index}.0/24 via "
                       f"{other.address}")
                    sh(f"ip -n {node.netns} -6 route add fd77:{other.index}::/64 via "
                       f"{other.address6}")

    def _attach(self, netns: str, port: str, addr: str, addr6: str) -> None:
        sh(f"ip netns add {netns}")
        sh(f"ip -n {netns} link set lo up")
        sh(f"ip -n {self.fabric} link add {port} type veth peer name eth0 netns {netns}")
        sh(f"ip -n {self.fabric} link set {port} master br0 up")
        sh(f"ip -n {netns} addr add {addr}/24 dev eth0")
        sh(f"ip -n {netns} addr add {addr6}/64 dev eth0 nodad")
        sh(f"ip -n {netns} link set eth0 up")

    def route_via(self, address: str, node: "Node") -> None:
        """Send the client's traffic for a service address (an externalIP, a load-balancer IP)
        through `node`: what an ECMP router upstream does, one next hop at a time."""
        via = node.address6 if ":" in address else node.address
        sh(f"ip -n {self.client} route replace {address} via {via}")

    # -- processes ---------------------------------------------------------------------------
    def spawn(self, argv: Sequence[str], netns: str, cgroup: Optional[str] = None,
              **popen) -> subprocess.Popen:
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup v2 and bpf
        # filesystems mounted below it, which an agent needs.
        cmd = f"exec nsenter --net=/run/netns/{shlex.quote(netns)} " + \
            " ".join(map(shlex.quote, argv))
        if cgroup:
            cmd = f"echo $$ > {shlex.quote(os.path.join(cgroup, 'cgroup.procs'))} && {cmd}"
        proc = subprocess.Popen(["sh", "-c", cmd], start_new_session=True, **popen)
        self.processes.append(proc)
        return proc

    def start_agent(self, node: Node, kubeconfig: str, extra: Sequence[str] = ()) -> None:
        log = open(os.path.join(self.workdir, f"agent-{node.name}.log"), "ab")
        node.agent = self.spawn(
            [sys.executable, "-m", "nodemesh.cli", "run", "--source", "kubernetes",
             "--kubeconfig", kubeconfig, "--node-name", node.name, "--interface", "eth0",
             "--interface", "pod",  # replies of local backends come back on it
             "--bpffs", node.bpffs, "--cgroup", node.cgroup, "--admin-socket",
             node.admin_socket, "--metrics-addr", f"127.0.0.1:{node.metrics_port}", *extra],
            node.netns, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, node: Node, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.agent is not None and node.agent.poll() is not None:
                raise RuntimeError(f"the agent of {node.name} exited {node.agent.returncode}; "
                                   f"see {self.workdir}/agent-{node.name}.log")
            if self.run_in(node.netns, ["curl", "-sf", "-o", "/dev/null",
                                        f"http://127.0.0.1:{node.metrics_port}/readyz"],
                           check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the agent of {node.name} was not ready within {timeout}s")

    def metrics(self, node: Node) -> str:
        return self.run_in(node.netns, ["curl", "-sf", f"http://127.0.0.1:{node.metrics_port}"
                                                        "/metrics"]).stdout

    def start_pod_servers(self, node: Node) -> None:
        """nginx (/who: the pod's name; /big: 50 MB; access log with the client address) and
        dnsmasq (who.lab -> 10.250.0.<node index>) in the node's pod, on IPv4 and IPv6."""
        d = os.path.join(self.workdir, f"pod{node.index}")
        os.makedirs(os.path.join(d, "www"), exist_ok=True)
        with open(os.path.join(d, "www", "who"), "w") as f:
            f.write(f"p{node.index}\n")
        with open(os.path.join(d, "www", "big"), "wb") as f:
            f.truncate(BIG_FILE_BYTES)
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""pid {d}/nginx.pid;
error_log {d}/error.log;
user root;  # the workdir may be private to root (pytest's tmp)
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
  log_format who '$remote_addr $remote_port $request_uri';
  access_log {d}/access.log who;
  client_body_temp_path {d}; proxy_temp_path {d};
  fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};
  server {{ listen {node.pod}:8080; listen [{node.pod6}]:8080; root {d}/www; }}
}}
""")
        proc = self.spawn(["nginx", "-c", conf, "-g", "daemon off;"], node.pod_netns)
        self.spawn(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                    "--user=root", f"--listen-address={node.pod}",
                    f"--listen-address={node.pod6}", "--bind-interfaces",
                    f"--pid-file={d}/dnsmasq.pid", f"--address=/who.lab/10.250.0.{node.index}"],
                   node.pod_netns, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while not (os.path.exists(f"{d}/nginx.pid") and os.path.exists(f"{d}/dnsmasq.pid")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the servers of pod {node.index} did not start ({d})")
            time.sleep(0.05)

    def access_log(self, node: Node) -> List[str]:
        path = os.path.join(self.workdir, f"pod{node.index}", "access.log")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return f.read().splitlines()

    def run_in(self, netns: str, argv: Sequence[str], check: bool = True,
               timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {netns} failed ({res.returncode}): "
                               f"{res.stderr.strip()}")
        return res

    def curl(self, url: str, *args: str) -> str:
        """curl from the external client (-g: an IPv6 literal's brackets are no glob)."""
        return self.run_in(self.client, ["curl", "-sSg", "--max-time", "10", *args,
                                         url]).stdout

    def dig(self, server: str, port: int, name: str = "who.lab") -> str:
        return self.run_in(self.client, ["dig", "+short", "+time=2", "+tries=1", "-p",
                                         str(port), f"@{server}", name]).stdout.strip()

    # -- teardown ----------------------------------------------------------------------------
    def destroy(self) -> None:
        kill_all(self.processes)
        self.processes = []
        _remove(self.namespaces(), [n.bpffs for n in self.nodes], [n.cgroup for n in self.nodes])


def _remove(namespaces: Sequence[str], bpffs: Sequence[str], cgroups: Sequence[str]) -> None:
    for folder in bpffs:
        try:
            datapath_cleanup(folder, force=True)
        except (DatapathError, OSError):
            pass
    for cg in cgroups:
        try:
            os.rmdir(cg)
        except OSError:
            pass
    for ns in namespaces:  # the TC filters go with the interfaces
        remove_netns(ns)  # with the pod servers a crashed run left running inside


def reap_stale() -> List[str]:
    """Remove what clusters of dead processes left: netns, pin folders, cgroups named nmk<pid>."""
    import re

    owner = re.compile(rf"^({PREFIX}(\d+)x[0-9a-f]+)-")
    dead: Dict[str, List[str]] = {}
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    for name in names:
        m = owner.match(name)
        if m and not _alive(int(m.group(2))):
            dead.setdefault(m.group(1), []).append(name)
    if not dead:
        return []
    root = cgroup2_root()
    with reaping():  # one reaper at a time; what another removed meanwhile is skipped
        for prefix, namespaces in dead.items():
            bpffs = [os.path.join("/sys/fs/bpf", d) for d in os.listdir("/sys/fs/bpf")
                     if d.startswith(prefix + "-")]
            cgroups = [os.path.join(root, d) for d in os.listdir(root)
                       if d.startswith(prefix + "-")]
            _remove(namespaces, bpffs, cgroups)
    return list(dead)


def new_cluster(workdir: str, nodes: int = 3) -> Cluster:
    reap_stale()
    prefix = f"{PREFIX}{os.getpid()}x{uuid.uuid4().hex[:4]}"
    return Cluster(prefix, workdir).create(nodes)
