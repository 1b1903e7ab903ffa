"""Typed access to the pinned maps: ctypes mirrors of bpf/nodemesh.h and batch reads/writes.

The mirrors are checked against BCC's generated types by tests/datapath/test_layout.py, and
against existing pins by the loader before it adopts them.
"""
from __future__ import annotations

import array
import ctypes
import ipaddress
import socket
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

from . import bpfsys
from .observe import FlowBudget, LatencyKey, LatencyStats, ObserveConfig

if TYPE_CHECKING:
    from .maglev_tables import KernelTables

ABI_VERSION = 3
FAMILY_V4 = 4
FAMILY_V6 = 6
SLOT_BANK_SHIFT = 15
SLOT_INDEX_MASK = 0x7FFF
ALG_RANDOM = 0
ALG_ROUND_ROBIN = 1
ALG_MAGLEV = 2
ALG_LEAST_CONNECTIONS = 3
ALGORITHM_IDS = {"random": ALG_RANDOM, "round_robin": ALG_ROUND_ROBIN,
                 "maglev": ALG_MAGLEV, "least_connections": ALG_LEAST_CONNECTIONS}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHM_IDS.items()}
PROTO_IDS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTO_NAMES = {v: k for k, v in PROTO_IDS.items()}
# enum nm_backend_state
BACKEND_ACTIVE = 0
BACKEND_TERMINATING = 1
BACKEND_QUARANTINED = 2

# enum nm_counter
COUNTER_NAMES = {0: "slot_miss", 1: "backend_miss", 2: "revnat_failed", 3: "revnat_hit",
                 4: "udp_sendmsg", 5: "v4_in_v6", 6: "affinity_hit", 7: "connect_failed",
                 8: "maglev_miss"}
SVC_F_AFFINITY = 0x1
COUNTER_SLOTS = 9
SVC_F_EXT_LOCAL = 0x2  # TC path: externalTrafficPolicy Local (no SNAT)
SVC_F_PROXY_OFF = 0x4  # never redirect to the node-local proxy (per-service opt-out)

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class SvcKey(ctypes.Structure):
    _fields_ = [("addr", u32 * 4), ("port", u16), ("proto", u8), ("family", u8), ("slot", u16),
                ("pad", u16)]


class SvcValue(ctypes.Structure):
    _fields_ = [("backend_id", u32), ("svc_id", u32), ("count", u16), ("bank", u8),
                ("algorithm", u8), ("flags", u16), ("proxy_port", u16), ("revision", u32),
                ("affinity_timeout", u32), ("max_conns_per_backend", u32), ("max_conns", u32)]


class BackendEntry(ctypes.Structure):
    _fields_ = [("addr", u32 * 4), ("port", u16), ("proto", u8), ("family", u8), ("svc_id", u32),
                ("state", u8), ("pad", u8 * 3)]


class RevnatKey(ctypes.Structure):
    _fields_ = [("cookie", u64), ("addr", u32 * 4), ("port", u16), ("family", u8),
                ("pad", u8 * 5)]


class RevnatValue(ctypes.Structure):
    _fields_ = [("addr", u32 * 4), ("port", u16), ("pad", u16), ("svc_id", u32)]


class SvcStats(ctypes.Structure):
    _fields_ = [("connections", u64), ("no_backend", u64), ("proxy_redirects", u64)]


class BackendStats(ctypes.Structure):
    _fields_ = [("connections", u64), ("reserved", u64)]


class AffinityKey(ctypes.Structure):
    _fields_ = [("client", u64), ("svc_id", u32), ("pad", u32)]


class AffinityValue(ctypes.Structure):
    _fields_ = [("backend_id", u32), ("pad", u32), ("last_used_ns", u64)]


class EndpointKey(ctypes.Structure):
    _fields_ = [("addr", u32 * 4), ("port", u16), ("family", u8), ("pad", u8)]


class EndpointHealth(ctypes.Structure):
    _fields_ = [("consecutive_failures", u64), ("failures", u64),
                ("successes", u64), ("last_failure_ns", u64)]


