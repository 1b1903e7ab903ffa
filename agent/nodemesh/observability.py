"""The observability features wired into the agent in one place: flow events (flows), kernel
latency per backend (latency), datapath cost and self metrics (bpfstats).

Agent.run calls start() once the programs are loaded and close() on the way out; the admin
API reads flows through `flow_log` and the cost through status().
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from . import bpfstats, flows
from .latency import LatencyCollector

if TYPE_CHECKING:
    from .daemon import Agent


@dataclass(frozen=True)
class Settings:
    flow_events_rate: int = flows.DEFAULT_RATE    # per second per CPU; 0: off
    flow_events_burst: int = flows.DEFAULT_BURST
    backend_latency: bool = True
    bpf_stats: bool = False  # BPF_ENABLE_STATS: every BPF program on the node reads the clock


class FlowCollector(Collector):
    def __init__(self, agent: "Agent"):
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        maps = self.agent.maps
        if maps is None:
            return
        b = flows.budget(maps)
        sent = CounterMetricFamily("nodemesh_flow_events",
                                   "Flow events the datapath put on the ring buffer")
        sent.add_metric([], b["sent"])
        yield sent
        lost = CounterMetricFamily("nodemesh_flow_events_lost",
                                   "Flow events not sent: rate_limit (the per-CPU token "
                                   "bucket refused them), ring_full (the agent fell behind)",
                                   labels=["reason"])
        lost.add_metric(["rate_limit"], b["lost_rate_limit"])
        lost.add_metric(["ring_full"], b["lost_ring_full"])
        yield lost


class Observability:
    def __init__(self, agent: "Agent", settings: Settings, per_backend: bool):
        self.agent = agent
        self.settings = settings
        self.flow_log = flows.FlowLog()
        self.cost: Optional[bpfstats.KernelCost] = None
        self._connections_at_start = 0
        registry = agent.registry
        ProcessCollector(registry=registry)
        registry.register(bpfstats.SelfCollector())
        registry.register(LatencyCollector(agent, per_backend))
        registry.register(FlowCollector(agent))

    def start(self) -> None:
        """After the load: set the datapath's switches, hold the run-time statistics on,
        start reading flow events."""
        agent = self.agent
        assert agent.maps is not None and agent.datapath is not None
        s = self.settings
        flows.configure(agent.maps, s.flow_events_rate, s.flow_events_burst, s.backend_latency)
        self._connections_at_start = self._connections()
        self.cost = bpfstats.KernelCost(agent.datapath.programs, agent.maps.fds, s.bpf_stats)
        agent.registry.register(bpfstats.CostCollector(self.cost))
        ring_fd = agent.datapath.flow_ringbuf_fd
        assert ring_fd is not None
        names = flows.ServiceNames(lambda: agent.snapshot)
        agent.workers.spawn("flow-events", lambda: flows.read(ring_fd, self.flow_log, names,
                                                               agent._stop))

    def _connections(self) -> int:
        maps = self.agent.maps
        if maps is None:
            return 0
        return sum(s["connections"] + s["no_backend"]
                   for s in maps.percpu_sums("svc_stats").values())

    def status(self) -> Dict[str, Any]:
        """The datapath's cost since this agent loaded its programs."""
        if self.cost is None or self.cost.stats_fd is None:
            return {"enabled": False}
        programs = self.cost.program_stats()
        connections = self._connections() - self._connections_at_start
        per_conn = bpfstats.ns_per_connection(programs, connections)
        return {"enabled": True, "connections": connections,
                "kernel_ns_per_connection": None if per_conn is None else round(per_conn, 1),
                "programs": {name: dict(p, ns_per_run=round(p["run_ns"] / p["runs"], 1)
                                        if p["runs"] else None)
                             for name, p in programs.items()},
                "flow_events": flows.budget(self.agent.maps) if self.agent.maps else {}}

    def close(self) -> None:
        if self.cost is not None:
            self.cost.close()
