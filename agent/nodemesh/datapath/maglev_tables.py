"""The kernel side of the Maglev tables: one inner array per maglev frontend, swapped into the
pinned outer map `maglev` (ARRAY_OF_MAPS, index svc_id) in one write.

Each frontend has two tables, as Katran keeps two rings: the active one, which the datapath
reads through the outer map, and a spare holding the table before it. A change writes the new
table into the spare, only the rows where it differs from what the spare holds (Katran's
changed-positions write), then points the outer map at it: one map write, so a connect() sees
the old table or the new one, never a half-written one. The old active becomes the spare.

A spare doubles the kernel memory of a table (2 x rows x 4 bytes); in exchange an update writes
O(changed rows), not O(rows), and is still atomic. The rows live only in the kernel: the diff
reads the spare back (one batch read), so the agent's memory does not grow with the tables,
but it holds two fds per maglev frontend (the open-file limit is raised to its hard limit).
After a restart the active tables are adopted (outer map -> inner map id -> fd) and the
spares are gone: the next change of such a frontend writes a whole fresh table once.

The reconciler is the only caller (one writer per thing); tests/fakemaps.py has an in-memory
twin with the same methods.
"""
from __future__ import annotations

import array
import ctypes
import resource
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from . import bpfsys

_ROW = ctypes.c_uint32


@dataclass
class Table:
    fd: int
    size: int  # rows
    fresh: bool = False  # created and never written: every row is 0


class KernelTables:
    def __init__(self, outer_fd: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.outer_fd = outer_fd
        self.active: Dict[int, Table] = {}
        self.spare: Dict[int, Table] = {}
        self._staged: Dict[int, Table] = {}

    # -- an update: stage (invisible), commit (the swap), or revert -------------------------
    def stage(self, svc_id: int, rows: Sequence[int]) -> int:
        """Write `rows` into frontend svc_id's spare table (a new one if it has none of this
        size). Nothing reads it until commit(). Returns the rows written."""
        new = array.array("I", rows)
        spare = self.spare.pop(svc_id, None)
        if spare is not None and spare.size != len(new):
            bpfsys.close(spare.fd)
            spare = None
        if spare is None:
            fd = bpfsys.map_create(bpfsys.MAP_TYPE_ARRAY, 4, 4, len(new), bpfsys.F_INNER_MAP,
                                   "nm_maglev")
            spare = Table(fd, len(new), fresh=True)
        try:
            have = array.array("I", bytes(4 * len(new))) if spare.fresh else read_rows(spare.fd)
            changed = [i for i, (a, b) in enumerate(zip(have, new)) if a != b]
            _write_rows(spare.fd, changed, new)
        except OSError:
            bpfsys.close(spare.fd)  # the next try starts from a fresh table
            raise
        spare.fresh = False
        self._staged[svc_id] = spare
        return len(changed)

    def commit(self, svc_id: int) -> None:
        """Point the outer map at the staged table: the one write that switches readers."""
        table = self._staged.pop(svc_id)
        try:
            bpfsys.map_update(self.outer_fd, _ROW(svc_id), ctypes.c_uint32(table.fd))
        except OSError:
            self.spare[svc_id] = table  # still a good spare: its rows are known
            raise
        old = self.active.get(svc_id)
        self.active[svc_id] = table
        if old is not None:
            self.spare[svc_id] = old

    def revert(self, svc_id: int) -> None:
        """Undo the last commit (the master write that should follow it failed): the previous
        table serves again, or none if there was none."""
        new = self.active.pop(svc_id)
        old = self.spare.pop(svc_id, None)
        if old is not None:
            bpfsys.map_update(self.outer_fd, _ROW(svc_id), ctypes.c_uint32(old.fd))
            self.active[svc_id] = old
        else:
            self._delete_outer(svc_id)
        self.spare[svc_id] = new

    def unstage(self, svc_id: int) -> None:
        table = self._staged.pop(svc_id, None)
        if table is not None:
            self.spare[svc_id] = table

    def remove(self, svc_id: int) -> None:
        """The frontend no longer uses Maglev (or is gone): clear its outer entry, free both."""
        self._delete_outer(svc_id)
        for tables in (self.active, self.spare, self._staged):
            t = tables.pop(svc_id, None)
            if t is not None:
                bpfsys.close(t.fd)

    def _delete_outer(self, svc_id: int) -> None:
        key = _ROW(svc_id)  # alive across the call: the attr holds only its address
        try:
            bpfsys.bpf(bpfsys.MAP_DELETE_ELEM, bpfsys._ElemAttr(
                map_fd=self.outer_fd, key=ctypes.addressof(key)))
        except bpfsys.BPFError as e:
            if e.errno != 2:  # ENOENT: an array-of-maps slot that is already empty
                raise

    # -- reads ------------------------------------------------------------------------------
    def adopt(self, svc_id: int) -> Optional[Sequence[int]]:
        """Take over the table a previous agent left for svc_id; its rows, or None."""
        map_id = ctypes.c_uint32()
        if not bpfsys.map_lookup(self.outer_fd, _ROW(svc_id), map_id):
            return None
        fd = bpfsys.map_fd_by_id(map_id.value)
        rows = read_rows(fd)
        self.active[svc_id] = Table(fd, len(rows))
        return rows

    def kernel_rows(self, svc_id: int) -> Optional[List[int]]:
        """The rows the datapath reads for svc_id now, straight from the kernel."""
        map_id = ctypes.c_uint32()
        if not bpfsys.map_lookup(self.outer_fd, _ROW(svc_id), map_id):
            return None
        fd = bpfsys.map_fd_by_id(map_id.value)
        try:
            return list(read_rows(fd))
        finally:
            bpfsys.close(fd)

    def rows_in_kernel(self) -> int:
        """Rows held in kernel memory (active + spare), 4 bytes each."""
        return sum(t.size for d in (self.active, self.spare) for t in d.values())

    def close(self) -> None:
        for tables in (self.active, self.spare, self._staged):
            for t in tables.values():
                bpfsys.close(t.fd)
            tables.clear()


def _write_rows(fd: int, rows: List[int], values: array.array) -> None:
    if not rows:
        return
    n = len(rows)
    keys = (_ROW * n)(*rows)
    vals = (_ROW * n)(*(values[i] for i in rows))
    bpfsys.map_update_batch(fd, keys, vals, n)


def read_rows(fd: int) -> array.array:
    info = bpfsys.map_info(fd)
    out = array.array("I", bytes(4 * info.max_entries))
    for key, value in bpfsys.map_lookup_batch(fd, _ROW, _ROW):
        out[int(key)] = int(value)
    return out