class FailureEvent(ctypes.Structure):
    _fields_ = [("addr", u32 * 4), ("port", u16), ("family", u8), ("old_state", u8),
                ("consecutive_failures", u32), ("pad", u32), ("ts_ns", u64)]


# bpf/lib/conn_count.h
SOCK_NONE, SOCK_PENDING, SOCK_ACTIVE = 0, 1, 2


class ConnCount(ctypes.Structure):
    _fields_ = [("active", u64), ("pending", u64)]


class SockConn(ctypes.Structure):
    _fields_ = [("backend", EndpointKey), ("svc_id", u32), ("state", u8), ("pad", u8 * 3)]


# bpf/nodemesh.h: a connected socket's reverse translation, in its own storage (sock_lb.c)
class SockRevnat(ctypes.Structure):
    _fields_ = [("backend", u32 * 4), ("vip", u32 * 4), ("backend_port", u16),
                ("vip_port", u16), ("svc_id", u32), ("family", u8), ("state", u8),
                ("flags", u8), ("pad", u8)]


# bpf/lib/identity.h and bpf/lib/policy.h
MAX_IDENTITIES = 65536
MAX_POLICY = 262144
IDENTITY_F_NO_SOCKET_LB = 0x1
VERDICT_ALLOW, VERDICT_DENY, VERDICT_AUDIT = 0, 1, 2
VERDICT_IDS = {"ALLOW": VERDICT_ALLOW, "DENY": VERDICT_DENY, "AUDIT": VERDICT_AUDIT}


class Identity(ctypes.Structure):
    _fields_ = [("identity", u32), ("flags", u32)]


class PolicyKey(ctypes.Structure):
    _fields_ = [("addr", u32 * 4), ("port", u16), ("proto", u8), ("family", u8),
                ("identity", u32)]


class PolicyValue(ctypes.Structure):
    _fields_ = [("verdict", u32), ("rule", u32)]


class PolicyStats(ctypes.Structure):
    _fields_ = [("denied", u64), ("audited", u64)]


class PolicyConfig(ctypes.Structure):
    _fields_ = [("opt_out_workloads", u32), ("pad", u32)]


# bpf/lib/proxy.h and bpf/lib/accel.h (the redirect to a node-local proxy, sockmap acceleration)
class MeshConfig(ctypes.Structure):
    _fields_ = [("proxy_uid", u32), ("proxy_port", u16), ("accelerate", u8),
                ("proxy_cgroup_level", u8), ("proxy_cgroup_id", u64)]


class OrigdstKey(ctypes.Structure):
    _fields_ = [("netns", u64), ("addr", u32 * 4), ("port", u16), ("proxy_port", u16),
                ("family", u8), ("pad", u8 * 7)]


class Origdst(ctypes.Structure):
    _fields_ = [("addr", u32 * 4), ("port", u16), ("family", u8), ("pad", u8), ("svc_id", u32)]


class SockKey(ctypes.Structure):
    _fields_ = [("local", u32 * 4), ("remote", u32 * 4), ("local_port", u32),
                ("remote_port", u32), ("netns", u64), ("family", u8), ("pad", u8 * 7)]


ACCEL_COUNTER_NAMES = {0: "redirected_bytes", 1: "redirected_messages", 2: "fallbacks",
                       3: "sockets_added"}
ACCEL_COUNTER_SLOTS = 4
MAX_ORIGDST = 65536
MAX_ACCEL_SOCKETS = 65536


class Info(ctypes.Structure):
    _fields_ = [("abi_version", u32), ("pad", u32), ("created_unix", u64)]


@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: int
    key: type
    value: type
    size_setting: str  # the NM_MAX_* define that sizes it, or "" for a fixed size
    fixed_size: int = 0

    @property
    def percpu(self) -> bool:
        return self.map_type in (bpfsys.MAP_TYPE_PERCPU_HASH, bpfsys.MAP_TYPE_PERCPU_ARRAY)


