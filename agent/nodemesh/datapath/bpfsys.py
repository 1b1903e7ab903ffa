"""The bpf(2) calls nodemesh needs beyond BCC: links, pins, object info and batch map ops.

BCC compiles and loads programs and creates maps; it has no bpf_link API for cgroups and its
batch helpers copy through Python lists. These thin wrappers call the syscall directly with
ctypes. Each attr struct is the leading part of union bpf_attr for that command; the kernel
accepts a shorter attr as long as it is the prefix it expects.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
from functools import lru_cache
from typing import List, Optional

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
           "riscv64": 280}

# enum bpf_cmd
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
OBJ_PIN = 6
OBJ_GET = 7
OBJ_GET_INFO_BY_FD = 15
MAP_LOOKUP_BATCH = 24
MAP_UPDATE_BATCH = 26
MAP_DELETE_BATCH = 27
LINK_CREATE = 28
LINK_UPDATE = 29
LINK_DETACH = 34
MAP_CREATE = 0
MAP_GET_FD_BY_ID = 14

# enum bpf_map_type (the ones we check)
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_ARRAY_OF_MAPS = 12
F_INNER_MAP = 1 << 12  # an inner map of any max_entries fits its outer map
MAP_TYPE_SK_STORAGE = 24
MAP_TYPE_SOCKHASH = 18
MAP_GET_NEXT_KEY = 4
LINK_TYPE_SOCKMAP = 14


class BPFError(OSError):
    pass


def _nr() -> int:
    try:
        return _NR_BPF[platform.machine()]
    except KeyError:
        raise BPFError(errno.ENOSYS, f"unsupported architecture {platform.machine()}")


_nr_bpf = _NR_BPF.get(platform.machine(), 0)  # 0: unsupported, _nr() raises


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret = _libc.syscall(_nr(), cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BPFError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return ret


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    bpf(OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(p), bpf_fd=fd))


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(path.encode())
    return bpf(OBJ_GET, _ObjAttr(pathname=ctypes.addressof(p)))


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("target_btf_id", ctypes.c_uint32), ("pad", ctypes.c_uint32 * 7)]


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return bpf(LINK_CREATE, _LinkCreateAttr(prog_fd=prog_fd, target_fd=target_fd,
                                            attach_type=attach_type))


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("new_prog_fd", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("old_prog_fd", ctypes.c_uint32)]


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Swap the program behind a link in one step: no moment without a program attached."""
    bpf(LINK_UPDATE, _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=new_prog_fd))


class _LinkDetachAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32)]


def link_detach(link_fd: int) -> None:
    bpf(LINK_DETACH, _LinkDetachAttr(link_fd=link_fd))


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("rest", ctypes.c_uint8 * 64)]


class LinkInfo(ctypes.Structure):
    # struct bpf_link_info: type, id, prog_id, then a union (8-aligned); for cgroup links the
    # union starts with cgroup_id (u64) and attach_type (u32).
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("prog_id", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("cgroup_id", ctypes.c_uint64),
                ("attach_type", ctypes.c_uint32), ("rest", ctypes.c_uint8 * 60)]


def _info(fd: int, info: ctypes.Structure) -> ctypes.Structure:
    bpf(OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                      info=ctypes.addressof(info)))
    return info


def map_info(fd: int) -> MapInfo:
    return _info(fd, MapInfo())


def link_info(fd: int) -> LinkInfo:
    return _info(fd, LinkInfo())


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def map_update(fd: int, key, value, flags: int = 0) -> None:
    bpf(MAP_UPDATE_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(key),
                                   value=ctypes.addressof(value), flags=flags))


def map_lookup(fd: int, key, value) -> bool:
    try:
        bpf(MAP_LOOKUP_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(key),
                                       value=ctypes.addressof(value)))
        return True
    except BPFError as e:
        if e.errno == errno.ENOENT:
            return False
        raise


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16)]


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "") -> int:
    """A new map's fd (the Maglev tables: inner maps the agent makes and swaps in)."""
    return bpf(MAP_CREATE, _MapCreateAttr(map_type=map_type, key_size=key_size,
                                          value_size=value_size, max_entries=max_entries,
                                          map_flags=flags, map_name=name.encode()[:15]))


