"""The TC packet path: compile bpf/tc_nodeport.c, attach it on clsact with pyroute2, keep the
node's addresses and the conntrack settings in its maps, sweep expired conntrack entries.

The programs are a second BCC unit next to sock_lb.c. They open the socket path's pinned maps
(services, backends ...) by path, so both paths read one service table, and pin their own
(`ct`, `tc_config`, `node_addrs`, `tc_stats`, `tc_drops`, `tc_events`, `tc_ifaces`) in the same
folder. Filters are direct-action `bpf` filters on the clsact qdisc, at a fixed priority and
handle and named after the pin folder, which is how a restarted agent finds (and replaces in
one netlink request) its own filters and how `cleanup` tells them from anyone else's.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

from . import bpfsys
from .maps import MapSizes, MapSpec, decode_addr, encode_addr, u8, u16, u32, u64

log = logging.getLogger(__name__)

PROG_INGRESS = "nm_tc_ingress"
PROG_EGRESS = "nm_tc_egress"
FILTER_PRIO = 0xC0DE >> 4    # a fixed priority (3085), so a restart finds and replaces ours
FILTER_HANDLE = 1
PARENT_INGRESS = 0xFFFFFFF2  # clsact's ingress hook (TC_H_MIN_INGRESS)
PARENT_EGRESS = 0xFFFFFFF3
ETH_P_ALL = 0x0003
IFACE_F_CLSACT = 0x1  # NM_TC_IFACE_F_CLSACT: nodemesh created this interface's clsact qdisc
IFACE_F_PEER = 0x2    # NM_TC_IFACE_F_PEER: a veth to a pod (peer in another netns, unbridged)
TC_INDEX_F_REDIRECTED = 0x0100  # NM_TC_INDEX_F_REDIRECTED: skb->tc_index, ingress redirected it

# The constants of bpf/lib/tc_types.h, each defined once here under a name derived from its C
# name (tests/datapath/test_tc_layout.py compares every one with what the compiler gives).
# enum nm_tc_verdict, enum nm_drop_reason, enum nm_tc_event, NM_TC_INGRESS/EGRESS
VERDICTS = {0: "pass", 1: "dnat", 2: "reverse", 3: "icmp_error", 4: "fragment",
            5: "unknown_protocol", 6: "drop"}
DROP_REASONS = {0: "no_backend", 1: "snat_exhausted", 2: "conntrack_full", 3: "rewrite_failed"}
EVENTS = {0: "snat_collision", 1: "ct_rebuilt"}
DIRECTIONS = {0: "ingress", 1: "egress"}
# enum nm_ct_kind, enum nm_ct_state
CT_FORWARD, CT_REPLY = 0, 1
CT_KINDS = {CT_FORWARD: "forward", CT_REPLY: "reply"}
CT_SYN_SENT, CT_ESTABLISHED, CT_CLOSING, CT_DATAGRAM = 0, 1, 2, 3
CT_STATES = {CT_SYN_SENT: "syn_sent", CT_ESTABLISHED: "established", CT_CLOSING: "closing",
             CT_DATAGRAM: "datagram"}
# NM_CT_F_*: nm_ct_value.flags
CT_F_SNAT = 0x1          # the client address was replaced (externalTrafficPolicy Cluster)
CT_F_FIN_CLIENT = 0x2    # TCP: the client sent FIN (or either side RST)
CT_F_FIN_BACKEND = 0x4   # TCP: the backend sent FIN (or either side RST)
CT_F_OVER = CT_F_FIN_CLIENT | CT_F_FIN_BACKEND  # both: the flow is over
SNAT_TRIES = 32              # NM_SNAT_TRIES: ports tried before snat_exhausted
SNAT_REUSE_AFTER_NS = 100_000_000  # NM_SNAT_REUSE_AFTER_NS: a closed flow's port, after 100 ms
CT_REBUILD_BACKENDS = 32     # NM_CT_REBUILD_BACKENDS: backends searched for an evicted flow
CT_REBUILD_PORTS = 4         # NM_CT_REBUILD_PORTS: its first SNAT ports searched


class CtKey(ctypes.Structure):
    _fields_ = [("src", u32 * 4), ("dst", u32 * 4), ("sport", u16), ("dport", u16),
                ("proto", u8), ("family", u8), ("pad", u16)]


class CtValue(ctypes.Structure):
    _fields_ = [("nat_src", u32 * 4), ("nat_dst", u32 * 4), ("nat_sport", u16),
                ("nat_dport", u16), ("kind", u8), ("state", u8), ("flags", u8), ("pad", u8),
                ("svc_id", u32), ("last_seen_ns", u64)]


class TcConfig(ctypes.Structure):
    _fields_ = [("tcp_syn_s", u32), ("tcp_established_s", u32), ("tcp_closing_s", u32),
                ("udp_s", u32), ("snat_port_min", u16), ("snat_port_max", u16), ("pad", u32)]


class NodeAddrKey(ctypes.Structure):
    _fields_ = [("addr", u32 * 4), ("ifindex", u32), ("family", u8), ("pad", u8 * 3)]


class TcStatsKey(ctypes.Structure):
    _fields_ = [("ifindex", u32), ("direction", u8), ("verdict", u8), ("pad", u16)]


TC_MAPS: Tuple[MapSpec, ...] = (
    MapSpec("ct", bpfsys.MAP_TYPE_LRU_HASH, CtKey, CtValue, "NM_MAX_CT"),
    MapSpec("tc_config", bpfsys.MAP_TYPE_ARRAY, u32, TcConfig, "", 1),
    MapSpec("node_addrs", bpfsys.MAP_TYPE_HASH, NodeAddrKey, u32, "NM_MAX_NODE_ADDRS"),
    MapSpec("tc_stats", bpfsys.MAP_TYPE_PERCPU_HASH, TcStatsKey, u64, "", 4096),
    MapSpec("tc_drops", bpfsys.MAP_TYPE_PERCPU_ARRAY, u32, u64, "", len(DROP_REASONS)),
    MapSpec("tc_events", bpfsys.MAP_TYPE_PERCPU_ARRAY, u32, u64, "", len(EVENTS)),
    MapSpec("tc_ifaces", bpfsys.MAP_TYPE_HASH, u32, u32, "", 1024),
)
TC_MAP_BY_NAME = {s.name: s for s in TC_MAPS}


@dataclass(frozen=True)
class TcSettings:
    """The packet path's knobs: conntrack capacity and lifetimes, the SNAT port range."""

    ct_entries: int = 131072          # two per flow; LRU maps are preallocated
    node_addrs: int = 4096
    tcp_syn_seconds: int = 60
    tcp_established_seconds: int = 21600
    tcp_closing_seconds: int = 10
    udp_seconds: int = 60
    snat_port_min: int = 32768
    snat_port_max: int = 60999

    def capacity(self, spec: MapSpec) -> int:
        if spec.size_setting == "NM_MAX_CT":
            return self.ct_entries
        if spec.size_setting == "NM_MAX_NODE_ADDRS":
            return self.node_addrs
        return spec.fixed_size

    def cflags(self) -> List[str]:
        return [f"-DNM_MAX_CT={self.ct_entries}", f"-DNM_MAX_NODE_ADDRS={self.node_addrs}"]

    def problems(self) -> List[str]:
        out = []
        if not 1 <= self.snat_port_min <= self.snat_port_max <= 65535:
            out.append(f"--snat-ports {self.snat_port_min}-{self.snat_port_max}: not a port "
                       f"range (1 <= first <= last <= 65535)")
        for name in ("tcp_syn_seconds", "tcp_established_seconds", "tcp_closing_seconds",
                     "udp_seconds"):
            if not 1 <= getattr(self, name) <= 2**31:
                out.append(f"--ct-{name.replace('_seconds', '').replace('_', '-')}-timeout: "
                           f"{getattr(self, name)} is not a number of seconds (>= 1)")
        if self.ct_entries < 2:
            out.append(f"--map-conntrack: {self.ct_entries} is too small (>= 2)")
        return out

    def config(self) -> TcConfig:
        return TcConfig(self.tcp_syn_seconds, self.tcp_established_seconds,
                        self.tcp_closing_seconds, self.udp_seconds, self.snat_port_min,
                        self.snat_port_max, 0)

    def lifetime_seconds(self, proto: int, state: int) -> int:
        if proto == socket.IPPROTO_UDP:
            return self.udp_seconds
        return {CT_ESTABLISHED: self.tcp_established_seconds,
                CT_CLOSING: self.tcp_closing_seconds}.get(state, self.tcp_syn_seconds)


