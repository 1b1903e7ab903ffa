"""A disposable test network on one machine: backends and a client in network namespaces.

Used by `nodemesh demo`, the datapath/e2e tests and the benchmarks.

    host netns ──veth <p>h/<p>p── [client netns: bridge br0] ──veth── [backend netns b1]
      (optional, for the agent's       198.18.N.1/24                  ──veth── [backend netns b2]
       health checks and curl)         fd6e:6d:N::1/64                 ...

Safety, by construction:
  * no namespace has a default route, so nothing here can reach beyond the lab;
  * the lab's VIP ranges (198.19.N.0/24, fd6e:6d:ffff:N::/64) are blackholed in the client
    netns and, when a host link exists, in the host: an untranslated VIP packet is dropped;
  * clients run in a cgroup v2 child made for the lab, never the cgroup root.
Every resource name carries the lab's prefix; a state file records the owner pid so that a
later run can reap what a crashed one left (reap_stale()).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ..datapath.loader import cgroup2_root

STATE_DIR = "/run/nodemesh/lab"


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed ({res.returncode}): {res.stderr.strip()}")
    return res


@dataclass
class LabBackend:
    name: str
    netns: str
    ipv4: str
    ipv6: str


@dataclass
class Lab:
    prefix: str
    subnet: int  # N in 198.18.N.0/24
    host_link: bool = False
    host_blackhole: bool = False  # drop the lab's ranges in the host netns (demo, benchmarks)
    backends: List[LabBackend] = field(default_factory=list)
    processes: List[subprocess.Popen] = field(default_factory=list)
    cgroup: str = ""

    # -- addresses ----------------------------------------------------------------------------
    @property
    def client_ns(self) -> str:
        return f"{self.prefix}-c"

    @property
    def gateway4(self) -> str:
        return f"198.18.{self.subnet}.1"

    @property
    def gateway6(self) -> str:
        return f"fd6e:6d:{self.subnet:x}::1"

    @property
    def host4(self) -> str:
        return f"198.18.{self.subnet}.254"

    @property
    def vip_range4(self) -> str:
        return f"198.19.{self.subnet}.0/24"

    @property
    def vip_range6(self) -> str:
        return f"fd6e:6d:ffff:{self.subnet:x}::/64"

    def vip4(self, i: int = 10) -> str:
        return f"198.19.{self.subnet}.{i}"

    def vip6(self, i: int = 10) -> str:
        return f"fd6e:6d:ffff:{self.subnet:x}::{i:x}"

    @property
    def bpffs(self) -> str:
        """The pin folder for an agent serving this lab (reaped with it)."""
        return f"/sys/fs/bpf/{self.prefix}"

    @property
    def admin_socket(self) -> str:
        return f"/run/nodemesh/{self.prefix}.sock"

    @property
    def state_file(self) -> str:
        return os.path.join(STATE_DIR, f"{self.prefix}.json")

    # -- building ----------------------------------------------------------------------------
    def _save(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        with open(self.state_file, "w") as f:
            json.dump({"pid": os.getpid(), "prefix": self.prefix, "subnet": self.subnet,
                       "host_link": self.host_link, "host_blackhole": self.host_blackhole,
                       "cgroup": self.cgroup,
                       "backends": [b.netns for b in self.backends]}, f)

    def create(self) -> "Lab":
        self.cgroup = os.path.join(cgroup2_root(), f"nodemesh-{self.prefix}")
        self._save()  # first, so that a crash from here on can be reaped
        os.makedirs(self.cgroup, exist_ok=True)
        c = self.client_ns
        sh(f"ip netns add {c}")
        sh(f"ip -n {c} link set lo up")
        sh(f"ip -n {c} link add br0 type bridge")
        sh(f"ip -n {c} addr add {self.gateway4}/24 dev br0")
        sh(f"ip -n {c} addr add {self.gateway6}/64 dev br0 nodad")
        sh(f"ip -n {c} link set br0 up")
        # Untranslated VIP traffic dies here, whatever the hooks do.
        sh(f"ip -n {c} route add blackhole {self.vip_range4}")
        sh(f"ip -n {c} -6 route add blackhole {self.vip_range6}")
        if self.host_link:
            h, p = f"{self.prefix}h", f"{self.prefix}p"
            sh(f"ip link add {h} type veth peer name {p} netns {c}")
            sh(f"ip -n {c} link set {p} master br0 up")
            sh(f"ip addr add {self.host4}/24 dev {h}")
            sh(f"ip addr add fd6e:6d:{self.subnet:x}::fe/64 dev {h} nodad")
            sh(f"ip link set {h} up")
        if self.host_link or self.host_blackhole:
            sh(f"ip route replace blackhole {self.vip_range4}")
            sh(f"ip -6 route replace blackhole {self.vip_range6}")
        if self.host_blackhole and not self.host_link:
            sh(f"ip route replace blackhole 198.18.{self.subnet}.0/24")
            sh(f"ip -6 route replace blackhole fd6e:6d:{self.subnet:x}::/64")
        return self

    def add_backend(self) -> LabBackend:
        i = len(self.backends) + 1
        b = LabBackend(name=f"b{i}", netns=f"{self.prefix}-b{i}",
                       ipv4=f"198.18.{self.subnet}.{10 + i}",
                       ipv6=f"fd6e:6d:{self.subnet:x}::{10 + i:x}")
        self.backends.append(b)
        self._save()
        outer, inner = f"{self.prefix}v{i}", "eth0"
        sh(f"ip netns add {b.netns}")
        sh(f"ip -n {b.netns} link set lo up")
        sh(f"ip -n {self.client_ns} link add {outer} type veth peer name {inner} "
           f"netns {b.netns}")
        sh(f"ip -n {self.client_ns} link set {outer} master br0 up")
        sh(f"ip -n {b.netns} addr add {b.ipv4}/24 dev {inner}")
        sh(f"ip -n {b.netns} addr add {b.ipv6}/64 dev {inner} nodad")
        sh(f"ip -n {b.netns} link set {inner} up")
        return b

    # -- processes ---------------------------------------------------------------------------
    def spawn(self, argv: Sequence[str], netns: Optional[str] = None, in_cgroup: bool = False,
              **popen) -> subprocess.Popen:
        """Start argv in a namespace, optionally inside the lab's (hooked) cgroup.

        The shell joins the cgroup before exec, so every socket the program makes is hooked."""
        cmd = " ".join(shlex.quote(a) for a in argv)
        if netns:
            cmd = f"exec ip netns exec {shlex.quote(netns)} {cmd}"
        else:
            cmd = f"exec {cmd}"
        if in_cgroup:
            cmd = f"echo $$ > {shlex.quote(os.path.join(self.cgroup, 'cgroup.procs'))} && {cmd}"
        proc = subprocess.Popen(["sh", "-c", cmd], start_new_session=True, **popen)
        self.processes.append(proc)
        return proc

    def start_servers(self, tcp_ports: Sequence[int] = (8080,),
                      udp_ports: Sequence[int] = (5353,),
                      backends: Optional[Sequence[LabBackend]] = None) -> None:
        """The lab's own echo server in every backend: TCP answers HTTP with its name, UDP
        answers any datagram with its name."""
        for b in backends or self.backends:
            argv = [sys.executable, "-m", "nodemesh.lab.server", "--name", b.name]
            for addr in (b.ipv4, b.ipv6):
                for p in tcp_ports:
                    argv += ["--tcp", f"[{addr}]:{p}" if ":" in addr else f"{addr}:{p}"]
                for p in udp_ports:
                    argv += ["--udp", f"[{addr}]:{p}" if ":" in addr else f"{addr}:{p}"]
            proc = self.spawn(argv, netns=b.netns, stdout=subprocess.PIPE, text=True)
            line = proc.stdout.readline()  # the server prints "ready" once it listens
            if "ready" not in line:
                raise RuntimeError(f"server in {b.netns} did not start: {line!r}")

    def start_nginx(self, backend: LabBackend, port: int, body: str, workdir: str,
                    connections: int = 4096) -> subprocess.Popen:
        """A real nginx in a backend's netns, answering every request with `body`; its pid,
        logs and temp files stay in workdir, and it runs in the foreground (so teardown's
        kill reaches it)."""
        conf = os.path.join(workdir, f"nginx-{backend.name}-{port}.conf")
        tmp = os.path.join(workdir, f"nginx-{backend.name}-{port}")
        os.makedirs(tmp, exist_ok=True)
        with open(conf, "w") as f:
            f.write(f"""pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