class _GetFdByIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


def map_fd_by_id(map_id: int) -> int:
    return bpf(MAP_GET_FD_BY_ID, _GetFdByIdAttr(id=map_id))
def map_keys(fd: int, key_size: int) -> List[bytes]:
    """Every key of a map, with GET_NEXT_KEY: for maps without batch ops (sockhash)."""
    out: List[bytes] = []
    bufs = [ctypes.create_string_buffer(key_size), ctypes.create_string_buffer(key_size)]
    prev = 0  # NULL: the first key
    while True:
        nxt = bufs[len(out) % 2]  # the other buffer still holds prev
        try:
            bpf(MAP_GET_NEXT_KEY, _ElemAttr(map_fd=fd, key=prev, value=ctypes.addressof(nxt)))
        except BPFError as e:
            if e.errno == errno.ENOENT:
                return out
            raise
        out.append(nxt.raw)
        prev = ctypes.addressof(nxt)


def map_delete(fd: int, key: bytes) -> bool:
    """Delete one key; False if it was not there."""
    buf = ctypes.create_string_buffer(key, len(key))
    try:
        bpf(MAP_DELETE_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(buf)))
        return True
    except BPFError as e:
        if e.errno == errno.ENOENT:
            return False
        raise


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64),
                ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def map_update_batch(fd: int, keys, values, count: int) -> None:
    """Write count (key, value) pairs, in order, in one syscall. keys/values: ctypes arrays.

    On failure, raises with .done set to the number of elements that were written."""
    if count == 0:
        return
    attr = _BatchAttr(keys=ctypes.addressof(keys), values=ctypes.addressof(values), count=count,
                      map_fd=fd)
    try:
        bpf(MAP_UPDATE_BATCH, attr)
    except BPFError as e:
        e.done = attr.count
        raise


# A change's batch writes are a few elements of packed bytes (3 slots, a master, 3 deletes):
# copied into one preallocated buffer a thread, with a preallocated attr, where a ctypes array
# for the keys and one for the values, a new attr and their byref were most of a call's CPU.
_STAGED_BYTES = 16384


class _Staging(threading.local):
    def __init__(self) -> None:
        self.keys = ctypes.create_string_buffer(_STAGED_BYTES)
        self.values = ctypes.create_string_buffer(_STAGED_BYTES)
        self.attr = _BatchAttr()
        self.attr_ref = ctypes.byref(self.attr)
        self.keys_at = ctypes.addressof(self.keys)
        self.values_at = ctypes.addressof(self.values)
        self.elem = _ElemAttr()
        self.elem_ref = ctypes.byref(self.elem)


_staging = _Staging()
_BATCH_SIZE = ctypes.sizeof(_BatchAttr)
_ELEM_SIZE = ctypes.sizeof(_ElemAttr)


def _staged_batch(cmd: int, fd: int, keys: bytes, values: Optional[bytes], count: int) -> int:
    """MAP_UPDATE_BATCH or MAP_DELETE_BATCH of count packed elements that fit the staging
    buffers: 0, or the errno (then _staging.attr.count is the elements done)."""
    st = _staging
    ctypes.memmove(st.keys, keys, len(keys))
    attr = st.attr
    attr.keys = st.keys_at
    if values is None:
        attr.values = 0
    else:
        ctypes.memmove(st.values, values, len(values))
        attr.values = st.values_at
    attr.count = count
    attr.map_fd = fd
    if _libc.syscall(_nr_bpf or _nr(), cmd, st.attr_ref, _BATCH_SIZE) < 0:
        return ctypes.get_errno()
    return 0


def _raise(cmd: int, err: int, done: int) -> None:
    e = BPFError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    e.done = done  # type: ignore[attr-defined]
    raise e


