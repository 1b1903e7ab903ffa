"""Kernel-measured latency and traffic per backend (bpf/lib/latency.h) as Prometheus metrics.

The kernel keeps log2 histograms of microseconds per (frontend, backend endpoint): bucket i
counts values below 2**i µs, the last bucket the rest. At scrape time they become Prometheus
histograms with le = 2**i µs in seconds (an upper bound: a value of exactly 2**i µs falls in
the next bucket), the sum from the kernel's sum of microseconds.

Detail level: with --metrics-detail backend the series carry {namespace, service, backend};
with service (the default) the backends of a service are added up into {namespace, service},
so the series stay bounded by the services with traffic.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Dict, Iterator, List, Tuple

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .datapath import maps as m
from .datapath.observe import LATENCY_BUCKETS, LatencyKey, LatencyStats

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger(__name__)

BOUNDS = [str(float(2 ** i) / 1e6) for i in range(LATENCY_BUCKETS - 1)] + ["+Inf"]


class Totals:
    """One label set's sums."""

    __slots__ = ("connect", "rtt", "connect_sum", "rtt_sum", "sent", "received", "retrans",
                 "closed")

    def __init__(self) -> None:
        self.connect = [0] * LATENCY_BUCKETS
        self.rtt = [0] * LATENCY_BUCKETS
        self.connect_sum = self.rtt_sum = 0
        self.sent = self.received = self.retrans = self.closed = 0

    def add(self, st: LatencyStats) -> None:
        for i in range(LATENCY_BUCKETS):
            self.connect[i] += st.connect_us[i]
            self.rtt[i] += st.rtt_us[i]
        self.connect_sum += st.connect_sum_us
        self.rtt_sum += st.rtt_sum_us
        self.sent += st.bytes_sent
        self.received += st.bytes_received
        self.retrans += st.retransmits
        self.closed += st.closed


def _buckets(counts: List[int]) -> List[Tuple[str, float]]:
    out, acc = [], 0
    for bound, n in zip(BOUNDS, counts):
        acc += n
        out.append((bound, float(acc)))
    return out


class LatencyCollector(Collector):
    def __init__(self, agent: "Agent", per_backend: bool):
        self.agent = agent
        self.per_backend = per_backend

    def totals(self) -> Dict[Tuple[str, ...], Totals]:
        """{(namespace, service[, backend]): Totals} for the frontends programmed now."""
        from .metrics import backend_label

        maps = self.agent.maps
        if maps is None:
            return {}
        snap = self.agent.snapshot
        by_key: Dict[Tuple[int, str, int, int], LatencyStats] = {}
        for key, value in maps.items("backend_latency"):
            k: LatencyKey = key  # type: ignore[assignment]
            # A copy: the batch reader reuses its buffer for the next chunk.
            by_key[(k.svc_id, m.decode_addr(k.family, k.addr), m.port_host(k.port),
                    k.family)] = LatencyStats.from_buffer_copy(value)  # type: ignore[arg-type]
        if not by_key:
            return {}
        out: Dict[Tuple[str, ...], Totals] = {}
        for (svc_id, address, port, _family), st in by_key.items():
            # One lookup an entry in the snapshot's svc_id index: a scrape costs what the
            # kernel has entries for, not N.
            view = snap.by_svc_id.get(svc_id)
            if view is None or view.desired is None or view.programmed is None or \
                    (address, port) not in view.programmed.backend_ids:
                continue  # a frontend or backend gone since: its entry ages out of the LRU
            labels: Tuple[str, ...] = (view.desired.namespace, view.desired.service)
            if self.per_backend:
                labels += (backend_label(address, port),)
            out.setdefault(labels, Totals()).add(st)
        return out

    def collect(self) -> Iterator[Metric]:
        try:
            totals = self.totals()
        except OSError as e:  # a scrape must not take the agent down
            log.warning("reading backend_latency failed: %s", e)
            return
        names = ["namespace", "service"] + (["backend"] if self.per_backend else [])
        connect = HistogramMetricFamily(
            "nodemesh_backend_connect_duration_seconds",
            "TCP connect duration to the backend, SYN to established, measured by sockops",
            labels=names)
        rtt = HistogramMetricFamily(
            "nodemesh_backend_rtt_seconds",
            "Smoothed RTT of connections to the backend, read by sockops as each one closes",
            labels=names)
        sent = CounterMetricFamily("nodemesh_backend_bytes",
                                   "Bytes of closed connections to the backend: sent "
                                   "(acknowledged by it) and received",
                                   labels=names + ["direction"])
        retrans = CounterMetricFamily("nodemesh_backend_retransmits",
                                      "TCP retransmissions of closed connections to the backend",
                                      labels=names)
        for labels, t in totals.items():
            lv = list(labels)
            connect.add_metric(lv, _buckets(t.connect), t.connect_sum / 1e6)
            rtt.add_metric(lv, _buckets(t.rtt), t.rtt_sum / 1e6)
            sent.add_metric(lv + ["sent"], t.sent)
            sent.add_metric(lv + ["received"], t.received)
            retrans.add_metric(lv, t.retrans)
        yield connect
        yield rtt
        yield sent
        yield retrans
