"""Flow events: what the connect and sendmsg hooks decided, one record per TCP connection and
per new UDP flow (bpf/lib/flow.h), kept in memory for `nodemesh flows`.

The kernel rate-limits them per CPU (a token bucket) and counts what it refused; the agent
reads the ring buffer on one supervised worker, names the service from the published
snapshot, and keeps the last HISTORY flows. Readers ask with a sequence number: the admin API
answers `/v1/flows?since=N&wait=S` with what came after N, waiting up to S seconds for the
first one. `--follow` is that call in a loop, so a follower holds no server thread between
calls and never blocks `nodemesh status`.
"""
from __future__ import annotations

import collections
import struct
import threading
from dataclasses import asdict, dataclass
from typing import (
    TYPE_CHECKING,
    Callable,
    Deque,
    Dict,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from .datapath import bpfsys
from .datapath import maps as m
from .datapath.observe import REASONS, VERDICT_IDS, VERDICTS, FlowBudget, FlowEvent, ObserveConfig
from .datapath.ringbuf import cast

if TYPE_CHECKING:
    from .snapshot import Snapshot

HISTORY = 4096
DEFAULT_RATE = 1000   # events per second per CPU
DEFAULT_BURST = 200   # events a CPU may send at once after a quiet spell
MAX_WAIT = 5.0        # seconds a /v1/flows call may wait for news


def configure(maps: m.Maps, rate: int, burst: int, latency: bool) -> None:
    """Write the datapath's observability switches (bpf/lib/observe.h), once at start."""
    cost = 1_000_000_000 // rate if rate > 0 else 0
    cfg = ObserveConfig(flow_cost_ns=cost, flow_burst_ns=cost * max(burst, 1),
                        latency=1 if latency else 0)
    bpfsys.map_update(maps.fd("observe_config"), m.u32(0), cfg)


def budget(maps: m.Maps) -> Dict[str, int]:
    """The per-CPU token buckets' counters, summed: sent, lost_rate_limit, lost_ring_full."""
    per_cpu = (FlowBudget * bpfsys.possible_cpus())()
    if not bpfsys.map_lookup(maps.fd("flow_budget"), m.u32(0), per_cpu):
        return {"sent": 0, "lost_rate_limit": 0, "lost_ring_full": 0}
    return {f: sum(getattr(b, f) for b in per_cpu)
            for f in ("sent", "lost_rate_limit", "lost_ring_full")}


@dataclass(frozen=True)
class Flow:
    seq: int
    time_ns: int          # CLOCK_MONOTONIC, as the kernel stamped it
    verdict: str
    reason: int
    protocol: str
    namespace: str        # "" when the frontend is not (or no longer) known
    service: str
    vip: str              # "addr:port", [v6]:port
    backend: str          # "" with no backend
    client: str           # the socket's bound address, "" before it has one
    pid: int
    comm: str
    cgroup_id: int
    netns: int
    cookie: int

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def _hostport(family: int, words: Sequence[int], port: int) -> str:
    # words: a FlowEvent u32[4] (a ctypes array reads as a Sequence[int])
    addr = m.decode_addr(family, words)
    return f"[{addr}]:{port}" if family == m.FAMILY_V6 else f"{addr}:{port}"


def decode(ev: FlowEvent, seq: int, names: Callable[[int], Tuple[str, str]]) -> Flow:
    namespace, service = names(ev.svc_id) if ev.svc_id else ("", "")
    backend = (_hostport(ev.family, ev.backend, m.port_host(ev.backend_port))
               if ev.backend_port else "")
    client = ""
    if ev.client_family and (any(ev.client) or ev.client_port):
        client = _hostport(ev.client_family, ev.client, ev.client_port)
    return Flow(seq=seq, time_ns=ev.ts_ns, verdict=VERDICTS.get(ev.verdict, str(ev.verdict)),
                reason=ev.reason, protocol=m.PROTO_NAMES.get(ev.proto, str(ev.proto)),
                namespace=namespace, service=service,
                vip=_hostport(ev.family, ev.vip, m.port_host(ev.vip_port)), backend=backend,
                client=client, pid=ev.pid, comm=ev.comm.decode(errors="replace"),
                cgroup_id=ev.cgroup_id, netns=ev.netns, cookie=ev.cookie)


@dataclass(frozen=True)
class Filter:
    service: Optional[Tuple[str, str]] = None  # (namespace, name)
    backend: Optional[str] = None              # an address, or address:port
    verdict: Optional[str] = None

    @classmethod
    def parse(cls, service: Optional[str], backend: Optional[str],
              verdict: Optional[str]) -> "Filter":
        """From the CLI's or the query string's values; ValueError names the bad one."""
        svc = None
        if service:
            ns, sep, name = service.partition("/")
            if not sep or not ns or not name:
                raise ValueError(f"--service {service!r}: give NAMESPACE/NAME")
            svc = (ns, name)
        if verdict and verdict not in VERDICT_IDS:
            raise ValueError(f"--verdict {verdict!r}: one of {', '.join(VERDICT_IDS)}")
        if backend is not None and not backend.strip():
            raise ValueError("--backend: give an address or address:port")
        return cls(svc, backend.strip() if backend else None, verdict or None)

    def __call__(self, f: Flow) -> bool:
        if self.service and (f.namespace, f.service) != self.service:
            return False
        if self.verdict and f.verdict != self.verdict:
            return False
        if self.backend:
            if not f.backend:
                return False
            host = f.backend.rsplit(":", 1)[0].strip("[]")
            if self.backend not in (f.backend, host, f"[{host}]"):
                return False
        return True


class RawFlow(NamedTuple):
    """A flow event as the ring buffer gave it, with the service it named when it came:
    what the reader keeps, so that an event costs its copy and one name lookup. It is decoded
    into a Flow only when someone asks (FlowLog.since): nearly every flow is never read."""
    seq: int
    data: bytes
    name: Tuple[str, str]  # (namespace, service), ("", "") when the frontend is not known

    def decode(self) -> Flow:
        name = self.name
        return decode(cast(self.data, FlowEvent), self.seq, lambda _svc_id: name)


_SVC_ID = struct.Struct("=I")
_SVC_ID_AT = FlowEvent.svc_id.offset


def raw(data: bytes, seq: int, names: Callable[[int], Tuple[str, str]]) -> RawFlow:
    """A ring-buffer record -> RawFlow, its service named now (the snapshot of this moment)."""
    svc_id = _SVC_ID.unpack_from(data, _SVC_ID_AT)[0]
    return RawFlow(seq, data, names(svc_id) if svc_id else ("", ""))


class FlowLog:
    """The last HISTORY flows, with a sequence number each; readers wait for news. It holds
    Flows or RawFlows (what the ring-buffer reader adds); readers get Flows."""

    def __init__(self, size: int = HISTORY):
        self._flows: Deque[Union[Flow, RawFlow]] = collections.deque(maxlen=size)
        self._cond = threading.Condition()
        self.seq = 0

    def next_seq(self) -> int:
        return self.seq + 1

    def add(self, flow: Flow) -> None:
        self.extend([flow])

    def extend(self, flows: Sequence[Union[Flow, RawFlow]]) -> None:
        """Add flows in seq order: one lock and one wake-up for a whole poll's worth."""
        if not flows:
            return
        with self._cond:
            self._flows.extend(flows)
            self.seq = flows[-1].seq
            self._cond.notify_all()

    def since(self, seq: int, match: Callable[[Flow], bool], wait: float = 0.0,
              limit: int = HISTORY) -> Tuple[List[Flow], int]:
        """(flows after seq that match, newest seq seen). Waits up to `wait` seconds for at
        least one new flow (matching or not) when there is none yet."""
        with self._cond:
            if wait > 0 and self.seq <= seq:
                self._cond.wait_for(lambda: self.seq > seq, timeout=min(wait, MAX_WAIT))
            newer, last = [f for f in self._flows if f.seq > seq], self.seq
        # Decoded outside the lock: the reader's next batch does not wait for it.
        out: List[Flow] = []
        for f in newer:
            flow = f.decode() if isinstance(f, RawFlow) else f
            if match(flow):
                out.append(flow)
        return out[-limit:], last


class ServiceNames:
    """svc_id -> (namespace, service), from the published snapshot's svc_id index: one lookup
    an event, whatever the number of services (no table of its own to rebuild)."""

    def __init__(self, snapshot: Callable[[], "Snapshot"]):
        self._snapshot = snapshot

    def __call__(self, svc_id: int) -> Tuple[str, str]:
        view = self._snapshot().by_svc_id.get(svc_id)
        if view is None or view.desired is None:
            return ("", "")
        return (view.desired.namespace, view.desired.service)


def read(ring_fd: int, log: FlowLog, names: Callable[[int], Tuple[str, str]],
         stop: threading.Event) -> None:
    """The worker: flow events from the ring buffer into the log, until stop. Each is kept
    as it came (RawFlow) and decoded only if read."""
    from .datapath.ringbuf import RingBuffer

    batch: List[Union[Flow, RawFlow]] = []

    def on_event(data: bytes) -> None:
        batch.append(raw(data, log.next_seq() + len(batch), names))

    ring = RingBuffer(ring_fd)
    try:
        while not stop.is_set():
            ring.poll(on_event, 0.1)
            log.extend(batch)
            batch.clear()
    finally:
        ring.close()


# -- the command's output ----------------------------------------------------------------

COLUMNS = ["TIME", "VERDICT", "PROTO", "SERVICE", "VIP", "BACKEND", "CLIENT", "PID", "COMM"]


def row(f: Dict[str, object], boot_offset: float) -> List[str]:
    import time

    t = time.strftime("%H:%M:%S", time.localtime(boot_offset + int(f["time_ns"]) / 1e9))  # type: ignore[call-overload]
    reason = REASONS.get(int(f["reason"]), str(f["reason"]))  # type: ignore[call-overload]
    verdict = str(f["verdict"]) + (f"({reason})" if f["verdict"] == "dropped" else "")
    svc = f"{f['namespace']}/{f['service']}" if f["service"] else "?"
    return [t, verdict, str(f["protocol"]), svc, str(f["vip"]), str(f["backend"] or "-"),
            str(f["client"] or "-"), str(f["pid"]), str(f["comm"])]


def monotonic_to_wall() -> float:
    """What to add to a CLOCK_MONOTONIC time to get the wall clock (bpf_ktime_get_ns)."""
    import time

    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)

