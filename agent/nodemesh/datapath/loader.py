"""Compile bpf/ with BCC, pin and adopt maps, attach the socket hooks through pinned bpf links.

The one place that attaches and detaches. Everything lives under the bpffs folder (mode 0700):

    <bpffs>/services, backends, ...   maps (BCC creates and pins them, or opens existing pins)
    <bpffs>/links/connect4, ...       one cgroup bpf_link per hook

Pinned links keep the programs attached after the agent exits (SIGTERM, SIGKILL, upgrade): the
datapath keeps serving. A new agent opens the pinned maps (so it sees the services already
programmed) and swaps its freshly loaded programs into the existing links with LINK_UPDATE,
which replaces a program in one step, so no connection ever meets an unhooked socket.

A running agent holds an exclusive flock on the folder itself, not on a lock file elsewhere:
the lock lives on the very object two agents would fight over, so it also works between
containers that share the bpffs mount but not /run, and it cannot outlive the folder.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from . import bpfsys
from .maps import ABI_VERSION, MAPS, Info, Maps, MapSizes, u32

if TYPE_CHECKING:
    from .compile import CompileChild

log = logging.getLogger(__name__)

DEFAULT_BPFFS = "/sys/fs/bpf/nodemesh"
BPFFS_ROOT = "/sys/fs/bpf"
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18


BPF_PROG_TYPE_SOCK_OPS = 13
BPF_PROG_TYPE_SK_MSG = 16
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25
CHECK_SECONDS = 2.0  # how often a running agent checks that its hooks and pins are in place


@dataclass(frozen=True)
class Hook:
    name: str       # pin name under links/
    function: str   # C function in sock_lb.c
    attach_type: int
    prog_type: int = BPF_PROG_TYPE_CGROUP_SOCK_ADDR
    target_map: str = ""  # attached to this map (a sockmap link), not to the cgroup


HOOKS = (
    Hook("connect4", "nm_connect4", 10),
    Hook("connect6", "nm_connect6", 11),
    Hook("sendmsg4", "nm_sendmsg4", 14),
    Hook("sendmsg6", "nm_sendmsg6", 15),
    Hook("recvmsg4", "nm_recvmsg4", 19),
    Hook("recvmsg6", "nm_recvmsg6", 20),
    Hook("getpeername4", "nm_getpeername4", 29),
    Hook("getpeername6", "nm_getpeername6", 30),
    Hook("sockops", "nm_sockops", 3, BPF_PROG_TYPE_SOCK_OPS),
    Hook("getsockopt", "nm_getsockopt", 21, BPF_PROG_TYPE_CGROUP_SOCKOPT),
    # --accelerate-local only (bpf/lib/accel.h): a sockmap link on the pinned sockhash.
    Hook("sk_msg", "nm_sk_msg", 7, BPF_PROG_TYPE_SK_MSG, target_map="accel_socks"),
)


def _link_target(info: bpfsys.LinkInfo) -> int:
    """The cgroup id of a cgroup link, or the map id of a sockmap link (whose info union
    holds map_id and attach_type as two u32 where a cgroup link has its u64 cgroup_id)."""
    return info.cgroup_id & 0xFFFFFFFF if info.type == bpfsys.LINK_TYPE_SOCKMAP \
        else info.cgroup_id


def _link_attach_type(info: bpfsys.LinkInfo) -> int:
    return info.cgroup_id >> 32 if info.type == bpfsys.LINK_TYPE_SOCKMAP else info.attach_type


class DatapathError(Exception):
    """The datapath cannot be loaded or attached; the message says what to do."""


def bpf_source_dir() -> Path:
    """Where the C sources are: $NODEMESH_BPF_DIR, the source checkout, or the installed copy."""
    env = os.environ.get("NODEMESH_BPF_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[3] / "bpf", Path("/usr/share/nodemesh/bpf")]
    for c in candidates:
        if (c / "sock_lb.c").is_file():
            return c
    raise DatapathError(f"cannot find the BPF sources (sock_lb.c) in any of: "
                        f"{', '.join(map(str, candidates))}; set NODEMESH_BPF_DIR")


def _mounts():
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                yield parts[1].replace("\\040", " "), parts[2]


def cgroup2_root() -> str:
    """The cgroup v2 mount point, read from /proc/mounts (never assumed)."""
    for mountpoint, fstype in _mounts():
        if fstype == "cgroup2":
            return mountpoint
    raise DatapathError("no cgroup v2 filesystem is mounted (/proc/mounts has no cgroup2): "
                        "the socket hooks need cgroup v2")


def check_cgroup(path: str) -> str:
    real = os.path.realpath(path)
    mounts = [m for m, t in _mounts() if t == "cgroup2"]
    if not any(real == m or real.startswith(m.rstrip("/") + "/") for m in mounts):
        raise DatapathError(f"--cgroup {path}: not inside a cgroup v2 mount "
                            f"({', '.join(mounts) or 'none mounted'})")
    if not os.path.isfile(os.path.join(real, "cgroup.procs")):
        raise DatapathError(f"--cgroup {path}: not a cgroup folder (no cgroup.procs)")
    return real


def _fs_type(path: str) -> str:
    """The type of the filesystem `path` is on: the mount whose device number it has."""
    dev = os.stat(path).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == want:
                return fields[fields.index("-") + 1]
    return "an unknown filesystem"


def _lock(folder: str) -> Optional[int]:
    """An fd holding the exclusive flock on `folder`, or None if another process holds it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _holder(folder: str) -> str:
    """' (pid N)' for whoever flocks `folder`, from /proc/locks; '' if it cannot be seen."""
    st = os.stat(folder)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "FLOCK" in parts and ident in parts:
                pid = parts[parts.index(ident) - 1]
                return f" (pid {pid})" if pid != "0" else ""
    return ""