MAPS: Tuple[MapSpec, ...] = (
    MapSpec("services", bpfsys.MAP_TYPE_HASH, SvcKey, SvcValue, "NM_MAX_SERVICE_ENTRIES"),
    MapSpec("backends", bpfsys.MAP_TYPE_HASH, u32, BackendEntry, "NM_MAX_BACKENDS"),
    MapSpec("rr_state", bpfsys.MAP_TYPE_ARRAY, u32, u64, "NM_MAX_FRONTENDS"),
    MapSpec("revnat", bpfsys.MAP_TYPE_LRU_HASH, RevnatKey, RevnatValue, "NM_MAX_REVNAT"),
    MapSpec("sock_revnat", bpfsys.MAP_TYPE_SK_STORAGE, ctypes.c_int, SockRevnat, "", 0),
    MapSpec("svc_stats", bpfsys.MAP_TYPE_PERCPU_HASH, u32, SvcStats, "NM_MAX_FRONTENDS"),
    MapSpec("backend_stats", bpfsys.MAP_TYPE_PERCPU_HASH, u32, BackendStats, "NM_MAX_BACKENDS"),
    MapSpec("counters", bpfsys.MAP_TYPE_PERCPU_ARRAY, u32, u64, "", COUNTER_SLOTS),
    MapSpec("info", bpfsys.MAP_TYPE_ARRAY, u32, Info, "", 1),
    MapSpec("affinity", bpfsys.MAP_TYPE_LRU_HASH, AffinityKey, AffinityValue, "NM_MAX_AFFINITY"),
    MapSpec("endpoint_health", bpfsys.MAP_TYPE_HASH, EndpointKey, EndpointHealth,
            "NM_MAX_ENDPOINTS"),
    # svc_id -> that frontend's Maglev table (an inner array; user space reads its map id)
    MapSpec("maglev", bpfsys.MAP_TYPE_ARRAY_OF_MAPS, u32, u32, "NM_MAX_FRONTENDS"),
    MapSpec("maglev_spare", bpfsys.MAP_TYPE_ARRAY_OF_MAPS, u32, u32, "NM_MAX_FRONTENDS"),
    # bpf/lib/conn_count.h
    MapSpec("sock_conn", bpfsys.MAP_TYPE_SK_STORAGE, ctypes.c_int, SockConn, "", 0),
    MapSpec("conn_counts", bpfsys.MAP_TYPE_HASH, EndpointKey, ConnCount, "NM_MAX_ENDPOINTS"),
    MapSpec("svc_conn_counts", bpfsys.MAP_TYPE_HASH, u32, ConnCount, "NM_MAX_FRONTENDS"),
    MapSpec("svc_conns", bpfsys.MAP_TYPE_ARRAY, u32, ConnCount, "NM_MAX_FRONTENDS"),
    MapSpec("conn_overflows", bpfsys.MAP_TYPE_PERCPU_HASH, u32, u64, "NM_MAX_FRONTENDS"),
    # bpf/lib/identity.h, bpf/lib/policy.h
    MapSpec("identities", bpfsys.MAP_TYPE_HASH, u64, Identity, "", MAX_IDENTITIES),
    MapSpec("identity_keys", bpfsys.MAP_TYPE_HASH, u32, u64, "", MAX_IDENTITIES),
    MapSpec("policy", bpfsys.MAP_TYPE_HASH, PolicyKey, PolicyValue, "", MAX_POLICY),
    MapSpec("policy_stats", bpfsys.MAP_TYPE_PERCPU_HASH, PolicyKey, PolicyStats,
            "NM_MAX_FRONTENDS"),
    MapSpec("policy_config", bpfsys.MAP_TYPE_ARRAY, u32, PolicyConfig, "", 1),
    MapSpec("mesh_config", bpfsys.MAP_TYPE_ARRAY, u32, MeshConfig, "", 1),
    MapSpec("proxy_origdst", bpfsys.MAP_TYPE_LRU_HASH, OrigdstKey, Origdst, "", MAX_ORIGDST),
    MapSpec("accel_socks", bpfsys.MAP_TYPE_SOCKHASH, SockKey, ctypes.c_int, "",
            MAX_ACCEL_SOCKETS),
    MapSpec("accel_stats", bpfsys.MAP_TYPE_PERCPU_ARRAY, u32, u64, "", ACCEL_COUNTER_SLOTS),
    # bpf/lib/observe.h, flow.h, latency.h (mirrors in observe.py)
    MapSpec("observe_config", bpfsys.MAP_TYPE_ARRAY, u32, ObserveConfig, "", 1),
    MapSpec("flow_budget", bpfsys.MAP_TYPE_PERCPU_ARRAY, u32, FlowBudget, "", 1),
    MapSpec("backend_latency", bpfsys.MAP_TYPE_LRU_HASH, LatencyKey, LatencyStats,
            "NM_MAX_LATENCY"),
)
MAP_BY_NAME = {m.name: m for m in MAPS}
_KEY_SIZE = {m.name: ctypes.sizeof(m.key) for m in MAPS}
_VALUE_SIZE = {m.name: ctypes.sizeof(m.value) for m in MAPS}