worker_processes 1;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
  client_body_temp_path {tmp}; proxy_temp_path {tmp};
  fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{ listen {backend.ipv4}:{port} reuseport backlog={connections};
           location / {{ return 200 "{body}\\n"; }} }}
}}
""")
        proc = self.spawn(["nginx", "-c", conf, "-g", "daemon off;"], netns=backend.netns)
        deadline = time.monotonic() + 5
        while not os.path.exists(f"{tmp}/nginx.pid"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx in {backend.netns} did not start ({tmp}/error.log)")
            time.sleep(0.05)
        return proc

    def client(self, args: Sequence[str], timeout: float = 120) -> Dict:
        """Run nodemesh.lab.client in the client netns inside the hooked cgroup; its JSON result."""
        proc = self.spawn([sys.executable, "-m", "nodemesh.lab.client", *args],
                          netns=self.client_ns, in_cgroup=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            self.processes.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"client {' '.join(args)} failed: {err.strip()}")
        return json.loads(out)

    # -- teardown ----------------------------------------------------------------------------
    def destroy(self) -> None:
        kill_all(self.processes)
        self.processes = []
        teardown(self.prefix, self.subnet, self.host_link, self.cgroup,
                 [b.netns for b in self.backends], self.host_blackhole)


def remove_netns(name: str) -> bool:
    """Kill every process inside the named netns, then delete it; True if it was deleted.

    `ip netns del` only removes the name: a server still running inside keeps the namespace,
    its veths and its sockets alive, unreachable, for as long as it runs."""
    for pid in sh(f"ip netns pids {shlex.quote(name)}", check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    return sh(f"ip netns del {shlex.quote(name)}", check=False).returncode == 0


def teardown(prefix: str, subnet: int, host_link: bool, cgroup: str,
             backend_ns: Sequence[str], host_blackhole: bool = False) -> None:
    """Remove everything a lab made. Each step tolerates what is already gone."""
    from ..datapath.loader import DatapathError
    from ..datapath.loader import cleanup as datapath_cleanup

    # first: hooks off before the cgroup goes; force: an agent a crashed run left may hold it
    folder = f"/sys/fs/bpf/{prefix}"
    try:
        datapath_cleanup(folder, force=True)
    except DatapathError:
        # Pins a build of another ABI (or a half-made folder) left: the folder is the lab's by
        # its name, so unpin everything in it; links detach with their last reference.
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            (os.rmdir if os.path.isdir(path) else os.unlink)(path)
        os.rmdir(folder)
    try:
        os.unlink(f"/run/nodemesh/{prefix}.sock")
    except FileNotFoundError:
        pass
    for ns in [*backend_ns, f"{prefix}-c"]:
        remove_netns(ns)
    if host_link:
        sh(f"ip link del {prefix}h", check=False)
    if host_link or host_blackhole:
        sh(f"ip route del blackhole 198.19.{subnet}.0/24", check=False)
        sh(f"ip -6 route del blackhole fd6e:6d:ffff:{subnet:x}::/64", check=False)
    if host_blackhole and not host_link:
        sh(f"ip route del blackhole 198.18.{subnet}.0/24", check=False)
        sh(f"ip -6 route del blackhole fd6e:6d:{subnet:x}::/64", check=False)
    if cgroup and os.path.isdir(cgroup):
        # Deepest first: tests and benchmarks make workload cgroups inside the lab's one.
        for folder in sorted((f for f, _, _ in os.walk(cgroup)), key=len, reverse=True):
            _empty_cgroup(folder)
            try:
                os.rmdir(folder)
            except OSError:
                pass
    try:
        os.unlink(os.path.join(STATE_DIR, f"{prefix}.json"))
    except FileNotFoundError:
        pass


def kill_all(processes) -> None:
    """SIGKILL each spawned process's group (they are session leaders) and reap it."""
    for proc in processes:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _empty_cgroup(cgroup: str) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(os.path.join(cgroup, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


@contextlib.contextmanager
def reaping() -> Iterator[None]:
    """Held while a reaper tears down what dead processes left (labs here, clusters in
    cluster.py): the suite's xdist workers all reap as they start, and two teardowns of the
    same leftovers race each other's unlinks."""
    os.makedirs("/run/nodemesh", exist_ok=True)
    with open("/run/nodemesh/.lab-reap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def reap_stale() -> List[str]:
    """Tear down labs whose owner process is gone (a crashed or killed earlier run).

    One reaper at a time (an flock beside the state files): the suite's xdist workers all
    start by reaping, and two teardowns of one lab raced each other's unlinks."""
    reaped: List[str] = []
    if not os.path.isdir(STATE_DIR):
        return reaped
    with reaping():
        for _, st in orphaned_states(STATE_DIR, "pid"):
            teardown(st["prefix"], st["subnet"], st.get("host_link", False),
                     st.get("cgroup", ""), st.get("backends", []),
                     st.get("host_blackhole", False))
            reaped.append(st["prefix"])
    return reaped


def orphaned_states(state_dir: str, owner_key: str) -> Iterator[Tuple[str, dict]]:
    """(path, state) of each JSON state file in state_dir whose owner process (the pid under
    owner_key) is gone; an unreadable file is removed. What to tear down is the caller's."""
    if not os.path.isdir(state_dir):
        return
    for name in os.listdir(state_dir):
        path = os.path.join(state_dir, name)
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            os.unlink(path)
            continue
        if not _alive(state.get(owner_key, 0)):
            yield path, state


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def new_lab(kind: str = "nmt", backends: int = 3, host_link: bool = False,
            host_blackhole: bool = False, seed: Optional[int] = None) -> Lab:
    """A fresh lab with a unique prefix and subnet; reaps stale labs first."""
    reap_stale()
    rng = random.Random(seed if seed is not None else os.getpid() ^ time.time_ns())
    used = set()
    if os.path.isdir(STATE_DIR):
        for name in os.listdir(STATE_DIR):
            try:
                with open(os.path.join(STATE_DIR, name)) as f:
                    used.add(json.load(f)["subnet"])
            except (OSError, ValueError, KeyError):
                pass
    subnet = rng.choice([n for n in range(1, 250) if n not in used])
    prefix = f"{kind}{rng.randrange(16 ** 4):04x}"
    lab = Lab(prefix=prefix, subnet=subnet, host_link=host_link, host_blackhole=host_blackhole)
    try:
        lab.create()
        for _ in range(backends):
            lab.add_backend()
    except Exception:
        lab.destroy()
        raise
    return lab