def _pinned_map_id(pin: str) -> Optional[int]:
    try:
        fd = bpfsys.obj_get(pin)
    except bpfsys.BPFError:
        return None
    try:
        return bpfsys.map_info(fd).id
    finally:
        bpfsys.close(fd)


def pin_mismatches(bpffs: str, specs, capacity) -> Tuple[bool, List[str]]:
    """(any of specs is pinned under bpffs, a line for each pin whose type, key size, value
    size or capacity differs from what this build creates). capacity(spec) -> max_entries."""
    found = False
    problems = []
    for spec in specs:
        path = os.path.join(bpffs, spec.name)
        if not os.path.exists(path):
            continue
        found = True
        fd = bpfsys.obj_get(path)
        try:
            info = bpfsys.map_info(fd)
        finally:
            bpfsys.close(fd)
        want = (spec.map_type, ctypes.sizeof(spec.key), ctypes.sizeof(spec.value),
                capacity(spec))
        have = (info.type, info.key_size, info.value_size, info.max_entries)
        if want != have:
            problems.append(f"{path}: pinned (type, key, value, capacity) = {have}, "
                            f"this build needs {want}")
    return found, problems


def ensure_bpffs(folder: str) -> None:
    """Make sure `folder` is on a bpf filesystem, mounting /sys/fs/bpf if nothing is (as Cilium
    does), and create it with mode 0700."""
    real = os.path.realpath(folder)
    bpf_mounts = [m for m, t in _mounts() if t == "bpf"]
    if not any(real == m or real.startswith(m.rstrip("/") + "/") for m in bpf_mounts):
        if real.startswith(BPFFS_ROOT + "/") and BPFFS_ROOT not in bpf_mounts:
            os.makedirs(BPFFS_ROOT, exist_ok=True)
            log.info("bpffs not mounted; mounting it at %s", BPFFS_ROOT)
            if subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS_ROOT]).returncode != 0:
                raise DatapathError(f"could not mount bpffs at {BPFFS_ROOT}")
        else:
            raise DatapathError(f"--bpffs {folder}: not on a bpf filesystem (mount one with "
                                f"'mount -t bpf bpf {BPFFS_ROOT}')")
    os.makedirs(os.path.join(real, "links"), mode=0o700, exist_ok=True)
    os.chmod(real, 0o700)
    os.chmod(os.path.join(real, "links"), 0o700)


