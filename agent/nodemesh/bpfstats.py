"""What the datapath costs, measured by the kernel, and what the agent itself costs.

BPF run-time statistics (run count and nanoseconds per program) are off by default in the
kernel: every program run then reads the clock twice. The agent turns them on with
BPF_ENABLE_STATS, which returns a file descriptor: the statistics stay on while any holder
keeps one open, so they end with the agent (even a killed one) and never depend on a sysctl
someone else may reset. Program counters come from /proc/self/fdinfo of the program fds the
agent loaded, map memory from the map fds' `memlock` (what the kernel charges the map).

Self metrics come from psutil (threads, fds, CPU, RSS), next to prometheus_client's standard
process collector (process_*).
"""
from __future__ import annotations

import ctypes
import logging
import os
import time
from typing import Dict, Iterator, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .datapath import bpfsys

log = logging.getLogger(__name__)

ENABLE_STATS = 32      # enum bpf_cmd: BPF_ENABLE_STATS
STATS_RUN_TIME = 0     # enum bpf_stats_type: BPF_STATS_RUN_TIME


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


def enable_stats() -> Optional[int]:
    """An fd that keeps BPF run-time statistics on while it is open; None if the kernel
    refuses (older than 5.8, or no CAP_SYS_ADMIN): the cost metrics are then absent."""
    try:
        return bpfsys.bpf(ENABLE_STATS, _EnableStatsAttr(type=STATS_RUN_TIME))
    except bpfsys.BPFError as e:
        log.warning("BPF run-time statistics unavailable (%s): no datapath cost metrics", e)
        return None


def fdinfo(fd: int) -> Dict[str, int]:
    """The numeric fields of /proc/self/fdinfo/<fd> (run_time_ns, run_cnt, memlock ...)."""
    out: Dict[str, int] = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            value = value.strip()
            if value.isdigit():
                out[key] = int(value)
    return out


class KernelCost:
    """Holds the statistics fd and reads program runs and map memory."""

    def __init__(self, programs: Dict[str, int], maps: Dict[str, int], enable: bool = True):
        self.programs = programs  # hook name -> program fd
        self.maps = maps          # map name -> map fd
        self.stats_fd = enable_stats() if enable else None
        self.since = time.time()

    def close(self) -> None:
        bpfsys.close(self.stats_fd)
        self.stats_fd = None

    def program_stats(self) -> Dict[str, Dict[str, int]]:
        """{hook: {"runs", "run_ns"}}, since this agent loaded the programs."""
        out = {}
        for name, fd in self.programs.items():
            info = fdinfo(fd)
            out[name] = {"runs": info.get("run_cnt", 0), "run_ns": info.get("run_time_ns", 0)}
        return out

    def map_memory(self) -> Dict[str, int]:
        return {name: fdinfo(fd).get("memlock", 0) for name, fd in self.maps.items()}


def ns_per_connection(programs: Dict[str, Dict[str, int]], connections: int) -> Optional[float]:
    """Kernel time of every nodemesh program divided by the connections they balanced."""
    if connections <= 0:
        return None
    return sum(p["run_ns"] for p in programs.values()) / connections


class CostCollector(Collector):
    def __init__(self, cost: KernelCost):
        self.cost = cost

    def collect(self) -> Iterator[Metric]:
        runs = CounterMetricFamily("nodemesh_bpf_program_runs",
                                   "Runs of each nodemesh BPF program (BPF_ENABLE_STATS, held "
                                   "by the agent), since the agent loaded it", labels=["program"])
        secs = CounterMetricFamily("nodemesh_bpf_program_run_seconds",
                                   "Kernel time spent in each nodemesh BPF program",
                                   labels=["program"])
        if self.cost.stats_fd is not None:
            for name, st in self.cost.program_stats().items():
                runs.add_metric([name], st["runs"])
                secs.add_metric([name], st["run_ns"] / 1e9)
        yield runs
        yield secs
        mem = GaugeMetricFamily("nodemesh_bpf_map_memory_bytes",
                                "Memory the kernel charges each BPF map (memlock)",
                                labels=["map"])
        for name, n in self.cost.map_memory().items():
            mem.add_metric([name], n)
        yield mem


class SelfCollector(Collector):
    """The agent process through psutil."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process(os.getpid())

    def collect(self) -> Iterator[Metric]:
        with self.proc.oneshot():
            cpu = self.proc.cpu_times()
            threads = self.proc.num_threads()
            fds = self.proc.num_fds()
            rss = self.proc.memory_info().rss
        c = CounterMetricFamily("nodemesh_agent_cpu_seconds", "CPU time of the agent process",
                                labels=["mode"])
        c.add_metric(["user"], cpu.user)
        c.add_metric(["system"], cpu.system)
        yield c
        yield GaugeMetricFamily("nodemesh_agent_threads", "Threads of the agent process",
                                value=threads)
        yield GaugeMetricFamily("nodemesh_agent_open_fds", "Open file descriptors of the agent",
                                value=fds)
        yield GaugeMetricFamily("nodemesh_agent_resident_memory_bytes",
                                "Resident memory of the agent process", value=rss)
