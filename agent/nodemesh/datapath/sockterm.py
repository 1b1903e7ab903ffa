"""End the sockets still connected to a removed backend, in every network namespace.

The connect hook rewrites a client's connect() to a VIP into a backend address once, so a
connected UDP socket (and any TCP connection) keeps talking to that backend for as long as it
lives, even after the backend has left the service. Here we find such sockets with sock_diag
(a SOCK_DIAG_BY_FAMILY dump, filtered in the kernel on the destination address:port) and end
them with SOCK_DESTROY. The kernel then aborts the socket (udp_abort / tcp_abort): its owner's
pending or next recv()/send() fails with ECONNABORTED, a UDP socket is left unconnected (so the
application's next connect() goes through the hook again and reaches a live backend), and a TCP
connection is reset. Needs CAP_NET_ADMIN and a kernel built with CONFIG_INET_DIAG_DESTROY.

Sockets live in the namespace they were made in, so we look in every network namespace on the
host: each process's /proc/PID/ns/net and the bind mounts under /run/netns, deduplicated by the
namespace inode. A netlink socket belongs to the namespace of the thread that creates it, and
setns() moves only the calling thread, so a short-lived worker thread hops from namespace to
namespace; the caller's threads never change namespace.

We build the netlink messages with struct rather than use pyroute2: its DiagSocket (0.7) has no
SOCK_DESTROY, no bytecode filter, returns whole dumps as lists and ignores NLMSG_ERROR replies,
and the messages are a handful of fixed-layout structs (uapi linux/inet_diag.h).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

from .. import threadname

log = logging.getLogger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Destination = Tuple[IPAddress, int]

NETNS_RUN_DIR = "/run/netns"
NETLINK_SOCK_DIAG = 4
CLONE_NEWNET = 0x40000000

# netlink message types and flags (linux/netlink.h, linux/sock_diag.h)
NLMSG_ERROR = 2
NLMSG_DONE = 3
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300

INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_D_COND = 8

# TCP states as the kernel numbers them (include/net/tcp_states.h); a connected UDP socket is
# TCP_ESTABLISHED, an unconnected one TCP_CLOSE.
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
STATE_NAMES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
               6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
               11: "CLOSING", 12: "NEW_SYN_RECV"}

# Which sockets count as "connected to" a destination: UDP sockets with a peer, TCP connections
# that are up or coming up. Listeners, TIME_WAIT and closing connections are left alone.
PROTOCOLS = {
    "UDP": (socket.IPPROTO_UDP, 1 << TCP_ESTABLISHED),
    "TCP": (socket.IPPROTO_TCP, (1 << TCP_ESTABLISHED) | (1 << TCP_SYN_SENT)),
}

_NLMSGHDR = struct.Struct("=IHHII")        # len, type, flags, seq, pid
_REQ_HEAD = struct.Struct("=BBBBI")        # inet_diag_req_v2 up to the sockid
_NLATTR = struct.Struct("=HH")
_BC_OP = struct.Struct("=BBH")             # inet_diag_bc_op: code, yes, no
_HOSTCOND = struct.Struct("=BBxxi")        # inet_diag_hostcond: family, prefix_len, port
_PORTS = struct.Struct("!HH")              # sockid sport, dport: network order
_IF_COOKIE = struct.Struct("=III")         # sockid if, cookie[2]: host order
_SOCKID_SIZE = 48
_DIAG_MSG_SIZE = 72                        # inet_diag_msg
_INODE_OFFSET = 68

# A bytecode program is one netlink attribute (16-bit length) and its jumps are 16-bit, so a
# long destination list is filtered in several dumps of this many destinations (<= 32 KiB).
_DESTINATIONS_PER_DUMP = 1000
_NETLINK_TIMEOUT = 5.0
_RECV_BUFFER = 1 << 16


# -- results -------------------------------------------------------------------------------------
@dataclass
class MatchedSocket:
    family: int                  # 4 or 6 (the socket's own family: 6 for a v4-mapped socket)
    state: str                   # "ESTABLISHED", "SYN_SENT"
    local: Tuple[str, int]
    remote: Tuple[str, int]      # a v4-mapped remote is shown as the IPv4 address it maps
    cookie: int
    inode: int
    outcome: str = ""            # destroyed | would-destroy | gone | failed: <ERRNO>


@dataclass
class NetnsResult:
    path: str
    inode: int
    matched: int = 0             # sockets whose remote address:port is a destination
    destroyed: int = 0
    gone: int = 0                # closed by their owner between the dump and SOCK_DESTROY
    errors: List[str] = field(default_factory=list)
    sockets: List[MatchedSocket] = field(default_factory=list)


@dataclass
class SockTermResult:
    protocol: str
    dry_run: bool
    namespaces: List[NetnsResult] = field(default_factory=list)
    vanished: List[str] = field(default_factory=list)  # namespaces gone before we got in
    seconds: float = 0.0

    @property
    def matched(self) -> int:
        return sum(n.matched for n in self.namespaces)

    @property
    def destroyed(self) -> int:
        return sum(n.destroyed for n in self.namespaces)

    @property
    def errors(self) -> List[str]:
        return [f"{n.path}: {e}" for n in self.namespaces for e in n.errors]

    def destroyed_by_netns(self) -> Dict[str, int]:
        return {n.path: n.destroyed for n in self.namespaces}

    def for_netns(self, path: str) -> Optional[NetnsResult]:
        for n in self.namespaces:
            if n.path == path:
                return n
        return None


# -- namespaces ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Netns:
    path: str
    inode: int


def network_namespaces() -> List[Netns]:
    """Every network namespace that a process is in or that /run/netns names, once each.

    Named ones come first so that a namespace is reported by its readable path. A namespace that
    nothing but an open file descriptor or a socket keeps alive cannot be found this way."""
    nsfs_dev = os.stat("/proc/self/ns/net").st_dev
    seen: Set[int] = set()
    found: List[Netns] = []

    def add(path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:  # the process exited, or we may not look
            return
        # A file under /run/netns whose namespace was unmounted is a plain empty file.
        if st.st_dev != nsfs_dev or st.st_ino in seen:
            return
        seen.add(st.st_ino)
        found.append(Netns(path, st.st_ino))

    try:
        names = sorted(os.listdir(NETNS_RUN_DIR))
    except OSError:
        names = []
    for name in names:
        add(os.path.join(NETNS_RUN_DIR, name))
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                add(f"/proc/{entry.name}/ns/net")
    return found


def _setns_function():
    if hasattr(os, "setns"):  # Python 3.12+
        return lambda fd: os.setns(fd, CLONE_NEWNET)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)

    def setns(fd: int) -> None:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns: {os.strerror(e)}")
    return setns


_setns = _setns_function()


# -- netlink messages ----------------------------------------------------------------------------
def _normalize(address: str, port: int) -> Destination:
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        raise ValueError(f"{address}: an unspecified address is no destination")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{address} port {port!r}: not a port (1-65535)")
    return ip, port


def destination_filter(destinations: Sequence[Destination]) -> bytes:
    """inet_diag bytecode accepting a socket whose remote address:port is any destination.

    The kernel runs it as a chain of conditional forward jumps: accept when the program ends
    exactly at its last byte, reject when a jump overshoots it. The kernel's audit walks the
    "yes" jumps in order, so every condition's "yes" falls through to the next op:

        COND d1 (yes: next, no: skip the JMP)  JMP (always: to the end = accept)
        COND d2 ...                            JMP ...
        COND dn (yes: the end = accept, no: 4 bytes past the end = reject)

    An IPv4 condition also matches an AF_INET6 socket talking to ::ffff:a.b.c.d (the kernel
    compares the mapped part), so one program serves both families' dumps."""
    if not destinations:
        raise ValueError("no destinations")
    conds = []
    for ip, port in destinations:
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        packed = ip.packed
        conds.append(_HOSTCOND.pack(family, len(packed) * 8, port) + packed)
    total = sum(_BC_OP.size + len(c) for c in conds) + _BC_OP.size * (len(conds) - 1)
    if total > 0xFFFF - _NLATTR.size:
        raise ValueError(f"{len(destinations)} destinations do not fit one filter")
    program = bytearray()
    for i, cond in enumerate(conds):
        size = _BC_OP.size + len(cond)
        program += _BC_OP.pack(INET_DIAG_BC_D_COND, size, size + _BC_OP.size) + cond
        if i < len(conds) - 1:
            program += _BC_OP.pack(INET_DIAG_BC_JMP, _BC_OP.size, total - len(program))
    assert len(program) == total
    return bytes(program)


