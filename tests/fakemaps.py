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
        out = []
        for i in range(1, master.count + 1):
            slot = self.lookup("services", fk.map_key(m.slot_number(master.bank, i)), m.SvcValue)
            assert slot is not None, f"{fk}: slot {i} of bank {master.bank} is missing"
            be = self.lookup("backends", m.pack_u32(slot.backend_id), m.BackendEntry)
            assert be is not None, f"{fk}: backend {slot.backend_id} is missing"
            out.append((m.decode_addr(be.family, be.addr), m.port_host(be.port)))
        return out


def zero_stats(maps: FakeMaps, name: str, ident: int) -> None:
    spec = m.MAP_BY_NAME[name]
    maps.data[name][m.pack_u32(ident)] = bytes(ctypes.sizeof(spec.value) * FakeMaps.CPUS)