def start(bpffs: str, cgroup: Optional[str], sizes: MapSizes,
          accelerate: bool = False) -> "Datapath":
    """The first step of an agent's start: check that BPF and the cgroup are usable, take the
    folder and start the compile in its child (Datapath.start_load), before anything else is
    touched. Raises DatapathError with what the node lacks.

    `nodemesh run` calls it before it imports the agent's own modules (~0.1-0.2 s of a CPU,
    more on a loaded node): the compile (clang, ~2 s of the other CPU) is on the critical path
    of every start, and the sooner it starts the sooner it ends."""
    from ..preflight import _bpf_syscall

    # What a node lacks is said before anything is touched, not as a traceback later.
    access = _bpf_syscall()
    if not access.ok:
        raise DatapathError(f"BPF is not usable: {access.detail} ({access.fix}); "
                            f"'nodemesh preflight' checks the whole node")
    datapath = Datapath(bpffs, check_cgroup(cgroup or cgroup2_root()), sizes, accelerate)
    try:
        datapath.start_load()
    except BaseException:
        datapath.close()
        raise
    return datapath


class Datapath:
    """Loads the programs against the pinned maps and keeps the hooks attached to one cgroup."""

    def __init__(self, bpffs: str = DEFAULT_BPFFS, cgroup: Optional[str] = None,
                 sizes: MapSizes = MapSizes(), accelerate: bool = False):
        self.bpffs = os.path.realpath(bpffs)
        self.accelerate = accelerate  # attach the sk_msg program (--accelerate-local)
        self.cgroup = cgroup
        self.sizes = sizes
        self.bpf = None
        self.maps: Optional[Maps] = None
        self.adopted = False
        self._prog_fds: Dict[str, int] = {}
        self._owned_fds: List[int] = []  # fds a compiler child passed us
        self.ringbuf_fd: Optional[int] = None
        self.flow_ringbuf_fd: Optional[int] = None
        self.load_seconds = 0.0
        self._lock_fd: Optional[int] = None
        self._map_ids: Dict[str, int] = {}
        self._compiling: Optional["CompileChild"] = None  # start_load()'s CompileChild

    # -- load -------------------------------------------------------------------------------
    def check_pins(self) -> bool:
        """Compare existing pins with what this build creates. True if there are pins to adopt.

        A pin from an incompatible build would be silently misread; refuse it instead."""
        found, problems = pin_mismatches(self.bpffs, MAPS, self.sizes.capacity)
        if problems:
            raise DatapathError("existing pins do not match this build (another nodemesh "
                                "version, or other --map-* sizes):\n  " + "\n  ".join(problems)
                                + f"\nrun 'nodemesh cleanup --bpffs {self.bpffs}' to start afresh")
        return found

    def start_load(self) -> None:
        """Take the folder and start the compile in its child; load() collects it. The agent
        calls this first thing, so that the compile runs while the rest of it starts."""
        from .compile import CompileChild

        if self._compiling is None:
            self._prepare()
            self._compiling = CompileChild(self.bpffs, self.sizes, bpf_source_dir())

    def abandon_load(self) -> None:
        """Stop a compile start_load() started and load() will not collect. In a folder that
        held no pins, what the start made (the folder, any pin the child got to) is removed:
        a start that ends before its load leaves nothing."""
        if self._compiling is not None:
            self._compiling.abandon()
            self._compiling = None
            if not self.adopted and self._lock_fd is not None:
                try:
                    _remove_pins(self.bpffs)  # under our lock: all of it is the child's
                except Exception as e:  # the start's own error is the one to report
                    log.warning("removing what an abandoned start made in %s: %s",
                                self.bpffs, e)

    def _prepare(self) -> None:
        ensure_bpffs(self.bpffs)
        self._lock_fd = self._take_lock()  # before reading or writing anything in the folder
        self.adopted = self.check_pins()

    def load(self, in_process: bool = False) -> Maps:
        """Compile, load and open the pinned maps (adopting existing ones).

        By default the compile runs in a child process, so that LLVM never stays in the agent
        (see compile.py); in_process keeps BCC's object (tests read its generated types)."""
        from .compile import FLOW_RINGBUF, RINGBUF, compile_and_load, compile_in_child

        compiling, self._compiling = self._compiling, None
        if compiling is None:
            self._prepare()
        src = bpf_source_dir()
        try:
            if compiling is not None:
                progs, fds, self.load_seconds = compiling.result()
                self._owned_fds = [*progs.values(), *fds.values()]
            elif in_process:
                self.bpf, progs, fds, self.load_seconds = compile_and_load(self.bpffs,
                                                                           self.sizes, src)
            else:
                progs, fds, self.load_seconds = compile_in_child(self.bpffs, self.sizes, src)
                self._owned_fds = [*progs.values(), *fds.values()]
        except Exception as e:  # BCC raises bare Exceptions with the verifier log on stderr
            raise DatapathError(f"compiling or loading {src / 'sock_lb.c'} failed: {e}. "
                                f"Check kernel headers with 'nodemesh preflight'.") from e
        self._prog_fds = progs
        self.ringbuf_fd = fds.pop(RINGBUF)
        self.flow_ringbuf_fd = fds.pop(FLOW_RINGBUF)
        self.maps = Maps(fds)
        # Every map of MAPS, but for one an older bpf/ (NODEMESH_BPF_DIR) does not declare.
        self._map_ids = {spec.name: bpfsys.map_info(fds[spec.name]).id for spec in MAPS
                         if spec.name in fds}
        self._stamp_info()
        log.info("datapath loaded in %.2fs (%s pinned maps under %s)", self.load_seconds,
                 "adopted" if self.adopted else "new", self.bpffs)
        return self.maps

    @property
    def programs(self) -> Dict[str, int]:
        """Program fds by hook name (what this agent loaded and attached)."""
        return dict(self._prog_fds)

    def _take_lock(self) -> int:
        fd = _lock(self.bpffs)
        if fd is None:
            raise DatapathError(f"another nodemesh agent{_holder(self.bpffs)} owns {self.bpffs}; "
                                f"stop it, or give this one another --bpffs")
        return fd

    def _stamp_info(self) -> None:
        assert self.maps is not None
        key, info = u32(0), Info()
        bpfsys.map_lookup(self.maps.fd("info"), key, info)
        if info.abi_version not in (0, ABI_VERSION):
            raise DatapathError(f"pinned maps in {self.bpffs} were written by ABI "
                                f"{info.abi_version}, this build is {ABI_VERSION}; run "
                                f"'nodemesh cleanup --bpffs {self.bpffs}'")
        if info.abi_version == 0:
            info.abi_version = ABI_VERSION
            info.created_unix = int(time.time())
            bpfsys.map_update(self.maps.fd("info"), key, info)

    # -- attach -----------------------------------------------------------------------------
    def attach(self) -> None:
        """Attach every hook to the cgroup: update pinned links in place, or create them."""
        if self.cgroup is None:
            raise DatapathError("no cgroup to attach to")
        cgroup = check_cgroup(self.cgroup)
        want_cgid = bpfsys.cgroup_id(cgroup)
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook in HOOKS:
                if not hook.target_map:
                    self._attach_one(hook, cg_fd, want_cgid, cgroup)
                elif self.accelerate:
                    assert self.maps is not None
                    self._attach_one(hook, self.maps.fd(hook.target_map),
                                     self._map_ids[hook.target_map], hook.target_map)
                else:
                    _detach_pinned(os.path.join(self.bpffs, "links", hook.name))
        finally:
            os.close(cg_fd)

    def hooks(self) -> List[Hook]:
        """The hooks this agent keeps attached."""
        return [h for h in HOOKS if self.accelerate or not h.target_map]

    def _attach_one(self, hook: Hook, cg_fd: int, want_cgid: int, cgroup: str) -> None:
        pin = os.path.join(self.bpffs, "links", hook.name)
        prog_fd = self._prog_fds[hook.name]
        if os.path.exists(pin):
            link_fd = bpfsys.obj_get(pin)
            try:
                info = bpfsys.link_info(link_fd)
                if _link_target(info) == want_cgid and \
                        _link_attach_type(info) == hook.attach_type:
                    bpfsys.link_update(link_fd, prog_fd)
                    log.debug("hook %s: swapped program into existing link %d", hook.name,
                              info.id)
                    return
                log.warning("hook %s: pinned link is on another cgroup or map (id %d); moving "
                            "it to %s", hook.name, _link_target(info), cgroup)
                bpfsys.link_detach(link_fd)
            finally:
                bpfsys.close(link_fd)
            os.unlink(pin)
        try:
            link_fd = bpfsys.link_create(prog_fd, cg_fd, hook.attach_type)
        except bpfsys.BPFError as e:
            hint = (" (another program is attached to this cgroup without BPF_F_ALLOW_MULTI)"
                    if e.errno in (errno.EPERM, errno.EEXIST, errno.EBUSY) else "")
            raise DatapathError(f"attaching {hook.name} to {cgroup} failed: {e.strerror}{hint}")
        try:
            bpfsys.obj_pin(link_fd, pin)
        finally:
            bpfsys.close(link_fd)
        log.debug("hook %s: attached to %s", hook.name, cgroup)

    # -- keep attached ----------------------------------------------------------------------
    def _holds_folder(self) -> bool:
        """Is the folder at our path still the one we locked (not removed, not re-created)?"""
        try:
            now, ours = os.stat(self.bpffs), os.fstat(self._lock_fd)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)

    def check(self) -> List[str]:
        """What is gone from the datapath this agent attached: the pin folder, a map pin (or a
        pin of another map), a link pin, a link no longer on our cgroup (a re-created cgroup
        has a new id). A few syscalls per object: cheap enough to run every CHECK_SECONDS."""
        if not self._holds_folder():
            return [f"pin folder {self.bpffs} was removed"]
        problems = [f"map pin {spec.name} is missing or holds another map" for spec in MAPS
                    if spec.name in self._map_ids
                    and _pinned_map_id(os.path.join(self.bpffs, spec.name))
                    != self._map_ids[spec.name]]
        try:
            cgid = bpfsys.cgroup_id(self.cgroup)
        except FileNotFoundError:
            return problems + [f"cgroup {self.cgroup} is gone"]
        for hook in self.hooks():
            want = (self._map_ids[hook.target_map] if hook.target_map else cgid, hook.attach_type)
            try:
                fd = bpfsys.obj_get(os.path.join(self.bpffs, "links", hook.name))
            except bpfsys.BPFError:
                problems.append(f"link pin links/{hook.name} is missing")
                continue
            try:
                info = bpfsys.link_info(fd)
            finally:
                bpfsys.close(fd)
            if (_link_target(info), _link_attach_type(info)) != want:
                problems.append(f"hook {hook.name} is no longer attached to "
                                f"{hook.target_map or self.cgroup}")
        return problems

    def repair(self) -> None:
        """Put back what check() finds gone: the folder and our lock on it, the map pins from
        the fds we hold (their contents never left), the links on the cgroup as it is now.
        Raises DatapathError (or OSError) when it cannot, e.g. when the cgroup is gone."""
        ensure_bpffs(self.bpffs)
        if not self._holds_folder():
            fd = self._take_lock()
            bpfsys.close(self._lock_fd)
            self._lock_fd = fd
        for spec in MAPS:
            pin = os.path.join(self.bpffs, spec.name)
            if spec.name in self._map_ids and _pinned_map_id(pin) != self._map_ids[spec.name]:
                if os.path.lexists(pin):
                    os.unlink(pin)
                bpfsys.obj_pin(self.maps.fd(spec.name), pin)
        if self.accelerate:  # a cleanup (--force) switched redirection off: switch it back on
            from .maps import MeshConfig
            cfg = MeshConfig()
            fd = self.maps.fd("mesh_config")
            if bpfsys.map_lookup(fd, u32(0), cfg) and not cfg.accelerate:
                cfg.accelerate = 1
                bpfsys.map_update(fd, u32(0), cfg)
        self.attach()

    def check_and_repair(self) -> bool:
        """check(), then repair() what it found. False when the datapath cannot be restored:
        the hooks no longer serve, so the agent must stop being ready."""
        problems = self.check()
        if not problems:
            return True
        log.warning("datapath damaged: %s; repairing", "; ".join(problems))
        try:
            self.repair()
            problems = self.check()
        except (DatapathError, OSError) as e:
            problems = [str(e)]
        if problems:
            log.error("cannot repair the datapath: %s", "; ".join(problems))
            return False
        log.info("datapath repaired: hooks attached to %s, pins under %s", self.cgroup,
                 self.bpffs)
        return True

    def close(self) -> None:
        """Drop this process's fds (and the folder's lock). Programs stay attached through
        their pinned links."""
        self.abandon_load()  # a compile started for a load that never came
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            except Exception:  # BCC cleanup must not mask the real exit reason
                pass
            self.bpf = None
        for fd in self._owned_fds:
            bpfsys.close(fd)
        self._owned_fds = []
        self.maps = None
        self._prog_fds = {}
        bpfsys.close(self._lock_fd)
        self._lock_fd = None


