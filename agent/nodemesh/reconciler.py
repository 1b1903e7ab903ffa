"""The reconciler: the one user-space writer of service maps, per frontend, in the manner of
Cilium's statedb reconciler (update, delete and prune, with a status per object).

The core loop tells it what each service wants (`set_service`, `remove_service`); that only
marks the frontends whose desired state changed as pending. `reconcile()` then writes the
pending frontends and nothing else, so one changed service costs one service's writes,
whatever the number of services. Every frontend has a Status: pending, done or error (with
the error and a retry count). A failed operation is retried with capped exponential backoff
and stays visible until it succeeds.

A round deletes before it writes, so ids freed by removed frontends are there for new ones.
An update keeps every change atomic for new connections:

    1. stats entries of reused ids deleted               -- the datapath recreates them at zero
    2. backend entries for new backend ids
    3. the frontend's slots, in the bank NOT in use     -- invisible until step 4
    4. the master entry: new count + bank, one write    -- the switch
    5. the old bank's slots and dropped backends deleted

A failure before step 4 undoes steps 1-3 and leaves the old set serving. Ids (and the
agent's memory of a frontend) are released only after the kernel delete succeeded, and
reused oldest-freed-first after a quarantine (IdPool), so a new owner does not inherit a
recent id's counters or a racing reader's stale slot.

`adopt()` rebuilds state from the pinned maps, so a restarted agent rewrites nothing that is
already right. `prune()` compares with the kernel: drifted frontends are rewritten, and
frontends the kernel has but nobody wants are deleted.
"""
from __future__ import annotations

import array
import collections
import ctypes
import dataclasses
import logging
import random
import socket
import struct
import time
from dataclasses import dataclass, field, replace
from typing import (
    Any,
    Callable,
    Collection,
    Deque,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
    Union,
)

from . import maglev, selection
from .datapath import maps as m
from .model import Service, all_serving

log = logging.getLogger(__name__)

ServiceKey = Tuple[str, str]
Endpoint = Tuple[str, int]  # (address, port)

PENDING, DONE, ERROR = "pending", "done", "error"
RETRY_FIRST, RETRY_CAP = 0.5, 30.0   # seconds: backoff of a failed frontend
ID_QUARANTINE = 10.0                 # seconds before a freed id is handed out again
# Maglev rows all tables may hold (4 bytes each in the kernel, twice with the spares): 64 MiB,
# e.g. 1,024 frontends at the default 16,381 rows or 50,000 at 331 rows.
MAGLEV_MAX_ROWS = 1 << 24
TABLE_BATCH = 1024  # Maglev tables staged (fds open) before they are swapped in
WRITE_CHUNK = 4096  # frontends whose map writes are packed and written together


class CapacityError(Exception):
    pass


_Cls = TypeVar("_Cls", bound=type)


def fast_init(cls: _Cls) -> _Cls:
    """Give a frozen slots dataclass an __init__ that sets each field through its slot's
    descriptor. The generated one calls object.__setattr__ per field, which looks the name up
    again each time: a first sync builds 400,000 of these objects (keys, desired, programmed,
    views), and their constructors were about a seventh of its CPU. Same signature, defaults
    and __post_init__; the class stays frozen (assignment still raises)."""
    params, body = [], []
    namespace: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        assert f.default_factory is dataclasses.MISSING, f.name
        if f.default is dataclasses.MISSING:
            params.append(f.name)
        else:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        namespace[f"_set_{f.name}"] = getattr(cls, f.name).__set__
        body.append(f"_set_{f.name}(self, {f.name})")
    if hasattr(cls, "__post_init__"):
        body.append("self.__post_init__()")
    exec(f"def __init__(self, {', '.join(params)}):\n    " + "\n    ".join(body), namespace)
    namespace["__init__"].__qualname__ = f"{cls.__qualname__}.__init__"
    setattr(cls, "__init__", namespace["__init__"])
    return cls


class FrontendKey(NamedTuple):
    """A frontend: (family, vip, port, protocol). A tuple, so that the dicts and sets of the
    reconciler and the snapshot hash it in C: a first sync of 100,000 frontends hashed these
    keys 2.4 million times, and a Python __hash__ (even returning a cached value) was about a
    tenth of its CPU. Compares, sorts and hashes as its fields in that order."""

    family: int
    vip: str
    port: int
    protocol: str

    def prefix(self) -> bytes:
        """The packed SvcKey without its slot: pack once per frontend, not once per slot."""
        return m.address_key_prefix(self.vip, self.port, m.PROTO_IDS[self.protocol])

    def map_key(self, slot: int = 0) -> bytes:
        """The packed SvcKey of this frontend's master (slot 0) or of one of its slots."""
        return m.pack_master_key(self.prefix()) if slot == 0 else \
            m.pack_svc_key(self.prefix(), slot)

    def slot_keys(self, bank: int, count: int) -> List[bytes]:
        return m.pack_slot_keys(self.prefix(), bank, count)

    def __str__(self) -> str:
        host = f"[{self.vip}]" if self.family == m.FAMILY_V6 else self.vip
        return f"{host}:{self.port}/{self.protocol}"


@fast_init
@dataclass(frozen=True, slots=True)
class DesiredFrontend:
    key: FrontendKey
    namespace: str
    service: str
    port_name: str
    algorithm: str
    # The eligible backends, flat: (address, target port, weight, address, ...). One tuple
    # where a tuple per backend cost 64 bytes more each (about 14 MiB at 100,000 frontends
    # of 3); `backends` gives the triples. A tuple of triples is flattened on construction.
    flat_backends: Tuple[Any, ...]
    selection: str                               # why this set (selection.eligible)
    all_backends: int
    affinity_timeout: int = 0                    # seconds; 0: no session affinity
    terminate_tcp: bool = False                  # end TCP connections to removed backends
    maglev_table_size: int = 0                   # rows of its Maglev table; 0: no table
    flags: int = 0                               # further master flags (SVC_F_EXT_LOCAL)
    limits: Tuple[int, int] = (0, 0)             # connectionLimits: per backend, per frontend
    proxy_port: Optional[int] = None             # Service.proxy_port (TCP frontends only)

    def __post_init__(self) -> None:
        flat = self.flat_backends
        if flat and isinstance(flat[0], tuple):
            object.__setattr__(self, "flat_backends", tuple(x for b in flat for x in b))

    @property
    def backends(self) -> Tuple[Tuple[str, int, int], ...]:
        """The eligible backends as (address, target port, weight) triples."""
        flat = self.flat_backends
        return tuple(zip(flat[0::3], flat[1::3], flat[2::3]))

    def fields(self) -> Tuple[Any, ...]:
        """Every field, in order (what equality compares)."""
        return (self.key, self.namespace, self.service, self.port_name, self.algorithm,
                self.flat_backends, self.selection, self.all_backends, self.affinity_timeout,
                self.terminate_tcp, self.maglev_table_size, self.flags, self.limits,
                self.proxy_port)


class PlainFrontend:
    """The desired state of a plain service's one frontend (_plain_service: one VIP, one
    port, no external frontends, no Maglev, at most COMPACT_IDS backends of weight 0 or 1 at
    distinct addresses: every Kubernetes ClusterIP service of a usual size), kept as what it
    is a function of: the service and the selection context of the round that handed it
    over. Its backends are chosen again when read (the first write, a change, a reader of
    the backends). A DesiredFrontend and its flat tuple were about 256 bytes a frontend
    (24 MiB at 100,000); this is 56. Reads as a DesiredFrontend, and compares equal to the
    DesiredFrontend with the same fields; `full()` makes that one."""

    __slots__ = ("key", "svc", "ctx")
    key: FrontendKey
    svc: Service
    ctx: selection.Context
    maglev_table_size = 0
    flags = 0

    def __init__(self, key: FrontendKey, svc: Service,
                 ctx: selection.Context = selection.NO_CONTEXT):
        self.key, self.svc, self.ctx = key, svc, ctx

    def chosen(self) -> Tuple[Tuple[Any, ...], str]:
        """(flat backends, why): what service_frontends puts in a DesiredFrontend."""
        # A change reads its old and new frontend's backends several times (compare, plan,
        # count references): the last few choices are kept. A tuple replaced whole, so a
        # reader's thread sees one or the other, never a half-made one.
        recent = _recent_choices[0]
        for d, got in recent:
            if d is self:
                return got
        got = self._choose()
        _recent_choices[0] = ((self, got),) + recent[:3]
        return got

    def _choose(self) -> Tuple[Tuple[Any, ...], str]:
        svc = self.svc
        chosen: Sequence[Any]
        if selection.all_eligible(svc, self.ctx):
            chosen, why = svc.backends, "ready"  # what eligible gives, without its lists
        else:
            chosen, why = selection.eligible(svc.backends, svc, self.ctx)
        sp = svc.ports[0]
        target, name = sp.target_port, sp.name
        v6 = self.key.family == m.FAMILY_V6
        flat: List[Any] = []
        for b in chosen:
            address = b.address
            if (":" in address) == v6:
                port = target  # Backend.target_port(sp) inline: 300,000 calls a first sync
                for port_name, number in b.ports:
                    if port_name == name:
                        port = number
                        break
                flat += (address, port, b.weight)
        return tuple(flat), why

    @property
    def flat_backends(self) -> Tuple[Any, ...]:
        return self.chosen()[0]

    @property
    def selection(self) -> str:
        return self.chosen()[1]

    @property
    def backends(self) -> Tuple[Tuple[str, int, int], ...]:
        flat = self.flat_backends
        return tuple(zip(flat[0::3], flat[1::3], flat[2::3]))

    @property
    def namespace(self) -> str:
        return self.svc.namespace

    @property
    def service(self) -> str:
        return self.svc.name

    @property
    def port_name(self) -> str:
        sp = self.svc.ports[0]
        return sp.name or str(sp.port)

    @property
    def algorithm(self) -> str:
        return self.svc.algorithm

    @property
    def all_backends(self) -> int:
        return len(self.svc.backends)

    @property
    def affinity_timeout(self) -> int:
        sa = self.svc.session_affinity
        return sa.timeout_seconds if sa else 0

    @property
    def terminate_tcp(self) -> bool:
        return self.svc.terminate_connections_on_removal

    @property
    def limits(self) -> Tuple[int, int]:
        cl = self.svc.connection_limits
        return (cl.max_connections_per_backend, cl.max_connections) if cl else _NO_LIMITS

    @property
    def proxy_port(self) -> Optional[int]:
        return self.svc.proxy_port if self.key.protocol == "TCP" else None

    def fields(self) -> Tuple[Any, ...]:
        flat, why = self.chosen()
        return (self.key, self.namespace, self.service, self.port_name, self.algorithm, flat,
                why, self.all_backends, self.affinity_timeout, self.terminate_tcp, 0, 0,
                self.limits, self.proxy_port)

    def full(self) -> DesiredFrontend:
        """The same desired state, materialised."""
        return DesiredFrontend(*self.fields())

    def __eq__(self, other: object) -> bool:
        if type(other) is PlainFrontend:
            if self.svc is other.svc and self.key == other.key and \
                    (self.ctx is other.ctx or self.ctx == other.ctx):
                return True  # the same function of the same arguments
            # A change's new and old frontend (set_service, _plan) differ in their backends
            # nearly always: those first, without building both field tuples.
            if self.key != other.key or self.chosen() != other.chosen():
                return False
            return self.fields() == other.fields()
        if isinstance(other, DesiredFrontend):
            return self.fields() == other.fields()
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash(self.fields())

    def __repr__(self) -> str:
        return f"Plain{self.full()!r}"


