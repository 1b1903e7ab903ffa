"""In-memory maps with the interface of datapath.maps.Maps, for reconciler tests without root
(Cilium's FakeLBMaps). Capacity is enforced like the kernel's, and any operation can be made
to fail on demand, part-way through a batch as the kernel's batch calls do."""
from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from nodemesh.datapath import maps as m


@dataclass
class Fault:
    op: str            # "update" | "delete"
    name: str          # map name
    after: int = 0     # elements done before it fails
    err: int = errno.ENOMEM
    times: int = 1     # how many calls fail
    skip: int = 0      # matching calls that go through first


class FakeMaps:
    CPUS = 2

    def __init__(self, sizes: m.MapSizes = m.MapSizes()):
        self.sizes = sizes
        self.data: Dict[str, Dict[bytes, bytes]] = {spec.name: {} for spec in m.MAPS}
        self.faults: List[Fault] = []
        self.calls: List[Tuple[str, str, int]] = []  # (op, map, elements)
        self.tables = FakeTables(self)

    def maglev_tables(self) -> "FakeTables":
        return self.tables

    def fail(self, op: str, name: str, after: int = 0, err: int = errno.ENOMEM,
             times: int = 1, skip: int = 0) -> None:
        self.faults.append(Fault(op, name, after, err, times, skip))

    def _fault(self, op: str, name: str) -> Optional[Fault]:
        for f in self.faults:
            if f.op == op and f.name == name and f.times > 0:
                if f.skip > 0:
                    f.skip -= 1
                    continue
                f.times -= 1
                return f
        return None

    @staticmethod
    def _error(err: int, done: int) -> OSError:
        e = OSError(err, f"injected: {errno.errorcode.get(err, err)}")
        e.done = done  # type: ignore[attr-defined]
        return e

    def update_packed(self, name: str, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        if not keys:
            return
        self.calls.append(("update", name, len(keys)))
        fault = self._fault("update", name)
        table = self.data[name]
        cap = self.sizes.capacity(m.MAP_BY_NAME[name])
        for i, (k, v) in enumerate(zip(keys, values)):
            if fault is not None and i >= fault.after:
                raise self._error(fault.err, i)
            if k not in table and len(table) >= cap:
                raise self._error(errno.E2BIG, i)
            table[k] = v

    def update_joined(self, name: str, keys: bytes, values: bytes) -> None:
        spec = m.MAP_BY_NAME[name]
        ks, vs = ctypes.sizeof(spec.key), ctypes.sizeof(spec.value)
        keys_, values_ = [keys[i:i + ks] for i in range(0, len(keys), ks)], \
            [values[i:i + vs] for i in range(0, len(values), vs)]
        table = self.data[name]
        if keys_ and not any(f.op == "update" and f.name == name and f.times > 0
                             for f in self.faults) and \
                len(table) + len(keys_) <= self.sizes.capacity(spec):
            # Nothing can fail: in one go (bench/core_round.py's first round writes 700,000).
            self.calls.append(("update", name, len(keys_)))
            table.update(zip(keys_, values_))
            return
        self.update_packed(name, keys_, values_)

    def delete_batch(self, name: str, keys: Sequence[object]) -> int:
        if not keys:
            return 0
        self.calls.append(("delete", name, len(keys)))
        fault = self._fault("delete", name)
        table = self.data[name]
        done = 0
        for i, k in enumerate(keys):
            if fault is not None and i >= fault.after:
                raise self._error(fault.err, done)
            if table.pop(bytes(k), None) is not None:  # type: ignore[call-overload]
                done += 1
        return done

    def items(self, name: str) -> Iterator[Tuple[object, object]]:
        spec = m.MAP_BY_NAME[name]
        value = (spec.value * self.CPUS) if spec.percpu else spec.value
        for k, v in list(self.data[name].items()):
            yield spec.key.from_buffer_copy(k), value.from_buffer_copy(v)

    def count(self, name: str) -> int:
        return len(self.data[name])

    def writes(self) -> int:
        return sum(n for _, _, n in self.calls)

    # -- what a connect() would see ---------------------------------------------------------
    def lookup(self, name: str, key: bytes, type_: type) -> Optional[object]:
        raw = self.data[name].get(key)
        return None if raw is None else type_.from_buffer_copy(raw)

    def serving(self, fk) -> Optional[List[Tuple[str, int]]]:
        """The backends a new connection to frontend `fk` can reach, read the way the
        datapath reads them (master, then its bank's slots, then backends); None if the
        frontend is not in the map, and an AssertionError if a slot or backend is dangling."""
        master = self.lookup("services", fk.map_key(0), m.SvcValue)
        if master is None:
            return None
        if master.algorithm == m.ALG_MAGLEV and master.backend_id and master.count:
            rows = self.tables.kernel_rows(master.svc_id)
            assert rows is not None and len(rows) == master.backend_id, \
                f"{fk}: its Maglev table is missing or of another size"
            for ident in set(rows):
                assert m.pack_u32(ident) in self.data["backends"], \
                    f"{fk}: Maglev row names backend {ident}, which is missing"
        out = []
        for i in range(1, master.count + 1):
            slot = self.lookup("services", fk.map_key(m.slot_number(master.bank, i)), m.SvcValue)
            assert slot is not None, f"{fk}: slot {i} of bank {master.bank} is missing"
            be = self.lookup("backends", m.pack_u32(slot.backend_id), m.BackendEntry)
            assert be is not None, f"{fk}: backend {slot.backend_id} is missing"
            out.append((m.decode_addr(be.family, be.addr), m.port_host(be.port)))
        return out


class FakeTables:
    """The Maglev tables of datapath/maglev_tables.py in memory: outer maps of svc_id -> table
    number (`outer` is what the datapath reads, `spare` the parked tables), tables of rows.
    Faults: ("update", "maglev") fails a row write, ("swap", "maglev") an outer-map batch."""

    def __init__(self, maps: FakeMaps):
        self.maps = maps
        self.outer: Dict[int, int] = {}            # what the datapath reads
        self.rows: Dict[int, List[int]] = {}       # table number -> rows
        self.active: Dict[int, int] = {}
        self.spare: Dict[int, int] = {}
        self._staged: Dict[int, int] = {}
        self._next = 1
        self.rows_written = 0

    def stage(self, svc_id: int, rows: Sequence[int]) -> int:
        """As the kernel's: the spare itself is written (it stays parked until commit), or a
        fresh table when there is no spare of this size."""
        spare = self.spare.get(svc_id)
        fresh = spare is None or len(self.rows[spare]) != len(rows)
        if fresh:
            spare, self._next = self._next, self._next + 1
            self.rows[spare] = [0] * len(rows)
        assert spare is not None
        changed = [i for i, (a, b) in enumerate(zip(self.rows[spare], rows)) if a != b]
        if changed:
            self.maps.calls.append(("update", "maglev", len(changed)))
            fault = self.maps._fault("update", "maglev")
            if fault is not None:
                for i in changed[:fault.after]:
                    self.rows[spare][i] = rows[i]
                if fresh:
                    del self.rows[spare]
                raise self.maps._error(fault.err, fault.after)
        self.rows[spare] = list(rows)
        self.rows_written += len(changed)
        self.unstage([svc_id])
        self._staged[svc_id] = spare
        return len(changed)

    def _swap(self, svc_ids: Sequence[int]) -> None:
        """One batch write of the outer map (a fault fails it before any element)."""
        self.maps.calls.append(("swap", "maglev", len(svc_ids)))
        fault = self.maps._fault("swap", "maglev")
        if fault is not None:
            raise self.maps._error(fault.err, 0)

    def _drop(self, table: Optional[int]) -> None:
        if table is not None and table not in self.outer.values() and \
                table not in self.spare.values() and table not in self._staged.values():
            self.rows.pop(table, None)

    def commit(self, svc_ids: Sequence[int]) -> None:
        if not svc_ids:
            return
        try:
            self._swap(svc_ids)
        except OSError:
            for i in svc_ids:
                self._drop(self._staged.pop(i))
            raise
        for i in svc_ids:
            old = self.outer.get(i)
            self.outer[i] = self.active[i] = self._staged.pop(i)
            previous_spare = self.spare.pop(i, None)
            if old is not None:
                self.spare[i] = old
            self._drop(previous_spare)

    def revert(self, svc_ids: Sequence[int]) -> None:
        if not svc_ids:
            return
        self._swap(svc_ids)
        for i in svc_ids:
            new, old = self.outer.pop(i, None), self.spare.pop(i, None)
            self.active.pop(i, None)
            if old is not None:
                self.outer[i] = self.active[i] = old
            if new is not None:
                self.spare[i] = new

    def unstage(self, svc_ids: Sequence[int]) -> None:
        for i in svc_ids:
            self._drop(self._staged.pop(i, None))

    def remove(self, svc_ids: Sequence[int]) -> None:
        if not svc_ids:
            return
        self._swap(svc_ids)
        for i in svc_ids:
            gone = [d.pop(i, None) for d in (self.outer, self.active, self.spare, self._staged)]
            for t in gone:
                self._drop(t)

    def adopt(self, svc_id: int) -> Optional[Sequence[int]]:
        return self.kernel_rows(svc_id)

    def size(self, svc_id: int) -> Optional[int]:
        t = self.outer.get(svc_id)
        return None if t is None else len(self.rows[t])

    def kernel_rows(self, svc_id: int) -> Optional[List[int]]:
        t = self.outer.get(svc_id)
        return None if t is None else list(self.rows[t])

    def rows_in_kernel(self) -> int:
        return sum(len(self.rows[t]) for d in (self.active, self.spare) for t in d.values())

    def forget(self) -> None:
        """A restart: what was staged and never committed is gone with the agent's fds; the
        active and spare tables live on in the kernel's outer maps."""
        for t in self._staged.values():
            del self.rows[t]
        self._staged = {}

    def close(self) -> None:
        pass


def zero_stats(maps: FakeMaps, name: str, ident: int) -> None:
    spec = m.MAP_BY_NAME[name]
    maps.data[name][m.pack_u32(ident)] = bytes(ctypes.sizeof(spec.value) * FakeMaps.CPUS)
