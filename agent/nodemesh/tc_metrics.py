"""Metrics of the TC packet path, read from its kernel maps at scrape time.

    nodemesh_tc_packets_total{interface,direction,verdict}  what the programs did per packet
    nodemesh_drops_total{reason}                            packets dropped, by named reason
    nodemesh_snat_collisions_total                          SNAT source ports found taken
    nodemesh_conntrack_rebuilt_total                        evicted forward entries rebuilt
    nodemesh_conntrack_entries / nodemesh_conntrack_capacity  live entries (two per flow)

The series are bounded: interfaces x 2 directions x 7 verdicts, and 4 drop reasons.
"""
from __future__ import annotations

import time
from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .datapath import tc as t


class TcCollector(Collector):
    def __init__(self, path: t.TcPath):
        self.path = path

    def collect(self) -> Iterator[Metric]:
        fds = self.path.map_fds
        if not fds:
            return
        names = {ifindex: name for name, ifindex in self.path.interfaces.items()}
        packets = CounterMetricFamily("nodemesh_tc_packets_total",
                                      "Packets the TC programs handled, by verdict",
                                      labels=["interface", "direction", "verdict"])
        for key, n in t.percpu_sum(fds["tc_stats"], t.TcStatsKey).items():
            assert isinstance(key, bytes)
            k = t.TcStatsKey.from_buffer_copy(key)
            packets.add_metric([names.get(k.ifindex, str(k.ifindex)),
                                t.DIRECTIONS.get(k.direction, str(k.direction)),
                                t.VERDICTS.get(k.verdict, str(k.verdict))], n)
        yield packets
        drops = CounterMetricFamily("nodemesh_drops_total",
                                    "Packets the TC programs dropped, by reason",
                                    labels=["reason"])
        sums = t.percpu_sum(fds["tc_drops"], t.u32)
        for index, reason in t.DROP_REASONS.items():
            drops.add_metric([reason], sums.get(index, 0))
        yield drops
        events = t.percpu_sum(fds["tc_events"], t.u32)
        yield CounterMetricFamily("nodemesh_snat_collisions_total",
                                  "SNAT source ports tried and found taken",
                                  value=events.get(0, 0))
        yield CounterMetricFamily("nodemesh_conntrack_rebuilt_total",
                                  "Flows whose forward conntrack entry the LRU evicted, found "
                                  "again from their reply entry",
                                  value=events.get(1, 0))
        settings = self.path.settings
        live, _ = self.path.scan(time.monotonic_ns())
        yield GaugeMetricFamily("nodemesh_conntrack_entries",
                                "Live conntrack entries (two per flow: one per direction)",
                                value=live)
        yield GaugeMetricFamily("nodemesh_conntrack_capacity",
                                "Conntrack entries the LRU map holds (--map-conntrack)",
                                value=settings.ct_entries)