Desired = Union[DesiredFrontend, PlainFrontend]
_recent_choices: List[Tuple[Tuple[PlainFrontend, Tuple[Tuple[Any, ...], str]], ...]] = [()]


def _new_plain(key: FrontendKey, svc: Service, ctx: selection.Context) -> PlainFrontend:
    p = _new_object(PlainFrontend)
    _set_plain_key(p, key)
    _set_plain_svc(p, svc)
    _set_plain_ctx(p, ctx)
    return p


_new_object = object.__new__
_set_plain_key = getattr(PlainFrontend, "key").__set__
_set_plain_svc = getattr(PlainFrontend, "svc").__set__
_set_plain_ctx = getattr(PlainFrontend, "ctx").__set__


def _plain_service(svc: Service) -> bool:
    """A service whose one frontend a PlainFrontend describes (see there); whichever of its
    backends selection then allows, the frontend is _is_plain."""
    ports = svc.ports
    if len(ports) != 1 or ports[0].node_port:
        return False
    # Service.simple: a shared answer for those options (and more), nearly always yes.
    if not svc.simple() and (svc.extra_vips or svc.external_ips or svc.load_balancer_ips or
                             svc.algorithm == "maglev"):
        return False
    backends = svc.backends
    n = len(backends)
    if n > COMPACT_IDS:
        return False
    if not all_serving(backends):  # (weight 1 each, then: nothing more to check)
        for b in backends:
            if b.weight > 1:
                return False
    return n < 2 or len({b.address for b in backends}) == n


class ProgrammedFrontend:
    """What the kernel holds for a frontend. Never changed in place: readers hold these.

    Its backend ids are packed, not a tuple of ints each: `packed_slots` is the backend id of
    each slot (native u32s), and `ids`, for a frontend written from `desired` with no
    endpoint twice and at most COMPACT_IDS backends (nearly all), the id of each of
    desired's backends in desired's order (u32s); otherwise (adopted, large) a Mapping.
    `slots` and `backend_ids` give them unpacked. At 100,000 frontends of 3 backends the
    tuples, the BackendIds and the 300,000 id ints were about 20 MiB of the heap.

    The fields after `desired` (and bank, algorithm, revision) are, for nearly every frontend,
    what a first write from `desired` gives them (bank 0, revision 1, not damaged, its
    algorithm, affinity, flags, limits and proxy port, no Maglev table): such a frontend
    stores none of them (`_rest` None) and reads them from `desired`. Fifteen slots were
    152 bytes a frontend; six are 80 (7 MiB less at 100,000)."""

    __slots__ = ("key", "svc_id", "packed_slots", "ids", "desired", "_rest")
    key: FrontendKey
    svc_id: int
    packed_slots: bytes                    # backend id per slot (a tuple is packed)
    ids: Any                               # u32 per desired backend, or a Mapping (above)
    desired: Optional["Desired"]
    # (bank, algorithm, revision, damaged, count, affinity_timeout, maglev_rows, flags,
    # limits, proxy_port), or None: those of a first write from `desired`
    _rest: Optional[Tuple[Any, ...]]
    # Read through properties made from _PROGRAMMED_REST (below the class): _rest's field,
    # or, with no _rest, what a first write from `desired` gives it.
    bank: int
    algorithm: str
    revision: int
    damaged: bool                          # kernel state disagrees; rewrite on next round
    count: int                             # slots in the kernel's active bank (-1: len(slots))
    affinity_timeout: int
    maglev_rows: int                       # size of its Maglev table in the kernel; 0: none
    flags: int
    limits: Tuple[int, int]
    proxy_port: Optional[int]

    def __init__(self, key: FrontendKey, svc_id: int, bank: int, algorithm: str,
                 revision: int, packed_slots: Any, ids: Any,
                 desired: Optional["Desired"] = None, damaged: bool = False, count: int = -1,
                 affinity_timeout: int = 0, maglev_rows: int = 0, flags: int = 0,
                 limits: Tuple[int, int] = (0, 0), proxy_port: Optional[int] = None):
        # Packed ids must have the desired frontend they follow (their count is its
        # backends'): _plan and _with_desired make them so; not checked here, on the hot path.
        if type(packed_slots) is not bytes:  # tests give a sequence
            packed_slots = pack_ids(packed_slots)
        if type(ids) is dict:
            ids = backend_id_map(ids)
        rest: Optional[Tuple[Any, ...]] = (bank, algorithm, revision, damaged, count,
                                           affinity_timeout, maglev_rows, flags, limits,
                                           proxy_port)
        if desired is not None and rest == _first_write(desired):
            rest = None
        _set_p_key(self, key)
        _set_p_svc_id(self, svc_id)
        _set_packed_slots(self, packed_slots)
        _set_ids(self, ids)
        _set_p_desired(self, desired)
        _set_p_rest(self, rest)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def fields(self) -> Dict[str, Any]:
        """Every field by name, as the constructor takes them."""
        return {"key": self.key, "svc_id": self.svc_id, "bank": self.bank,
                "algorithm": self.algorithm, "revision": self.revision,
                "packed_slots": self.packed_slots, "ids": self.ids, "desired": self.desired,
                "damaged": self.damaged, "count": self.count,
                "affinity_timeout": self.affinity_timeout, "maglev_rows": self.maglev_rows,
                "flags": self.flags, "limits": self.limits, "proxy_port": self.proxy_port}

    def replace(self, **changes: Any) -> "ProgrammedFrontend":
        """A copy with these fields changed (dataclasses.replace's)."""
        return ProgrammedFrontend(**{**self.fields(), **changes})

    def __eq__(self, other: object) -> bool:
        if type(other) is not ProgrammedFrontend:
            return NotImplemented
        return self is other or tuple(self.fields().values()) == tuple(other.fields().values())

    def __hash__(self) -> int:
        return hash(tuple(self.fields().values()))

    def __repr__(self) -> str:
        return "ProgrammedFrontend(" + ", ".join(f"{k}={v!r}" for k, v in
                                                 self.fields().items()) + ")"

    @property
    def slots(self) -> Tuple[int, ...]:
        """The backend id of each slot, in slot order."""
        return unpack_ids(self.packed_slots)

    def triples(self) -> Iterator[Tuple[str, int, int]]:
        """(address, port, backend id) of each backend, without building backend_ids."""
        ids = self.ids
        if type(ids) is bytes:
            assert self.desired is not None
            flat = self.desired.flat_backends
            return zip(flat[0::3], flat[1::3], unpack_ids(ids))
        return backend_triples(ids)

    def endpoints(self) -> Iterator[Tuple[str, int]]:
        """(address, port) of each backend, as iterating backend_ids gives them."""
        ids = self.ids
        if type(ids) is bytes:
            assert self.desired is not None
            flat = self.desired.flat_backends
            return zip(flat[0::3], flat[1::3])
        return iter(ids)

    @property
    def backend_ids(self) -> Mapping[Tuple[str, int], int]:
        """(address, target port) -> backend id."""
        ids = self.ids
        if type(ids) is bytes:
            assert self.desired is not None
            return AlignedIds(self.desired.flat_backends, ids)
        return ids  # type: ignore[no-any-return]

    @property
    def backend_count(self) -> int:
        """len(backend_ids), without making them."""
        ids = self.ids
        return len(ids) >> 2 if type(ids) is bytes else len(ids)

    @property
    def slot_count(self) -> int:
        r = self._rest
        return len(self.packed_slots) >> 2 if r is None or r[4] < 0 else r[4]


_set_p_key = getattr(ProgrammedFrontend, "key").__set__
_set_p_svc_id = getattr(ProgrammedFrontend, "svc_id").__set__
_set_packed_slots = getattr(ProgrammedFrontend, "packed_slots").__set__
_set_ids = getattr(ProgrammedFrontend, "ids").__set__
_set_p_desired = getattr(ProgrammedFrontend, "desired").__set__
_set_p_rest = getattr(ProgrammedFrontend, "_rest").__set__


def _first_write(d: "Desired") -> Tuple[Any, ...]:
    """The fields after `desired` that a first write from d gives (ProgrammedFrontend._rest)."""
    return (0, d.algorithm, 1, False, -1, d.affinity_timeout, 0, d.flags, d.limits,
            d.proxy_port)


# ProgrammedFrontend._rest's fields in order, each with what a first write gives it: a
# constant, or None for desired's field of the same name (_first_write, field by field).
_PROGRAMMED_REST = (("bank", 0), ("algorithm", None), ("revision", 1), ("damaged", False),
                    ("count", -1), ("affinity_timeout", None), ("maglev_rows", 0),
                    ("flags", None), ("limits", None), ("proxy_port", None))


def _programmed_field(i: int, name: str, first: Any) -> "property":
    if first is None:
        return property(lambda p: getattr(p.desired, name) if p._rest is None else p._rest[i])
    return property(lambda p: first if p._rest is None else p._rest[i])


for _i, (_name, _first) in enumerate(_PROGRAMMED_REST):
    setattr(ProgrammedFrontend, _name, _programmed_field(_i, _name, _first))


def _new_first_write(key: FrontendKey, svc_id: int, packed_slots: bytes, ids: Any,
                     desired: "Desired") -> ProgrammedFrontend:
    """A ProgrammedFrontend first written from `desired`, as its constructor would make it,
    without the comparison (the bulk path's 100,000 of a first sync)."""
    p: ProgrammedFrontend = _new_object(ProgrammedFrontend)
    _set_p_key(p, key)
    _set_p_svc_id(p, svc_id)
    _set_packed_slots(p, packed_slots)
    _set_ids(p, ids)
    _set_p_desired(p, desired)
    _set_p_rest(p, None)
    return p