# -- compile ---------------------------------------------------------------------------------

def compile_and_load_tc(bpffs: str, sizes: MapSizes, settings: TcSettings, src_dir: Path
                        ) -> Tuple[object, Dict[str, int], Dict[str, int], float]:
    """(the BCC object, program fds, map fds, seconds). The socket path's maps must be pinned
    in bpffs already (the loader loads sock_lb.c first)."""
    from bcc import BPF  # Debian's python3-bpfcc

    from .compile import load_program, source_text

    started = time.monotonic()
    cflags = [f'-DNM_PIN_DIR="{bpffs}"', f"-I{src_dir}", *sizes.cflags(), *settings.cflags()]
    bpf = BPF(text=source_text(src_dir / "tc_nodeport.c").encode(), cflags=cflags)
    progs = {name: load_program(bpf, name, BPF.SCHED_CLS).fd  # EAGAIN retried, as sock_lb's
             for name in (PROG_INGRESS, PROG_EGRESS)}
    maps = {spec.name: bpf[spec.name.encode()].map_fd for spec in TC_MAPS}
    return bpf, progs, maps, time.monotonic() - started



# -- attach with pyroute2 ---------------------------------------------------------------------

def filter_name(bpffs: str, prog: str) -> str:
    """Our filters carry the program and the pin folder in their name: 'nm_tc_ingress:/sys/..'."""
    return f"{prog}:{os.path.realpath(bpffs)}"


