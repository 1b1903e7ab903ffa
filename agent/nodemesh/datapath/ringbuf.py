"""A BPF ring buffer consumer over mmap, so that the agent needs no BCC at run time.

The kernel's layout (kernel/bpf/ringbuf.c, tools/lib/bpf/ringbuf.c): page 0 holds the
consumer position (we write it), page 1 the producer position (the kernel writes it), then the
data area, mapped twice in a row so a record that wraps reads as one piece. Each record starts
with an 8-byte header: u32 length (bit 31: still being written, bit 30: discarded) and u32
page offset; records are 8-byte aligned.
"""
from __future__ import annotations

import ctypes
import mmap
import select
import struct
from typing import Callable

from . import bpfsys

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingBuffer:
    def __init__(self, map_fd: int):
        info = bpfsys.map_info(map_fd)
        self.size = info.max_entries  # the data area, a power of two of pages
        self.mask = self.size - 1
        page = mmap.PAGESIZE
        self.consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self.producer = mmap.mmap(map_fd, page + 2 * self.size, mmap.MAP_SHARED,
                                  mmap.PROT_READ, offset=page)
        self.data_offset = page
        self.poller = select.epoll()
        self.poller.register(map_fd, select.EPOLLIN)

    def poll(self, callback: Callable[[bytes], None], timeout: float) -> int:
        """Wait up to timeout seconds for records; hand each to callback. Returns how many."""
        n = self.consume(callback)
        if n:
            return n
        self.poller.poll(timeout)
        return self.consume(callback)

    def consume(self, callback: Callable[[bytes], None]) -> int:
        cons = _U64.unpack_from(self.consumer, 0)[0]
        n = 0
        while True:
            prod = _U64.unpack_from(self.producer, 0)[0]
            if cons >= prod:
                break
            at = self.data_offset + (cons & self.mask)
            length = _U32.unpack_from(self.producer, at)[0]
            if length & BUSY:
                break  # the producer is still writing this record
            size = length & ~(BUSY | DISCARD)
            if not length & DISCARD:
                callback(bytes(self.producer[at + HEADER:at + HEADER + size]))
                n += 1
            cons += (size + HEADER + 7) & ~7
            # Publish our position so the kernel can reuse the space.
            _U64.pack_into(self.consumer, 0, cons)
        return n

    def close(self) -> None:
        self.poller.close()
        self.consumer.close()
        self.producer.close()


def cast(data: bytes, struct_type):
    return struct_type.from_buffer_copy(data[:ctypes.sizeof(struct_type)])
