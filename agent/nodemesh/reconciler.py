"""The reconciler: the one writer of service maps.

`apply(services)` diffs the desired services against what is programmed and writes only the
frontends that changed, in an order that keeps every change atomic for new connections:

    1. stats entries of reused ids deleted               -- the datapath recreates them at zero
    2. backend entries for new backend ids
    3. the frontend's slots, in the bank NOT in use     -- invisible until step 4
    4. the master entry: new count + bank, one write    -- the switch
    5. deletes: removed masters, old-bank slots, unused backends and their stats

A failure before step 4 undoes steps 1-3 and leaves the old set serving. State is kept per
frontend ((VIP, port, protocol): the datapath's unit) and reported per service.

`adopt()` rebuilds that state from the pinned maps, so a restarted agent rewrites nothing that is
already right and keeps ids (and so counters) stable.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, List, Optional, Sequence, Tuple

from . import selection
from .datapath import maps as m
from .model import Service

log = logging.getLogger(__name__)


class CapacityError(Exception):
    pass


class ReconcileError(Exception):
    pass


@dataclass(frozen=True, order=True)
class FrontendKey:
    family: int
    vip: str
    port: int
    protocol: str

    @cached_property
    def _prefix(self) -> bytes:
        family, words = m.encode_addr(self.vip)
        return m.key_prefix(family, words, self.port, m.PROTO_IDS[self.protocol])

    def map_key(self, slot: int = 0) -> bytes:
        """The packed SvcKey of this frontend's master (slot 0) or of one of its slots."""
        return m.pack_svc_key(self._prefix, slot)

    def __str__(self) -> str:
        host = f"[{self.vip}]" if self.family == m.FAMILY_V6 else self.vip
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class DesiredFrontend:
    key: FrontendKey
    namespace: str
    service: str
    port_name: str
    algorithm: str
    backends: Tuple[Tuple[str, int, int], ...]  # eligible (address, target port, weight)
    selection: str                               # why this set (selection.eligible)
    all_backends: int
    affinity_timeout: int = 0                    # seconds; 0: no session affinity


@dataclass
class ProgrammedFrontend:
    key: FrontendKey
    svc_id: int
    bank: int
    algorithm: str
    revision: int
    slots: Tuple[int, ...]                 # backend id per slot, in slot order
    backend_ids: Dict[Tuple[str, int], int]
    desired: Optional[DesiredFrontend] = None
    damaged: bool = False                  # kernel state disagrees; rewrite on next apply
    count: int = -1                        # slots in the kernel's active bank (-1: len(slots))
    affinity_timeout: int = 0

    @property
    def slot_count(self) -> int:
        return len(self.slots) if self.count < 0 else self.count


class IdPool:
    """Ids 1..capacity; released ids are reused lowest first."""

    def __init__(self, capacity: int, what: str):
        self.capacity = capacity
        self.what = what
        self.used: set = set()
        self._next = 1
        self._free: List[int] = []
        self.reused: set = set()  # handed out again since the last take_reused()

    def take(self, ident: int) -> None:
        self.used.add(ident)
        self._next = max(self._next, ident + 1)

    def allocate(self) -> int:
        while self._free:
            ident = self._free.pop()
            if ident not in self.used:
                self.used.add(ident)
                self.reused.add(ident)
                return ident
        if self._next > self.capacity:
            raise CapacityError(f"no free {self.what} id: all {self.capacity} are in use "
                                f"(raise the map size)")
        ident = self._next
        self._next += 1
        self.used.add(ident)
        return ident

    def take_reused(self) -> set:
        reused, self.reused = self.reused, set()
        return reused

    def release(self, ident: int) -> None:
        if ident in self.used:
            self.used.discard(ident)
            self._free.append(ident)

    def __len__(self) -> int:
        return len(self.used)


@dataclass
class ApplyResult:
    changed: int = 0
    added: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    writes: int = 0
    seconds: float = 0.0
    errors: List[str] = field(default_factory=list)
    # (address, port, protocol) no frontend sends new connections to any more, with whether
    # a service asked for its TCP connections to be ended too (terminateConnectionsOnRemoval)
    removed_endpoints: List[Tuple[str, int, str, bool]] = field(default_factory=list)