def _attrs(msg) -> Dict[str, object]:
    return dict(msg.get("attrs", []))


def _bpf_filters(ipr, ifindex: int, parent: int) -> Iterator[Tuple[int, int, str]]:
    """(prio, handle, name) of every bpf filter on one clsact hook."""
    try:
        msgs = ipr.get_filters(index=ifindex, parent=parent)
    except Exception as e:  # NetlinkError: no clsact here
        if getattr(e, "code", None) in (errno.EINVAL, errno.ENOENT):
            return
        raise
    for msg in msgs:
        attrs = _attrs(msg)
        if attrs.get("TCA_KIND") != "bpf":
            continue
        opts = attrs.get("TCA_OPTIONS")
        name = ""
        if opts is not None:
            name = _attrs(opts).get("TCA_BPF_NAME") or ""
        if not msg["handle"]:  # the head entry of a priority's chain, not a filter
            continue
        yield msg["info"] >> 16, msg["handle"], name


def _veth_to_an_endpoint(ipr, ifindex: int) -> bool:
    """A veth whose peer lives in another network namespace (IFLA_LINK_NETNSID names it) and
    is no bridge's port there: a pod's end, where bpf_redirect_peer delivers (it drops towards
    any other device). A veth to a bridge is a way out of the node (a VM's or a container
    node's uplink, or the lab's fabric), which a real node's NIC would be: it keeps
    bpf_redirect, so the lab does not save a hop that a node would not."""
    links = ipr.get_links(ifindex)
    if not links:
        return False
    attrs = _attrs(links[0])
    info = attrs.get("IFLA_LINKINFO")
    kind = _attrs(info).get("IFLA_INFO_KIND") if info is not None else None
    nsid, peer = attrs.get("IFLA_LINK_NETNSID"), attrs.get("IFLA_LINK")
    if kind != "veth" or nsid is None or not peer:
        return False
    try:  # the peer, seen from here by its netns id (IFLA_TARGET_NETNSID, Linux 4.20)
        found = ipr.link("get", index=peer, IFLA_IF_NETNSID=nsid)
    except Exception:  # NetlinkError: not allowed or gone; then no peer redirect
        return False
    return bool(found) and not _attrs(found[0]).get("IFLA_MASTER")