def map_update_packed(fd: int, keys: bytes, values: bytes, count: int) -> None:
    """map_update_batch for count elements packed end to end in bytes: in order, one syscall.

    On failure, raises with .done set to the number of elements that were written."""
    if count == 0:
        return
    if len(keys) > _STAGED_BYTES or len(values) > _STAGED_BYTES:  # a first sync's chunk
        karr = (ctypes.c_char * len(keys)).from_buffer_copy(keys)
        varr = (ctypes.c_char * len(values)).from_buffer_copy(values)
        map_update_batch(fd, karr, varr, count)
        return
    err = _staged_batch(MAP_UPDATE_BATCH, fd, keys, values, count)
    if err:
        _raise(MAP_UPDATE_BATCH, err, _staging.attr.count)


def map_delete_packed(fd: int, keys: bytes, count: int) -> int:
    """map_delete_batch for count keys packed end to end in bytes; keys already gone are
    skipped. Returns how many went."""
    if count == 0:
        return 0
    if len(keys) > _STAGED_BYTES:
        arr = (ctypes.c_char * len(keys)).from_buffer_copy(keys)
        return _delete_batch(fd, arr, len(keys) // count, count)
    err = _staged_batch(MAP_DELETE_BATCH, fd, keys, None, count)
    if not err:
        return count
    if err != errno.ENOENT:
        _raise(MAP_DELETE_BATCH, err, _staging.attr.count)
    # A missing key stops the batch at that key: finish one by one, skipping the missing
    # (the stats of a backend nobody connected to, usually: a reused id's, a dropped one's).
    return _delete_rest(fd, _staging.keys_at, len(keys) // count, _staging.attr.count, count)


def map_delete_batch(fd: int, keys, count: int) -> int:
    """Delete count keys; keys that are already gone are skipped. Returns how many went."""
    if count == 0:
        return 0
    return _delete_batch(fd, keys, ctypes.sizeof(keys) // len(keys), count)


def _delete_batch(fd: int, keys, size: int, count: int) -> int:
    attr = _BatchAttr(keys=ctypes.addressof(keys), count=count, map_fd=fd)
    try:
        bpf(MAP_DELETE_BATCH, attr)
        return attr.count
    except BPFError as e:
        if e.errno != errno.ENOENT:
            raise
    # A missing key stops the batch at that key: finish one by one, skipping the missing.
    return _delete_rest(fd, ctypes.addressof(keys), size, attr.count, count)


def _delete_rest(fd: int, base: int, size: int, done: int, count: int) -> int:
    """Delete keys done..count-1 of the packed keys at base one at a time, skipping those
    already gone; returns done plus those deleted. No exception for a missing key: nearly
    every key of a stats map's delete is missing."""
    st = _staging
    elem, ref, nr = st.elem, st.elem_ref, _nr_bpf or _nr()
    elem.map_fd, elem.value, elem.flags = fd, 0, 0
    for i in range(done, count):
        elem.key = base + i * size
        if _libc.syscall(nr, MAP_DELETE_ELEM, ref, _ELEM_SIZE) == 0:
            done += 1
        else:
            err = ctypes.get_errno()
            if err != errno.ENOENT:
                _raise(MAP_DELETE_ELEM, err, done)
    return done


def map_lookup_batch(fd: int, key_type, value_type, chunk: int = 4096):
    """Yield (key, value) for every element, reading `chunk` elements a syscall."""
    keys = (key_type * chunk)()
    values = (value_type * chunk)()
    token_in = ctypes.c_uint64(0)
    token_out = ctypes.c_uint64(0)
    first = True
    while True:
        attr = _BatchAttr(in_batch=0 if first else ctypes.addressof(token_in),
                          out_batch=ctypes.addressof(token_out), keys=ctypes.addressof(keys),
                          values=ctypes.addressof(values), count=chunk, map_fd=fd)
        done = False
        try:
            bpf(MAP_LOOKUP_BATCH, attr)
        except BPFError as e:
            if e.errno != errno.ENOENT:
                raise
            done = True  # ENOENT: this was the last chunk (possibly empty)
        for i in range(attr.count):
            yield keys[i], values[i]
        if done:
            return
        token_in.value = token_out.value
        first = False


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def cgroup_id(path: str) -> int:
    """The id the kernel uses for a cgroup v2 folder (its inode number)."""
    return os.stat(path).st_ino


def close(fd: Optional[int]) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
