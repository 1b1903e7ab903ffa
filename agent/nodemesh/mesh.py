"""Node-wide mesh settings: the redirect to a node-local proxy and same-node acceleration.

The datapath is in bpf/lib/proxy.h and bpf/lib/accel.h. The agent writes the settings once,
at start, into the one-element `mesh_config` map (before the hooks attach), and reads the
acceleration counters at scrape time. Which services go to the proxy is per frontend, in the
master entry the reconciler writes (Service.proxy_port).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .datapath import bpfsys
from .datapath import maps as m
from .datapath.loader import DatapathError, cgroup2_root, check_cgroup

NO_UID = 0xFFFFFFFF
DEFAULT_PROXY_UID = 1337  # Istio's and Linkerd's proxy uid
# Measured in bench/accel.py (bench/results/accel-*.md): off unless asked for, see README.
DEFAULT_ACCELERATE_LOCAL = False


@dataclass(frozen=True)
class MeshOptions:
    proxy_port: int = 0                   # node default proxy port; 0: no redirect by default
    proxy_uid: Optional[int] = DEFAULT_PROXY_UID  # never redirected; None: no uid exemption
    proxy_cgroup: Optional[str] = None    # cgroup v2 folder whose tasks are never redirected
    accelerate_local: bool = DEFAULT_ACCELERATE_LOCAL


def mesh_config(opts: MeshOptions) -> m.MeshConfig:
    """The mesh_config element for opts; DatapathError names a bad --proxy-cgroup."""
    cfg = m.MeshConfig(proxy_uid=NO_UID if opts.proxy_uid is None else opts.proxy_uid,
                       proxy_port=m.port_be(opts.proxy_port),
                       accelerate=1 if opts.accelerate_local else 0)
    if opts.proxy_cgroup:
        try:
            real = check_cgroup(opts.proxy_cgroup)
        except DatapathError as e:
            raise DatapathError(str(e).replace("--cgroup", "--proxy-cgroup")) from None
        rel = os.path.relpath(real, cgroup2_root())
        level = 0 if rel == "." else len(rel.split(os.sep))
        if level > 255:
            raise DatapathError(f"--proxy-cgroup {opts.proxy_cgroup}: nested too deep")
        cfg.proxy_cgroup_level = level
        cfg.proxy_cgroup_id = bpfsys.cgroup_id(real)
    return cfg


def write_mesh_config(maps: m.Maps, opts: MeshOptions) -> None:
    bpfsys.map_update(maps.fd("mesh_config"), m.u32(0), mesh_config(opts))


def accel_counters(maps: m.Maps) -> Dict[str, int]:
    sums = maps.percpu_sums("accel_stats")
    return {name: sums.get(i, {}).get("value", 0)
            for i, name in m.ACCEL_COUNTER_NAMES.items()}


class AccelCollector(Collector):
    """nodemesh_sockmap_*: what the sk_msg program moved, and the sockets it can move to."""

    def __init__(self, agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily]:
        maps = self.agent.maps
        if maps is None:
            return
        try:
            c = accel_counters(maps)
            active = maps.count("accel_socks")
        except OSError:  # a scrape must not take the agent down
            return
        yield CounterMetricFamily("nodemesh_sockmap_redirected_bytes",
                                  "Bytes sk_msg moved from a local socket straight to its local "
                                  "peer (--accelerate-local)", value=c["redirected_bytes"])
        yield CounterMetricFamily("nodemesh_sockmap_redirected_messages",
                                  "sendmsg chunks moved socket to socket",
                                  value=c["redirected_messages"])
        yield CounterMetricFamily("nodemesh_sockmap_fallbacks",
                                  "Messages of accelerated sockets that went through TCP: the "
                                  "peer is not a local socket in the sockhash",
                                  value=c["fallbacks"])
        yield GaugeMetricFamily("nodemesh_sockmap_active_sockets",
                                "Local TCP sockets in the sockhash now (they leave it when they "
                                "close)", value=active)