def _has_clsact(ipr, ifindex: int) -> bool:
    return any(_attrs(q).get("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=ifindex))


class TcPath:
    """The loaded TC programs, their maps, and the interfaces they are attached to."""

    def __init__(self, bpffs: str, sizes: MapSizes, settings: TcSettings):
        self.bpffs = os.path.realpath(bpffs)
        self.sizes = sizes
        self.settings = settings
        self.bpf = None
        self.progs: Dict[str, int] = {}
        self.map_fds: Dict[str, int] = {}
        self._owned: List[int] = []
        self.interfaces: Dict[str, int] = {}  # name -> ifindex
        self.load_seconds = 0.0
        # Pinned counter arrays an older build made smaller: their pins are taken away before
        # the load (which then creates and pins the new size), their fds kept until the old
        # counts are added to the new map (name -> the old map's fd).
        self._retired: Dict[str, int] = {}

    def load(self, in_process: bool = False) -> None:
        from .compile import compile_in_child
        from .loader import bpf_source_dir

        self.retire_grown_arrays()
        self.check_pins()
        src = bpf_source_dir()
        try:
            if in_process:
                self.bpf, self.progs, self.map_fds, self.load_seconds = compile_and_load_tc(
                    self.bpffs, self.sizes, self.settings, src)
            else:
                self.progs, self.map_fds, self.load_seconds = compile_in_child(
                    self.bpffs, self.sizes, src, tc=self.settings)
                self._owned = [*self.progs.values(), *self.map_fds.values()]
        except BaseException:
            self._restore_retired()
            raise
        bpfsys.map_update(self.map_fds["tc_config"], u32(0), self.settings.config())
        log.info("TC programs loaded in %.2fs", self.load_seconds)

    def retire_grown_arrays(self) -> List[str]:
        """Take away the pins of counter arrays (u32 -> u64, per-CPU or not) that this build
        makes bigger and that differ in nothing else: an older agent's tc_events had 1 entry,
        this one has len(EVENTS). Refusing them would ask for `nodemesh cleanup`, which drops
        the conntrack map and so breaks every flow. The load then creates the new size; the
        old counts are added to it by carry_over(), once the old programs are detached.
        Returns the names retired."""
        for spec in TC_MAPS:
            path = os.path.join(self.bpffs, spec.name)
            if spec.name in self._retired or spec.value is not u64 or spec.key is not u32 or \
                    spec.map_type not in (bpfsys.MAP_TYPE_ARRAY, bpfsys.MAP_TYPE_PERCPU_ARRAY) \
                    or not os.path.exists(path):
                continue
            fd = bpfsys.obj_get(path)
            info = bpfsys.map_info(fd)
            if (info.type, info.key_size, info.value_size) == (spec.map_type, 4, 8) and \
                    info.max_entries < self.settings.capacity(spec):
                os.unlink(path)
                self._retired[spec.name] = fd
                log.info("%s: pinned with %d entries, this build has %d: replaced by a new map "
                         "that keeps its counts", path, info.max_entries,
                         self.settings.capacity(spec))
            else:
                bpfsys.close(fd)
        return list(self._retired)

    def _restore_retired(self) -> None:
        """The load failed: pin the old maps back where nothing new took their place."""
        for name, fd in self._retired.items():
            path = os.path.join(self.bpffs, name)
            if not os.path.exists(path):
                bpfsys.obj_pin(fd, path)
            bpfsys.close(fd)
        self._retired.clear()

    def carry_over(self) -> None:
        """Add the retired maps' counts (per CPU) to the new maps. After attach: the old
        programs, which counted into the old maps until their filters were replaced, are gone.
        A packet counted by a new program during the copy may be lost (user space and the
        program both read-modify-write the slot): counters, not state."""
        for name, fd in list(self._retired.items()):
            spec = TC_MAP_BY_NAME[name]
            per_cpu = spec.map_type == bpfsys.MAP_TYPE_PERCPU_ARRAY
            value_type = u64 * (bpfsys.possible_cpus() if per_cpu else 1)
            try:
                for index in range(bpfsys.map_info(fd).max_entries):
                    old, new = value_type(), value_type()
                    if not bpfsys.map_lookup(fd, u32(index), old):
                        continue
                    bpfsys.map_lookup(self.map_fds[name], u32(index), new)
                    for cpu in range(len(new)):
                        new[cpu] += old[cpu]
                    bpfsys.map_update(self.map_fds[name], u32(index), new)
            finally:
                bpfsys.close(fd)
                del self._retired[name]

    def check_pins(self) -> None:
        from .loader import DatapathError, pin_mismatches

        _, problems = pin_mismatches(self.bpffs, TC_MAPS, self.settings.capacity)
        if problems:
            raise DatapathError("existing TC pins do not match this build (another version, "
                                "or another --map-conntrack):\n  " + "\n  ".join(problems) +
                                f"\nrun 'nodemesh cleanup --bpffs {self.bpffs}' to start afresh")

    def attach(self, interfaces: Sequence[str]) -> None:
        """Attach ingress and egress on each interface: create clsact if there is none (and
        remember that we did), then add our filter or replace it in place (a restart)."""
        from pyroute2 import IPRoute

        from .loader import DatapathError

        with IPRoute() as ipr:
            for name in interfaces:
                found = ipr.link_lookup(ifname=name)
                if not found:
                    raise DatapathError(f"--interface {name}: no such interface")
                ifindex = found[0]
                flags = u32(0)
                bpfsys.map_lookup(self.map_fds["tc_ifaces"], u32(ifindex), flags)
                flags = u32(flags.value & ~IFACE_F_PEER)
                if not _has_clsact(ipr, ifindex):
                    ipr.tc("add", "clsact", index=ifindex)
                    flags = u32(flags.value | IFACE_F_CLSACT)
                if _veth_to_an_endpoint(ipr, ifindex):
                    flags = u32(flags.value | IFACE_F_PEER)
                if flags.value:
                    bpfsys.map_update(self.map_fds["tc_ifaces"], u32(ifindex), flags)
                for parent, prog in ((PARENT_INGRESS, PROG_INGRESS),
                                     (PARENT_EGRESS, PROG_EGRESS)):
                    ipr.tc("replace-filter", "bpf", index=ifindex, handle=FILTER_HANDLE,
                           parent=parent, prio=FILTER_PRIO, protocol=ETH_P_ALL,
                           fd=self.progs[prog], name=filter_name(self.bpffs, prog),
                           direct_action=True)
                self.interfaces[name] = ifindex
                log.info("TC programs attached to %s (ifindex %d)", name, ifindex)
        self.carry_over()
        self.sync_addresses()

    def attached(self) -> List[str]:
        """Interfaces whose filters are missing (for the agent's periodic check)."""
        from pyroute2 import IPRoute

        missing = []
        with IPRoute() as ipr:
            for name, ifindex in self.interfaces.items():
                names = {n for parent in (PARENT_INGRESS, PARENT_EGRESS)
                         for _, _, n in _bpf_filters(ipr, ifindex, parent)}
                if {filter_name(self.bpffs, PROG_INGRESS),
                        filter_name(self.bpffs, PROG_EGRESS)} - names:
                    missing.append(name)
        return missing

    def sync_addresses(self) -> int:
        """Make node_addrs hold exactly the addresses of the attached interfaces (NodePorts
        answer on them). Returns the number of changes."""
        from pyroute2 import IPRoute

        want = set()
        with IPRoute() as ipr:
            ours = set(self.interfaces.values())
            for msg in ipr.get_addr():
                addr = _attrs(msg).get("IFA_ADDRESS")
                if addr and msg["index"] in ours:
                    want.add((addr, msg["index"]))
        fd = self.map_fds["node_addrs"]
        have = {}
        for key, _ in bpfsys.map_lookup_batch(fd, NodeAddrKey, u32):
            k = NodeAddrKey.from_buffer_copy(bytes(key))
            have[(decode_addr(k.family, k.addr), k.ifindex)] = k
        changes = 0
        for addr, ifindex in want - set(have):
            family, words = encode_addr(addr)
            bpfsys.map_update(fd, NodeAddrKey((u32 * 4)(*words), ifindex, family), u32(1))
            changes += 1
        for gone in set(have) - want:
            bpfsys.map_delete_batch(fd, (NodeAddrKey * 1)(have[gone]), 1)
            changes += 1
        return changes

    # -- conntrack -----------------------------------------------------------------------
    def conntrack(self) -> List[Tuple[CtKey, CtValue]]:
        return [(CtKey.from_buffer_copy(bytes(k)), CtValue.from_buffer_copy(bytes(v)))
                for k, v in bpfsys.map_lookup_batch(self.map_fds["ct"], CtKey, CtValue)]

    def scan(self, now_ns: int) -> Tuple[int, List[CtKey]]:
        """(live entries, keys of the expired ones). The map is read in place, one batch at a
        time, and only expired keys are copied: a full 131,072-entry map costs about 0.07 s
        of CPU this way, 0.5 s when every entry was copied into Python objects first (the
        agent shares the node's CPUs with the traffic it serves)."""
        lifetimes: Dict[Tuple[int, int], int] = {}
        live, expired = 0, []
        for k, v in bpfsys.map_lookup_batch(self.map_fds["ct"], CtKey, CtValue):
            kind = (k.proto, v.state)
            life = lifetimes.get(kind)
            if life is None:
                life = lifetimes[kind] = self.settings.lifetime_seconds(*kind) * 1_000_000_000
            if now_ns - v.last_seen_ns > life:
                expired.append(CtKey.from_buffer_copy(k))
            else:
                live += 1
        return live, expired

    def sweep(self, now_ns: Optional[int] = None) -> int:
        """Delete expired conntrack entries (the datapath already treats them as gone; this
        frees their room and keeps the entry count true). Returns how many."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        _, expired = self.scan(now)
        if expired:
            bpfsys.map_delete_batch(self.map_fds["ct"], (CtKey * len(expired))(*expired),
                                    len(expired))
        return len(expired)

    def close(self) -> None:
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            except Exception:  # BCC cleanup must not mask the real exit reason
                pass
            self.bpf = None
        for fd in self._owned:
            bpfsys.close(fd)
        self._owned = []
        self.progs, self.map_fds = {}, {}
        for fd in self._retired.values():  # never attached: the old counts are not carried
            bpfsys.close(fd)
        self._retired.clear()


def detach(bpffs: str) -> List[str]:
    """Remove the filters this pin folder's agent added, in this network namespace, and the
    clsact qdiscs it created that are empty afterwards. Other filters and qdiscs stay."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    done: List[str] = []
    created = _created_clsact(bpffs)
    ours = {filter_name(bpffs, PROG_INGRESS), filter_name(bpffs, PROG_EGRESS)}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            try:
                _detach_link(ipr, link, ours, created, done)
            except NetlinkError as e:
                # The interface went away since the listing (a veth whose peer's netns was
                # just deleted): its filters and qdiscs went with it.
                if e.code != errno.ENODEV:
                    raise
    return done


def _detach_link(ipr, link, ours: Set[str], created: Set[int], done: List[str]) -> None:
    ifindex, ifname = link["index"], _attrs(link).get("IFLA_IFNAME")
    remaining = 0
    for parent in (PARENT_INGRESS, PARENT_EGRESS):
        for prio, handle, name in list(_bpf_filters(ipr, ifindex, parent)):
            if name not in ours:
                remaining += 1
                continue
            ipr.tc("del-filter", "bpf", index=ifindex, handle=handle, parent=parent,
                   prio=prio, protocol=ETH_P_ALL)
            done.append(f"removed TC filter {name.split(':')[0]} from {ifname}")
    if ifindex in created and remaining == 0 and _has_clsact(ipr, ifindex) and \
            not _any_filter(ipr, ifindex):
        ipr.tc("del", "clsact", index=ifindex)
        done.append(f"removed clsact qdisc from {ifname}")


def _any_filter(ipr, ifindex: int) -> bool:
    for parent in (PARENT_INGRESS, PARENT_EGRESS):
        try:
            if any(_attrs(m).get("TCA_KIND") for m in ipr.get_filters(index=ifindex,
                                                                        parent=parent)):
                return True
        except Exception:  # no clsact: nothing attached
            return False
    return False


def _created_clsact(bpffs: str) -> set:
    pin = os.path.join(bpffs, "tc_ifaces")
    try:
        fd = bpfsys.obj_get(pin)
    except OSError:
        return set()
    try:
        return {int(k) for k, v in bpfsys.map_lookup_batch(fd, u32, u32)
                if int(v) & IFACE_F_CLSACT}
    finally:
        bpfsys.close(fd)


def percpu_sum(fd: int, key_type) -> Dict[object, int]:
    """{key: u64 value summed over CPUs}; keys are ints for u32 maps, bytes for struct keys."""
    out: Dict[object, int] = {}
    for k, per_cpu in bpfsys.map_lookup_batch(fd, key_type, u64 * bpfsys.possible_cpus()):
        out[int(k) if isinstance(k, int) else bytes(k)] = sum(int(v) for v in per_cpu)
    return out
