"""Test helpers for root tests: a lab with servers, and a real agent process serving it."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Dict, Iterable, Optional

from prometheus_client.parser import text_string_to_metric_families

from nodemesh import api
from nodemesh.lab.topology import Lab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Stretches every wait in the tests (never a statistical bound) on slow machines: `make
# vm-test` runs the suite under software emulation, about ten times slower, and sets 5.
TIME_SCALE = float(os.environ.get("NODEMESH_TEST_TIME_SCALE", "1"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_yaml(name: str, vip: str, backends: Iterable[str], *, port: int = 80,
                 target: int = 8080, protocol: str = "TCP", algorithm: str = "random",
                 weights: Optional[Iterable[int]] = None, namespace: str = "test",
                 extra_ports: str = "") -> str:
    backends = list(backends)
    weights = list(weights) if weights is not None else [1] * len(backends)
    lines = [f"  - name: {name}", f"    namespace: {namespace}", f"    vip: {vip}",
             f"    algorithm: {algorithm}", "    ports:",
             f"      - {{port: {port}, targetPort: {target}, protocol: {protocol}}}"]
    if extra_ports:
        lines.append(extra_ports)
    lines.append("    backends:" + ("" if backends else " []"))
    lines += [f"      - {{address: {a}, weight: {w}}}" for a, w in zip(backends, weights)]
    return "\n".join(lines) + "\n"


def config_yaml(*services: str) -> str:
    return "services:\n" + "".join(services) if services else "services: []\n"


class AgentProcess:
    """`nodemesh run` as a subprocess, hooked to the lab's cgroup, pins in the lab's folder."""

    def __init__(self, lab: Lab, workdir: str):
        self.lab = lab
        self.config = os.path.join(workdir, "services.yaml")
        self.log = os.path.join(workdir, "agent.log")
        self.metrics_port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.prefix: list = []  # argv the agent runs under (setpriv, say)

    def write_config(self, text: str) -> None:
        # Write then rename, as editors and ConfigMaps do: the agent never reads half a file.
        tmp = self.config + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.config)

    def start(self, wait: bool = True, extra: Iterable[str] = ()) -> "AgentProcess":
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "nodemesh.cli", "--log-level", "debug", "run",
             "--config",
             self.config, "--cgroup", self.lab.cgroup, "--bpffs", self.lab.bpffs,
             "--admin-socket", self.lab.admin_socket, "--metrics-addr",
             f"127.0.0.1:{self.metrics_port}", "--resync-seconds", "5",
             "--metrics-detail", "backend", *extra],
            stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        logf.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        timeout *= TIME_SCALE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n"
                                     f"{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url("/readyz"), timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"agent not ready in {timeout}s:\n{self.log_text()[-3000:]}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def log_text(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except OSError:
            return ""

    def metrics(self) -> Dict[tuple, float]:
        """{(sample name, sorted label items): value}"""
        with urllib.request.urlopen(self.url("/metrics"), timeout=5) as r:
            text = r.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels) -> float:
        want = tuple(sorted(labels.items()))
        return self.metrics().get((name, want), 0.0)

    def status(self) -> dict:
        return api.get(self.lab.admin_socket, "/v1/status")

    def services(self) -> list:
        return api.get(self.lab.admin_socket, "/v1/services")

    def wait_for(self, predicate, timeout: float = 5.0, what: str = "condition"):
        timeout *= TIME_SCALE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                             f"{self.log_text()[-2000:]}")

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=15 * TIME_SCALE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "nodemesh.cli", *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=120 * TIME_SCALE)
    if check and res.returncode != 0:
        raise AssertionError(f"nodemesh {' '.join(args)} failed: {res.stderr}")
    return res


def bpftool_json(*args: str):
    res = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True)
    return json.loads(res.stdout.strip() or "null")


# -- workload cgroups and their clients (the policy and identity tests) ----------------------
HOLDER = os.path.join(ROOT, "tests", "conn_holder.py")


def holder_client(lab: Lab, cgroup: str, target: str):
    """tests/conn_holder.py in the lab's client netns, inside `cgroup` (joined before `ip netns
    exec`, which remounts /sys). Returns say(line) -> the holder's JSON answer."""
    import shlex

    cmd = (f"echo $$ > {shlex.quote(os.path.join(cgroup, 'cgroup.procs'))} && exec ip netns "
           f"exec {lab.client_ns} {shlex.quote(sys.executable)} {HOLDER} {target}")
    proc = subprocess.Popen(["sh", "-c", cmd], start_new_session=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    lab.processes.append(proc)

    def say(line: str):
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())
    return say


def remove_workload_cgroups(lab: Lab, paths: Iterable[str]) -> None:
    """Stop every process of the lab (the test's alone), then remove `paths`, deepest first;
    a cgroup lingers a moment after its last process exits."""
    for proc in list(lab.processes):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    remove_cgroups(paths)


def remove_cgroups(paths: Iterable[str]) -> None:
    """Remove the cgroups `paths`, deepest first, once their processes are gone: a killed
    process leaves its cgroup a moment later, so each removal is retried for up to a second."""
    for path in sorted(set(paths), key=len, reverse=True):
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)


def lab_per_module():
    """`lab` and `loaded` fixtures of module scope, over conftest's `module_lab` and
    `module_loaded`: one lab and one load of the programs for a whole test module, whose tests
    each set the services (and policies) they need. At a module's top level:
    `lab, loaded = lab_per_module()`."""
    import pytest

    @pytest.fixture(scope="module")
    def lab(module_lab):
        return module_lab

    @pytest.fixture(scope="module")
    def loaded(module_loaded):
        return module_loaded

    return lab, loaded