def attachments(bpffs: str = DEFAULT_BPFFS) -> List[Dict[str, object]]:
    """What the pinned links say is attached: for `nodemesh status`."""
    out = []
    for hook in HOOKS:
        pin = os.path.join(bpffs, "links", hook.name)
        if not os.path.exists(pin):
            continue
        fd = bpfsys.obj_get(pin)
        try:
            info = bpfsys.link_info(fd)
            target = _link_target(info)
            out.append({"hook": hook.name, "link_id": info.id, "prog_id": info.prog_id,
                        "map_id" if hook.target_map else "cgroup_id": target,
                        "attached": target != 0})
        finally:
            bpfsys.close(fd)
    return out


def _detach_pinned(pin: str) -> None:
    """Detach and unpin one link pin, if there is one (--accelerate-local turned off)."""
    if not os.path.exists(pin):
        return
    fd = bpfsys.obj_get(pin)
    try:
        bpfsys.link_detach(fd)
    finally:
        bpfsys.close(fd)
    os.unlink(pin)
    log.info("detached %s", os.path.basename(pin))


def cleanup(bpffs: str = DEFAULT_BPFFS, force: bool = False) -> List[str]:
    """Detach the hooks and remove the pins nodemesh makes under bpffs, then the folder if
    nothing else is left in it. Idempotent. Returns what it did.

    A mistyped path must never cost anyone a file: it refuses a folder that is not on bpffs or
    has no nodemesh `info` map, leaves (and reports) whatever nodemesh does not pin, and,
    unless force, refuses a folder a running agent owns."""
    real = os.path.realpath(bpffs)
    if not os.path.isdir(real):
        return []
    fstype = _fs_type(real)
    if fstype != "bpf":
        raise DatapathError(f"{bpffs} is on {fstype}, not bpffs: nodemesh has no pins there; "
                            f"nothing removed")
    lock_fd = _lock(real)
    if lock_fd is None and not force:
        raise DatapathError(f"a running nodemesh agent{_holder(real)} owns {real}; stop it "
                            f"first (or pass --force); nothing removed")
    try:
        return _remove_pins(real)
    finally:
        bpfsys.close(lock_fd)