def _errno_name(code: Optional[int]) -> str:
    if code == errno.EOPNOTSUPP:  # the same number as ENOTSUP on Linux; say what the kernel means
        return "EOPNOTSUPP"
    return errno.errorcode.get(code, str(code)) if code else "error"


def _address(family: int, raw: bytes) -> IPAddress:
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    ip = ipaddress.IPv6Address(raw)
    return ip.ipv4_mapped or ip


class _DiagConnection:
    """One NETLINK_SOCK_DIAG socket, bound to the namespace of the thread that opened it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_SOCK_DIAG)
        self.sock.settimeout(_NETLINK_TIMEOUT)  # the kernel always answers; never hang on it
        self.sock.bind((0, 0))
        self.seq = int(time.time()) & 0xFFFF_0000
        self.buffer = bytearray(_RECV_BUFFER)

    def close(self) -> None:
        self.sock.close()

    def _send(self, msg_type: int, flags: int, payload: bytes) -> int:
        self.seq = (self.seq + 1) & 0xFFFF_FFFF
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), msg_type, flags, self.seq,
                                      0) + payload)
        return self.seq

    def _messages(self, seq: int) -> Iterator[Tuple[int, memoryview]]:
        """(type, payload) of each reply to request `seq`, one receive buffer at a time.

        A payload is a view into the shared buffer: use it before asking for the next."""
        while True:
            n, _, msg_flags, _ = self.sock.recvmsg_into([self.buffer])
            if msg_flags & socket.MSG_TRUNC:
                raise OSError(errno.EMSGSIZE, "netlink reply larger than the receive buffer")
            view = memoryview(self.buffer)[:n]
            offset = 0
            while offset + _NLMSGHDR.size <= n:
                length, msg_type, _, msg_seq, _ = _NLMSGHDR.unpack_from(view, offset)
                if length < _NLMSGHDR.size or offset + length > n:
                    raise OSError(errno.EBADMSG, "malformed netlink message")
                if msg_seq == seq:
                    yield msg_type, view[offset + _NLMSGHDR.size:offset + length]
                offset += (length + 3) & ~3

    def dump(self, family: int, protocol: int, states: int,
             program: bytes) -> Iterator[Tuple[bytes, int, int]]:
        """Stream (sockid, state, inode) of the sockets the kernel filter lets through."""
        request = (_REQ_HEAD.pack(family, protocol, 0, 0, states) + bytes(_SOCKID_SIZE)
                   + _NLATTR.pack(_NLATTR.size + len(program), INET_DIAG_REQ_BYTECODE) + program)
        seq = self._send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, request)
        for msg_type, payload in self._messages(seq):
            if msg_type == NLMSG_DONE:
                # A dump that failed part-way says so in NLMSG_DONE's payload.
                code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                if code > 0:
                    raise OSError(code, f"sock_diag dump: {os.strerror(code)}")
                return
            if msg_type == NLMSG_ERROR:
                code = -struct.unpack_from("=i", payload)[0]
                raise OSError(code, f"sock_diag dump: {os.strerror(code)}")
            if msg_type == SOCK_DIAG_BY_FAMILY and len(payload) >= _DIAG_MSG_SIZE:
                inode = struct.unpack_from("=I", payload, _INODE_OFFSET)[0]
                yield bytes(payload[4:4 + _SOCKID_SIZE]), payload[1], inode

    def destroy(self, family: int, protocol: int, states: int, sockid: bytes) -> int:
        """SOCK_DESTROY one socket, named by the sockid (addresses, ports, interface and cookie)
        the dump gave; the cookie makes sure a reused 4-tuple is not someone else's socket.
        Returns 0 or the errno of the kernel's acknowledgement."""
        seq = self._send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK,
                         _REQ_HEAD.pack(family, protocol, 0, 0, states) + sockid)
        for msg_type, payload in self._messages(seq):
            if msg_type == NLMSG_ERROR:
                return -struct.unpack_from("=i", payload)[0]
        raise AssertionError("unreachable: _messages only ends by raising")


