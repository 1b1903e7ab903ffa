"""What the fault tests (tests/fault/) and the soak (bench/soak.py) share: traffic that keeps
flowing while a fault is injected, and a dump of the pinned maps that names every stale entry.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

from helpers import TIME_SCALE

from nodemesh.datapath import bpfsys, maps


class Traffic:
    """TCP connections and UDP flows (a new socket per datagram: a new flow each time) to the
    lab's web service, in the hooked cgroup, until stopped. Bounded: `max_seconds` and 10^6
    operations per client. `results` holds each client's JSON tally once stopped.

    Each client pauses `interval` between operations: a steady rate, not a flood that
    overflows the lab servers' listen backlogs on a shared 2-CPU machine. An operation fails
    after `timeout` seconds (5: one SYN retransmission, 1 s, is a slow success, not a loss)."""

    def __init__(self, lab, workdir: str, tcp_port: int = 80, udp_port: int = 53,
                 max_seconds: float = 120, tcp_clients: int = 2, udp_clients: int = 1,
                 vip: Optional[str] = None, interval: float = 0.002, timeout: float = 5.0):
        self.stop_file = os.path.join(workdir, f"stop-traffic-{id(self)}")
        self.results: Dict[str, dict] = {}
        vip = vip or lab.vip4()
        seconds = str(max_seconds * TIME_SCALE)
        self.threads = []
        for mode, port, n in (("tcp", tcp_port, tcp_clients), ("udp", udp_port, udp_clients)):
            if not n:
                continue
            args = [mode, "--target", f"{vip}:{port}", "--count", "1000000", "--concurrency",
                    str(n), "--stop-file", self.stop_file, "--max-seconds", seconds,
                    "--interval", str(interval), "--timeout", str(timeout)]
            self.threads.append(threading.Thread(
                target=self._run, args=(lab, mode, args, max_seconds), daemon=True))

    def _run(self, lab, name, args, max_seconds):
        try:
            self.results[name] = lab.client(args, timeout=(max_seconds + 30) * TIME_SCALE)
        except Exception as e:  # noqa: BLE001 - shown in the assertion
            self.results[name] = {"ok": 0, "failed": -1, "errors": {repr(e): 1}}

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        time.sleep(0.5)  # the clients are up (python start-up) before the fault
        return self

    def stop(self) -> Dict[str, dict]:
        open(self.stop_file, "w").close()
        for t in self.threads:
            t.join(timeout=60 * TIME_SCALE)
        return self.results

    def __exit__(self, *exc) -> None:
        self.stop()

    def failed(self) -> int:
        return sum(r["failed"] for r in self.results.values())

    def ok(self) -> int:
        return sum(r["ok"] for r in self.results.values())


@dataclass
class MapDump:
    """The pinned maps, decoded: what the datapath would serve a new connection."""
    masters: Dict[bytes, Tuple[int, int, int]] = field(default_factory=dict)  # prefix: svc_id, count, bank
    slots: Dict[bytes, Dict[int, int]] = field(default_factory=dict)  # prefix: {slot: backend id}
    backends: Dict[int, int] = field(default_factory=dict)  # backend id: svc_id
    svc_stats: Set[int] = field(default_factory=set)
    backend_stats: Set[int] = field(default_factory=set)
    revnat_svc_ids: List[int] = field(default_factory=list)
    affinity: List[Tuple[int, int]] = field(default_factory=list)  # (svc_id, backend id)
    endpoints: int = 0

    def counts(self) -> Dict[str, int]:
        return {"services": len(self.masters) + sum(len(s) for s in self.slots.values()),
                "frontends": len(self.masters), "backends": len(self.backends),
                "svc_stats": len(self.svc_stats), "backend_stats": len(self.backend_stats),
                "revnat": len(self.revnat_svc_ids), "affinity": len(self.affinity),
                "endpoint_health": self.endpoints}

    def stale(self) -> List[str]:
        """Every entry no frontend explains, and every frontend that is not whole."""
        problems = []
        live_svc = {svc_id for svc_id, _, _ in self.masters.values()}
        referenced: Dict[int, int] = {}
        for prefix, slots in self.slots.items():
            if prefix not in self.masters:
                problems.append(f"{len(slots)} slots of a frontend with no master")
                continue
            svc_id, count, bank = self.masters[prefix]
            want = {maps.slot_number(bank, i) for i in range(1, count + 1)}
            if set(slots) != want:
                problems.append(f"frontend {svc_id}: slots {sorted(slots)} but the master "
                                f"says bank {bank} x {count}")
            for backend_id in slots.values():
                referenced[backend_id] = svc_id
        for prefix, (svc_id, count, _) in self.masters.items():
            if count and prefix not in self.slots:
                problems.append(f"frontend {svc_id}: count {count} but no slot")
        for backend_id, svc_id in self.backends.items():
            if backend_id not in referenced:
                problems.append(f"backend {backend_id} (frontend {svc_id}) is in no slot")
            elif referenced[backend_id] != svc_id:
                problems.append(f"backend {backend_id} belongs to {svc_id} but sits in a slot "
                                f"of {referenced[backend_id]}")
        for backend_id in referenced:
            if backend_id not in self.backends:
                problems.append(f"a slot names backend {backend_id}, which does not exist")
        problems += [f"svc_stats {s} of no frontend" for s in self.svc_stats - live_svc]
        problems += [f"backend_stats {b} of no backend"
                     for b in self.backend_stats - set(self.backends)]
        problems += [f"revnat entry for frontend {s}, which is gone"
                     for s in set(self.revnat_svc_ids) - live_svc]
        problems += [f"affinity entry for frontend {s}, which is gone"
                     for s, _ in self.affinity if s not in live_svc]
        return problems


def dump(bpffs: str) -> MapDump:
    names = ("services", "backends", "svc_stats", "backend_stats", "revnat", "affinity",
             "endpoint_health")
    fds = {n: bpfsys.obj_get(os.path.join(bpffs, n)) for n in names}
    m = maps.Maps(fds)
    try:
        d = MapDump()
        for key, value in m.items("services"):
            prefix = bytes(key)[:20]  # addr, port, proto, family: the frontend
            if key.slot == 0:
                d.masters[prefix] = (value.svc_id, value.count, value.bank)
            else:
                d.slots.setdefault(prefix, {})[key.slot] = value.backend_id
        d.backends = {maps.key_int(k): v.svc_id for k, v in m.items("backends")}
        d.svc_stats = {maps.key_int(k) for k, _ in m.items("svc_stats")}
        d.backend_stats = {maps.key_int(k) for k, _ in m.items("backend_stats")}
        d.revnat_svc_ids = [v.svc_id for _, v in m.items("revnat")]
        d.affinity = [(k.svc_id, v.backend_id) for k, v in m.items("affinity")]
        d.endpoints = m.count("endpoint_health")
        return d
    finally:
        m.close()


class Flapper:
    """A backend's health port that goes down and up every `period` seconds: a TCP reset rule
    for that port in the backend's own netns, added and deleted (its service port stays up,
    so every connection the datapath admits can succeed). Bounded by `max_seconds`; the rule
    is removed on stop."""

    def __init__(self, netns: str, port: int, period: float = 0.3, max_seconds: float = 60):
        self.rule = ["-p", "tcp", "--dport", str(port), "-j", "REJECT", "--reject-with",
                     "tcp-reset"]
        self.netns, self.period, self.max_seconds = netns, period, max_seconds
        self.flips = 0
        self.down = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _iptables(self, op: str) -> None:
        import subprocess

        subprocess.run(["ip", "netns", "exec", self.netns, "iptables", op, "INPUT", *self.rule],
                       check=True, capture_output=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds * TIME_SCALE
        while not self._stop.wait(self.period) and time.monotonic() < deadline:
            self._iptables("-D" if self.down else "-I")
            self.down = not self.down
            self.flips += 1

    def __enter__(self) -> "Flapper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.down:
            self._iptables("-D")
            self.down = False