@dataclass(frozen=True)
class MapSizes:
    """Capacities, passed to the C code as -D flags. The defaults hold 100,000 services with
    3 backends each; the hash maps are not preallocated (memory follows use)."""

    service_entries: int = 524288
    frontends: int = 131072
    backends: int = 524288
    revnat: int = 65536
    affinity: int = 65536
    endpoints: int = 262144
    latency: int = 16384

    def setting(self, name: str) -> int:
        return {"NM_MAX_SERVICE_ENTRIES": self.service_entries, "NM_MAX_FRONTENDS": self.frontends,
                "NM_MAX_BACKENDS": self.backends, "NM_MAX_REVNAT": self.revnat,
                "NM_MAX_AFFINITY": self.affinity, "NM_MAX_ENDPOINTS": self.endpoints,
                "NM_MAX_LATENCY": self.latency}[name]

    def capacity(self, spec: MapSpec) -> int:
        return self.setting(spec.size_setting) if spec.size_setting else spec.fixed_size

    def cflags(self) -> List[str]:
        return [f"-D{n}={self.setting(n)}" for n in
                ("NM_MAX_SERVICE_ENTRIES", "NM_MAX_FRONTENDS", "NM_MAX_BACKENDS", "NM_MAX_REVNAT",
                 "NM_MAX_AFFINITY", "NM_MAX_ENDPOINTS", "NM_MAX_LATENCY")]


# Byte-level packers for the hot path of a large apply (~700,000 elements for 100,000
# services): one struct.pack per element takes less than half the time of filling a ctypes
# object and calling bytes(). Their formats are generated from the mirrors above, so each layout
# is defined once; tests/unit/test_maps.py proves they produce the mirrors' bytes.
_CODES = {u8: "B", u16: "H", u32: "I", u64: "Q"}


def _packer(mirror, first: str = "", end: str = "") -> struct.Struct:
    """A struct.Struct for the fields of a ctypes mirror from `first` up to (not including)
    `end`, or to the end of the struct. Native byte order, like ctypes. Fields named pad*, holes
    and trailing padding are zero bytes the caller does not pass."""
    names = [name for name, _ in mirror._fields_]
    chosen = names[names.index(first) if first else 0:names.index(end) if end else None]
    at = getattr(mirror, chosen[0]).offset
    fmt = "="
    for name, ctype in mirror._fields_:
        if name not in chosen:
            continue
        field = getattr(mirror, name)
        if field.offset > at:
            fmt += f"{field.offset - at}x"
        if name.startswith("pad"):
            fmt += f"{field.size}x"
        elif hasattr(ctype, "_length_"):
            fmt += f"{ctype._length_}{_CODES[ctype._type_]}"
        else:
            fmt += _CODES[ctype]
        at = field.offset + field.size
    if not end and ctypes.sizeof(mirror) > at:
        fmt += f"{ctypes.sizeof(mirror) - at}x"
    return struct.Struct(fmt)


