"""Workload identity: which cgroup belongs to which (namespace, service account, labels), and
the identity number the kernel sees for it (bpf/lib/identity.h).

Identity numbers are allocated per distinct (namespace, service account, labels), in the
manner of Cilium's identities, and stay stable across agent restarts: the pinned
`identity_keys` map remembers each number's fingerprint, and a restarted agent reuses it.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from .datapath import bpfsys
from .datapath import maps as m

log = logging.getLogger(__name__)

Labels = Tuple[Tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Workload:
    """A cgroup (relative to the cgroup v2 mount) and who runs in it."""

    cgroup: str
    namespace: str
    service_account: str = "default"
    labels: Labels = ()
    socket_lb: bool = True  # False: connect() to a VIP is left alone (socketLB: false)
    name: str = ""          # the pod's name (Kubernetes) or the workload's, for messages

    @property
    def key(self) -> Tuple[str, str, Labels]:
        return (self.namespace, self.service_account, self.labels)


def fingerprint(key: Tuple[str, str, Labels]) -> int:
    """64 bits of SHA-256 over the identity's attributes: what identity_keys remembers."""
    ns, sa, labels = key
    text = "\0".join([ns, sa, *(f"{k}={v}" for k, v in sorted(labels))])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


class IdentityAllocator:
    """(namespace, service account, labels) -> identity number, 1..MAX_IDENTITIES-1."""

    def __init__(self) -> None:
        self.by_fingerprint: Dict[int, int] = {}
        self.keys: Dict[Tuple[str, str, Labels], int] = {}

    def adopt(self, pinned: Iterable[Tuple[int, int]]) -> None:
        """(identity, fingerprint) pairs from the pinned identity_keys map."""
        for ident, fp in pinned:
            self.by_fingerprint[fp] = ident

    def identity(self, key: Tuple[str, str, Labels]) -> int:
        got = self.keys.get(key)
        if got is not None:
            return got
        fp = fingerprint(key)
        ident = self.by_fingerprint.get(fp)
        if ident is None:
            used = set(self.by_fingerprint.values())
            ident = next((i for i in range(1, m.MAX_IDENTITIES) if i not in used), 0)
            if not ident:
                raise ValueError(f"more than {m.MAX_IDENTITIES - 1} identities")
            self.by_fingerprint[fp] = ident
        self.keys[key] = ident
        return ident


@dataclass(frozen=True)
class ResolvedWorkloads:
    by_cgroup_id: Dict[int, Tuple[Workload, int]]  # cgroup id -> (workload, identity)
    missing: List[str]                             # workloads whose cgroup is not there


def resolve(workloads: Iterable[Workload], allocator: IdentityAllocator,
            cgroup_root: str) -> ResolvedWorkloads:
    """Find each workload's cgroup id; a folder that does not exist is reported, not fatal."""
    out: Dict[int, Tuple[Workload, int]] = {}
    missing: List[str] = []
    for w in workloads:
        path = os.path.join(cgroup_root, w.cgroup.lstrip("/"))
        try:
            cgid = bpfsys.cgroup_id(path)
        except OSError:
            missing.append(f"{w.namespace}/{w.name or w.cgroup}: cgroup {path} not found")
            continue
        out[cgid] = (w, allocator.identity(w.key))
    return ResolvedWorkloads(out, missing)


def find_cgroup(cgroup_root: str, candidates: Iterable[str]) -> Optional[str]:
    """The first candidate path (relative to the cgroup mount) that exists as a cgroup."""
    for rel in candidates:
        if os.path.isfile(os.path.join(cgroup_root, rel, "cgroup.procs")):
            return rel
    return None


def kubelet_cgroup_candidates(pod_uid: str, qos_class: str, parent: str = "") -> List[str]:
    """Where the kubelet puts a pod's cgroup, for both cgroup drivers, under `parent` (the
    kubelet's --cgroup-root; "" for the default). QoS class: Guaranteed, Burstable,
    BestEffort. cgroupfs: kubepods/[burstable|besteffort/]pod<uid>; systemd:
    kubepods.slice/[kubepods-burstable.slice/]kubepods[-burstable]-pod<uid_with_underscores>
    .slice."""
    qos = {"Burstable": "burstable", "BestEffort": "besteffort"}.get(qos_class, "")
    uid_sd = pod_uid.replace("-", "_")
    base = parent.strip("/")
    join = (lambda *p: "/".join(x for x in (base, *p) if x))  # noqa: E731
    cgroupfs = join("kubepods", qos, f"pod{pod_uid}")
    if qos:
        systemd = join("kubepods.slice", f"kubepods-{qos}.slice",
                       f"kubepods-{qos}-pod{uid_sd}.slice")
    else:
        systemd = join("kubepods.slice", f"kubepods-pod{uid_sd}.slice")
    return [systemd, cgroupfs]
