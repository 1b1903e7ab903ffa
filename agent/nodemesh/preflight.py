"""What the node must offer, checked one by one and said plainly (`nodemesh preflight`)."""
from __future__ import annotations

import ctypes
import logging
import os
import platform
from dataclasses import dataclass
from typing import List, Optional

from .datapath import bpfsys, loader

log = logging.getLogger("nodemesh.preflight")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _bpf_syscall() -> Check:
    # BPF_PROG_GET_NEXT_ID needs no program: EPERM means no privilege, ENOSYS no BPF at all.
    class Attr(ctypes.Structure):
        _fields_ = [("start_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                    ("open_flags", ctypes.c_uint32)]
    try:
        bpfsys.bpf(11, Attr())
        return Check("bpf syscall", True, "available")
    except bpfsys.BPFError as e:
        if e.errno == 2:  # ENOENT: no program loaded yet, but the call works
            return Check("bpf syscall", True, "available")
        if e.errno == 1:
            return Check("bpf syscall", False, "permission denied",
                         "run as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")
        return Check("bpf syscall", False, e.strerror, "a kernel with CONFIG_BPF_SYSCALL=y")


def _cgroup2(cgroup: Optional[str]) -> Check:
    try:
        if cgroup:
            return Check("cgroup v2", True, f"{loader.check_cgroup(cgroup)} is a cgroup v2 folder")
        root = loader.cgroup2_root()
        return Check("cgroup v2", True, f"mounted at {root}")
    except loader.DatapathError as e:
        return Check("cgroup v2", False, str(e),
                     "mount it: mount -t cgroup2 none /sys/fs/cgroup/unified")


def _btf() -> Check:
    ok = os.path.exists("/sys/kernel/btf/vmlinux")
    return Check("BTF", ok, "/sys/kernel/btf/vmlinux" + (" present" if ok else " missing"),
                 "" if ok else "a kernel built with CONFIG_DEBUG_INFO_BTF=y (not needed by the "
                               "socket hooks today, by later features)")


def _headers() -> Check:
    build = f"/lib/modules/{platform.release()}/build"
    if os.path.isdir(os.path.join(build, "include")):
        target = os.path.realpath(build)
        mismatch = platform.release() not in target
        detail = f"{build} -> {target}"
        if mismatch:
            detail += " (headers of another kernel version: fine for the networking programs)"
        return Check("kernel headers (BCC)", True, detail)
    return Check("kernel headers (BCC)", False, f"{build} is missing",
                 f"install linux-headers-{platform.release()} (or run scripts/setup)")


def _bpffs() -> Check:
    for line in open("/proc/mounts"):
        parts = line.split()
        if len(parts) > 2 and parts[2] == "bpf":
            return Check("bpffs", True, f"mounted at {parts[1]}")
    return Check("bpffs", True, "not mounted; the agent mounts it at /sys/fs/bpf on start")


def _bcc() -> Check:
    try:
        import bcc  # noqa: F401
        return Check("BCC (python3-bpfcc)", True, "importable")
    except ImportError as e:
        return Check("BCC (python3-bpfcc)", False, str(e),
                     "apt-get install python3-bpfcc; use a venv with --system-site-packages")


def _kernel() -> Check:
    rel = platform.release()
    try:
        major, minor = (int(x) for x in rel.split(".")[:2])
    except ValueError:
        return Check("kernel version", True, rel)
    ok = (major, minor) >= (5, 10)
    return Check("kernel version", ok, rel, "" if ok else
                 "5.10 or newer (bpf links on cgroups, getpeername hooks, bpf_set_retval "
                 "needs 5.18 for ECONNREFUSED)")


def run_checks(cgroup: Optional[str] = None) -> List[Check]:
    return [_kernel(), _bpf_syscall(), _cgroup2(cgroup), _bpffs(), _btf(), _headers(), _bcc()]


def program_types() -> Check:
    """Compile and load the real programs into a scratch pin folder: the proof that counts."""
    # A compile that LLVM aborts takes the process with it, finally blocks included: reap the
    # scratch folders of preflights that are gone before making ours.
    for name in os.listdir(loader.BPFFS_ROOT) if os.path.isdir(loader.BPFFS_ROOT) else ():
        pid = name.rpartition("-")[2]
        if name.startswith("nodemesh-preflight-") and pid.isdigit() and \
                not os.path.exists(f"/proc/{pid}"):
            try:
                loader.cleanup(os.path.join(loader.BPFFS_ROOT, name))
            except loader.DatapathError as e:  # an odd folder of that name: report, go on
                log.warning("preflight: leaving %s: %s", name, e)
    scratch = os.path.join(loader.BPFFS_ROOT, f"nodemesh-preflight-{os.getpid()}")
    dp = loader.Datapath(scratch, None)
    try:
        dp.load()
        return Check("sock_addr programs", True,
                     f"compiled and verified {len(loader.HOOKS)} hooks in "
                     f"{dp.load_seconds:.1f}s")
    except Exception as e:
        return Check("sock_addr programs", False, str(e).splitlines()[0],
                     "see the error above; kernel headers and BPF support are the usual cause")
    finally:
        dp.close()
        loader.cleanup(scratch)
