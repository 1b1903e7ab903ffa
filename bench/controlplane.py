#!/usr/bin/env python3
"""Control-plane benchmark: the real agent (`python -m nodemesh.cli run`) at N services.

    .venv/bin/python bench/controlplane.py                      # quick: N = 1 and 10,000
    .venv/bin/python bench/controlplane.py --full               # and 100,000 (minutes each)
    .venv/bin/python bench/controlplane.py --sizes 100000 --sources file --changes 30

Sources (--sources, comma-separated):
  file        one YAML file with every service
  dir         a folder of 100 *.yaml files (N/100 services each; a change rewrites one file)
  kubernetes  tests/k8s_fake_apiserver.py on 127.0.0.1, N Services + N EndpointSlices shaped
              as bench/k8s_source.py makes them (the real services' on the lab's backends)

Every service has 3 backends, one TCP port 80 -> 8080, a VIP in 10.96.0.0/15 (the formula of
bench/k8s_source.py). Each service has its own 3 endpoint addresses, as a cluster's services
have their own pods: bench/k8s_source.py's formula, 300,000 distinct addresses in 10.128.0.0/10
at 100,000 (a range the lab never routes; also blackholed in the client netns), for every
source. Only the services the probe and the change loop use (svc-0 and the --changes services
the loop picks) start on the lab's real backends (set A). Until 2026-11-29 every service had
the same three lab addresses, 300,000 equal strings: a shape that flattered any sharing of
equal addresses (branch mem7's address pool in the Kubernetes source, -18 MiB in it).

The agent runs as root with --metrics-detail service, its own --bpffs, --admin-socket and
--metrics-addr 127.0.0.1:PORT, its hooks on a Lab's child cgroup (agent/nodemesh/lab), cold
(no pins) for every N. The lab has 6 backends running the lab server (answers with its
name): those real services start on set A = b1 b2 b3; a change moves
one service to the other set (A <-> B = b4 b5 b6), so every connection made after the
switch lands on the new set, with no sampling delay. Measured:

  to /readyz     process start -> GET /readyz 200 (asked when the agent logs "ready:", read
                 every 10 ms, and every 0.5 s anyway: not polled every 10 ms, whose ~1,500
                 requests over a 100,000-service start took the agent's GIL); "datapath" is the
                 agent's own "datapath loaded in" (BPF compile + load) within it
  CPU to ready   the agent's user+system CPU at ready, its compiler child included
  RSS ready      psutil RSS right after ready; settled = once the agent has logged "first sync
                 frozen" (a moment after ready: it then collects, freezes the first sync out
                 of the cyclic collector and gives the heap the start freed back to the OS):
                 what the agent keeps while it serves; peak = VmHWM at the end of the run
  change -> map  the source event (file: just after the rename into place returns; folder:
                 the same for one of the 100 files; kubernetes: just before the fake API
                 server's write of the EndpointSlice) -> the frontend's master entry in the
                 pinned `services` map switches to the new backend set. This bench reads the
                 kernel map itself (bpf(2) lookups of the master entry every 0.5 ms, then its
                 slots and backends), the most direct observation of "programmed": not a log
                 line, not the admin API (whose 100,000-service JSON would load the agent).
                 The polling thread is SCHED_BATCH while it polls (--poller-normal: not), so
                 that its wake-ups never preempt the agent mid-round; on a busy CPU it runs
                 when the scheduler next picks it (later by up to a tick when both CPUs
                 are busy: a bias up of change -> map, never down).
  change -> conn the same event -> the first TCP connection that lands on the new set, from a
                 probe in the lab's client netns inside the hooked cgroup that connects to the
                 VIP every --probe-interval (2 ms) from before the change until it sees the
                 new set (bounded: the new set, or max(5 s, time to ready, 3x the slowest
                 change so far) and 100,000 connections). The time is connect()'s return.
  CPU / change   the agent's user+system CPU over the change loop, minus its idle CPU rate
                 (measured just after, over the same duration, at most --idle-seconds and
                 scaled) times the loop's duration, divided by the number of changes. This
                 counts the agent's work for the probe's connections in the loop too (flow
                 events, connection and latency accounting: a few per change, since the
                 probe stops at the first connection on the new set)
  ... without the probe's connections
                 the same, less the probe's share: a second baseline runs the probe alone
                 against an unchanged service, at the same interval and for as long, and
                 gives the agent's CPU per probe connection above idle; that times the loop's
                 probe connections is taken off. What is left is the cost of the changes
  by thread      the same three readings per thread, in ns of CPU (/proc/PID/task/*/
                 schedstat), printed and written below each table, named by their OS names
                 (nodemesh.threadname; numbered pool workers summed): the core loop
                 (MainThread (core)), the flow-event reader (nm-flow-ev), the Kubernetes
                 watches (nm-k8s-svc, nm-k8s-eps) and delivery (nm-k8s-dlv), the metrics and
                 admin servers; "all threads" is their sum (threads that ended during the
                 loop are missing from it). The whole-agent figures above come from 10 ms
                 ticks: over C changes they are good to 10/C ms (--changes 200: 0.05 ms).
                 A last column counts, the same way, the times each thread was put on a CPU
                 a change (schedstat's third field): each thread a change wakes adds one or
                 more, so it shows the hand-offs between threads; and splits them into
                 wake-ups after a block (voluntary_ctxt_switches in /proc/PID/task/TID/status)
                 and preemptions (nonvoluntary_ctxt_switches: another task took the CPU, on
                 two CPUs often the bench's own map poller or probe). The idle baseline
                 subtracts the core's periodic wake (every 0.25 s while nothing comes) at its
                 idle rate, but a change restarts that wait, so the loop has fewer of them
                 than the baseline takes off: the core's figures a change are low by the
                 difference (the wake costs next to nothing since branch chg5)
                 --profile DIR also writes a `py-spy record` of the loop (collapsed stacks
                 per thread, NODEMESH_BENCH_PROFILE_RATE samples a second, default 200; a
                 profiled run's CPU figures are not a plain run's)
  /metrics       median (min-max) time of --scrapes GETs, and the body size

--resync-seconds (default 3600) is passed to the agent so that its periodic prune of the
kernel maps does not land inside some change loops and not others; the Kubernetes source's
own relist period is its default (300 s). The file source polls files every 0.25 s: that is
most of its change latency.

Network safety: the probe runs only in the lab's client netns (no route off the machine) and
the VIP range is also blackholed there; servers listen only in the lab's backend netns; the
agent hooks only the lab's child cgroup. Everything (agent, lab, pins, temp files) is removed
on exit, and a crashed run's leftovers are reaped by the next (state in /run/nodemesh).
Results: markdown tables on stdout and in bench/results/controlplane.md (--append adds).
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (os.path.join(ROOT, "agent"), os.path.join(ROOT, "tests"),
           os.path.join(ROOT, "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from k8s_source import vm_hwm  # noqa: E402  (bench/ is on the path above)

VIP_RANGE = "10.96.0.0/15"  # 131,072 addresses; blackholed in the lab's client netns
POD_RANGE = "10.128.0.0/10"  # the services' own endpoint addresses; blackholed there too
FILES = 100                 # files of the folder variant
SET_A = (0, 1, 2)           # lab backend indexes every service starts on
SET_B = (3, 4, 5)           # ... and the other set a change moves a service to
STATE_DIR = "/run/nodemesh/bench-controlplane"


def vip_of(i: int) -> str:
    """Service i's VIP: bench/k8s_source.py's service_object() formula (checked in main)."""
    return f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"


def own_addresses(i: int) -> List[str]:
    """Service i's own 3 endpoint addresses: bench/k8s_source.py's slice_object() formula
    (checked in main; in POD_RANGE; distinct across services, as pods' are in a cluster)."""
    return [f"10.{128 + n // 65536}.{n // 256 % 256}.{n % 256}"
            for n in range(i * 3, i * 3 + 3)]


def real_services(n: int, changes: int) -> set:
    """The services that start on the lab's real backends: svc-0 (the probe's baseline) and
    every service the change loop moves (the loop's formula below)."""
    return {0} | {(c * 7919) % n for c in range(changes)}


# -- the probe: runs in the client netns, inside the hooked cgroup ----------------------------

def probe_main() -> int:
    """One JSON command a line on stdin; per command, one "primed" line once a connection
    lands on an old backend, then one result line. Exits at EOF."""
    for line in sys.stdin:
        cmd = json.loads(line)
        host, port = cmd["target"].rsplit(":", 1)
        target = (host, int(port))
        want, old = set(cmd["want"]), set(cmd["old"])
        interval = cmd["interval"]
        started = time.monotonic()
        deadline = started + cmd["max_seconds"]
        primed = False
        n = failed = 0
        errors: Dict[str, int] = collections.Counter()
        others: Dict[str, int] = collections.Counter()
        result = None
        while time.monotonic() < deadline and n < cmd["max_count"]:
            n += 1
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(1.0)
            try:
                s.connect(target)
                landed = time.monotonic()
                s.sendall(b"GET / HTTP/1.0\r\nHost: probe\r\n\r\n")
                data = b""
                while len(data) < 4096:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                name = data.partition(b"\r\n\r\n")[2].decode(errors="replace").strip()
            except OSError as e:
                failed += 1
                errors[type(e).__name__ if not e.errno else os.strerror(e.errno)] += 1
                name = None
            finally:
                s.close()
            if name in old and not primed:
                primed = True
                print(json.dumps({"primed": landed}), flush=True)
            elif name in want:
                if not primed:  # the new set before the change: the state is not as assumed
                    result = {"error": f"{name} answered before the change"}
                else:
                    result = {"landed": landed, "connections": n}
                break
            elif name is not None and name not in old:
                others[name] += 1
            time.sleep(interval)
        if result is None:
            result = {"error": f"no connection reached {sorted(want)} within "
                               f"{time.monotonic() - started:.1f}s ({n} tries)"}
        result.update(failed=failed, errors=dict(errors), others=dict(others), tries=n)
        if not primed:
            print(json.dumps({"primed": None}), flush=True)
        print(json.dumps(result), flush=True)
    return 0


class Probe:
    """The probe process, in a netns (default: the lab's client netns) and a cgroup (default:
    the lab's hooked cgroup; "" for none). bench/run.py points it at each variant's."""

    def __init__(self, lab, interval: float, netns: Optional[str] = None,
                 cgroup: Optional[str] = None, port: int = 80):
        from workloads import spawn
        self.interval = interval
        self.port = port
        self.proc = spawn(lab, [sys.executable, os.path.abspath(__file__), "--probe"],
                          netns or lab.client_ns, lab.cgroup if cgroup is None else cgroup,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[dict]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put({"error": "probe exited"})

    def arm(self, vip: str, want: Sequence[str], old: Sequence[str], max_seconds: float,
            max_count: int = 100_000) -> None:
        self.proc.stdin.write(json.dumps({
            "target": f"{vip}:{self.port}", "want": list(want), "old": list(old),
            "interval": self.interval, "max_seconds": max_seconds,
            "max_count": max_count}) + "\n")
        self.proc.stdin.flush()
        primed = self.lines.get(timeout=max_seconds + 10)
        if primed.get("primed") is None:
            result = self.lines.get(timeout=10)
            raise RuntimeError(f"probe: the old set {sorted(old)} never answered on {vip}: "
                               f"{primed} {result}")

    def result(self, timeout: float) -> dict:
        return self.lines.get(timeout=timeout)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass


# -- the kernel map, read directly -----------------------------------------------------------

class MapReader:
    """Reads one frontend's master entry and backend set from the agent's pinned maps."""

    def __init__(self, bpffs: str):
        from nodemesh.datapath import bpfsys

        self.bpfsys = bpfsys
        self.fds = {name: bpfsys.obj_get(os.path.join(bpffs, name))
                    for name in ("services", "backends")}

    def master(self, vip: str) -> Optional[bytes]:
        from nodemesh.datapath import maps as m
        from nodemesh.reconciler import FrontendKey

        key = m.SvcKey.from_buffer_copy(FrontendKey(m.FAMILY_V4, vip, 80, "TCP").map_key(0))
        value = m.SvcValue()
        if not self.bpfsys.map_lookup(self.fds["services"], key, value):
            return None
        return bytes(value)

    def backends(self, vip: str) -> Optional[frozenset]:
        from nodemesh.datapath import maps as m
        from nodemesh.reconciler import FrontendKey

        fk = FrontendKey(m.FAMILY_V4, vip, 80, "TCP")
        master = m.SvcValue()
        if not self.bpfsys.map_lookup(self.fds["services"],
                                      m.SvcKey.from_buffer_copy(fk.map_key(0)), master):
            return None
        out = set()
        for i in range(1, master.count + 1):
            slot = m.SvcValue()
            key = m.SvcKey.from_buffer_copy(fk.map_key(m.slot_number(master.bank, i)))
            if not self.bpfsys.map_lookup(self.fds["services"], key, slot):
                return None  # mid-switch: read again
            entry = m.BackendEntry()
            if not self.bpfsys.map_lookup(self.fds["backends"], m.u32(slot.backend_id), entry):
                return None
            out.add(m.decode_addr(entry.family, entry.addr))
        return frozenset(out)

    def wait_switch(self, vip: str, before: bytes, want: frozenset, deadline: float,
                    interval: float = 0.0005, batch: bool = True) -> float:
        """Poll until the master entry changed and the set is `want`; the monotonic time.
        With `batch` the polling thread is SCHED_BATCH meanwhile: its wake-ups every 0.5 ms
        then never preempt a running task (the agent's core loop, mid-round, was preempted
        by it 0.2-0.4 times a change quietly, more under load, and paid for the caches it
        evicted); it still runs at once on an idle CPU, and at the next tick otherwise."""
        policy = os.sched_getscheduler(0)
        if batch:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        try:
            return self._wait_switch(vip, before, want, deadline, interval)
        finally:
            if batch:
                os.sched_setscheduler(0, policy, os.sched_param(0))

    def _wait_switch(self, vip: str, before: bytes, want: frozenset, deadline: float,
                     interval: float) -> float:
        last = before
        while True:
            now_master = self.master(vip)
            now = time.monotonic()
            if now_master is not None and now_master != last:
                got = self.backends(vip)
                if got == want:
                    return now
                last = now_master  # another write (not ours yet): wait for the next
            if now > deadline:
                raise RuntimeError(f"{vip}: the kernel map did not switch to {sorted(want)} "
                                   f"(has {sorted(self.backends(vip) or ())})")
            time.sleep(interval)

    def close(self) -> None:
        for fd in self.fds.values():
            self.bpfsys.close(fd)
        self.fds = {}


# -- the sources ------------------------------------------------------------------------------

def service_line(i: int, addresses: Sequence[str]) -> str:
    return (f"  - {{name: svc-{i}, namespace: bench, vip: {vip_of(i)}, ports: [{{port: 80, "
            f"targetPort: 8080}}], backends: [" +
            ", ".join(f"{{address: {a}}}" for a in addresses) + "]}\n")


def replace_file(staging: str, path: str, text: str) -> float:
    """Write then rename into place (as editors and ConfigMaps do); the time of the rename."""
    tmp = os.path.join(staging, os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return time.monotonic()


class FileVariant:
    name = "file"
    title = "file source, one file"

    def __init__(self, workdir: str, n: int, initial: Callable[[int], Sequence[str]]):
        self.n = n
        self.staging = os.path.join(workdir, "staging")
        os.makedirs(self.staging, exist_ok=True)
        self.path = os.path.join(workdir, "services.yaml")
        self.lines = [service_line(i, initial(i)) for i in range(n)]
        replace_file(self.staging, self.path, "services:\n" + "".join(self.lines))

    def args(self) -> List[str]:
        return ["--config", self.path]

    def change(self, i: int, addresses: Sequence[str]) -> float:
        self.lines[i] = service_line(i, addresses)
        return replace_file(self.staging, self.path, "services:\n" + "".join(self.lines))

    def close(self) -> None:
        pass


class DirVariant:
    name = "dir"
    title = f"file source, a folder of {FILES} files"

    def __init__(self, workdir: str, n: int, initial: Callable[[int], Sequence[str]]):
        self.n = n
        self.staging = os.path.join(workdir, "staging")
        os.makedirs(self.staging, exist_ok=True)
        self.folder = os.path.join(workdir, "services.d")
        os.makedirs(self.folder, exist_ok=True)
        self.files: List[List[str]] = [[] for _ in range(FILES)]
        for i in range(n):
            self.files[self.file_of(i)].append(service_line(i, initial(i)))
        for k in range(FILES):
            replace_file(self.staging, self.file_path(k), self.text(k))

    def file_of(self, i: int) -> int:
        return i * FILES // self.n

    def file_path(self, k: int) -> str:
        return os.path.join(self.folder, f"svc-{k:03d}.yaml")

    def text(self, k: int) -> str:
        return ("services:\n" + "".join(self.files[k])) if self.files[k] else "services: []\n"

    def args(self) -> List[str]:
        return ["--config", self.folder]

    def change(self, i: int, addresses: Sequence[str]) -> float:
        k = self.file_of(i)
        first = -(-k * self.n // FILES)  # the first i with file_of(i) == k
        self.files[k][i - first] = service_line(i, addresses)
        return replace_file(self.staging, self.file_path(k), self.text(k))

    def close(self) -> None:
        pass


class K8sVariant:
    name = "kubernetes"
    title = "Kubernetes source (tests/k8s_fake_apiserver.py)"

    def __init__(self, workdir: str, n: int, initial: Callable[[int], Sequence[str]]):
        import k8s_source  # bench/k8s_source.py: the object shapes
        from k8s_fake_apiserver import FakeApiServer

        self.k8s = k8s_source
        self.generation = 0
        self.api = FakeApiServer()
        try:
            with open(os.path.join(ROOT, "tests", "fixtures", "k8s", "node-a.json")) as f:
                self.api.add_node(json.load(f))
            self.api.load(k8s_source.service_object(i) for i in range(n))
            self.api.load(self.slice(i, 0, initial(i)) for i in range(n))
        except BaseException:
            self.api._server.server_close()  # not started: stop() would wait for serve_forever
            raise
        self.api.start()
        self.kubeconfig = self.api.write_kubeconfig(os.path.join(workdir, "kubeconfig"))

    def slice(self, i: int, generation: int, addresses: Sequence[str]) -> dict:
        """bench/k8s_source.py's EndpointSlice, its endpoints on the given addresses."""
        obj = self.k8s.slice_object(i, generation)
        assert len(obj["endpoints"]) == len(addresses), "3 endpoints per slice expected"
        for endpoint, address in zip(obj["endpoints"], addresses):
            endpoint["addresses"] = [address]
        return obj

    def args(self) -> List[str]:
        return ["--source", "kubernetes", "--kubeconfig", self.kubeconfig,
                "--node-name", "node-a"]

    def change(self, i: int, addresses: Sequence[str]) -> float:
        self.generation += 1
        obj = self.slice(i, self.generation, addresses)
        t0 = time.monotonic()
        self.api.put(obj)
        return t0

    def close(self) -> None:
        self.api.stop()


VARIANTS = {"file": FileVariant, "dir": DirVariant, "kubernetes": K8sVariant}


# -- the agent --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




class Agent:
    def __init__(self, lab, workdir: str, state: "State", resync: float):
        self.lab = lab
        self.state = state
        self.resync = resync
        self.port = free_port()
        self.log = os.path.join(workdir, "agent.log")
        self.proc: Optional[subprocess.Popen] = None

    def start(self, extra: Sequence[str]) -> float:
        logf = open(self.log, "w")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nodemesh.cli", "--log-level", "info", "run",
             "--cgroup", self.lab.cgroup, "--bpffs", self.lab.bpffs,
             "--admin-socket", self.lab.admin_socket,
             "--metrics-addr", f"127.0.0.1:{self.port}", "--metrics-detail", "service",
             "--resync-seconds", str(self.resync), *extra],
            stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        logf.close()
        self.state.add_agent(self.proc.pid)
        return started

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    READY_LINE = b"ready:"  # daemon.py logs it right after /readyz turns 200
    READY_POLL_SECONDS = 0.5  # /readyz asked this often anyway (an agent that logs otherwise)

    def wait_ready(self, started: float, timeout: float) -> float:
        """Seconds from start to GET /readyz 200. The agent's log is read every 10 ms and
        /readyz asked once it says "ready:" (or every READY_POLL_SECONDS), not every 10 ms:
        a GET every 10 ms was ~1,500 requests over a 100,000-service start, each taking the
        agent's GIL from the first sync and costing both processes CPU (a kubelet asks every
        10 s). The time is still that of the first 200 seen, within 10 ms of the log line."""
        deadline = started + timeout
        next_poll = 0.0
        offset, tail, logged = 0, b"", False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            with open(self.log, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            logged = logged or self.READY_LINE in tail + chunk
            tail = (tail + chunk)[-len(self.READY_LINE):]
            now = time.monotonic()
            if logged or now >= next_poll:
                next_poll = now + self.READY_POLL_SECONDS
                try:
                    with urllib.request.urlopen(self.url("/readyz"), timeout=1) as r:
                        if r.status == 200:
                            return time.monotonic() - started
                except OSError:
                    pass
            time.sleep(0.01)
        raise RuntimeError(f"agent not ready in {timeout:.0f}s:\n{self.log_tail()}")

    def wait_logged(self, text: bytes, timeout: float) -> bool:
        """Whether the agent's log says `text` within `timeout` seconds (read every 10 ms)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log, "rb") as f:
                if text in f.read():
                    return True
            time.sleep(0.01)
        return False

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log) as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def datapath_seconds(self) -> Optional[float]:
        m = re.search(r"datapath loaded in ([\d.]+)s", self.log_tail(10 ** 6))
        return float(m.group(1)) if m else None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.state.remove_agent(self.proc.pid)


def cpu_seconds(p, children: bool = False) -> float:
    t = p.cpu_times()
    return t.user + t.system + ((t.children_user + t.children_system) if children else 0.0)


TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> Dict[int, float]:
    """Each thread's CPU seconds, by native thread id, to the nanosecond: the first field of
    /proc/PID/task/TID/schedstat (time on a CPU), not stat's 10 ms ticks, so that a thread's
    share of a change resolves to ~0.01 ms even over a short loop."""
    out: Dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # the thread ended
    return out


def thread_runs(pid: int) -> Dict[int, float]:
    """Each thread's count of times it was put on a CPU (schedstat's third field): a thread
    that blocks on every change (a read, a wait, a queue) adds at least one a change, so the
    count a change shows the hand-offs between threads."""
    out: Dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = float(f.read().split()[2])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended
    return out


def thread_switches(pid: int, field: str) -> Dict[int, float]:
    """Each thread's voluntary_ctxt_switches (it blocked: a wait, a read, the GIL, so each is
    followed by a wake-up) or nonvoluntary_ctxt_switches (it was preempted: another task took
    its CPU) from /proc/PID/task/TID/status. The two add up to schedstat's count of times on a
    CPU, and tell a hand-off from a preemption by the bench's own poller or another load."""
    out: Dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(field):
                        out[int(tid)] = float(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue  # the thread ended
    return out


def thread_counts(pid: int) -> Dict[str, Dict[int, float]]:
    """The per-thread counts the by-thread table resolves a change into: times on a CPU,
    and of those, wake-ups after a block and preemptions."""
    return {"runs": thread_runs(pid),
            "woken": thread_switches(pid, "voluntary_ctxt_switches:"),
            "preempted": thread_switches(pid, "nonvoluntary_ctxt_switches:")}


def thread_names(pid: int) -> Dict[int, str]:
    """Native thread id -> name: the main thread (the core loop) is `MainThread (core)`; the
    others carry their OS names (nodemesh.threadname: nm-k8s-svc, nm-flow-ev, ...), which
    /proc/PID/task/TID/comm shows. A thread of another name (a library's) is `comm[tid]`."""
    names: Dict[int, str] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) == pid:
            names[pid] = "MainThread (core)"
            continue
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        names[int(tid)] = comm if comm.startswith("nm-") else f"{comm}[{tid}]"
    return names


def start_profile(folder: Optional[str], pid: int, source: str,
                  n: int) -> Optional[subprocess.Popen]:
    """`py-spy record` of the agent over the change loop (--profile DIR): collapsed stacks per
    thread, active samples only. It samples without stopping the agent, but its figures and
    the CPU of a profiled run are not those of a plain run."""
    if not folder:
        return None
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, f"loop-{source}-{n}.txt")
    rate = os.environ.get("NODEMESH_BENCH_PROFILE_RATE", "200")
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--threads", "--nonblocking",
                             "--rate", rate, "--format", "raw", "--output", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the first change
    return proc


def stop_profile(proc: Optional[subprocess.Popen]) -> None:
    if proc is not None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def thread_group(name: str) -> str:
    """A thread's part of the agent: numbered workers of one pool count together."""
    return re.sub(r"-\d+$", "-*", name)


def thread_delta(before: Dict[int, float], after: Dict[int, float],
                 names: Dict[int, str]) -> Dict[str, float]:
    out: Dict[str, float] = collections.Counter()
    for tid, cpu in after.items():
        out[thread_group(names.get(tid, f"thread {tid}"))] += cpu - before.get(tid, 0.0)
    return dict(out)


# -- leftovers of a crashed run ---------------------------------------------------------------

class State:
    """/run/nodemesh/bench-controlplane/<pid>.json: this run's agents and temp dir, so that a
    later run can end and remove what a killed one left (the lab reaps its own part)."""

    def __init__(self, workdir: str):
        os.makedirs(STATE_DIR, exist_ok=True)
        self.path = os.path.join(STATE_DIR, f"{os.getpid()}.json")
        self.data = {"owner": os.getpid(), "workdir": workdir, "agents": []}
        self._save()

    def _save(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f)
        os.replace(self.path + ".tmp", self.path)

    def add_agent(self, pid: int) -> None:
        self.data["agents"].append(pid)
        self._save()

    def remove_agent(self, pid: int) -> None:
        self.data["agents"] = [p for p in self.data["agents"] if p != pid]
        self._save()

    def remove(self) -> None:
        shutil.rmtree(self.data["workdir"], ignore_errors=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    @staticmethod
    def reap() -> None:
        from nodemesh.lab.topology import orphaned_states

        for path, data in orphaned_states(STATE_DIR, "owner"):  # benches that are gone
            for pid in data.get("agents", []):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read()
                except OSError:
                    continue
                if b"nodemesh.cli" in cmdline and b"/sys/fs/bpf/nmcp" in cmdline:
                    print(f"reaping agent {pid} of a crashed run", file=sys.stderr)
                    os.kill(pid, signal.SIGKILL)
            workdir = data.get("workdir", "")
            if os.path.basename(workdir).startswith("nodemesh-cp-"):
                shutil.rmtree(workdir, ignore_errors=True)
            os.unlink(path)


# -- one run: a source at N services ----------------------------------------------------------

def pct(values: List[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run_one(args, lab, workdir: str, state: State, source: str, n: int) -> dict:
    import psutil

    names_of = {i: lab.backends[i].name for i in range(len(lab.backends))}
    addrs = {i: lab.backends[i].ipv4 for i in range(len(lab.backends))}
    set_a = [addrs[i] for i in SET_A]
    real = real_services(n, args.changes)
    run_dir = tempfile.mkdtemp(prefix=f"{source}-{n}-", dir=workdir)
    t = time.monotonic()
    variant = VARIANTS[source](run_dir, n,
                               lambda i: set_a if i in real else own_addresses(i))
    prepared = time.monotonic() - t
    # What the source holds (the fake API server's 200,000 stored objects at 100,000) lives
    # until the run ends: out of the cyclic collector's reach, or each full collection in
    # this process walks it all (~1 s of CPU, on the CPUs the agent's start competes for; a
    # real API server is another machine). The server's work for each request is unchanged.
    gc.collect()
    gc.freeze()
    print(f"  {source} N={n:,}: source prepared in {prepared:.1f}s", flush=True)
    agent = Agent(lab, run_dir, state, args.resync_seconds)
    probe = None
    reader = None
    try:
        bench0 = cpu_seconds(psutil.Process())
        started = agent.start(variant.args())
        ready = agent.wait_ready(started, timeout=max(120.0, n / 100))
        p = psutil.Process(agent.proc.pid)
        out = {"source": source, "n": n, "ready": ready, "datapath": agent.datapath_seconds(),
               "cpu_ready": cpu_seconds(p, children=True), "rss_ready": p.memory_info().rss,
               "hwm_ready": vm_hwm(p.pid), "cpu_ready_own": cpu_seconds(p),
               "cpu_ready_bench": cpu_seconds(psutil.Process()) - bench0}
        # The agent's own process (its threads, not the compiler or decoding children) is
        # what a first sync waits for on two CPUs: its CPU to ready moves less with the
        # machine's load than the time to ready does.
        print(f"  {source} N={n:,}: ready in {ready:.2f}s, RSS "
              f"{out['rss_ready'] / 2 ** 20:.0f} MiB (VmHWM {out['hwm_ready'] / 2 ** 20:.0f} "
              f"MiB); CPU of the agent's own process to ready {out['cpu_ready_own']:.2f} s, "
              f"with its children {out['cpu_ready']:.2f} s; this bench's process (the "
              f"source's server: {source}) meanwhile {out['cpu_ready_bench']:.2f} s",
              flush=True)
        settled = agent.wait_logged(b"first sync frozen", timeout=60.0)
        out["rss_settled"] = p.memory_info().rss if settled else None
        if settled:
            print(f"  {source} N={n:,}: RSS settled (first sync frozen, freed heap returned) "
                  f"{out['rss_settled'] / 2 ** 20:.0f} MiB", flush=True)

        reader = MapReader(lab.bpffs)
        probe = Probe(lab, args.probe_interval)
        current: Dict[int, tuple] = {}
        to_map: List[float] = []
        to_conn: List[float] = []
        connections: List[int] = []
        probe_failures: List[str] = []
        rng = random.Random(n)
        tries = 0  # the probe's connections during the loop
        names = thread_names(p.pid)
        spy = start_profile(args.profile, p.pid, source, n)
        threads0, counts0 = thread_cpu(p.pid), thread_counts(p.pid)
        cpu0 = cpu_seconds(p)
        loop0 = time.monotonic()
        for c in range(args.changes):
            i = (c * 7919) % n
            old = current.get(i, SET_A)
            new = SET_B if old == SET_A else SET_A
            vip = vip_of(i)
            before = reader.master(vip)
            if before is None or reader.backends(vip) != frozenset(addrs[k] for k in old):
                raise RuntimeError(f"svc-{i} {vip}: the kernel does not hold "
                                   f"{[addrs[k] for k in old]} before change {c}")
            # A random pause first: a change right after the agent's last poll of the files
            # would wait a whole poll interval every time (phase-locked), an unfair p50.
            time.sleep(rng.uniform(0.0, args.jitter))
            bound = min(300.0, max(5.0, ready, 3 * max(to_map, default=0.0)))
            probe.arm(vip, [names_of[k] for k in new], [names_of[k] for k in old], bound)
            t0 = variant.change(i, [addrs[k] for k in new])
            t_map = reader.wait_switch(vip, before, frozenset(addrs[k] for k in new),
                                       deadline=t0 + bound, batch=not args.poller_normal)
            current[i] = new
            res = probe.result(timeout=bound + 15)
            tries += res.get("tries", res.get("connections", 0))
            to_map.append(t_map - t0)
            if "landed" in res:
                to_conn.append(res["landed"] - t0)
                connections.append(res["connections"])
            else:
                probe_failures.append(res.get("error", str(res)))
        loop = time.monotonic() - loop0
        cpu_loop = cpu_seconds(p) - cpu0
        threads_loop = thread_delta(threads0, thread_cpu(p.pid), names)
        counts = thread_counts(p.pid)
        counts_loop = {k: thread_delta(counts0[k], counts[k], names) for k in counts}
        stop_profile(spy)
        idle_for = min(loop, args.idle_seconds)
        # Baseline 1, idle: nothing changes and nothing connects.
        names.update(thread_names(p.pid))
        threads1, counts1, cpu1 = thread_cpu(p.pid), thread_counts(p.pid), cpu_seconds(p)
        time.sleep(idle_for)
        idle_rate = (cpu_seconds(p) - cpu1) / idle_for
        threads_idle = thread_delta(threads1, thread_cpu(p.pid), names)
        counts = thread_counts(p.pid)
        counts_idle = {k: thread_delta(counts1[k], counts[k], names) for k in counts}
        # Baseline 2, the probe alone: nothing changes, the probe connects to an unchanged
        # service at the loop's interval for as long, so every connection costs the agent
        # what it costs in the loop (flow events, connection and latency accounting).
        threads2, counts2, cpu2 = thread_cpu(p.pid), thread_counts(p.pid), cpu_seconds(p)
        t2 = time.monotonic()
        still = current.get(0, SET_A)
        probe.arm(vip_of(0), ["(nobody)"], [names_of[k] for k in still], idle_for)
        res = probe.result(timeout=idle_for + 15)
        probe_for = time.monotonic() - t2
        probe_cpu = cpu_seconds(p) - cpu2
        threads_probe = thread_delta(threads2, thread_cpu(p.pid), names)
        counts = thread_counts(p.pid)
        counts_probe = {k: thread_delta(counts2[k], counts[k], names) for k in counts}
        probe_tries = res.get("tries", 0)
        # The agent's CPU per probe connection, above idle (0 if the probe made none).
        per_try = ((probe_cpu - idle_rate * probe_for) / probe_tries) if probe_tries else 0.0
        out.update(to_map=to_map, to_conn=to_conn, probe_failures=probe_failures,
                   connections=connections, loop=loop, idle_rate=idle_rate,
                   cpu_per_change=(cpu_loop - idle_rate * loop) / args.changes,
                   tries=tries, probe_tries=probe_tries, probe_for=probe_for,
                   per_try=per_try,
                   cpu_change_only=(cpu_loop - idle_rate * loop - per_try * tries)
                   / args.changes)
        # Per thread: the loop's CPU, its idle rate, and what the probe's connections cost.
        per_thread = {}
        for g in sorted(set(threads_loop) | set(threads_idle) | set(threads_probe)):
            rate = threads_idle.get(g, 0.0) / idle_for
            g_try = ((threads_probe.get(g, 0.0) - rate * probe_for) / probe_tries
                     if probe_tries else 0.0)
            per_thread[g] = {"loop": threads_loop.get(g, 0.0), "idle_rate": rate,
                             "probe_per_try": g_try,
                             "change_only": (threads_loop.get(g, 0.0) - rate * loop
                                             - g_try * tries) / args.changes}
            # The same for the times the thread was put on a CPU, and of those its wake-ups
            # after a block and its preemptions, a change.
            for k in counts_loop:
                k_rate = counts_idle[k].get(g, 0.0) / idle_for
                per_try_k = ((counts_probe[k].get(g, 0.0) - k_rate * probe_for) / probe_tries
                             if probe_tries else 0.0)
                per_thread[g][f"{k}_per_change"] = (counts_loop[k].get(g, 0.0) - k_rate * loop
                                                    - per_try_k * tries) / args.changes
        out["threads"] = per_thread
        print(f"  {source} N={n:,}: {args.changes} changes in {loop:.1f}s; change->map p50 "
              f"{statistics.median(to_map) * 1000:.0f} ms; CPU/change "
              f"{out['cpu_per_change'] * 1000:.2f} ms with the probe's {tries} connections, "
              f"{out['cpu_change_only'] * 1000:.2f} ms without "
              f"({per_try * 1e6:.0f} us a connection)", flush=True)
        print(thread_table(per_thread, args.changes, tries), flush=True)

        times, sizes = [], []
        for _ in range(args.scrapes):
            t = time.perf_counter()
            with urllib.request.urlopen(agent.url("/metrics"), timeout=120) as r:
                body = r.read()
            times.append(time.perf_counter() - t)
            sizes.append(len(body))
        out.update(scrape=times, scrape_bytes=statistics.median(sizes),
                   hwm_end=vm_hwm(p.pid), rss_end=p.memory_info().rss)
        if agent.proc.poll() is not None:
            raise RuntimeError(f"agent exited during the run:\n{agent.log_tail()}")
        return out
    finally:
        if probe is not None:
            probe.close()
            if probe.proc in lab.processes:
                lab.processes.remove(probe.proc)
        if reader is not None:
            reader.close()
        agent.stop()
        if args.logs:
            os.makedirs(args.logs, exist_ok=True)
            shutil.copy(agent.log, os.path.join(args.logs, f"agent-{source}-{n}.log"))
        variant.close()
        from nodemesh.datapath.loader import cleanup
        cleanup(lab.bpffs)
        shutil.rmtree(run_dir, ignore_errors=True)


# -- output -----------------------------------------------------------------------------------

def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x >= 0.0995 else f"{x * 1000:.1f} ms"


def cpu_text(per_change: float, changes: int) -> str:
    """psutil's CPU times tick in 10 ms (USER_HZ): below two ticks per loop, say so."""
    floor = 2 * 0.01 / changes
    return f"< {floor * 1000:.1f} ms" if per_change < floor else ms(per_change)


def thread_table(per_thread: Dict[str, dict], changes: int, tries: int) -> str:
    """Per thread (numbered pool workers together): CPU over the change loop, its idle rate,
    the CPU a probe connection costs it, and what is left per change."""
    lines = [f"| thread | CPU over the loop | idle | per probe connection | per change, "
             f"without the probe's {tries:,} connections | times on a CPU a change, without "
             f"the probe's | of which woken / preempted |", "|---|---|---|---|---|---|---|"]
    total = {k: sum(t.get(k, 0.0) for t in per_thread.values())
             for k in ("loop", "idle_rate", "probe_per_try", "change_only", "runs_per_change",
                       "woken_per_change", "preempted_per_change")}
    for g, t in [*sorted(per_thread.items(), key=lambda kv: -kv[1]["loop"]),
                 ("all threads", total)]:
        if t["loop"] < 0.0005 and abs(t["change_only"]) < 0.00001:
            continue  # nothing to say
        lines.append(f"| {g} | {t['loop']:.3f} s | {t['idle_rate'] * 100:.2f} % | "
                     f"{t['probe_per_try'] * 1e6:.1f} us | {t['change_only'] * 1000:.3f} ms | "
                     f"{t.get('runs_per_change', 0.0):.2f} | "
                     f"{t.get('woken_per_change', 0.0):.2f} / "
                     f"{t.get('preempted_per_change', 0.0):.2f} |")
    return "\n".join(lines)


def row(r: dict, changes: int) -> str:
    mib = 2 ** 20
    if "error" in r:
        return f"| {r['n']:,} | failed: {r['error']} |" + " |" * 10
    conn = (f"{ms(statistics.median(r['to_conn']))} / {ms(pct(r['to_conn'], 99))}"
            if r["to_conn"] else "n/a")
    if r["probe_failures"]:
        conn += f" ({len(r['probe_failures'])} of {changes} not seen)"
    dp = f" ({r['datapath']:.2f} s datapath)" if r.get("datapath") is not None else ""
    settled = (f"{r['rss_settled'] / mib:.0f} MiB" if r.get("rss_settled") is not None
               else "n/a")
    return (f"| {r['n']:,} | {r['ready']:.2f} s{dp} | {r['cpu_ready']:.2f} s | "
            f"{r['rss_ready'] / mib:.0f} MiB | {settled} | {r['hwm_end'] / mib:.0f} MiB | "
            f"{ms(statistics.median(r['to_map']))} / {ms(pct(r['to_map'], 99))} "
            f"(max {ms(max(r['to_map']))}) | {conn} | "
            f"{cpu_text(r['cpu_per_change'], changes)} | "
            f"{cpu_text(r['cpu_change_only'], changes)} | {r['idle_rate'] * 100:.1f} % | "
            f"{ms(statistics.median(r['scrape']))} ({ms(min(r['scrape']))}–"
            f"{ms(max(r['scrape']))}) | {r['scrape_bytes'] / 1024:,.0f} KiB |")


HEADER = ("| services | start → /readyz 200 | agent CPU to ready | RSS ready | RSS settled "
          "| peak RSS (VmHWM) "
          "| change → kernel map p50 / p99 | change → first connection on the new set "
          "p50 / p99 | agent CPU / change | agent CPU / change without the probe's connections "
          "| agent idle CPU | /metrics scrape median (min–max) "
          "| /metrics size |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table(source: str, results: List[dict], args) -> str:
    text = (f"### {VARIANTS[source].title}\n\n{HEADER}\n" +
            "\n".join(row(r, args.changes) for r in results) + "\n")
    for r in results:
        if "threads" in r:
            text += (f"\nAgent CPU by thread at {r['n']:,} ({r['loop']:.1f} s loop; baselines "
                     f"{min(r['loop'], args.idle_seconds):.1f} s idle, {r['probe_for']:.1f} s "
                     f"of the probe alone, {r['probe_tries']:,} connections, "
                     f"{r['per_try'] * 1e6:.0f} us of agent CPU each):\n\n"
                     + thread_table(r["threads"], args.changes, r["tries"]) + "\n")
    return text


def main() -> int:
    if len(sys.argv) == 2 and sys.argv[1] == "--probe":
        return probe_main()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--sizes", default=None,
                    help="comma-separated service counts (default 1,10000; --full adds 100000)")
    ap.add_argument("--full", action="store_true", help="sizes 1,10000,100000")
    ap.add_argument("--sources", default="file,dir,kubernetes")
    ap.add_argument("--changes", type=int, default=30)
    ap.add_argument("--scrapes", type=int, default=5)
    ap.add_argument("--probe-interval", type=float, default=0.002, metavar="SECONDS")
    ap.add_argument("--poller-normal", action="store_true",
                    help="poll the kernel map as a SCHED_OTHER thread (before 2026-11-29 "
                         "18:00: its wake-ups preempted the agent); default SCHED_BATCH")
    ap.add_argument("--jitter", type=float, default=0.5, metavar="SECONDS",
                    help="random pause (0 to this) before each change, against phase-locking "
                         "with the file source's 0.25 s polls")
    ap.add_argument("--idle-seconds", type=float, default=30.0,
                    help="longest idle baseline (scaled to the loop's duration)")
    ap.add_argument("--resync-seconds", type=float, default=3600.0)
    ap.add_argument("--output", default=os.path.join(ROOT, "bench", "results",
                                                     "controlplane.md"))
    ap.add_argument("--logs", metavar="DIR", help="keep each run's agent log here")
    ap.add_argument("--profile", metavar="DIR",
                    help="py-spy record the agent over each change loop into DIR "
                         "(.venv/bin/pip install py-spy; changes the CPU figures)")
    ap.add_argument("--append", action="store_true", help="add to --output, not replace it")
    args = ap.parse_args()
    sizes = [int(s) for s in (args.sizes or ("1,10000,100000" if args.full else "1,10000"))
             .split(",")]
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    for s in sources:
        if s not in VARIANTS:
            ap.error(f"--sources: {s!r} is not one of {', '.join(VARIANTS)}")
    if any(not 1 <= n <= 131072 for n in sizes):
        ap.error("--sizes: 1 to 131,072 services (the VIP range 10.96.0.0/15)")
    if args.changes < 1:
        ap.error("--changes: at least 1")
    if os.geteuid() != 0:
        print("this benchmark needs root (netns, cgroups, BPF)", file=sys.stderr)
        return 1
    try:
        import k8s_source
        assert k8s_source.service_object(70000)["spec"]["clusterIP"] == vip_of(70000)
        assert [e["addresses"][0] for e in k8s_source.slice_object(70000)["endpoints"]] == \
            own_addresses(70000)
    except ImportError:
        pass  # the kubernetes variant reports it

    from nodemesh.datapath.loader import cleanup
    from nodemesh.lab.topology import new_lab, sh

    State.reap()
    load_start = os.getloadavg()[0]
    workdir = tempfile.mkdtemp(prefix="nodemesh-cp-")
    state = State(workdir)
    lab = None
    results: Dict[str, List[dict]] = {s: [] for s in sources}
    try:
        import sigterm  # bench/: a kill tears the lab down too
        sigterm.exit_on_sigterm()
        lab = new_lab("nmcp", backends=len(SET_A) + len(SET_B))
        sh(f"ip -n {lab.client_ns} route replace blackhole {VIP_RANGE}")
        sh(f"ip -n {lab.client_ns} route replace blackhole {POD_RANGE}")
        lab.start_servers(tcp_ports=(8080,), udp_ports=())
        print(f"lab {lab.prefix}: cgroup {lab.cgroup}, pins {lab.bpffs}", flush=True)
        for source in sources:
            for n in sizes:
                try:
                    results[source].append(run_one(args, lab, workdir, state, source, n))
                except Exception as e:  # one variant failing must not lose the others
                    traceback.print_exc()
                    message = str(e).strip().splitlines()
                    results[source].append({"n": n, "error": " ".join(message[:1])[:200] or
                                            type(e).__name__})
    finally:
        if lab is not None:
            cleanup(lab.bpffs)
            lab.destroy()
        state.remove()

    head = (f"## Control plane, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            f"kernel {os.uname().release}, {os.cpu_count()} CPUs, Python "
            f"{sys.version.split()[0]}; `bench/controlplane.py "
            f"{' '.join(sys.argv[1:])}`; {args.changes} changes per row (one service moved "
            f"between two sets of 3 real backends each), 3 backends per service, "
            f"--metrics-detail service, probe every {args.probe_interval * 1000:g} ms; "
            f"1-min load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at "
            f"the end (a load above the CPU count means other work shared the machine). "
            f"Definitions: bench/controlplane.py's docstring.\n")
    text = head + "\n" + "\n".join(table(s, results[s], args) for s in sources)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    if args.append and os.path.exists(args.output):
        with open(args.output) as f:
            text = f.read().rstrip("\n") + "\n\n" + text
    elif not text.startswith("# "):
        text = "# nodemesh control-plane benchmarks\n\n" + text
    with open(args.output, "w") as f:
        f.write(text)
    print("\n" + text)
    return 0 if all("error" not in r for rs in results.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