_ADDR = _packer(SvcKey, "addr", "port")  # the u32[4] address field of every struct
_KEY_PREFIX = _packer(SvcKey, end="slot")
_KEY_TAIL = _packer(SvcKey, "slot")
_SVC_VALUE = _packer(SvcValue)
_BACKEND = _packer(BackendEntry)
_ENDPOINT_KEY = _packer(EndpointKey)
_U32 = struct.Struct("=" + _CODES[u32])
_V4_REST = bytes(_ADDR.size - 4)  # an IPv4 address fills addr[0]; the other words are zero
# What follows the address in a key prefix and a backend entry. The u32[4] address holds the
# address bytes as they are in memory, so inet_pton's bytes go in as they are: a first sync
# packs 400,000 addresses, and the round trip through four ints was a tenth of its packing.
_KEY_PREFIX_REST = _packer(SvcKey, "port", "slot")
_BACKEND_REST = _packer(BackendEntry, "port")
# A slot entry holds only backend_id: the rest of the SvcValue is zeros.
_SLOT_VALUE = struct.Struct(_packer(SvcValue, end="svc_id").format +
                            f"{ctypes.sizeof(SvcValue) - _packer(SvcValue, end='svc_id').size}x")


@lru_cache(maxsize=1 << 12)
def encode_addr(address: str) -> Tuple[int, Tuple[int, int, int, int]]:
    """(family, four u32 words holding the address bytes in network order).

    inet_pton rather than ipaddress: a 10,000-service apply encodes ~100,000 addresses and
    ipaddress was most of its time. The cache is small on purpose: an entry costs about 250
    bytes (its tuples, ints and LRU link), and 131,072 of them were 30 MiB of a 100,000-
    service agent, for a hit that saves 0.4 us over inet_pton (a miss costs 1.6 us); 4,096
    still hold what one frontend's writes encode again and again (its VIP, per slot)."""
    if ":" in address:
        return FAMILY_V6, _ADDR.unpack(socket.inet_pton(socket.AF_INET6, address))
    return FAMILY_V4, _ADDR.unpack(socket.inet_pton(socket.AF_INET, address) + _V4_REST)


def decode_addr(family: int, words: Sequence[int]) -> str:
    raw = _ADDR.pack(*words)
    if family == FAMILY_V4:
        # inet_ntop writes what str(IPv4Address) does at a third of the cost (every flow
        # event decodes two addresses).
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return ipaddress.IPv6Address(raw).compressed


def raw_addr(address: str) -> Tuple[int, bytes]:
    """(family, the 16 bytes of the u32[4] address field): what encode_addr holds, packed."""
    if ":" in address:
        return FAMILY_V6, socket.inet_pton(socket.AF_INET6, address)
    return FAMILY_V4, socket.inet_pton(socket.AF_INET, address) + _V4_REST


def port_be(port: int) -> int:
    """A port as the u16 the hooks compare: network byte order in memory."""
    return socket.htons(port)


def port_host(port_be_value: int) -> int:
    return socket.ntohs(port_be_value)


def key_prefix(family: int, words, port: int, proto: int) -> bytes:
    """The first 20 bytes of an SvcKey (everything but slot and pad)."""
    a, b, c, d = words  # positional: pack(*words, ...) costs ~30% more
    return _KEY_PREFIX.pack(a, b, c, d, port_be(port), proto, family)


def address_key_prefix(address: str, port: int, proto: int) -> bytes:
    """key_prefix from the address string, without encode_addr's four ints."""
    family, raw = raw_addr(address)
    return raw + _KEY_PREFIX_REST.pack(socket.htons(port), proto, family)


def pack_svc_key(prefix: bytes, slot: int) -> bytes:
    return prefix + _KEY_TAIL.pack(slot)


# The packed slot field and pad of the first slots of each bank, and of the master (slot 0):
# a frontend's keys are its prefix joined to these, with no pack call per slot.
_TAILS_CACHED = 64
_BANK_TAILS = tuple(tuple(_KEY_TAIL.pack((bank << SLOT_BANK_SHIFT) | i)
                          for i in range(1, _TAILS_CACHED + 1)) for bank in (0, 1))
_MASTER_TAIL = _KEY_TAIL.pack(0)


def pack_master_key(prefix: bytes) -> bytes:
    return prefix + _MASTER_TAIL


