"""A TC program driven by BPF_PROG_TEST_RUN, in a network namespace made for it (Katran's
BpfTester, in pytest): one frame in, the frame and the verdict out.

The run happens in the calling thread's network namespace (the FIB lookups of the program
see that namespace's routes), so `TestNetns` moves the thread there with setns(2) and back.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import uuid
from typing import List, Tuple

from nodemesh.datapath import bpfsys

BPF_PROG_TEST_RUN = 10
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class _TestRunAttr(ctypes.Structure):  # union bpf_attr, BPF_PROG_TEST_RUN
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32)]


class SkbCtx(ctypes.Structure):  # the leading part of struct __sk_buff, up to ifindex
    _fields_ = [("len", ctypes.c_uint32), ("pkt_type", ctypes.c_uint32),
                ("mark", ctypes.c_uint32), ("queue_mapping", ctypes.c_uint32),
                ("protocol", ctypes.c_uint32), ("vlan_present", ctypes.c_uint32),
                ("vlan_tci", ctypes.c_uint32), ("vlan_proto", ctypes.c_uint32),
                ("priority", ctypes.c_uint32), ("ingress_ifindex", ctypes.c_uint32),
                ("ifindex", ctypes.c_uint32)]


# A node's side of the packet tables: nmtc0 with the node's addresses (192.0.2.1,
# 2001:db8::1) and the clients' networks (198.51.100.0/24, 2001:db8:c::/64) routed through
# it. For TestNetns; FORWARDING switches forwarding on, without which bpf_fib_lookup answers
# "forwarding disabled" and the TC program hands a packet to the stack, not redirecting it.
NODE_NETNS = """
ip link set lo up
ip link add nmtc0 type veth peer name nmtc1
ip link set nmtc1 up
ip link set nmtc0 up
ip addr add 192.0.2.1/24 dev nmtc0
ip addr add 2001:db8::1/64 dev nmtc0 nodad
ip route add 198.51.100.0/24 dev nmtc0
ip route add 2001:db8:c::/64 dev nmtc0
"""
FORWARDING = "sysctl -qw net.ipv4.ip_forward=1\nsysctl -qw net.ipv6.conf.all.forwarding=1\n"


def run(prog_fd: int, frame: bytes, ifindex: int) -> Tuple[int, bytes]:
    """(the program's return value, the frame as it left the program)."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    ctx = SkbCtx(ingress_ifindex=ifindex, ifindex=ifindex)
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(frame),
                        data_size_out=ctypes.sizeof(data_out),
                        data_in=ctypes.addressof(data_in), data_out=ctypes.addressof(data_out),
                        repeat=1, ctx_size_in=ctypes.sizeof(ctx), ctx_in=ctypes.addressof(ctx))
    bpfsys.bpf(BPF_PROG_TEST_RUN, attr)
    return attr.retval, data_out.raw[:attr.data_size_out]


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True)


def reap_stale() -> List[str]:
    """Remove what TC tests of dead processes left: netns nmtc<pid><hex6> (TestNetns) and
    pin folders /sys/fs/bpf/nmtc-<pid>-<hex6> (the TC test modules), as a killed run leaves
    them. Under the labs' reaping lock, so that the suite's workers do it once."""
    import re
    import shutil

    from nodemesh.datapath.loader import DatapathError, cleanup
    from nodemesh.lab.topology import _alive, reaping, remove_netns

    reaped: List[str] = []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    netns = [m.group(0) for m in (re.match(r"^nmtc(\d+)[0-9a-f]{6}$", line.split()[0])
                                  for line in listed.splitlines() if line.strip())
             if m and not _alive(int(m.group(1)))]
    pins = [os.path.join("/sys/fs/bpf", d) for d in os.listdir("/sys/fs/bpf")
            if (m := re.match(r"^nmtc-(\d+)-[0-9a-f]{6}$", d)) and not _alive(int(m.group(1)))]
    if not netns and not pins:
        return reaped
    with reaping():
        for name in netns:
            if remove_netns(name):
                reaped.append(name)
        for folder in pins:
            try:
                cleanup(folder, force=True)
            except DatapathError:  # no marker (a load cut short): the name says it is ours
                shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:
                continue
            reaped.append(folder)
    return reaped


class TestNetns:
    """A network namespace set up by `setup` (ip commands run inside it), entered by this thread until exit()."""

    __test__ = False  # not a pytest class

    def __init__(self, setup: str):
        self.name = f"nmtc{os.getpid()}{uuid.uuid4().hex[:6]}"
        self._home = -1
        self.setup = setup

    def __enter__(self) -> "TestNetns":
        sh(f"ip netns add {self.name}")
        try:
            for line in self.setup.strip().splitlines():
                sh(f"ip netns exec {self.name} {line.strip()}")
            self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._home >= 0:
            _libc.setns(self._home, CLONE_NEWNET)
            os.close(self._home)
            self._home = -1
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class InNetns:
    """This thread inside an existing network namespace until exit (sockets made meanwhile
    stay in it)."""

    def __init__(self, name: str):
        self.name = name
        self._home = -1

    def __enter__(self) -> "InNetns":
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc) -> None:
        _libc.setns(self._home, CLONE_NEWNET)
        os.close(self._home)