_U32S = [struct.Struct(f"{n}I") for n in range(65)]


def pack_ids(ids: Sequence[int]) -> bytes:
    """Backend ids as native u32s (what ProgrammedFrontend keeps): a cached Struct for up to
    64 (three times as fast as an array's tobytes)."""
    n = len(ids)
    return _U32S[n].pack(*ids) if n <= 64 else array.array("I", ids).tobytes()


def unpack_ids(packed: bytes) -> Tuple[int, ...]:
    """pack_ids' ids back, as a tuple."""
    n = len(packed) >> 2
    return _U32S[n].unpack(packed) if n <= 64 else tuple(memoryview(packed).cast("I"))


def raw_constructor(cls: type) -> Callable[..., Any]:
    """A function making a `cls` from every field, positionally and in order, with no
    defaults and no __post_init__: for bulk paths whose values are already in their final
    form (flat backends, packed ids)."""
    names = [f.name for f in dataclasses.fields(cls)]
    namespace: Dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    body = ["self = _new(_cls)"]
    for name in names:
        namespace[f"_set_{name}"] = getattr(cls, name).__set__
        body.append(f"_set_{name}(self, {name})")
    body.append("return self")
    exec(f"def make({', '.join(names)}):\n    " + "\n    ".join(body), namespace)
    return namespace["make"]  # type: ignore[no-any-return]




@dataclass(frozen=True, slots=True)
class Status:
    state: str                 # pending | done | error
    error: str = ""
    retries: int = 0           # failed attempts since the last success
    next_attempt: float = 0.0  # monotonic time the next attempt is due


_DONE = Status(DONE)  # shared: most of 100,000 frontends are simply done
_PENDING = Status(PENDING)  # shared: a first sync marks 100,000 frontends pending at once
DONE_STATUS = _DONE  # what StatusTable gives a programmed frontend with none stored


class StatusTable(Mapping[FrontendKey, Status]):
    """Every known frontend's Status, storing only those not done: a programmed frontend
    with no entry is done. A dict entry per frontend, all pointing at one shared "done",
    was about 5 MiB at 100,000 frontends. Setting "done" on a frontend not (yet)
    programmed stores it like any other status."""

    __slots__ = ("_programmed", "_other")

    def __init__(self, programmed: Mapping[FrontendKey, Any]):
        self._programmed = programmed
        self._other: Dict[FrontendKey, Status] = {}

    def __getitem__(self, key: FrontendKey) -> Status:
        st = self._other.get(key)
        if st is not None:
            return st
        if key in self._programmed:
            return _DONE
        raise KeyError(key)

    def get(self, key: FrontendKey, default: Any = None) -> Any:
        # Mapping.get goes through __getitem__ and a KeyError for every frontend not
        # programmed yet: 100,000 raised and caught in a first sync.
        st = self._other.get(key)
        if st is not None:
            return st
        return _DONE if key in self._programmed else default

    def __contains__(self, key: object) -> bool:
        return key in self._other or key in self._programmed

    @property
    def stored(self) -> Callable[[FrontendKey], Optional[Status]]:
        """The lookup of stored statuses (a dict's get, for readers of many keys that look
        up `programmed` anyway): None if none is stored, and then the status is DONE_STATUS
        if programmed, else there is none. Good until the table next changes."""
        return self._other.get

    def __iter__(self) -> Iterator[FrontendKey]:
        yield from self._other
        yield from (k for k in self._programmed if k not in self._other)

    def __len__(self) -> int:
        return len(self._other) + sum(1 for k in self._programmed if k not in self._other)

    def __setitem__(self, key: FrontendKey, st: Status) -> None:
        if st is _DONE and key in self._programmed:
            self._other.pop(key, None)
        else:
            self._other[key] = st

    def set_done(self, keys: Collection[FrontendKey]) -> None:
        """Status done for frontends that are all in `programmed` (a round's committed ones)."""
        pop = self._other.pop
        for key in keys:
            pop(key, None)

    def shrink(self) -> None:
        """Drop the table an emptied dict keeps (dicts never shrink): after a first sync it
        is sized for every frontend."""
        if not self._other:
            self._other = {}

    def pop(self, key: FrontendKey, default: Optional[Status] = None) -> Optional[Status]:
        """Forget a frontend's status (call it once the frontend left `programmed`)."""
        return self._other.pop(key, default)


class IdSet:
    """A set of ids 1..capacity as a bitmap: 64 KiB for 524,288 backend ids, where a Python
    set of 300,000 ints takes about 25 MB."""

    __slots__ = ("_bits", "_len")

    def __init__(self, capacity: int):
        self._bits = bytearray(capacity // 8 + 1)
        self._len = 0

    def __contains__(self, ident: object) -> bool:
        return isinstance(ident, int) and 0 <= ident < len(self._bits) * 8 and \
            bool(self._bits[ident >> 3] & (1 << (ident & 7)))

    def add(self, ident: int) -> None:
        # Inline, not `in self`: every id of a 100,000-service sync passes here.
        index, bit = ident >> 3, 1 << (ident & 7)
        if not self._bits[index] & bit:
            self._bits[index] |= bit
            self._len += 1

    def add_range(self, start: int, stop: int) -> None:
        """add() every id of range(start, stop), none of which is in the set yet (fresh ids:
        a first sync takes 400,000 at a time), whole bytes at once."""
        bits = self._bits
        ident = start
        while ident < stop and ident & 7:
            bits[ident >> 3] |= 1 << (ident & 7)
            ident += 1
        whole = (stop - ident) >> 3
        if whole:
            bits[ident >> 3:(ident >> 3) + whole] = b"\xff" * whole
            ident += whole << 3
        while ident < stop:
            bits[ident >> 3] |= 1 << (ident & 7)
            ident += 1
        self._len += max(0, stop - start)

    def discard(self, ident: int) -> None:
        if ident in self:
            self._bits[ident >> 3] &= ~(1 << (ident & 7)) & 0xFF
            self._len -= 1

    def __iter__(self) -> Iterator[int]:
        for byte_index, byte in enumerate(self._bits):
            if byte:
                for bit in range(8):
                    if byte & (1 << bit):
                        yield byte_index * 8 + bit

    def __len__(self) -> int:
        return self._len

    def __eq__(self, other: object) -> bool:
        return set(self) == set(other) if isinstance(other, (set, frozenset, IdSet)) \
            else NotImplemented


BackendKey = Tuple[str, int]  # (address, target port)


class _FlatKeys:
    """The keys of an (address, port, x, ...) flat tuple `_flat`, for the mappings below."""

    __slots__ = ()
    _flat: Tuple[Any, ...]

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]  # the subclass's __getitem__
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def __iter__(self) -> Iterator[BackendKey]:
        flat = self._flat
        return zip(flat[0::3], flat[1::3])


class BackendIds(_FlatKeys, Mapping[BackendKey, int]):
    """A small frontend's (address, port) -> backend id, kept as one flat tuple (address,
    port, id, address, port, id, ...): about 110 bytes for 3 backends, where a dict with its
    key tuples takes about 350. At 100,000 frontends that is 25 MB of the agent's RSS.
    Lookups scan, so only frontends of up to COMPACT_IDS backends use it (backend_id_map);
    it is read-only and compares equal to a dict with the same items."""

    __slots__ = ("_flat",)

    def __init__(self, items: Iterator[Tuple[BackendKey, int]] = iter(())):
        self._flat: Tuple[Any, ...] = tuple(x for (address, port), ident in items
                                            for x in (address, port, ident))

    def __getitem__(self, key: BackendKey) -> int:
        flat = self._flat
        address, port = key
        for i in range(0, len(flat), 3):
            if flat[i] == address and flat[i + 1] == port:
                return flat[i + 2]  # type: ignore[no-any-return]
        raise KeyError(key)

    @classmethod
    def from_flat(cls, flat: Tuple[Any, ...]) -> "BackendIds":
        """From (address, port, id, ...) with no (address, port) twice: kept as it is."""
        ids = cls.__new__(cls)
        ids._flat = flat
        return ids

    def triples(self) -> Iterator[Tuple[str, int, int]]:
        flat = self._flat
        return zip(flat[0::3], flat[1::3], flat[2::3])

    def __len__(self) -> int:
        return len(self._flat) // 3

    def items(self) -> Any:  # an iterable of pairs, as dict.items() is used here
        flat = self._flat
        return list(zip(zip(flat[0::3], flat[1::3]), flat[2::3]))

    def values(self) -> Any:
        return list(self._flat[2::3])

    def __repr__(self) -> str:
        return f"BackendIds({dict(self.items())!r})"


