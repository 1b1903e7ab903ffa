"""The kernel side of the Maglev tables: one inner array per maglev frontend, swapped into the
pinned outer map `maglev` (ARRAY_OF_MAPS, index svc_id) in one write.

Each frontend has two tables, as Katran keeps two rings: the active one, which the datapath
reads through `maglev`, and a spare holding the table before it, parked in a second pinned
outer map, `maglev_spare`, that no program reads. A change writes the new table into the
spare, only the rows where it differs from what the spare holds (read back in one batch:
Katran's changed-positions write), then points `maglev` at it: one map write, so a connect()
sees the old table or the new one, never a half-written one. The old active becomes the spare.

Both tables are held by the outer maps alone, and found again by map id: the agent keeps no
fd and no copy of the rows between changes (at 100,000 maglev frontends it would need 200,000
fds, more than a node's open-file limit allows), and a restarted agent finds the spares too.
A spare doubles the kernel memory of a table (2 x rows x 4 bytes); in exchange an update writes
O(changed rows), not O(rows), and is still atomic.

The reconciler is the only caller (one writer per thing); tests/fakemaps.py has an in-memory
twin with the same methods.
"""
from __future__ import annotations

import array
import ctypes
import errno
from typing import Dict, List, Optional, Sequence

from . import bpfsys

_ROW = ctypes.c_uint32


class KernelTables:
    def __init__(self, outer_fd: int, spare_fd: int):
        self.outer_fd = outer_fd  # `maglev`: what the datapath reads
        self.spare_fd = spare_fd  # `maglev_spare`: parked tables, read by nobody
        self._staged: Dict[int, int] = {}  # svc_id -> fd of a staged table (until commit)
        # Every write of an outer map waits for an RCU grace period (~10 ms here), and an
        # array of maps has no batch delete: so writes are batched (one wait per batch), and
        # "no table" is this shared 1-row table, which a batch update can write.
        self._none = bpfsys.map_create(bpfsys.MAP_TYPE_ARRAY, 4, 4, 1, bpfsys.F_INNER_MAP,
                                       "nm_maglev_none")

    # -- an update: stage (invisible), commit (the swap), or revert -------------------------
    def stage(self, svc_id: int, rows: Sequence[int]) -> int:
        """Write `rows` into frontend svc_id's spare table (a new one if it has none of this
        size). Nothing reads it until commit(). Returns the rows written."""
        new = array.array("I", rows)
        fd = _open(self.spare_fd, svc_id)
        if fd is not None and bpfsys.map_info(fd).max_entries != len(new):
            bpfsys.close(fd)
            fd = None
        try:
            if fd is None:
                fd = bpfsys.map_create(bpfsys.MAP_TYPE_ARRAY, 4, 4, len(new),
                                       bpfsys.F_INNER_MAP, "nm_maglev")
                have = array.array("I", bytes(4 * len(new)))
            else:
                have = read_rows(fd)
            changed = [i for i, (a, b) in enumerate(zip(have, new)) if a != b]
            _write_rows(fd, changed, new)
        except OSError:
            bpfsys.close(fd)
            raise
        self.unstage([svc_id])
        self._staged[svc_id] = fd
        return len(changed)

    def commit(self, svc_ids: Sequence[int]) -> None:
        """Point `maglev` at the staged tables (one write each, in one batch: the switch for
        readers), then park the tables they replace as the spares. On failure no staged table
        serves (those already swapped are swapped back) and the error is raised."""
        if not svc_ids:
            return
        fds = [self._staged.pop(i) for i in svc_ids]
        olds = [_open(self.outer_fd, i) for i in svc_ids]  # before the swap frees them
        try:
            try:
                _set_all(self.outer_fd, svc_ids, fds)
            except OSError as e:
                done = getattr(e, "done", 0)
                if done:
                    _set_all(self.outer_fd, svc_ids[:done],
                             [self._none if o is None else o for o in olds[:done]])
                raise
            try:
                _set_all(self.spare_fd, svc_ids, [self._none if o is None else o for o in olds])
            except OSError:
                pass  # a spare is only a head start: the next change writes a fresh table
        finally:
            for fd in fds + olds:
                bpfsys.close(fd)

    def revert(self, svc_ids: Sequence[int]) -> None:
        """Undo the last commit (the master writes that should follow it failed): the previous
        tables serve again, and the new ones become the spares."""
        if not svc_ids:
            return
        news = [_open(self.outer_fd, i) for i in svc_ids]
        olds = [_open(self.spare_fd, i) for i in svc_ids]
        try:
            _set_all(self.outer_fd, svc_ids, [self._none if o is None else o for o in olds])
            _set_all(self.spare_fd, svc_ids, [self._none if n is None else n for n in news])
        finally:
            for fd in news + olds:
                bpfsys.close(fd)

    def unstage(self, svc_ids: Sequence[int]) -> None:
        for i in svc_ids:
            bpfsys.close(self._staged.pop(i, None))

    def remove(self, svc_ids: Sequence[int]) -> None:
        """These frontends no longer use Maglev (or are gone): both entries become the empty
        table, and the kernel frees their tables with their last reference."""
        if not svc_ids:
            return
        self.unstage(svc_ids)
        _set_all(self.outer_fd, svc_ids, [self._none] * len(svc_ids))
        _set_all(self.spare_fd, svc_ids, [self._none] * len(svc_ids))

    # -- reads ------------------------------------------------------------------------------
    def adopt(self, svc_id: int) -> Optional[Sequence[int]]:
        """The rows of the table a previous agent left for svc_id, or None."""
        return self.kernel_rows(svc_id)

    def size(self, svc_id: int) -> Optional[int]:
        """Rows of the table the datapath reads for svc_id, or None (for prune)."""
        fd = _open(self.outer_fd, svc_id)
        if fd is None:
            return None
        try:
            rows = bpfsys.map_info(fd).max_entries
            return None if rows == 1 else rows
        finally:
            bpfsys.close(fd)

    def kernel_rows(self, svc_id: int) -> Optional[List[int]]:
        """The rows the datapath reads for svc_id now, straight from the kernel; None when it
        has no table (an empty entry, or the 1-row empty table)."""
        fd = _open(self.outer_fd, svc_id)
        if fd is None:
            return None
        try:
            rows = read_rows(fd)
            return None if len(rows) == 1 else list(rows)
        finally:
            bpfsys.close(fd)

    def close(self) -> None:
        self.unstage(list(self._staged))
        bpfsys.close(self._none)


def _open(outer_fd: int, svc_id: int) -> Optional[int]:
    """An fd of the table in outer[svc_id], or None. (User space reads a map id there.)"""
    map_id = ctypes.c_uint32()
    if not bpfsys.map_lookup(outer_fd, _ROW(svc_id), map_id):
        return None
    try:
        return bpfsys.map_fd_by_id(map_id.value)
    except bpfsys.BPFError as e:
        if e.errno == errno.ENOENT:  # replaced and freed since the lookup
            return None
        raise


def _set_all(outer_fd: int, svc_ids: Sequence[int], table_fds: Sequence[int]) -> None:
    n = len(svc_ids)
    bpfsys.map_update_batch(outer_fd, (_ROW * n)(*svc_ids), (_ROW * n)(*table_fds), n)


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