def pack_slot_keys(prefix: bytes, bank: int, count: int) -> List[bytes]:
    """The keys of slots 1..count of `bank` of the frontend whose key prefix is `prefix`."""
    if count <= _TAILS_CACHED:
        return [prefix + tail for tail in _BANK_TAILS[bank][:count]]
    return [prefix + _KEY_TAIL.pack((bank << SLOT_BANK_SHIFT) | i) for i in range(1, count + 1)]


def pack_slot_keys_joined(prefix: bytes, bank: int, count: int) -> bytes:
    """pack_slot_keys joined into one bytes (what update_joined takes)."""
    if count <= 0:
        return b""
    if count <= _TAILS_CACHED:
        return prefix + prefix.join(_BANK_TAILS[bank][:count])
    return b"".join(pack_slot_keys(prefix, bank, count))


def pack_slot_value(backend_id: int) -> bytes:
    return _SLOT_VALUE.pack(backend_id)


def pack_slot_values(backend_ids: Sequence[int]) -> List[bytes]:
    """pack_slot_value of each id, in order."""
    return list(map(_SLOT_VALUE.pack, backend_ids))


# A frontend's slot values in one pack call: the slot format repeated, for up to 64 slots.
_SLOT_VALUES = [struct.Struct("=" + _SLOT_VALUE.format[1:] * n)
                for n in range(_TAILS_CACHED + 1)]


# A slot value is its backend id (the first u32) and zeros: many of them are an array of
# u32 words with every _SLOT_WORDS-th set, written in one slice assignment.
_SLOT_WORDS = _SLOT_VALUE.size // 4
assert _SLOT_VALUE.format.startswith("=I") and _SLOT_VALUE.size % 4 == 0 and \
    SvcValue.backend_id.offset == 0 and array.array("I").itemsize == 4


def pack_slot_values_joined(backend_ids: Sequence[int]) -> bytes:
    """pack_slot_values joined into one bytes (what update_joined takes): a chunk's slots
    (the reconciler's bulk path, 12,000 at a time) with no call a slot or a frontend."""
    n = len(backend_ids)
    if n <= _TAILS_CACHED:
        return _SLOT_VALUES[n].pack(*backend_ids)
    words = array.array("I", bytes(_SLOT_VALUE.size * n))
    words[0::_SLOT_WORDS] = array.array("I", backend_ids)
    return words.tobytes()


def pack_master_value(svc_id: int, count: int, bank: int, algorithm: int,
                      revision: int, flags: int = 0, affinity_timeout: int = 0,
                      maglev_rows: int = 0, max_conns_per_backend: int = 0,
                      max_conns: int = 0, proxy_port: int = 0) -> bytes:
    """A master entry; a maglev master carries its table's row count in backend_id."""
    return _SVC_VALUE.pack(maglev_rows, svc_id, count, bank, algorithm, flags,
                           port_be(proxy_port), revision, affinity_timeout,
                           max_conns_per_backend, max_conns)


def pack_endpoint_key(address: str, port: int) -> bytes:
    family, (a, b, c, d) = encode_addr(address)
    return _ENDPOINT_KEY.pack(a, b, c, d, port_be(port), family)


def pack_backend(address: str, port: int, proto: int, svc_id: int, state: int) -> bytes:
    # raw_addr inline: a first sync packs 300,000 backends
    if ":" in address:
        return _inet_pton(_AF_INET6, address) + \
            _BACKEND_REST.pack(_htons(port), proto, FAMILY_V6, svc_id, state)
    return _inet_pton(_AF_INET, address) + _V4_REST + \
        _BACKEND_REST.pack(_htons(port), proto, FAMILY_V4, svc_id, state)


_inet_pton, _htons, _AF_INET, _AF_INET6 = \
    socket.inet_pton, socket.htons, socket.AF_INET, socket.AF_INET6

# The packers behind pack_backend, key prefixes and pack_master_value, for loops that inline
# them (the reconciler's bulk path: 400,000 elements a first sync). Fields in struct order.
V4_REST = _V4_REST
pack_backend_rest = _BACKEND_REST.pack      # port (network order), proto, family, svc_id, state
pack_key_prefix_rest = _KEY_PREFIX_REST.pack  # port (network order), proto, family
pack_master_fields = _SVC_VALUE.pack