def _check_marker(folder: str) -> None:
    """Raise unless `folder` holds the `info` map a nodemesh load creates."""
    pin = os.path.join(folder, "info")
    try:
        fd = bpfsys.obj_get(pin)
    except bpfsys.BPFError:
        raise DatapathError(f"{folder} has no nodemesh info map: not a nodemesh pin folder; "
                            f"nothing removed") from None
    try:
        mi, info = bpfsys.map_info(fd), Info()
        shape = (mi.type, mi.key_size, mi.value_size, mi.max_entries, mi.name)
        if shape != (bpfsys.MAP_TYPE_ARRAY, 4, ctypes.sizeof(Info), 1, b"info") or \
                not bpfsys.map_lookup(fd, u32(0), info):
            raise DatapathError(f"{pin} is not a nodemesh info map; nothing removed")
    finally:
        bpfsys.close(fd)
    # 0: a load that never finished stamping it. Newer: that build may pin what we don't know.
    if info.abi_version > ABI_VERSION:
        raise DatapathError(f"{folder} was made by a newer nodemesh (ABI {info.abi_version}, "
                            f"this one is {ABI_VERSION}); clean it up with that version")


def _stop_acceleration(real: str) -> List[str]:
    """Turn sk_msg redirects off for good. Sockets accelerated now stay in the unpinned
    sockhash until they close (each holds the sk_msg program, which holds the map), and with
    accelerate cleared their next messages take TCP; what was queued is read first, in order
    (bpf/lib/accel.h)."""
    from .maps import MeshConfig

    try:
        cfg_fd = bpfsys.obj_get(os.path.join(real, "mesh_config"))
    except bpfsys.BPFError:
        return []
    try:
        cfg = MeshConfig()
        if not bpfsys.map_lookup(cfg_fd, u32(0), cfg) or not cfg.accelerate:
            return []
        cfg.accelerate = 0
        bpfsys.map_update(cfg_fd, u32(0), cfg)
    finally:
        bpfsys.close(cfg_fd)
    return ["stopped acceleration"]