def desired_frontends(services: Sequence[Service],
                      ctx: selection.Context = selection.NO_CONTEXT
                      ) -> Dict[FrontendKey, DesiredFrontend]:
    out: Dict[FrontendKey, DesiredFrontend] = {}
    for svc in services:
        chosen, why = selection.eligible(svc.backends, svc, ctx)
        affinity = svc.session_affinity.timeout_seconds if svc.session_affinity else 0
        for vip, sp in svc.frontends():
            v6 = ":" in vip  # addresses are canonical: only IPv6 has colons
            key = FrontendKey(m.FAMILY_V6 if v6 else m.FAMILY_V4, vip, sp.port, sp.protocol)
            backends = tuple((b.address, b.target_port(sp), b.weight) for b in chosen
                             if (":" in b.address) == v6)
            out[key] = DesiredFrontend(key, svc.namespace, svc.name, sp.name or str(sp.port),
                                       svc.algorithm, backends, why, len(svc.backends),
                                       affinity)
    return out


@dataclass
class _Change:
    desired: DesiredFrontend
    old: Optional[ProgrammedFrontend]
    new: ProgrammedFrontend
    new_backend_ids: List[int]
    dropped_backend_ids: List[int]
    new_svc_id: bool


class Reconciler:
    def __init__(self, maps: m.Maps, sizes: m.MapSizes = m.MapSizes()):
        self.maps = maps
        self.sizes = sizes
        self.lock = threading.RLock()
        self.programmed: Dict[FrontendKey, ProgrammedFrontend] = {}
        self.svc_ids = IdPool(sizes.frontends - 1, "frontend")
        self.backend_ids = IdPool(sizes.backends - 1, "backend")
        self._garbage_slots: List[bytes] = []
        self._garbage_backends: List[int] = []
        self._garbage_svc_stats: List[int] = []
        self.services: List[Service] = []
        self.status: Dict[Tuple[str, str], Dict[str, object]] = {}
        self.last_result: Optional[ApplyResult] = None
        self.endpoints: set = set()  # (address, port) watched in endpoint_health

    # -- adoption ---------------------------------------------------------------------------
    def adopt(self) -> int:
        """Rebuild programmed state from the pinned maps. Returns the frontends adopted."""
        with self.lock:
            masters: Dict[Tuple, Tuple[m.SvcKey, m.SvcValue]] = {}
            slots: Dict[Tuple, Dict[int, int]] = {}
            for key, value in self.maps.items("services"):
                ident = (tuple(key.addr), key.port, key.proto, key.family)
                if key.slot == 0:
                    masters[ident] = (m.SvcKey.from_buffer_copy(key),
                                      m.SvcValue.from_buffer_copy(value))
                else:
                    slots.setdefault(ident, {})[key.slot] = value.backend_id
            backends = {m.key_int(k): m.BackendEntry.from_buffer_copy(v)
                        for k, v in self.maps.items("backends")}
            referenced = set()
            for ident, (key, master) in masters.items():
                proto = m.PROTO_NAMES.get(key.proto)
                if proto is None or key.family not in (m.FAMILY_V4, m.FAMILY_V6):
                    self._garbage_slots.append(bytes(key))
                    continue
                fk = FrontendKey(key.family, m.decode_addr(key.family, key.addr),
                                 m.port_host(key.port), proto)
                have = slots.get(ident, {})
                order = [have.get(m.slot_number(master.bank, i))
                         for i in range(1, master.count + 1)]
                damaged = any(b is None or b not in backends for b in order)
                ids = tuple(b for b in order if b is not None)
                backend_ids = {}
                for b in set(ids):
                    if b in backends:
                        e = backends[b]
                        backend_ids[(m.decode_addr(e.family, e.addr), m.port_host(e.port))] = b
                        referenced.add(b)
                        self.backend_ids.take(b)
                self.svc_ids.take(master.svc_id)
                self.programmed[fk] = ProgrammedFrontend(
                    fk, master.svc_id, master.bank, m.ALGORITHM_NAMES.get(master.algorithm,
                                                                          "random"),
                    master.revision, ids, backend_ids, damaged=damaged, count=master.count,
                    affinity_timeout=master.affinity_timeout
                    if master.flags & m.SVC_F_AFFINITY else 0)
                active = {m.slot_number(master.bank, i) for i in range(1, master.count + 1)}
                for slot in have:
                    if slot not in active:  # a bank left behind by an interrupted update
                        self._garbage_slots.append(fk.map_key(slot))
            for ident, have in slots.items():
                if ident not in masters:
                    addr, port, proto, family = ident
                    for slot in have:
                        k = m.SvcKey()
                        k.addr[:] = addr
                        k.port, k.proto, k.family, k.slot = port, proto, family, slot
                        self._garbage_slots.append(bytes(k))
            stat_ids = {m.key_int(k) for k, _ in self.maps.items("backend_stats")}
            self._garbage_backends = sorted((set(backends) | stat_ids) - referenced)
            for key, _ in self.maps.items("endpoint_health"):
                self.endpoints.add((m.decode_addr(key.family, key.addr), m.port_host(key.port)))
            live_svc = {p.svc_id for p in self.programmed.values()}
            self._garbage_svc_stats = [m.key_int(k) for k, _ in self.maps.items("svc_stats")
                                       if m.key_int(k) not in live_svc]
            log.info("adopted %d frontends and %d backends from pinned maps (%d stale entries "
                     "to remove)", len(self.programmed), len(referenced),
                     len(self._garbage_slots) + len(self._garbage_backends))
            return len(self.programmed)

    # -- apply ------------------------------------------------------------------------------
    def apply(self, services: Sequence[Service],
              ctx: selection.Context = selection.NO_CONTEXT) -> ApplyResult:
        with self.lock:
            started = time.monotonic()
            result = ApplyResult()
            self._collect_garbage(result)
            before = self._endpoints_in_use()
            desired = desired_frontends(services, ctx)
            changes: List[_Change] = []
            failed_keys: Dict[FrontendKey, str] = {}
            for key, d in desired.items():
                old = self.programmed.get(key)
                try:
                    change = self._plan(d, old)
                except (CapacityError, ValueError) as e:
                    failed_keys[key] = str(e)
                    continue
                if change is None:
                    old.desired = d
                    result.unchanged += 1
                else:
                    changes.append(change)
            removed = [p for k, p in self.programmed.items() if k not in desired]

            committed = self._write(changes, failed_keys, result)
            for c in committed:
                self.programmed[c.new.key] = c.new
                if c.old is None:
                    result.added += 1
                else:
                    result.changed += 1
            self._delete(committed, removed, result)
            for p in removed:
                del self.programmed[p.key]
            result.removed = len(removed)
            result.failed = len(failed_keys)
            self._sync_endpoint_health(services, result)
            terminate_tcp = {s.key for s in (*self.services, *services)
                             if s.terminate_connections_on_removal}
            after = self._endpoints_in_use()
            result.removed_endpoints = sorted(
                (addr, port, proto, bool(owners & terminate_tcp))
                for (addr, port, proto), owners in before.items()
                if (addr, port, proto) not in after)
            for key, err in failed_keys.items():
                result.errors.append(f"{desired[key].namespace}/{desired[key].service} {key}: "
                                     f"{err}")
            self.services = list(services)
            self._update_status(services, desired, failed_keys)
            result.seconds = time.monotonic() - started
            self.last_result = result
            if changes or removed or failed_keys:
                log.info("applied %d services: %d frontends added, %d changed, %d removed, %d "
                         "unchanged, %d failed, %d map writes in %.3fs", len(services),
                         result.added, result.changed, result.removed, result.unchanged,
                         result.failed, result.writes, result.seconds)
            for err in result.errors:
                log.error("not programmed: %s", err)
            return result

    def _plan(self, d: DesiredFrontend, old: Optional[ProgrammedFrontend]) -> Optional[_Change]:
        if old is not None and not old.damaged and old.desired == d:
            return None  # the common case on a resync or an unrelated change: nothing to do
        ids: Dict[Tuple[str, int], int] = {}
        new_ids: List[int] = []
        old_ids = old.backend_ids if old else {}
        try:
            for address, port, _ in d.backends:
                if (address, port) in old_ids:
                    ids[(address, port)] = old_ids[(address, port)]
            seq = selection.slots_for(d.algorithm, [w for _, _, w in d.backends])
            # Compare before allocating: an unchanged frontend costs no id and no write.
            if old and not old.damaged and old.algorithm == d.algorithm and \
                    old.affinity_timeout == d.affinity_timeout and len(ids) == len(d.backends):
                slots = tuple(ids[(d.backends[i][0], d.backends[i][1])] for i in seq)
                if slots == old.slots:
                    return None
            for address, port, _ in d.backends:
                if (address, port) not in ids:
                    ids[(address, port)] = self.backend_ids.allocate()
                    new_ids.append(ids[(address, port)])
            new_svc = old is None
            svc_id = self.svc_ids.allocate() if new_svc else old.svc_id
        except CapacityError:
            for i in new_ids:
                self.backend_ids.release(i)
            raise
        slots = tuple(ids[(d.backends[i][0], d.backends[i][1])] for i in seq)
        if len(slots) > m.SLOT_INDEX_MASK:
            raise ValueError(f"{len(slots)} slots exceed the per-frontend limit")
        keep = set(ids.values())
        dropped = [i for i in old_ids.values() if i not in keep]
        new = ProgrammedFrontend(d.key, svc_id, (1 - old.bank) if old else 0, d.algorithm,
                                 ((old.revision if old else 0) + 1) & 0xFFFFFFFF, slots, ids, d,
                                 affinity_timeout=d.affinity_timeout)
        return _Change(d, old, new, new_ids, dropped, new_svc)

    def _write(self, changes: List[_Change], failed: Dict[FrontendKey, str],
               result: ApplyResult) -> List[_Change]:
        """Steps 1-4. Returns the changes whose master was written."""
        if not changes:
            return []
        # A reused id may still have its previous owner's counters: clear them before the id
        # is published (the datapath creates a zeroed entry on first use).
        reused_svc = [m.u32(i) for i in self.svc_ids.take_reused()]
        reused_be = [m.u32(i) for i in self.backend_ids.take_reused()]
        be_keys, be_values = [], []
        for c in changes:
            proto = m.PROTO_IDS[c.new.key.protocol]
            fresh = set(c.new_backend_ids)
            for (address, port), ident in c.new.backend_ids.items():
                if ident in fresh:
                    be_keys.append(m.pack_u32(ident))
                    be_values.append(m.pack_backend(address, port, proto, c.new.svc_id,
                                                    m.BACKEND_ACTIVE))
        slot_keys, slot_values = [], []
        for c in changes:
            key = c.new.key
            bank = c.new.bank
            for i, ident in enumerate(c.new.slots, start=1):
                slot_keys.append(key.map_key(m.slot_number(bank, i)))
                slot_values.append(m.pack_slot_value(ident))
        try:
            self.maps.delete_batch("svc_stats", reused_svc)
            self.maps.delete_batch("backend_stats", reused_be)
            self.maps.update_packed("backends", be_keys, be_values)
            self.maps.update_packed("services", slot_keys, slot_values)
        except OSError as e:
            # Nothing points at what we wrote yet: take it back, keep the old sets serving.
            self.maps.delete_batch("services", slot_keys)
            self.maps.delete_batch("backends", be_keys)
            self._release(changes)
            for c in changes:
                failed[c.new.key] = f"map write failed ({e.strerror}); the previous state " \
                                    f"keeps serving"
            return []
        master_keys = [c.new.key.map_key(0) for c in changes]
        master_values = [m.pack_master_value(c.new.svc_id, len(c.new.slots), c.new.bank,
                                             m.ALGORITHM_IDS[c.new.algorithm], c.new.revision,
                                             m.SVC_F_AFFINITY if c.new.affinity_timeout else 0,
                                             c.new.affinity_timeout)
                         for c in changes]
        done = len(master_keys)
        try:
            self.maps.update_packed("services", master_keys, master_values)
        except OSError as e:
            done = getattr(e, "done", 0)
            lost = changes[done:]
            self.maps.delete_batch("services", [c.new.key.map_key(m.slot_number(c.new.bank, i))
                                                for c in lost
                                                for i in range(1, len(c.new.slots) + 1)])
            self._release(lost)
            for c in lost:
                failed[c.new.key] = f"master write failed ({e.strerror}); the previous state " \
                                    f"keeps serving"
        result.writes += len(be_keys) + len(slot_keys) + done
        return changes[:done]

    def _release(self, changes: List[_Change]) -> None:
        for c in changes:
            for i in c.new_backend_ids:
                self.backend_ids.release(i)
            if c.new_svc_id:
                self.svc_ids.release(c.new.svc_id)

    def _delete(self, committed: List[_Change], removed: List[ProgrammedFrontend],
                result: ApplyResult) -> None:
        """Step 5: everything no master points at any more."""
        masters = [p.key.map_key(0) for p in removed]
        slots = [p.key.map_key(m.slot_number(p.bank, i)) for p in removed
                 for i in range(1, p.slot_count + 1)]
        backends: List[int] = []
        svc_ids: List[int] = []
        for p in removed:
            backends.extend(p.backend_ids.values())
            svc_ids.append(p.svc_id)
        for c in committed:
            if c.old is not None:
                slots.extend(c.old.key.map_key(m.slot_number(c.old.bank, i))
                             for i in range(1, c.old.slot_count + 1))
                backends.extend(c.dropped_backend_ids)
        try:
            result.writes += self.maps.delete_batch("services", masters)
            result.writes += self.maps.delete_batch("services", slots)
            result.writes += self.maps.delete_batch("backends", [m.u32(b) for b in backends])
            self.maps.delete_batch("backend_stats", [m.u32(b) for b in backends])
            self.maps.delete_batch("svc_stats", [m.u32(s) for s in svc_ids])
        except OSError as e:
            log.error("deleting stale map entries failed (%s); they will be retried at the "
                      "next resync", e)
        for b in backends:
            self.backend_ids.release(b)
        for s in svc_ids:
            self.svc_ids.release(s)

    def _endpoints_in_use(self) -> Dict[Tuple[str, int, str], set]:
        """(address, port, protocol) of every backend in a selection set -> its services."""
        out: Dict[Tuple[str, int, str], set] = {}
        for fk, p in self.programmed.items():
            owner = (p.desired.namespace, p.desired.service) if p.desired else None
            for (address, port) in p.backend_ids:
                out.setdefault((address, port, fk.protocol), set()).add(owner)
        return out

    def _sync_endpoint_health(self, services: Sequence[Service], result: ApplyResult) -> None:
        """Watch the TCP endpoints of services with outlierDetection (sockops counts their
        connect outcomes only if an entry exists), and stop watching the others."""
        want = set()
        for svc in services:
            if svc.outlier_detection is None:
                continue
            for sp in svc.ports:
                if sp.protocol == "TCP":
                    for b in svc.backends:
                        want.add((b.address, b.target_port(sp)))
        add = sorted(want - self.endpoints)
        drop = sorted(self.endpoints - want)
        try:
            self.maps.update_packed("endpoint_health",
                                    [m.pack_endpoint_key(a, p) for a, p in add],
                                    [bytes(ctypes.sizeof(m.EndpointHealth))] * len(add))
            self.maps.delete_batch("endpoint_health", [m.pack_endpoint_key(a, p) for a, p in drop])
        except OSError as e:
            result.errors.append(f"endpoint_health: {e}")
            return
        result.writes += len(add) + len(drop)
        self.endpoints = want

    def reset_endpoint(self, address: str, port: int) -> None:
        """Zero an endpoint's consecutive-failure count (after an ejection)."""
        with self.lock:
            if (address, port) in self.endpoints:
                self.maps.update_packed("endpoint_health", [m.pack_endpoint_key(address, port)],
                                        [bytes(ctypes.sizeof(m.EndpointHealth))])

    def endpoint_health(self) -> Dict[Tuple[str, int], Dict[str, int]]:
        out = {}
        for key, value in self.maps.items("endpoint_health"):
            out[(m.decode_addr(key.family, key.addr), m.port_host(key.port))] = {
                "consecutive_failures": value.consecutive_failures, "failures": value.failures,
                "successes": value.successes}
        return out

    def _collect_garbage(self, result: ApplyResult) -> None:
        """Delete what adoption found unreferenced (an interrupted update's inactive bank,
        orphaned backends). No master points at it, so it can go before any new write."""
        if not (self._garbage_slots or self._garbage_backends or self._garbage_svc_stats):
            return
        try:
            result.writes += self.maps.delete_batch("services", self._garbage_slots)
            result.writes += self.maps.delete_batch(
                "backends", [m.u32(b) for b in self._garbage_backends])
            self.maps.delete_batch("backend_stats", [m.u32(b) for b in self._garbage_backends])
            self.maps.delete_batch("svc_stats", [m.u32(s) for s in self._garbage_svc_stats])
        except OSError as e:
            log.error("removing stale entries failed: %s", e)
            return
        self._garbage_slots, self._garbage_backends, self._garbage_svc_stats = [], [], []

    def _update_status(self, services, desired, failed) -> None:
        by_service: Dict[Tuple[str, str], List[FrontendKey]] = {}
        for k, d in desired.items():
            by_service.setdefault((d.namespace, d.service), []).append(k)
        status: Dict[Tuple[str, str], Dict[str, object]] = {}
        for svc in services:
            keys = by_service.get(svc.key, [])
            errors = [f"{k}: {failed[k]}" for k in keys if k in failed]
            status[svc.key] = {"programmed": not errors, "errors": errors,
                               "frontends": len(keys)}
        self.status = status

    # -- verification -----------------------------------------------------------------------
    def verify(self) -> List[str]:
        """Compare the kernel's masters with what we believe is programmed; mark drift."""
        with self.lock:
            kernel = {}
            for key, value in self.maps.items("services"):
                if key.slot == 0:
                    kernel[(tuple(key.addr), key.port, key.proto, key.family)] = \
                        (value.svc_id, value.count, value.bank)
            drift = []
            for fk, p in self.programmed.items():
                k = m.SvcKey.from_buffer_copy(fk.map_key(0))
                got = kernel.pop((tuple(k.addr), k.port, k.proto, k.family), None)
                if got != (p.svc_id, len(p.slots), p.bank):
                    drift.append(f"{fk}: kernel has {got}, expected "
                                 f"{(p.svc_id, len(p.slots), p.bank)}")
                    p.damaged = True
            for ident in kernel:
                drift.append(f"unknown frontend in kernel: {ident}")
            return drift

    # -- views ------------------------------------------------------------------------------
    def snapshot(self) -> List[Dict[str, object]]:
        """Programmed frontends with their labels, for metrics and the admin API."""
        with self.lock:
            out = []
            for fk, p in sorted(self.programmed.items()):
                d = p.desired
                counts: Dict[int, int] = {}
                for ident in p.slots:
                    counts[ident] = counts.get(ident, 0) + 1
                weights = {(a, port): w for a, port, w in d.backends} if d else {}
                backends = [{"address": a, "port": port, "id": ident,
                             "weight": weights.get((a, port)), "slots": counts.get(ident, 0)}
                            for (a, port), ident in sorted(p.backend_ids.items())]
                out.append({"namespace": d.namespace if d else "", "service": d.service if d
                            else "", "port_name": d.port_name if d else "", "vip": fk.vip,
                            "port": fk.port, "protocol": fk.protocol, "family": fk.family,
                            "svc_id": p.svc_id, "algorithm": p.algorithm,
                            "revision": p.revision, "slots": len(p.slots),
                            "selection": d.selection if d else "", "backends": backends})
            return out
