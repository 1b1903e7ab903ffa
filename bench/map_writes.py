#!/usr/bin/env python3
"""The reconciler's per-change map writes, in process, on real (unpinned) maps: thread CPU a
change of the six batch calls a one-service change makes (3 backends and 3 slots written, its
master, then the old bank's 3 slots, 3 backends and their 3 backend_stats deleted), through
nodemesh.datapath.maps.Maps. Needs root (bpf(2)). Compare agent copies side by side:

    sudo PYTHONPATH=<copy>/agent .venv/bin/python bench/map_writes.py [CHANGES] [--cold]

--cold evicts the CPU caches (a 32 MiB walk) before each change, as the agent meets them
between changes ~0.3 s apart.
"""
import ctypes
import sys
import time

from nodemesh.datapath import bpfsys
from nodemesh.datapath import maps as m


def main() -> None:
    changes = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 2000
    cold = "--cold" in sys.argv
    fds = {}
    for name in ("services", "backends", "backend_stats"):
        spec = m.MAP_BY_NAME[name]
        fds[name] = bpfsys.map_create(spec.map_type, ctypes.sizeof(spec.key),
                                      ctypes.sizeof(spec.value), 65536, name=name)
    maps = m.Maps(fds)
    prefix = m.address_key_prefix("10.96.0.1", 80, 6)
    evict = bytearray(32 << 20)
    samples = []
    try:
        for n in range(changes):
            bank, ids = n & 1, [1000 + 3 * (n & 1) + i for i in range(3)]
            old_ids = [1000 + 3 * (1 - (n & 1)) + i for i in range(3)]
            be_keys = b"".join(m.pack_u32(i) for i in ids)
            be_values = b"".join(m.pack_backend(f"10.0.0.{i % 250}", 8080, 6, 7, 1) for i in ids)
            slot_keys = b"".join(m.pack_slot_keys(prefix, bank, 3))
            slot_values = b"".join(m.pack_slot_values(ids))
            master = m.pack_master_key(prefix)
            master_value = m.pack_master_value(7, 3, bank, 0, n & 0xFFFFFFFF)
            old_slots = m.pack_slot_keys(prefix, 1 - bank, 3)
            if cold:
                evict[::64] = bytes(len(evict) // 64)
            t0 = time.thread_time_ns()
            maps.update_joined("backends", be_keys, be_values)
            maps.update_joined("services", slot_keys, slot_values)
            maps.update_joined("services", master, master_value)
            maps.delete_batch("services", old_slots)
            maps.delete_batch("backends", [m.pack_u32(i) for i in old_ids])
            maps.delete_batch("backend_stats", [m.pack_u32(i) for i in old_ids])
            samples.append(time.thread_time_ns() - t0)
    finally:
        maps.close()
    samples.sort()
    print(f"{changes} changes{' (cold)' if cold else ''}: six batch calls a change, thread CPU "
          f"median {samples[len(samples) // 2] / 1000:.1f} us, p90 "
          f"{samples[len(samples) * 9 // 10] / 1000:.1f} us")


if __name__ == "__main__":
    main()