def _remove_pins(real: str) -> List[str]:
    done: List[str] = []
    links_dir = os.path.join(real, "links")
    entries = sorted(os.listdir(real))
    links = sorted(os.listdir(links_dir)) if os.path.isdir(links_dir) else []
    if [e for e in entries if e != "links"] or links:  # empty folders hold nothing to lose
        _check_marker(real)
    done += _stop_acceleration(real)
    left = []
    from . import tc  # the TC path's filters first: they hold its programs
    if os.path.exists(os.path.join(real, "ct")):
        done += tc.detach(real)
    hooks = {h.name for h in HOOKS}
    for name in links:
        pin = os.path.join(links_dir, name)
        if name not in hooks or os.path.isdir(pin):
            left.append(pin)
            continue
        try:
            fd = bpfsys.obj_get(pin)
            try:
                bpfsys.link_detach(fd)
            except bpfsys.BPFError as e:
                if e.errno not in (errno.ENOLINK, errno.EINVAL, errno.ENOENT):
                    raise
            finally:
                bpfsys.close(fd)
        except bpfsys.BPFError as e:
            log.warning("%s: %s", pin, e)
        with contextlib.suppress(FileNotFoundError):  # another cleanup got there first
            os.unlink(pin)
        done.append(f"detached {name}")
    maps = {spec.name for spec in MAPS} | {spec.name for spec in tc.TC_MAPS}
    # info last: a cleanup cut short keeps its marker, so running it again finishes the job.
    for name in sorted(entries, key=lambda e: e == "info"):
        path = os.path.join(real, name)
        if name == "links" and os.path.isdir(path):
            continue
        if name not in maps or os.path.isdir(path):
            left.append(path)
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        done.append(f"unpinned {name}")
    done += [f"left {path}: nodemesh did not make it" for path in left]
    for folder in (links_dir, real):
        if not os.path.isdir(folder):
            continue
        try:
            os.rmdir(folder)
        except OSError as e:
            done.append(f"kept {folder}: {e.strerror}")
            break
        if folder == real:
            done.append(f"removed {real}")
    return done