# -- the work ------------------------------------------------------------------------------------
def _describe(family: int, sockid: bytes, state: int, inode: int) -> MatchedSocket:
    sport, dport = _PORTS.unpack_from(sockid, 0)
    _, cookie0, cookie1 = _IF_COOKIE.unpack_from(sockid, 36)
    return MatchedSocket(
        family=4 if family == socket.AF_INET else 6,
        state=STATE_NAMES.get(state, str(state)),
        local=(str(_address(family, sockid[4:20])), sport),
        remote=(str(_address(family, sockid[20:36])), dport),
        cookie=cookie0 | (cookie1 << 32), inode=inode)


def _terminate_in_current_netns(result: NetnsResult, destinations: Set[Destination],
                                protocol: int, states: int, dry_run: bool) -> None:
    ordered = sorted(destinations, key=lambda d: (d[0].version, d[0].packed, d[1]))
    v4 = [d for d in ordered if d[0].version == 4]
    # AF_INET sockets can only reach IPv4 destinations; AF_INET6 ones reach both (v4-mapped).
    plans = [(socket.AF_INET, v4), (socket.AF_INET6, ordered)]
    unsupported = False
    conn = _DiagConnection()
    try:
        for family, dests in plans:
            # The whole dump first, then the destroys: aborting a UDP socket unhashes it, and a
            # dump resumes by position in the hash chain, so destroying mid-dump could skip one.
            found: List[Tuple[bytes, MatchedSocket]] = []
            for start in range(0, len(dests), _DESTINATIONS_PER_DUMP):
                chunk = dests[start:start + _DESTINATIONS_PER_DUMP]
                for sockid, state, inode in conn.dump(family, protocol, states,
                                                      destination_filter(chunk)):
                    # Belt and braces: the kernel filter already chose these.
                    remote = (_address(family, sockid[20:36]), _PORTS.unpack_from(sockid)[1])
                    if remote in destinations:
                        found.append((sockid, _describe(family, sockid, state, inode)))
            result.matched += len(found)
            result.sockets.extend(matched for _, matched in found)
            for sockid, matched in found:
                if dry_run:
                    matched.outcome = "would-destroy"
                    continue
                if unsupported:
                    matched.outcome = "failed: EOPNOTSUPP"
                    continue
                code = conn.destroy(family, protocol, states, sockid)
                if code == 0:
                    matched.outcome = "destroyed"
                    result.destroyed += 1
                elif code in (errno.ENOENT, errno.ESTALE):
                    # Closed meanwhile: nothing has its 4-tuple (ENOENT), or a newer socket
                    # does and the cookie told them apart (ESTALE).
                    matched.outcome = "gone"
                    result.gone += 1
                else:
                    matched.outcome = f"failed: {_errno_name(code)}"
                    if code == errno.EOPNOTSUPP:  # every other one would fail the same way
                        unsupported = True
                        result.errors.append("SOCK_DESTROY is not supported by this kernel "
                                             "(it needs CONFIG_INET_DIAG_DESTROY)")
                    else:
                        result.errors.append(
                            f"SOCK_DESTROY {matched.remote[0]}:{matched.remote[1]} from "
                            f"{matched.local[0]}:{matched.local[1]}: {os.strerror(code)}")
    finally:
        conn.close()