def pack_u32(value: int) -> bytes:
    return _U32.pack(value)


def slot_number(bank: int, index: int) -> int:
    return (bank << SLOT_BANK_SHIFT) | index


class Maps:
    """Open fds of the pinned maps, with the batch operations the reconciler and metrics use."""

    def __init__(self, fds: Dict[str, int]):
        self.fds = fds
        self._maglev: Optional["KernelTables"] = None

    def maglev_tables(self) -> "KernelTables":
        """The Maglev tables behind the `maglev` outer map (datapath/maglev_tables.py)."""
        if self._maglev is None:
            from .maglev_tables import KernelTables
            self._maglev = KernelTables(self.fds["maglev"], self.fds["maglev_spare"])
        return self._maglev

    def fd(self, name: str) -> int:
        return self.fds[name]

    # -- writes -----------------------------------------------------------------------------
    def update_packed(self, name: str, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        """update_batch for elements already packed to bytes (see pack_*)."""
        if keys:
            self.update_joined(name, b"".join(keys), b"".join(values))

    def update_joined(self, name: str, keys: bytes, values: bytes) -> None:
        """update_batch for elements packed and joined end to end: as many as `keys` holds
        keys of the map's size. A first sync packs a frontend's keys in one go, not a
        bytes object per element."""
        if not keys:
            return
        if len(values) != len(keys) // _KEY_SIZE[name] * _VALUE_SIZE[name]:
            raise ValueError(f"{name}: {len(keys)} bytes of keys and {len(values)} bytes of "
                             f"values are not as many elements")
        bpfsys.map_update_packed(self.fds[name], keys, values, len(keys) // _KEY_SIZE[name])

    def delete_batch(self, name: str, keys: Sequence[object]) -> int:
        """Delete keys (packed bytes each, or ctypes key objects); those already gone are
        skipped. Returns how many went."""
        if not keys:
            return 0
        if type(keys[0]) is bytes:
            return bpfsys.map_delete_packed(self.fds[name], b"".join(keys),  # type: ignore
                                            len(keys))
        arr = (MAP_BY_NAME[name].key * len(keys))(*keys)
        return bpfsys.map_delete_batch(self.fds[name], arr, len(keys))

    # -- reads ------------------------------------------------------------------------------
    def items(self, name: str) -> Iterator[Tuple[object, object]]:
        spec = MAP_BY_NAME[name]
        value = (spec.value * bpfsys.possible_cpus()) if spec.percpu else spec.value
        yield from bpfsys.map_lookup_batch(self.fds[name], spec.key, value)

    def count(self, name: str) -> int:
        if MAP_BY_NAME[name].map_type == bpfsys.MAP_TYPE_SOCKHASH:  # no batch ops on sockets
            return len(bpfsys.map_keys(self.fds[name], ctypes.sizeof(MAP_BY_NAME[name].key)))
        return sum(1 for _ in self.items(name))

    def percpu_sums(self, name: str) -> Dict[int, Dict[str, int]]:
        """{key: {field: sum over CPUs}} for a per-CPU map keyed by u32."""
        spec = MAP_BY_NAME[name]
        fields = [f for f, _ in spec.value._fields_ if f != "reserved"] \
            if hasattr(spec.value, "_fields_") else None
        out: Dict[int, Dict[str, int]] = {}
        for key, per_cpu in self.items(name):
            k = key_int(key)
            if fields is None:
                out[k] = {"value": sum(int(v) for v in per_cpu)}
            else:
                out[k] = {f: sum(getattr(v, f) for v in per_cpu) for f in fields}
        return out

    def counters(self) -> Dict[str, int]:
        sums = self.percpu_sums("counters")
        return {COUNTER_NAMES[i]: sums.get(i, {}).get("value", 0) for i in COUNTER_NAMES}

    def close(self) -> None:
        if self._maglev is not None:
            self._maglev.close()
        for fd in self.fds.values():
            bpfsys.close(fd)
        self.fds = {}


def key_int(key) -> int:
    """A u32 map key as int (ctypes arrays of c_uint32 already hand out ints)."""
    return key if isinstance(key, int) else int(key.value)
