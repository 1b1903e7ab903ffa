"""`nodemesh demo`: three backends in network namespaces behind a VIP, balanced in the kernel.

Builds a lab (agent/lab/topology.py), blackholes the lab's VIP and backend ranges in the host,
runs a real agent with a config file, sends connections from a client namespace inside the
lab's cgroup, and shows where they went, as counted by the client and by the kernel. Then it
keeps the agent serving metrics until Ctrl-C (or exits at once with --once) and removes
everything it made.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List

from .lab.topology import Lab, new_lab

DEMO_SOCKET = "/run/nodemesh/demo.sock"


def _config(lab: Lab, weights: List[int]) -> str:
    b = lab.backends
    lines = ["# written by `nodemesh demo`", "services:",
             "  - name: web", "    namespace: demo", f"    vip: {lab.vip4(10)}",
             "    algorithm: random", "    ports:",
             "      - {name: http, port: 80, targetPort: 8080, protocol: TCP}",
             "      - {name: dns, port: 53, targetPort: 5353, protocol: UDP}",
             "    backends:"]
    lines += [f"      - {{address: {be.ipv4}, weight: {w}}}" for be, w in zip(b, weights)]
    lines += ["  - name: web-rr", "    namespace: demo", f"    vip: {lab.vip4(11)}",
              "    algorithm: round_robin", "    ports:",
              "      - {port: 80, targetPort: 8080}", "    backends:"]
    lines += [f"      - {{address: {be.ipv4}}}" for be in b]
    lines += ["  - name: web6", "    namespace: demo", f"    vip: {lab.vip6(10)}",
              "    ports:", "      - {port: 80, targetPort: 8080}", "    backends:"]
    lines += [f"      - {{address: {be.ipv6}}}" for be in b]
    return "\n".join(lines) + "\n"


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the agent did not become ready in time")


def _bar(n: int, total: int, width: int = 40) -> str:
    return "#" * round(width * n / total) if total else ""


def _show_split(title: str, result: Dict, weights: Dict[str, int]) -> None:
    total = sum(result["backends"].values())
    wsum = sum(weights.values())
    print(f"\n{title}: {result['ok']} ok, {result['failed']} failed"
          + (f" {result['errors']}" if result["errors"] else ""))
    for name in sorted(weights):
        n = result["backends"].get(name, 0)
        print(f"  {name}  {n:4d}  {100 * n / total if total else 0:5.1f}%  "
              f"(weight {weights[name]}, expected {100 * weights[name] / wsum:5.1f}%)  "
              f"{_bar(n, total)}")


def run(once: bool = False, metrics_addr: str = "127.0.0.1:9464", connections: int = 300) -> int:
    if os.geteuid() != 0:
        print("nodemesh demo needs root (network namespaces, cgroups, BPF)", file=sys.stderr)
        return 1
    weights = [1, 2, 3]
    lab = new_lab("nmd", backends=3, host_blackhole=True)
    agent = None
    stop = {"now": False}
    try:
        lab.start_servers(tcp_ports=(8080,), udp_ports=(5353,))
        workdir = tempfile.mkdtemp(prefix="nodemesh-demo-")
        cfg = os.path.join(workdir, "services.yaml")
        with open(cfg, "w") as f:
            f.write(_config(lab, weights))
        print(f"lab {lab.prefix}: backends {', '.join(b.ipv4 for b in lab.backends)} in netns "
              f"{', '.join(b.netns for b in lab.backends)}; client netns {lab.client_ns}; "
              f"hooks on cgroup {lab.cgroup}")
        print(f"config: {cfg}")
        agent = subprocess.Popen(
            [sys.executable, "-m", "nodemesh.cli", "run", "--config", cfg, "--cgroup", lab.cgroup,
             "--bpffs", lab.bpffs, "--admin-socket", DEMO_SOCKET, "--metrics-addr",
             metrics_addr, "--metrics-detail", "backend"], start_new_session=True)
        _wait_ready(f"http://{metrics_addr}/readyz", agent)
        print(f"agent ready (pid {agent.pid})")

        vip = lab.vip4(10)
        by_name = {b.name: w for b, w in zip(lab.backends, weights)}
        r = lab.client(["tcp", "--target", f"{vip}:80", "--count", str(connections),
                        "--concurrency", "4"])
        _show_split(f"TCP {vip}:80 (weighted random), {connections} connections", r, by_name)
        r = lab.client(["udp", "--target", f"{vip}:53", "--count", "100"])
        _show_split(f"UDP {vip}:53 (unconnected sendto), 100 datagrams; replies from a "
                    f"backend address: {r['source_mismatch']}", r, by_name)
        r = lab.client(["tcp", "--target", f"{lab.vip4(11)}:80", "--count", "30"])
        _show_split(f"TCP {lab.vip4(11)}:80 (round robin), 30 connections", r,
                    {b.name: 1 for b in lab.backends})
        r = lab.client(["tcp", "--target", f"[{lab.vip6(10)}]:80", "--count", "60"])
        _show_split(f"TCP [{lab.vip6(10)}]:80 (IPv6), 60 connections", r,
                    {b.name: 1 for b in lab.backends})

        with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        print("\nwhat the kernel counted (from the metrics endpoint):")
        for line in text.splitlines():
            if line.startswith(("nodemesh_backend_connections_total",
                                "nodemesh_service_connections_total", "nodemesh_services ")):
                print("  " + line)
        print(f"\nmetrics:  http://{metrics_addr}/metrics")
        print(f"status:   nodemesh status --admin-socket {DEMO_SOCKET}")
        print(f"services: nodemesh services --admin-socket {DEMO_SOCKET}")
        if once:
            return 0
        print("\nserving; press Ctrl-C to stop and remove everything the demo made")
        signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        while not stop["now"] and agent.poll() is None:
            time.sleep(0.5)
        return 0
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.kill()
        lab.destroy()  # namespaces, cgroup, and the host blackhole routes
        print("demo cleaned up")