def _visit(targets: Sequence[Netns], result: SockTermResult, destinations: Set[Destination],
           protocol: int, states: int, dry_run: bool) -> None:
    """Runs in the worker thread: enter each namespace in turn and do the work there."""
    nsfs_dev = os.stat("/proc/self/ns/net").st_dev
    visited: Set[int] = set()
    for target in targets:
        try:
            fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            result.vanished.append(target.path)
            continue
        except OSError as e:
            result.namespaces.append(NetnsResult(target.path, target.inode,
                                                 errors=[f"open: {e.strerror}"]))
            continue
        try:
            st = os.fstat(fd)
            if target.inode and (st.st_dev != nsfs_dev or st.st_ino != target.inode):
                # What we listed is gone: `ip netns del` unmounted the /run/netns file (left a
                # plain file), or /proc/PID now belongs to a process in another namespace.
                result.vanished.append(target.path)
                continue
            if st.st_dev != nsfs_dev:
                result.namespaces.append(NetnsResult(target.path, 0,
                                                     errors=["not a network namespace"]))
                continue
            if st.st_ino in visited:  # the same namespace under another name
                continue
            visited.add(st.st_ino)
            ns_result = NetnsResult(target.path, st.st_ino)
            result.namespaces.append(ns_result)
            try:
                _setns(fd)
                _terminate_in_current_netns(ns_result, destinations, protocol, states, dry_run)
            except OSError as e:
                ns_result.errors.append(f"{_errno_name(e.errno)}: {e.strerror or e}")
        finally:
            os.close(fd)


