"""Workloads and policies from the Kubernetes API: the Pods on this node (their cgroups found
under the kubelet's layouts) and MeshPolicy objects (deploy/kubernetes/meshpolicy-crd.yaml).

Fed by the Kubernetes source's watchers (the same list/watch loop as Services), it keeps
one Workload per pod and one Policy per MeshPolicy, and hands the whole Mesh to the delivery
thread when it changed, once both collections are listed.

A pod's cgroup is looked for under every kubelet layout (systemd and cgroupfs drivers, each
QoS class) below the cgroup v2 mount, or below $NODEMESH_KUBELET_CGROUP_ROOT (relative to
the mount) when the kubelet runs with --cgroup-root. A pod whose folder is not found yet (its
sandbox is being made) is reported and looked for again at every later delivery.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from .. import config
from ..identity import Workload, find_cgroup, kubelet_cgroup_candidates
from ..meshconfig import _policy
from ..policy import Mesh, Policy

log = logging.getLogger(__name__)

SOCKET_LB_ANNOTATION = "nodemesh.io/socket-lb"
GROUP, VERSION, PLURAL = "nodemesh.io", "v1alpha1", "meshpolicies"
Key = Tuple[str, str]


def pod_workload(pod: dict, cgroup_root: str, parent: str = "") -> Tuple[Optional[Workload],
                                                                        Optional[str]]:
    """(the pod's Workload, or None; a note when its cgroup is not found)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    uid, ns, name = meta.get("uid"), meta.get("namespace", "default"), meta.get("name", "")
    if not uid or status.get("phase") in ("Succeeded", "Failed"):
        return None, None
    labels = tuple(sorted((str(k), str(v)) for k, v in (meta.get("labels") or {}).items()))
    socket_lb = (meta.get("annotations") or {}).get(SOCKET_LB_ANNOTATION, "true") != "false"
    candidates = kubelet_cgroup_candidates(uid, status.get("qosClass") or "BestEffort", parent)
    found = find_cgroup(cgroup_root, candidates)
    note = None if found else (f"pod {ns}/{name}: no cgroup found (looked for "
                               f"{', '.join(candidates)} under {cgroup_root})")
    return Workload(found or candidates[0], ns, spec.get("serviceAccountName") or "default",
                    labels, socket_lb, name), note


def mesh_policy(obj: dict) -> Tuple[Optional[Policy], List[str]]:
    """A MeshPolicy object as a Policy, validated like the config's `policies:`."""
    meta = obj.get("metadata") or {}
    raw = dict(obj.get("spec") or {}, name=meta.get("name"),
               namespace=meta.get("namespace", "default"))
    c = config._Checker()
    where = f"MeshPolicy {raw['namespace']}/{raw['name']}"
    got = _policy(c, raw, "spec")
    return got, [f"{where}: {p.path}: {p.message}" for p in c.problems]


class MeshState:
    """The pods and policies, under the same put/delete/list_page/list_done contract as the
    source's _ClusterState (its watchers call these)."""

    def __init__(self, on_dirty: Callable[[], None], on_note: Callable[[str], None],
                 cgroup_root: str):
        self._lock = threading.Lock()
        self._on_dirty = on_dirty
        self._on_note = on_note
        self.cgroup_root = cgroup_root
        self.parent = os.environ.get("NODEMESH_KUBELET_CGROUP_ROOT", "")
        self._pods: Dict[Key, dict] = {}
        self._workloads: Dict[Key, Optional[Workload]] = {}
        self._missing: Set[Key] = set()
        self._policies: Dict[Key, Optional[Policy]] = {}
        self._versions: Dict[str, Dict[Key, str]] = {"pod": {}, "meshpolicy": {}}
        self._listed: Set[str] = set()
        self._sent: Optional[Mesh] = None
        # Something was put, dropped or listed since take_mesh last built a Mesh: every
        # delivery of the source asks, nearly always with nothing new (see take_mesh).
        self._stale = True

    @staticmethod
    def _key(obj: dict) -> Key:
        meta = obj.get("metadata") or {}
        return (meta.get("namespace", "default"), meta.get("name", ""))

    def put(self, kind: str, obj: dict) -> None:
        with self._lock:
            self._put(kind, self._key(obj), obj)
        self._on_dirty()

    def delete(self, kind: str, obj: dict) -> None:
        with self._lock:
            self._drop(kind, self._key(obj))
        self._on_dirty()

    def list_page(self, kind: str, items: Iterable[dict], seen: Set[Key]) -> None:
        for obj in items:
            key = self._key(obj)
            seen.add(key)
            version = (obj.get("metadata") or {}).get("resourceVersion", "")
            with self._lock:
                if self._versions[kind].get(key) != version or not version:
                    self._put(kind, key, obj)
        self._on_dirty()

    def list_done(self, kind: str, seen: Set[Key]) -> None:
        with self._lock:
            for key in [k for k in self._versions[kind] if k not in seen]:
                self._drop(kind, key)
            self._listed.add(kind)
            self._stale = True
        self._on_dirty()

    def _put(self, kind: str, key: Key, obj: dict) -> None:
        self._stale = True
        self._versions[kind][key] = (obj.get("metadata") or {}).get("resourceVersion", "")
        if kind == "pod":
            self._pods[key] = obj
            self._resolve(key)
        else:
            policy, problems = mesh_policy(obj)
            for p in problems:
                self._on_note(p)
            self._policies[key] = policy

    def _resolve(self, key: Key) -> None:
        workload, note = pod_workload(self._pods[key], self.cgroup_root, self.parent)
        self._workloads[key] = workload
        if note:
            if key not in self._missing:
                self._on_note(note)
            self._missing.add(key)
        else:
            self._missing.discard(key)

    def _drop(self, kind: str, key: Key) -> None:
        self._stale = True
        self._versions[kind].pop(key, None)
        if kind == "pod":
            self._pods.pop(key, None)
            self._workloads.pop(key, None)
            self._missing.discard(key)
        else:
            self._policies.pop(key, None)

    def missing(self) -> List[str]:
        with self._lock:
            return [f"{ns}/{name}" for ns, name in sorted(self._missing)]

    def take_mesh(self) -> Optional[Mesh]:
        """The whole Mesh if it changed since the last call (None before both collections are
        listed, so the agent never applies half of them). Pods whose cgroup was missing are
        looked for again."""
        with self._lock:
            if not {"pod", "meshpolicy"} <= self._listed:
                return None
            if not self._stale and not self._missing:
                return None  # nothing changed since the last Mesh built: a Service's change
            self._stale = False
            for key in list(self._missing):
                self._resolve(key)
            mesh = Mesh(tuple(w for _, w in sorted(self._workloads.items()) if w is not None),
                        tuple(p for _, p in sorted(self._policies.items()) if p is not None))
            if mesh == self._sent:
                return None
            self._sent = mesh
            return mesh