class AlignedIds(_FlatKeys, Mapping[BackendKey, int]):
    """A ProgrammedFrontend's (address, port) -> backend id when its ids are packed: the
    endpoints are its desired frontend's flat backends (address, port, weight, ...) and the
    ids a u32 each in the same order. Made on demand, read-only, equal to the dict."""

    __slots__ = ("_flat", "_ids")

    def __init__(self, flat: Tuple[Any, ...], ids: bytes):
        self._flat = flat
        self._ids = ids

    def __getitem__(self, key: BackendKey) -> int:
        flat = self._flat
        address, port = key
        for i in range(0, len(flat), 3):
            if flat[i] == address and flat[i + 1] == port:
                return memoryview(self._ids).cast("I")[i // 3]
        raise KeyError(key)

    def triples(self) -> Iterator[Tuple[str, int, int]]:
        flat = self._flat
        return zip(flat[0::3], flat[1::3], memoryview(self._ids).cast("I"))

    def __len__(self) -> int:
        return len(self._ids) >> 2

    def items(self) -> Any:  # an iterable of pairs, as dict.items() is used here
        flat = self._flat
        return list(zip(zip(flat[0::3], flat[1::3]), memoryview(self._ids).cast("I")))

    def values(self) -> Any:
        return list(memoryview(self._ids).cast("I"))

    def __repr__(self) -> str:
        return f"AlignedIds({dict(self.items())!r})"


COMPACT_IDS = 8  # backends a frontend may have and still keep its ids in a BackendIds
SMALL_ROUND = 16  # frontends a round may touch and log its summary at DEBUG, not INFO


def backend_id_map(ids: Dict[BackendKey, int]) -> Mapping[BackendKey, int]:
    """What a ProgrammedFrontend keeps of `ids`: compact when small, the dict otherwise."""
    return BackendIds(iter(ids.items())) if len(ids) <= COMPACT_IDS else ids


def backend_triples(ids: Mapping[BackendKey, int]) -> Iterator[Tuple[str, int, int]]:
    """(address, port, id) of every backend of a ProgrammedFrontend's backend_ids."""
    if isinstance(ids, (BackendIds, AlignedIds)):
        return ids.triples()
    return ((address, port, ident) for (address, port), ident in ids.items())


class IdPool:
    """Ids 1..capacity. Freed ids are reused oldest-freed-first once `quarantine` seconds have
    passed; a fresh id is preferred to a quarantined one, and a quarantined one to failing."""

    def __init__(self, capacity: int, what: str, quarantine: float = ID_QUARANTINE,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.what = what
        self.quarantine = quarantine
        self.clock = clock
        self.used = IdSet(capacity)
        self._next = 1
        self._freed: Deque[Tuple[float, int]] = collections.deque()  # (freed at, id), oldest first
        self.reused: Set[int] = set()  # handed out again since the last take_reused()

    def take(self, ident: int) -> None:
        """Mark an id in use (adoption)."""
        self.used.add(ident)
        self._next = max(self._next, ident + 1)

    def allocate(self) -> int:
        while self._freed and self._freed[0][1] in self.used:  # taken by adoption meanwhile
            self._freed.popleft()
        if self._freed and self.clock() - self._freed[0][0] >= self.quarantine:
            return self._reuse()
        if self._next <= self.capacity:
            ident = self._next
            self._next += 1
            self.used.add(ident)
            return ident
        if self._freed:
            return self._reuse()  # full: a quarantined id beats failing
        raise CapacityError(f"no free {self.what} id: all {self.capacity} are in use "
                            f"(raise --map-{self.what}s)")

    def allocate_many(self, count: int) -> List[int]:
        """`count` ids, as many allocate() calls would give them; all or none."""
        first = self._next
        if not self._freed and first + count - 1 <= self.capacity:
            # Nothing freed to reuse (a first sync): the next fresh ids, in one go.
            self._next = first + count
            self.used.add_range(first, first + count)
            return list(range(first, first + count))
        got: List[int] = []
        try:
            for _ in range(count):
                got.append(self.allocate())
        except CapacityError:
            for ident in reversed(got):  # given back in order, ahead of the quarantined
                self.unallocate(ident)
            raise
        return got

    def _reuse(self) -> int:
        _, ident = self._freed.popleft()
        self.used.add(ident)
        self.reused.add(ident)
        return ident

    def take_reused(self) -> Set[int]:
        reused, self.reused = self.reused, set()
        return reused

    def release(self, ident: int) -> None:
        if ident in self.used:
            self.used.discard(ident)
            self._freed.append((self.clock(), ident))

    def unallocate(self, ident: int) -> None:
        """Give back an id that no map entry ever pointed at: no quarantine needed."""
        self.used.discard(ident)
        self.reused.discard(ident)
        self._freed.appendleft((float("-inf"), ident))

    def __len__(self) -> int:
        return len(self.used)


@dataclass
class RoundResult:
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    writes: int = 0
    seconds: float = 0.0
    errors: List[str] = field(default_factory=list)   # the first few, for status and logs
    # (address, port, protocol) no frontend sends new connections to any more, with whether
    # a service asked for its TCP connections to be ended too (terminateConnectionsOnRemoval)
    removed_endpoints: List[Tuple[str, int, str, bool]] = field(default_factory=list)
    touched: Set[FrontendKey] = field(default_factory=set)  # status or state changed

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.failed or self.writes)


def service_frontends(svc: Service, ctx: selection.Context = selection.NO_CONTEXT
                      ) -> Dict[FrontendKey, Desired]:
    """The frontends one service wants, with the backends selection allows now."""
    if _plain_service(svc):
        # Its desired state is a function of (svc, ctx): kept as that, not materialised.
        sp = svc.ports[0]
        vip = svc.vip
        key = _new_key(FrontendKey, (m.FAMILY_V6 if ":" in vip else m.FAMILY_V4, vip,
                                     sp.port, sp.protocol))
        return {key: _new_plain(key, svc, ctx)}
    out: Dict[FrontendKey, Desired] = {}
    chosen, why = selection.eligible(svc.backends, svc, ctx)
    affinity = svc.session_affinity.timeout_seconds if svc.session_affinity else 0
    cl = svc.connection_limits
    limits = (cl.max_connections_per_backend, cl.max_connections) if cl else _NO_LIMITS
    ports = svc.ports
    # One VIP and one port, nearly every service: no generator.
    pairs = ((svc.vip, ports[0]),) if len(ports) == 1 and not svc.extra_vips \
        else svc.frontends()
    for vip, sp in pairs:
        v6 = ":" in vip  # addresses are canonical: only IPv6 has colons
        protocol = sp.protocol
        # tuple.__new__: FrontendKey's own __new__ is a Python call (100,000 a first sync)
        key = _new_key(FrontendKey, (m.FAMILY_V6 if v6 else m.FAMILY_V4, vip, sp.port,
                                     protocol))
        flat: List[Any] = []
        target = sp.target_port
        for b in chosen:
            address = b.address
            if (":" in address) == v6:
                flat += (address, b.target_port(sp) if b.ports else target, b.weight)
        out[key] = _new_desired(key, svc.namespace, svc.name, sp.name or str(sp.port),
                                svc.algorithm, tuple(flat), why, len(svc.backends), affinity,
                                svc.terminate_connections_on_removal,
                                svc.maglev_table_size if svc.algorithm == "maglev" else 0, 0,
                                limits, svc.proxy_port if protocol == "TCP" else None)
    # external_frontends is a call and a generator a service: only when it may have some
    if svc.external_ips or svc.load_balancer_ips or len(ports) > 1 or \
            (ports and ports[0].node_port):
        out.update(external_frontends(svc, ctx, affinity))
    return out


_new_key = tuple.__new__
_NO_LIMITS = (0, 0)


_new_desired = raw_constructor(DesiredFrontend)


def external_frontends(svc: Service, ctx: selection.Context, affinity: int
                       ) -> Dict[FrontendKey, DesiredFrontend]:
    """The TC path's frontends: externalIPs, loadBalancerIPs and nodePorts. With
    externalTrafficPolicy Local they hold only this node's backends and carry SVC_F_EXT_LOCAL,
    which tells the TC program to keep the client's address (no SNAT)."""
    out: Dict[FrontendKey, DesiredFrontend] = {}
    local = svc.external_traffic_policy == "Local"
    if not (svc.external_ips or svc.load_balancer_ips or any(sp.node_port for sp in svc.ports)):
        return out
    policy_svc = replace(svc, internal_traffic_policy="Local") if local else svc
    chosen, why = selection.eligible(svc.backends, policy_svc, ctx)
    flags = m.SVC_F_EXT_LOCAL if local else 0
    for addr, port, sp in svc.external_frontends():
        v6 = ":" in addr
        key = FrontendKey(m.FAMILY_V6 if v6 else m.FAMILY_V4, addr, port, sp.protocol)
        backends = tuple(x for b in chosen if (":" in b.address) == v6
                         for x in (b.address, b.target_port(sp), b.weight))
        out[key] = DesiredFrontend(key, svc.namespace, svc.name, sp.name or str(sp.port),
                                   svc.algorithm, backends, why, len(svc.backends), affinity,
                                   svc.terminate_connections_on_removal,
                                   svc.maglev_table_size if svc.algorithm == "maglev" else 0,
                                   flags)
    return out


def desired_frontends(services: Sequence[Service],
                      ctx: selection.Context = selection.NO_CONTEXT
                      ) -> Dict[FrontendKey, Desired]:
    out: Dict[FrontendKey, Desired] = {}
    for svc in services:
        out.update(service_frontends(svc, ctx))
    return out


def watched_endpoints(svc: Service) -> FrozenSet[Endpoint]:
    """TCP endpoints whose connect outcomes sockops counts (services with outlierDetection)."""
    if svc.outlier_detection is None:
        return frozenset()
    return frozenset((b.address, b.target_port(sp)) for sp in svc.ports if sp.protocol == "TCP"
                     for b in svc.backends)


@dataclass
class _Change:
    old: Optional[ProgrammedFrontend]
    new: ProgrammedFrontend
    new_backend_ids: List[int]
    dropped_backend_ids: List[int]
    new_svc_id: bool


class Reconciler:
    def __init__(self, maps: m.Maps, sizes: m.MapSizes = m.MapSizes(),
                 clock: Callable[[], float] = time.monotonic,
                 maglev_max_rows: int = MAGLEV_MAX_ROWS):
        self.maps = maps
        self.tables = maps.maglev_tables()
        self.maglev_max_rows = maglev_max_rows
        self.maglev_rows = 0  # rows of the programmed (active) tables
        self.sizes = sizes
        self.clock = clock
        self.programmed: Dict[FrontendKey, ProgrammedFrontend] = {}
        self.desired: Dict[FrontendKey, Desired] = {}
        self.status = StatusTable(self.programmed)
        self.pending: Set[FrontendKey] = set()
        # A service's frontends: the FrontendKey itself when it has one (most have), a tuple
        # otherwise; a 1-tuple each was about 4.5 MiB at 100,000 services. See frontends_of.
        self.by_service: Dict[ServiceKey, Any] = {}
        self.svc_ids = IdPool(sizes.frontends - 1, "frontend", clock=clock)
        self.backend_ids = IdPool(sizes.backends - 1, "backend", clock=clock)
        self._garbage_slots: List[bytes] = []
        self._garbage_backends: List[int] = []
        self._garbage_svc_stats: List[int] = []
        # endpoint_health: which services watch an endpoint, and what the kernel has
        self._watchers: Dict[Endpoint, Set[ServiceKey]] = {}
        self._watched_by: Dict[ServiceKey, FrozenSet[Endpoint]] = {}
        self.endpoints: Set[Endpoint] = set()
        self._endpoints_dirty: Set[Endpoint] = set()
        # Frontends using an (address, port, protocol): see _count_endpoint.
        self._endpoint_refs: Dict[str, Any] = {}
        self._ref_ints: Dict[int, int] = {}  # one object per value: see _shared
        self.last_result: Optional[RoundResult] = None
        # The frontends the last round first wrote through _add_fresh: each done, and written
        # from what it wants now (desired[key] is its desired), so its snapshot view is
        # itself (snapshot.stored_view): the core publishes them without a look each, and
        # empties the list once read.
        self.last_added: List[ProgrammedFrontend] = []

    def _items(self, name: str) -> Iterator[Tuple[Any, Any]]:
        """A map's elements as its ctypes key and value types (see maps.MAPS)."""
        return self.maps.items(name)

    # -- desired state (the core loop) ----------------------------------------------------
    def set_service(self, key: ServiceKey, frontends: Mapping[FrontendKey, Desired],
                    watched: FrozenSet[Endpoint] = frozenset()) -> List[str]:
        """What one service wants now. Marks changed frontends pending; writes nothing.
        Returns conflicts: frontends another service already owns are not taken over."""
        desired = self.desired
        if len(frontends) == 1 and key not in self.by_service:
            # A service new to the reconciler with one frontend (a first sync's case) that no
            # other service holds: what the general path below does, without its lists.
            (fk, d), = frontends.items()
            if fk not in desired:
                desired[fk] = d
                self._mark(fk)
                self.by_service[key] = fk
                if watched or key in self._watched_by:
                    self._watch(key, watched)
                return []
        conflicts = []
        mine = {}
        changed = []
        for fk, d in frontends.items():
            other = desired.get(fk)
            if other is None:
                changed.append((fk, d))
            elif (other.namespace, other.service) != key:
                conflicts.append(f"{fk} is already {other.namespace}/{other.service}'s")
                continue
            elif other != d:
                changed.append((fk, d))
            mine[fk] = d
        had = self.by_service.get(key)
        if had is not None:
            for fk in [k for k in self.frontends_of(key) if k not in mine]:
                desired.pop(fk, None)
                self._mark(fk)
        for fk, d in changed:
            desired[fk] = d
            self._mark(fk)
        if mine:
            self.by_service[key] = next(iter(mine)) if len(mine) == 1 else tuple(mine)
        else:
            self.by_service.pop(key, None)
        self._watch(key, watched)
        return conflicts

    def frontends_of(self, key: ServiceKey) -> Tuple[FrontendKey, ...]:
        """The frontends service `key` owns."""
        mine = self.by_service.get(key, ())
        return (mine,) if isinstance(mine, FrontendKey) else tuple(mine)

    def remove_service(self, key: ServiceKey) -> None:
        self.set_service(key, {})

    def _mark(self, fk: FrontendKey) -> None:
        self.pending.add(fk)
        # The status table's dict: a status not stored is done (or none), and pending is
        # stored in either case (StatusTable.__setitem__), without two calls through it.
        other = self.status._other
        old = other.get(fk)
        # A new desired state is tried at once, even while an old failure backs off.
        other[fk] = _PENDING if old is None or not (old.error or old.retries) \
            else Status(PENDING, old.error, old.retries)

    def _watch(self, key: ServiceKey, endpoints: FrozenSet[Endpoint]) -> None:
        old = self._watched_by.get(key, frozenset())
        if old == endpoints:
            return
        for ep in old - endpoints:
            owners = self._watchers.get(ep)
            if owners is not None:
                owners.discard(key)
                if not owners:
                    del self._watchers[ep]
                    self._endpoints_dirty.add(ep)
        for ep in endpoints - old:
            self._watchers.setdefault(ep, set()).add(key)
            self._endpoints_dirty.add(ep)
        if endpoints:
            self._watched_by[key] = endpoints
        else:
            self._watched_by.pop(key, None)

    def next_attempt(self) -> Optional[float]:
        """When the earliest pending frontend is due (monotonic), or None."""
        return min((self.status[k].next_attempt for k in self.pending), default=None)

    # -- adoption ---------------------------------------------------------------------------
    def adopt(self) -> int:
        """Rebuild programmed state from the pinned maps. Returns the frontends adopted.
        Every adopted frontend is pending: the first round keeps what is still wanted (with
        no write when it is already right) and deletes the rest."""
        masters: Dict[Tuple[Any, ...], Tuple[m.SvcKey, m.SvcValue]] = {}
        slots: Dict[Tuple[Any, ...], Dict[int, int]] = {}
        for key, value in self._items("services"):
            ident = (tuple(key.addr), key.port, key.proto, key.family)
            if key.slot == 0:
                masters[ident] = (m.SvcKey.from_buffer_copy(key),
                                  m.SvcValue.from_buffer_copy(value))
            else:
                slots.setdefault(ident, {})[key.slot] = value.backend_id
        backends = {m.key_int(k): m.BackendEntry.from_buffer_copy(v)
                    for k, v in self._items("backends")}
        referenced = set()
        for ident, (key, master) in masters.items():
            proto = m.PROTO_NAMES.get(key.proto)
            if proto is None or key.family not in (m.FAMILY_V4, m.FAMILY_V6):
                self._garbage_slots.append(bytes(key))
                continue
            fk = FrontendKey(key.family, m.decode_addr(key.family, key.addr),
                             m.port_host(key.port), proto)
            have = slots.get(ident, {})
            order = [have.get(m.slot_number(master.bank, i)) for i in range(1, master.count + 1)]
            damaged = any(b is None or b not in backends for b in order)
            ids = tuple(b for b in order if b is not None)
            backend_ids = {}
            for b in set(ids):
                if b in backends:
                    e = backends[b]
                    backend_ids[(m.decode_addr(e.family, e.addr), m.port_host(e.port))] = b
                    referenced.add(b)
                    self.backend_ids.take(b)
            self.svc_ids.take(master.svc_id)
            rows = master.backend_id if master.algorithm == m.ALG_MAGLEV else 0
            if rows:
                try:
                    table = self.tables.adopt(master.svc_id)
                except OSError:
                    table = None
                damaged = damaged or table is None or len(table) != rows
                self.maglev_rows += rows
            self.programmed[fk] = ProgrammedFrontend(
                fk, master.svc_id, master.bank, m.ALGORITHM_NAMES.get(master.algorithm, "random"),
                master.revision, pack_ids(ids), backend_id_map(backend_ids), damaged=damaged,
                count=master.count,
                affinity_timeout=master.affinity_timeout
                if master.flags & m.SVC_F_AFFINITY else 0, maglev_rows=rows,
                flags=master.flags & ~(m.SVC_F_AFFINITY | m.SVC_F_PROXY_OFF),
                proxy_port=_proxy_port(master),
                limits=(master.max_conns_per_backend, master.max_conns))
            self._refer(fk, backend_ids, +1)
            self._mark(fk)
            active = {m.slot_number(master.bank, i) for i in range(1, master.count + 1)}
            for slot in have:
                if slot not in active:  # a bank left behind by an interrupted update
                    self._garbage_slots.append(fk.map_key(slot))
        for ident, have in slots.items():
            if ident not in masters:
                self._garbage_slots.extend(_svc_key(ident, slot) for slot in have)
        stat_ids = {m.key_int(k) for k, _ in self._items("backend_stats")}
        self._garbage_backends = sorted((set(backends) | stat_ids) - referenced)
        for key, _ in self._items("endpoint_health"):
            ep = (m.decode_addr(key.family, key.addr), m.port_host(key.port))
            self.endpoints.add(ep)
            self._endpoints_dirty.add(ep)  # dropped at the first round unless still watched
        live_svc = {p.svc_id for p in self.programmed.values()}
        self._garbage_svc_stats = [m.key_int(k) for k, _ in self._items("svc_stats")
                                   if m.key_int(k) not in live_svc]
        log.info("adopted %d frontends and %d backends from pinned maps (%d stale entries "
                 "to remove)", len(self.programmed), len(referenced),
                 len(self._garbage_slots) + len(self._garbage_backends))
        return len(self.programmed)

    # -- a round ----------------------------------------------------------------------------
    def reconcile(self, force: bool = False,
                  only: Optional[Collection[FrontendKey]] = None) -> RoundResult:
        """Write the pending frontends that are due (all of them with force). Deletes first,
        so that the ids they free serve the writes.

        `only`: a round of the first sync while the source has listed part of the desired
        set. Only these frontends are written, if desired, and nothing is deleted (no
        frontend, no garbage, no endpoint_health entry): an adopted frontend nobody has
        named yet may belong to a service still to be listed, and keeps serving until the
        round without `only`."""
        started = self.clock()
        result = RoundResult()
        self.last_added = []
        desired, programmed = self.desired, self.programmed  # (the same dicts all round)
        if only is None:
            self._collect_garbage(result)
            due = list(self.pending) if force else \
                [k for k in self.pending if self.status[k].next_attempt <= started]
        else:
            pending = self.pending
            due = [k for k in only if k in pending and k in desired]
        failed: Dict[FrontendKey, str] = {}
        deletes = [programmed[k] for k in due if k not in desired and k in programmed]
        self._delete(deletes, failed, result)
        changes: List[_Change] = []
        fresh: List[Desired] = []  # nothing programmed or adopted: see _add_fresh
        for k in due:
            d = desired.get(k)
            if d is None:
                if k not in programmed:  # deleted (or never written): forget it
                    self.pending.discard(k)
                    self.status.pop(k, None)
                    result.touched.add(k)
                continue
            old = programmed.get(k)
            if old is None and _is_plain(d):
                fresh.append(d)
                continue
            try:
                change = self._plan(d, old)
            except (CapacityError, ValueError) as e:
                failed[k] = str(e)
                continue
            if change is None:
                assert old is not None
                if old.desired != d:
                    self.programmed[k] = _with_desired(old, d)
                result.unchanged += 1
                self._done(k, result)
            else:
                changes.append(change)
        # In chunks, each in the atomic order (backends, slots, masters): a first sync's
        # packed writes are then a chunk's, not 700,000 elements' at once (the peak).
        committed = []
        for at in range(0, len(changes), WRITE_CHUNK):
            committed += self._write(changes[at:at + WRITE_CHUNK], failed, result)
        added: List[FrontendKey] = []
        for at in range(0, len(fresh), WRITE_CHUNK):
            added += self._add_fresh(fresh[at:at + WRITE_CHUNK], failed, result)
        for c in committed:
            new = c.new
            programmed[new.key] = new
            if c.old is None:  # every id is new
                self._refer(new.key, new.endpoints(), +1)
                result.added += 1
            else:
                if c.new_backend_ids:
                    fresh_ids = set(c.new_backend_ids)
                    self._refer(new.key, {a: i for a, i in new.backend_ids.items()
                                          if i in fresh_ids}, +1)
                result.changed += 1
                if c.dropped_backend_ids:
                    dropped = set(c.dropped_backend_ids)
                    self._refer(c.old.key, {a: i for a, i in c.old.backend_ids.items()
                                            if i in dropped}, -1, result, c.old.desired)
        if committed or added:
            keys = [c.new.key for c in committed] + added if committed else added
            self.pending.difference_update(keys)
            self.status.set_done(keys)
            result.touched.update(keys)
        self._delete_old_banks(committed, result)
        if only is None:
            self._sync_endpoint_health(result)
        for k, err in failed.items():
            self._failed(k, err, started, result)
        result.failed = len(failed)
        if not self.pending:
            # A set keeps the table of its largest size: after a first sync of 100,000
            # frontends, scanning even an empty one costs milliseconds each round.
            self.pending = set()
            self.status.shrink()
        result.seconds = self.clock() - started
        self.last_result = result
        self._log(result, failed)
        return result

    def _add_fresh(self, fresh: List[Desired], failed: Dict[FrontendKey, str],
                   result: RoundResult) -> List[FrontendKey]:
        """Write frontends that have nothing in the kernel (no programmed or adopted state)
        and are plain (_is_plain): what _plan and _write do for them, packed straight from
        the desired frontends without a _Change or a list of bytes per element. Nearly all of
        a first sync's 100,000. Same ids in the same order, the same writes in the same
        order (backends, slots, masters). Returns the frontends added."""
        if not fresh:
            return []
        try:
            svc_ids = self.svc_ids.allocate_many(len(fresh))
        except CapacityError:  # each fails (or not) on its own, as _plan says why
            return self._add_one_by_one(fresh, failed, result)
        # A PlainFrontend chooses its backends when asked: once here for the whole chunk.
        flats = [d.flat_backends for d in fresh]
        try:
            be_ids = self.backend_ids.allocate_many(sum(map(len, flats)) // 3)
        except CapacityError:
            for i in reversed(svc_ids):
                self.svc_ids.unallocate(i)
            return self._add_one_by_one(fresh, failed, result)
        news: List[ProgrammedFrontend] = []
        be_values: List[bytes] = []
        slot_keys: List[bytes] = []
        master_keys: List[bytes] = []
        master_values: List[bytes] = []
        # Each packer inline (see maps.pack_backend, address_key_prefix, pack_master_value):
        # a call each was a fifth of this loop.
        active, proto_ids, v4, v6 = m.BACKEND_ACTIVE, m.PROTO_IDS, m.FAMILY_V4, m.FAMILY_V6
        pton, af4, af6, htons, v4_rest = socket.inet_pton, socket.AF_INET, socket.AF_INET6, \
            socket.htons, m.V4_REST
        backend_rest, key_rest, master = \
            m.pack_backend_rest, m.pack_key_prefix_rest, m.pack_master_fields
        master_tail, slot_keys_of, slot_values_of = \
            m.pack_master_key(b""), m.pack_slot_keys_joined, m.pack_slot_values_joined
        new_frontend, algorithm_ids, svc_f_affinity, svc_f_proxy_off = \
            _new_first_write, m.ALGORITHM_IDS, m.SVC_F_AFFINITY, m.SVC_F_PROXY_OFF
        # Each frontend's ids are the next of be_ids, in order: the chunk's backend keys and
        # slot values are be_ids packed whole (below), each frontend's ids a slice of them.
        all_packed = pack_ids(be_ids)
        at = 0
        for d, svc_id, flat in zip(fresh, svc_ids, flats):
            key = d.key
            n = len(flat) // 3
            packed = all_packed[at:at + 4 * n]  # equal weights: the slots are the backends
            at += 4 * n
            affinity, proxy, limits = d.affinity_timeout, d.proxy_port, d.limits
            news.append(new_frontend(key, svc_id, packed, packed, d))
            family, vip, port, protocol = key
            proto = proto_ids[protocol]
            prefix = (pton(af4, vip) + v4_rest if family == v4 else pton(af6, vip)) + \
                key_rest(htons(port), proto, family)
            if n:
                for i in range(0, n * 3, 3):
                    address = flat[i]
                    if ":" in address:
                        be_values.append(pton(af6, address) + backend_rest(
                            htons(flat[i + 1]), proto, v6, svc_id, active))
                    else:
                        be_values.append(pton(af4, address) + v4_rest + backend_rest(
                            htons(flat[i + 1]), proto, v4, svc_id, active))
                slot_keys.append(slot_keys_of(prefix, 0, n))
            master_keys.append(prefix + master_tail)
            master_values.append(master(
                0, svc_id, n, 0, algorithm_ids[d.algorithm],
                (svc_f_affinity if affinity else 0) | d.flags
                | (svc_f_proxy_off if proxy == 0 else 0),
                htons(proxy or 0), 1, affinity, *limits))
        done = self._commit(lambda: [_Change(None, p, list(unpack_ids(p.ids)), [], True)
                                     for p in news], _Packed(
            all_packed, b"".join(be_values), b"".join(slot_keys), slot_values_of(be_ids),
            b"".join(master_keys), b"".join(master_values)), failed, result, tables=False)
        programmed = self.programmed
        refs, shared, count = self._endpoint_refs, self._ref_ints.get, self._count_endpoint
        for p, flat in zip(news[:done], flats):
            programmed[p.key] = p
            # _refer(+1) inline
            proto = proto_ids[p.key.protocol]
            for i in range(0, len(flat), 3):
                address = flat[i]
                port_proto = (flat[i + 1] << 8) | proto
                v = refs.get(address)
                if v is None:
                    v = (port_proto << 32) | 1
                    refs[address] = shared(v) or self._shared(v)
                else:
                    count(address, port_proto, 1)
        result.added += done
        self.last_added += news[:done]
        return [p.key for p in news[:done]]

    def _add_one_by_one(self, fresh: List[Desired], failed: Dict[FrontendKey, str],
                        result: RoundResult) -> List[FrontendKey]:
        """_add_fresh's frontends through _plan and _write (ids short: each says why)."""
        changes = []
        for d in fresh:
            try:
                change = self._plan(d, None)
            except (CapacityError, ValueError) as e:
                failed[d.key] = str(e)
                continue
            assert change is not None
            changes.append(change)
        committed = self._write(changes, failed, result)
        for c in committed:
            self.programmed[c.new.key] = c.new
            self._refer(c.new.key, c.new.endpoints(), +1)
        result.added += len(committed)
        return [c.new.key for c in committed]

    def _done(self, k: FrontendKey, result: RoundResult) -> None:
        self.pending.discard(k)
        self.status[k] = _DONE
        result.touched.add(k)

    def _failed(self, k: FrontendKey, err: str, now: float, result: RoundResult) -> None:
        old = self.status.get(k)
        retries = (old.retries if old else 0) + 1
        delay = min(RETRY_CAP, RETRY_FIRST * 2 ** (retries - 1)) * random.uniform(0.8, 1.2)
        self.status[k] = Status(ERROR, err, retries, now + delay)
        self.pending.add(k)
        result.touched.add(k)
        if len(result.errors) < 5:
            d = self.desired.get(k) or (self.programmed[k].desired if k in self.programmed
                                        else None)
            who = f"{d.namespace}/{d.service} " if d else ""
            result.errors.append(f"{who}{k}: {err}")

    @staticmethod
    def _log(result: RoundResult, failed: Dict[FrontendKey, str]) -> None:
        if result:
            # A sync, a resync or a failure is news; a change of a few frontends (nearly every
            # round once synced) is what metrics and `nodemesh services` show: a line at INFO
            # each was 0.11-0.16 ms of a ~1.5 ms change at 100,000 services, and the log's
            # volume grew with the cluster's churn (kube-proxy and Cilium log those at debug).
            small = result.added + result.changed + result.removed <= SMALL_ROUND
            log.log(logging.DEBUG if small and not result.failed else logging.INFO,
                    "reconciled: %d frontends added, %d changed, %d removed, %d failed; %d map "
                    "writes in %.3fs", result.added, result.changed, result.removed,
                    result.failed, result.writes, result.seconds)
        if failed:
            # One line per round, however many failed: 45,000 lines help nobody.
            log.error("%d frontends not programmed (retried with backoff; the previous state "
                      "keeps serving): %s%s", len(failed), "; ".join(result.errors),
                      f" (+{len(failed) - len(result.errors)} more)"
                      if len(failed) > len(result.errors) else "")

    def _refer(self, fk: FrontendKey, backend_ids: Iterable[Tuple[str, int]], step: int,
               result: Optional[RoundResult] = None,
               desired: Optional[Desired] = None) -> None:
        """Count frontends per (address, port, protocol); one that reaches 0 is reported as
        removed, so sockets still connected to it can be ended."""
        proto = m.PROTO_IDS[fk.protocol]
        count = self._count_endpoint
        if step > 0:  # nothing reaches 0
            refs = self._endpoint_refs
            shared = self._ref_ints.get
            for address, port in backend_ids:
                port_proto = (port << 8) | proto
                v = refs.get(address)
                if v is None:  # inline: the first sync's case, 300,000 times
                    v = (port_proto << 32) | step
                    refs[address] = shared(v) or self._shared(v)
                else:
                    count(address, port_proto, step)
            return
        for address, port in backend_ids:
            if count(address, (port << 8) | proto, step) <= 0:
                if result is not None:
                    result.removed_endpoints.append(
                        (address, port, fk.protocol, bool(desired and desired.terminate_tcp)))

    def _count_endpoint(self, address: str, port_proto: int, step: int) -> int:
        """Add step to the frontends using (address, port << 8 | protocol); returns the new
        count, forgotten at 0. Keyed by the address string the backends already hold, the
        usual one endpoint an address is one int (port_proto << 32 | count), a dict
        {port_proto: count} for several: a tuple key each was about 9 MiB at 100,000 services."""
        refs = self._endpoint_refs
        v = refs.get(address)
        n: int
        if type(v) is dict:
            n = v.get(port_proto, 0) + step
            if n > 0:
                v[port_proto] = n
                return n
            v.pop(port_proto, None)
            if len(v) == 1:
                (other, count), = v.items()
                refs[address] = self._shared((other << 32) | count)
            elif not v:
                del refs[address]
            return n
        if v is not None and v >> 32 != port_proto:  # a second endpoint at this address
            if step > 0:
                refs[address] = {v >> 32: v & 0xFFFFFFFF, port_proto: step}
            return step
        n = (v & 0xFFFFFFFF if v is not None else 0) + step
        if n > 0:
            refs[address] = self._shared((port_proto << 32) | n)
        elif v is not None:
            del refs[address]
        return n

    def _shared(self, value: int) -> int:
        """`value` as one int object for all the addresses that count it: nearly every
        endpoint holds the same (port, protocol, count), and an int of its size is 36 bytes,
        about 10 MiB at 300,000 endpoints. Up to 4,096 distinct values are shared."""
        ints = self._ref_ints
        got = ints.get(value)
        if got is not None:
            return got
        if len(ints) < 4096:
            ints[value] = value
        return value

    def _plan(self, d: Desired, old: Optional[ProgrammedFrontend]) -> Optional[_Change]:
        if old is not None and not old.damaged and old.desired == d:
            return None  # unchanged since it was last written: nothing to do
        ids: Dict[Tuple[str, int], int] = {}
        # Packed ids are scanned per lookup: a dict of the few a frontend has, once.
        old_ids: Mapping[Tuple[str, int], int] = {} if old is None else \
            old.ids if isinstance(old.ids, dict) else dict(old.backend_ids.items())
        flat = d.flat_backends
        endpoints = list(zip(flat[0::3], flat[1::3]))  # (address, port) by backend index
        weights = flat[2::3]
        if old_ids:
            for ep in endpoints:
                if ep in old_ids:
                    ids[ep] = old_ids[ep]
        seq = selection.slots_for(d.algorithm, weights)
        # Compare before allocating: an unchanged frontend costs no id and no write.
        table_rows = d.maglev_table_size \
            if d.maglev_table_size and any(w > 0 for w in weights) else 0
        if old and not old.damaged and old.algorithm == d.algorithm and \
                old.affinity_timeout == d.affinity_timeout and old.flags == d.flags and \
                old.limits == d.limits and old.proxy_port == d.proxy_port and \
                len(ids) == len(endpoints) and old.maglev_rows == table_rows:
            if pack_ids([ids[endpoints[i]] for i in seq]) == old.packed_slots:
                return None
        if len(seq) > m.SLOT_INDEX_MASK:
            raise ValueError(f"{len(seq)} slots exceed the per-frontend limit "
                             f"{m.SLOT_INDEX_MASK}")
        more_rows = table_rows - (old.maglev_rows if old else 0)
        if more_rows > 0 and self.maglev_rows + more_rows > self.maglev_max_rows:
            raise CapacityError(f"its Maglev table of {table_rows} rows would take the node "
                                f"past its limit of {self.maglev_max_rows} Maglev rows "
                                f"({self.maglev_rows} in use); give it a smaller "
                                f"maglev.tableSize")
        missing = [ep for ep in dict.fromkeys(endpoints) if ep not in ids] if ids \
            else list(dict.fromkeys(endpoints))
        new_ids = self.backend_ids.allocate_many(len(missing))
        try:
            svc_id = self.svc_ids.allocate() if old is None else old.svc_id
        except CapacityError:
            for i in new_ids:
                self.backend_ids.unallocate(i)
            raise
        ids.update(zip(missing, new_ids))
        by_index = list(map(ids.__getitem__, endpoints))  # backend id by backend index
        slots = pack_ids([by_index[i] for i in seq])
        backend_ids: Any
        if len(ids) == len(endpoints) and len(ids) <= COMPACT_IDS:
            # No endpoint twice (nearly always): an id for each of d's backends, in d's order.
            backend_ids = pack_ids(by_index)
        else:
            backend_ids = backend_id_map(ids)
        if old_ids:
            keep = set(by_index)
            dropped = [i for i in old_ids.values() if i not in keep]
        else:
            dropped = []
        new = ProgrammedFrontend(d.key, svc_id, (1 - old.bank) if old else 0, d.algorithm,
                                 ((old.revision if old else 0) + 1) & 0xFFFFFFFF, slots,
                                 backend_ids, d,
                                 affinity_timeout=d.affinity_timeout, maglev_rows=table_rows,
                                 flags=d.flags, limits=d.limits, proxy_port=d.proxy_port)
        self.maglev_rows += more_rows  # reserved now, given back if the change fails
        return _Change(old, new, new_ids, dropped, old is None)

    def _table_rows(self, p: ProgrammedFrontend) -> List[int]:
        """The backend id of every row of p's Maglev table."""
        assert p.desired is not None
        backends = p.desired.backends
        rows = maglev.build_table([(maglev.backend_key(a, port), w) for a, port, w in backends],
                                  p.maglev_rows)
        ids = [p.backend_ids[(a, port)] for a, port, _ in backends]
        return [ids[i] for i in rows]

    def _swap_tables(self, changes: List[_Change]) -> int:
        """Step 3b: each maglev frontend's new table is staged, then swapped in (one outer-map
        write each, batched: every batch waits one RCU grace period) before their masters.
        The rows name only backends that exist from step 2 until step 5, so a reader of an
        old master and a new table is still served. Returns the rows written; on failure no
        new table serves. A staged table is an open fd: batches of TABLE_BATCH keep the
        agent within its open-file limit."""
        staged: List[int] = []
        swapped: List[_Change] = []
        batch: List[_Change] = []
        writes = 0
        try:
            for c in changes:
                if c.new.maglev_rows:
                    writes += self.tables.stage(c.new.svc_id, self._table_rows(c.new))
                    staged.append(c.new.svc_id)
                    batch.append(c)
                    if len(staged) >= TABLE_BATCH:
                        self.tables.commit(staged)
                        swapped += batch
                        staged, batch = [], []
            self.tables.commit(staged)
            swapped += batch
        except OSError:
            self.tables.unstage(staged)
            self._revert_tables(swapped)
            raise
        return writes + len(swapped)

    def _revert_tables(self, changes: List[_Change]) -> None:
        svc_ids = [c.new.svc_id for c in changes if c.new.maglev_rows]
        try:
            self.tables.revert(svc_ids)
        except OSError as e:
            log.warning("putting back the previous Maglev tables of %d frontends failed (%s); "
                        "their connections use the slots until the retry", len(svc_ids),
                        _reason(e))

    def _give_back_rows(self, changes: List[_Change]) -> None:
        for c in changes:
            self.maglev_rows -= c.new.maglev_rows - (c.old.maglev_rows if c.old else 0)

    def _write(self, changes: List[_Change], failed: Dict[FrontendKey, str],
               result: RoundResult) -> List[_Change]:
        """Steps 1-4. Returns the changes whose master was written."""
        if not changes:
            return []
        be_keys: List[bytes] = []
        be_values: List[bytes] = []
        slot_keys: List[bytes] = []
        slot_values: List[bytes] = []
        master_keys: List[bytes] = []
        pack_u32, pack_backend, active = m.pack_u32, m.pack_backend, m.BACKEND_ACTIVE
        for c in changes:
            new = c.new
            key = new.key
            proto = m.PROTO_IDS[key.protocol]
            svc_id = new.svc_id
            if c.old is None or c.old.damaged:
                # All its ids are new, or a damaged frontend may have lost its backend
                # entries too: write them all.
                for address, port, ident in new.triples():
                    be_keys.append(pack_u32(ident))
                    be_values.append(pack_backend(address, port, proto, svc_id, active))
            elif c.new_backend_ids:
                fresh = set(c.new_backend_ids)
                for address, port, ident in new.triples():
                    if ident in fresh:
                        be_keys.append(pack_u32(ident))
                        be_values.append(pack_backend(address, port, proto, svc_id, active))
            prefix = key.prefix()  # packed once per frontend, for its slots and master
            slot_ids = unpack_ids(new.packed_slots)
            # A frontend's slots packed in one go each (a bytes for all of them, not one a slot)
            slot_keys.append(m.pack_slot_keys_joined(prefix, new.bank, len(slot_ids)))
            slot_values.append(m.pack_slot_values_joined(slot_ids))
            master_keys.append(m.pack_master_key(prefix))
        master_values = [_master_value(c.new) for c in changes]
        done = self._commit(lambda: changes, _Packed(
            b"".join(be_keys), b"".join(be_values), b"".join(slot_keys), b"".join(slot_values),
            b"".join(master_keys), b"".join(master_values)), failed, result, tables=True)
        return changes[:done]

    def _commit(self, changes: Callable[[], List[_Change]], packed: "_Packed",
                failed: Dict[FrontendKey, str], result: RoundResult, tables: bool) -> int:
        """Steps 1-4 for packed writes, in that order; `changes()` gives the _Change of each
        master, in order (made only if something fails). Returns the masters written: those
        of the first that many changes."""
        # A reused id may still have its previous owner's counters: clear them before the id
        # is published (the datapath creates a zeroed entry on first use).
        pack_u32 = m.pack_u32
        reused_svc = [pack_u32(i) for i in self.svc_ids.take_reused()]
        reused_be = [pack_u32(i) for i in self.backend_ids.take_reused()]
        table_writes = 0
        try:
            self.maps.delete_batch("svc_stats", reused_svc)
            self.maps.delete_batch("backend_stats", reused_be)
            self.maps.update_joined("backends", packed.be_keys, packed.be_values)
            self.maps.update_joined("services", packed.slot_keys, packed.slot_values)
            if tables:
                table_writes = self._swap_tables(changes())
        except OSError as e:
            # Nothing points at what we wrote yet: take it back, keep the old sets serving.
            lost = changes()
            self._give_back_rows(lost)
            self._undo(lost, _split(packed.slot_keys, _SVC_KEY_SIZE),
                       _split(packed.be_keys, 4))
            for c in lost:
                failed[c.new.key] = f"map write failed ({_reason(e)}); the previous state " \
                                    f"keeps serving"
            return 0
        done = len(packed.master_keys) // _SVC_KEY_SIZE
        try:
            self.maps.update_joined("services", packed.master_keys, packed.master_values)
        except OSError as e:
            done = getattr(e, "done", 0)
            lost = changes()[done:]
            self._revert_tables(lost)
            self._give_back_rows(lost)
            self._undo(lost, [k for c in lost for k in c.new.key.slot_keys(c.new.bank,
                                                                            c.new.slot_count)],
                       [m.pack_u32(i) for c in lost for i in c.new_backend_ids])
            for c in lost:
                failed[c.new.key] = f"master write failed ({_reason(e)}); the previous state " \
                                    f"keeps serving"
        result.writes += (len(packed.be_keys) >> 2) + \
            len(packed.slot_keys) // _SVC_KEY_SIZE + table_writes + done
        return done

    def _undo(self, changes: List[_Change], slot_keys: List[bytes], be_keys: List[bytes]) -> None:
        """Take back slots and backends no master points at. What cannot be deleted now is
        garbage for the next round; its ids stay used until then."""
        try:
            self.maps.delete_batch("services", slot_keys)
        except OSError:
            self._garbage_slots.extend(slot_keys)
        try:
            self.maps.delete_batch("backends", be_keys)
            for c in changes:
                for i in c.new_backend_ids:
                    self.backend_ids.unallocate(i)
        except OSError:
            for c in changes:
                self._garbage_backends.extend(c.new_backend_ids)
        for c in changes:
            if c.new_svc_id:
                self.svc_ids.unallocate(c.new.svc_id)

    def _delete(self, removed: List[ProgrammedFrontend], failed: Dict[FrontendKey, str],
                result: RoundResult) -> None:
        """Frontends nobody wants: master first (the switch), then what it pointed at. Their
        ids and state are released only once the kernel let go of them."""
        if not removed:
            return
        masters = [p.key.map_key(0) for p in removed]
        slots = [k for p in removed for k in p.key.slot_keys(p.bank, p.slot_count)]
        backends = [b for p in removed for b in p.backend_ids.values()]
        try:
            result.writes += self.maps.delete_batch("services", masters)
        except OSError as e:
            for p in removed:
                failed[p.key] = f"delete failed ({_reason(e)}); retried"
            return
        self._remove_tables([p.svc_id for p in removed if p.maglev_rows])
        for p in removed:
            self.maglev_rows -= p.maglev_rows
            del self.programmed[p.key]
            self._refer(p.key, p.backend_ids, -1, result, p.desired)
            self.pending.discard(p.key)
            self.status.pop(p.key, None)
            result.touched.add(p.key)
        result.removed += len(removed)
        # No master points at these any more: a failure here only leaves garbage to retry.
        self._delete_unreferenced(slots, backends, [p.svc_id for p in removed], result)

    def _delete_old_banks(self, committed: List[_Change], result: RoundResult) -> None:
        slots: List[bytes] = []
        backends: List[int] = []
        for c in committed:
            if c.old is not None:
                slots.extend(c.old.key.slot_keys(c.old.bank, c.old.slot_count))
                backends.extend(c.dropped_backend_ids)
        self._remove_tables([c.new.svc_id for c in committed
                             if c.old and c.old.maglev_rows and not c.new.maglev_rows])
        self._delete_unreferenced(slots, backends, [], result)

    def _remove_tables(self, svc_ids: List[int]) -> None:
        """Drop Maglev tables no master reads any more. A failure only leaves memory in use
        until the id's next owner overwrites or removes it."""
        try:
            self.tables.remove(svc_ids)
        except OSError as e:
            log.warning("removing %d Maglev tables failed (%s)", len(svc_ids), _reason(e))

    def _delete_unreferenced(self, slots: List[bytes], backends: List[int], svc_ids: List[int],
                             result: RoundResult) -> None:
        try:
            # Keys packed to bytes, once for both maps of the backends: the maps' cheap path.
            backend_keys = [m.pack_u32(b) for b in backends]
            result.writes += self.maps.delete_batch("services", slots)
            result.writes += self.maps.delete_batch("backends", backend_keys)
            self.maps.delete_batch("backend_stats", backend_keys)
            self.maps.delete_batch("svc_stats", [m.pack_u32(s) for s in svc_ids])
        except OSError as e:
            log.warning("deleting unreferenced map entries failed (%s); retried next round",
                        _reason(e))
            self._garbage_slots.extend(slots)
            self._garbage_backends.extend(backends)
            self._garbage_svc_stats.extend(svc_ids)
            return
        for b in backends:
            self.backend_ids.release(b)
        for s in svc_ids:
            self.svc_ids.release(s)

    def _collect_garbage(self, result: RoundResult) -> None:
        """Delete what adoption or a failed delete left unreferenced. No master points at it,
        so it can go before any new write."""
        if not (self._garbage_slots or self._garbage_backends or self._garbage_svc_stats):
            return
        slots, self._garbage_slots = self._garbage_slots, []
        backends, self._garbage_backends = self._garbage_backends, []
        svc_ids, self._garbage_svc_stats = self._garbage_svc_stats, []
        self._delete_unreferenced(slots, backends, svc_ids, result)

    def _sync_endpoint_health(self, result: RoundResult) -> None:
        """Watch the TCP endpoints of services with outlierDetection (sockops counts their
        connect outcomes only if an entry exists), and stop watching the others."""
        if not self._endpoints_dirty:
            return
        add = sorted(ep for ep in self._endpoints_dirty
                     if ep in self._watchers and ep not in self.endpoints)
        drop = sorted(ep for ep in self._endpoints_dirty
                      if ep not in self._watchers and ep in self.endpoints)
        try:
            self.maps.update_packed("endpoint_health", [m.pack_endpoint_key(a, p) for a, p in add],
                                    [bytes(ctypes.sizeof(m.EndpointHealth))] * len(add))
            self.maps.delete_batch("endpoint_health", [m.pack_endpoint_key(a, p) for a, p in drop])
        except OSError as e:
            if len(result.errors) < 5:
                result.errors.append(f"endpoint_health: {_reason(e)}")
            return  # still dirty: the next round tries again
        result.writes += len(add) + len(drop)
        self.endpoints.update(add)
        self.endpoints.difference_update(drop)
        self._endpoints_dirty.clear()

    def endpoint_health(self) -> Dict[Endpoint, Dict[str, int]]:
        out = {}
        for key, value in self._items("endpoint_health"):
            out[(m.decode_addr(key.family, key.addr), m.port_host(key.port))] = {
                "consecutive_failures": value.consecutive_failures, "failures": value.failures,
                "successes": value.successes}
        return out

    # -- prune: the kernel against our state ------------------------------------------------
    def prune(self) -> List[str]:
        """Compare the kernel's masters with what we believe is programmed. A drifted frontend
        is marked damaged and pending (rewritten next round); a master nobody wants is
        deleted now with its slots. Returns what was found, for the log."""
        kernel: Dict[Tuple[Any, ...], Tuple[int, int, int]] = {}
        kernel_slots: Dict[Tuple[Any, ...], List[int]] = {}
        for key, value in self._items("services"):
            ident = (tuple(key.addr), key.port, key.proto, key.family)
            if key.slot == 0:
                kernel[ident] = (value.svc_id, value.count, value.bank)
            else:
                kernel_slots.setdefault(ident, []).append(key.slot)
        drift = []
        for fk, p in self.programmed.items():
            k = m.SvcKey.from_buffer_copy(fk.map_key(0))
            ident = (tuple(k.addr), k.port, k.proto, k.family)
            got = kernel.pop(ident, None)
            kernel_slots.pop(ident, None)
            if got != (p.svc_id, p.slot_count, p.bank):
                drift.append(f"{fk}: kernel has {got}, expected "
                             f"{(p.svc_id, p.slot_count, p.bank)}")
                self.programmed[fk] = p.replace(damaged=True)
                self._mark(fk)
            elif p.maglev_rows and self.tables.size(p.svc_id) != p.maglev_rows:
                drift.append(f"{fk}: its Maglev table is missing or of another size")
                self.programmed[fk] = p.replace(damaged=True)
                self._mark(fk)
        unknown = [_svc_key(ident, 0) for ident in kernel]
        if unknown:
            drift.append(f"{len(unknown)} frontends in the kernel that nobody wants: deleted")
            try:
                self.maps.delete_batch("services", unknown)
            except OSError as e:
                drift.append(f"deleting them failed ({_reason(e)}); retried at the next prune")
        for ident, have in kernel_slots.items():  # slots with no master left
            self._garbage_slots.extend(_svc_key(ident, slot) for slot in have)
        return drift

    # -- whole sets (tests, benchmarks) -----------------------------------------------------
    def apply(self, services: Sequence[Service],
              ctx: selection.Context = selection.NO_CONTEXT) -> RoundResult:
        """Make the desired state exactly `services` and reconcile: the whole-set form of
        set_service/remove_service, for tests and benchmarks. The agent uses deltas."""
        wanted = {s.key for s in services}
        for key in [k for k in self.by_service if k not in wanted]:
            self.remove_service(key)
        for key in [k for k in self._watched_by if k not in wanted]:
            self._watch(key, frozenset())
        for svc in services:
            self.set_service(svc.key, service_frontends(svc, ctx), watched_endpoints(svc))
        return self.reconcile(force=True)


def _with_desired(old: ProgrammedFrontend, d: Desired) -> ProgrammedFrontend:
    """`old` as written, now wanted as `d` (which needed no write; an adopted frontend's
    first round). Packed ids follow the desired backends' order: packed in d's order when d's
    backends are exactly old's, else kept as a Mapping (the ids it holds stay its own until
    the next write)."""
    ids = old.ids
    if type(ids) is bytes or len(ids) <= COMPACT_IDS:
        have = dict(old.backend_ids.items())
        flat = d.flat_backends
        endpoints = list(zip(flat[0::3], flat[1::3]))
        if len(endpoints) == len(have) and all(ep in have for ep in endpoints):
            ids = pack_ids([have[ep] for ep in endpoints])
        elif type(ids) is bytes:
            ids = BackendIds(iter(have.items()))
    return old.replace(desired=d, ids=ids)


def _proxy_port(master: m.SvcValue) -> Optional[int]:
    """A master's proxy setting as Service.proxy_port: 0 opted out, None the node default."""
    if master.flags & m.SVC_F_PROXY_OFF:
        return 0
    return m.port_host(master.proxy_port) or None


def _svc_key(ident: Tuple[Any, ...], slot: int) -> bytes:
    addr, port, proto, family = ident
    k = m.SvcKey()
    k.addr[:] = addr
    k.port, k.proto, k.family, k.slot = port, proto, family, slot
    return bytes(k)


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


@dataclass(frozen=True)
class _Packed:
    """A batch of frontends' writes, each map's elements packed and joined end to end."""
    be_keys: bytes
    be_values: bytes
    slot_keys: bytes
    slot_values: bytes
    master_keys: bytes
    master_values: bytes


_SVC_KEY_SIZE = ctypes.sizeof(m.SvcKey)


def _split(joined: bytes, size: int) -> List[bytes]:
    return [joined[i:i + size] for i in range(0, len(joined), size)]


def _master_value(p: ProgrammedFrontend) -> bytes:
    return m.pack_master_value(p.svc_id, p.slot_count, p.bank, m.ALGORITHM_IDS[p.algorithm],
                               p.revision,
                               (m.SVC_F_AFFINITY if p.affinity_timeout else 0) | p.flags
                               | (m.SVC_F_PROXY_OFF if p.proxy_port == 0 else 0),
                               p.affinity_timeout, p.maglev_rows, *p.limits,
                               proxy_port=p.proxy_port or 0)


_ONES = tuple((1,) * n for n in range(COMPACT_IDS + 1))


def _is_plain(d: Desired) -> bool:
    """A frontend _add_fresh can write: no Maglev table, at most COMPACT_IDS backends, all of
    weight 1 (one slot each, in order, whatever the algorithm: selection.slots_for) and no
    endpoint twice. Kubernetes' frontends are all plain."""
    if type(d) is PlainFrontend:
        return True  # whichever backends it chooses (_plain_service)
    flat = d.flat_backends
    n = len(flat) // 3
    if n > COMPACT_IDS or d.maglev_table_size or flat[2::3] != _ONES[n]:
        return False
    return n < 2 or len(set(zip(flat[0::3], flat[1::3]))) == n
