"""ctypes mirrors of bpf/lib/observe.h, flow.h and latency.h: the observability maps and the
flow event. tests/datapath/test_observability.py proves they match what BCC generated."""
from __future__ import annotations

import ctypes

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

LATENCY_BUCKETS = 24  # NM_LAT_BUCKETS: bucket i counts values below 2**i µs; the last, the rest
FLOW_RINGBUF = "flow_events"

# enum nm_flow_verdict
VERDICTS = {1: "translated", 2: "no_backend", 3: "proxy_redirect", 4: "denied", 5: "dropped"}
VERDICT_IDS = {v: k for k, v in VERDICTS.items()}
REASONS = {1: "connection_limit"}  # enum nm_flow_reason (bpf/lib/flow.h), for dropped flows


class ObserveConfig(ctypes.Structure):
    _fields_ = [("flow_cost_ns", u64), ("flow_burst_ns", u64), ("latency", u32), ("pad", u32)]


class FlowBudget(ctypes.Structure):
    _fields_ = [("credit_ns", u64), ("last_ns", u64), ("lost_rate_limit", u64),
                ("lost_ring_full", u64), ("sent", u64)]


class FlowEvent(ctypes.Structure):
    _fields_ = [("ts_ns", u64), ("cgroup_id", u64), ("netns", u64), ("cookie", u64),
                ("pid", u32), ("svc_id", u32), ("comm", ctypes.c_char * 16),
                ("client", u32 * 4), ("vip", u32 * 4), ("backend", u32 * 4),
                ("client_port", u16), ("vip_port", u16), ("backend_port", u16),
                ("family", u8), ("proto", u8), ("verdict", u8), ("reason", u8),
                ("client_family", u8), ("pad", u8)]


class LatencyKey(ctypes.Structure):
    _fields_ = [("addr", u32 * 4), ("port", u16), ("family", u8), ("pad", u8), ("svc_id", u32)]


class LatencyStats(ctypes.Structure):
    _fields_ = [("connect_us", u64 * LATENCY_BUCKETS), ("rtt_us", u64 * LATENCY_BUCKETS),
                ("connect_sum_us", u64), ("rtt_sum_us", u64), ("bytes_sent", u64),
                ("bytes_received", u64), ("retransmits", u64), ("closed", u64)]