def destroy_sockets(destinations: Iterable[Tuple[str, int]], protocol: str,
                    netns_paths: Optional[Iterable[str]] = None, *,
                    dry_run: bool = False) -> SockTermResult:
    """SOCK_DESTROY every `protocol` ("UDP" or "TCP") socket, IPv4 and IPv6, whose remote
    address:port is one of `destinations`, in each of `netns_paths` (default: every network
    namespace on the host). UDP: connected sockets; TCP: ESTABLISHED and SYN_SENT.

    Never raises for one namespace: what went wrong is in the result's `errors` (per namespace),
    and namespaces that disappeared before we could enter them are listed in `vanished`.
    Raises ValueError for a bad protocol or destination."""
    try:
        proto, states = PROTOCOLS[protocol.upper()]
    except KeyError:
        raise ValueError(f"protocol {protocol!r}: not UDP or TCP") from None
    wanted = {_normalize(address, port) for address, port in destinations}
    result = SockTermResult(protocol=protocol.upper(), dry_run=dry_run)
    if not wanted:
        return result
    started = time.monotonic()
    targets = (network_namespaces() if netns_paths is None
               else [Netns(path, 0) for path in netns_paths])
    failure: List[BaseException] = []

    def work() -> None:
        try:
            _visit(targets, result, wanted, proto, states, dry_run)
        except BaseException as e:  # noqa: B902 - handed to the caller's thread below
            failure.append(e)

    # The worker's setns() calls change only its own namespace, and it ends with the call.
    worker = threadname.Thread(target=work, name="sockterm-netns-walk", daemon=True)
    worker.start()
    worker.join()
    result.seconds = time.monotonic() - started
    if failure:
        raise failure[0]
    if result.destroyed or result.errors:
        log.info("%s sockets to %d destination(s): %d destroyed in %d namespace(s)%s",
                 result.protocol, len(wanted), result.destroyed,
                 sum(1 for n in result.namespaces if n.destroyed),
                 f"; errors: {'; '.join(result.errors)}" if result.errors else "")
    return result


def count_sockets(destinations: Iterable[Tuple[str, int]], protocol: str,
                  netns_paths: Optional[Iterable[str]] = None) -> SockTermResult:
    """What destroy_sockets() would destroy, destroying nothing (outcome "would-destroy")."""
    return destroy_sockets(destinations, protocol, netns_paths, dry_run=True)
