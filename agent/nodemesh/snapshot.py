"""What readers see: an immutable snapshot the core loop publishes after each round.

Metrics and the admin API read the latest Snapshot (one attribute read, no lock), so a
scrape never delays a change and a change never waits for a scrape. Publishing must cost
what the round changed, not what the node holds: a Shards mapping is split in 4,096 dicts,
and a round copies only the dicts whose keys it touched (at 100,000 frontends, about 25
entries each: with 256 shards of 400, the copies and the garbage collector's walks of them
were a fifth of a one-service round's CPU).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import (
    Any,
    Dict,
    Generic,
    Hashable,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Self,
    Tuple,
    TypeVar,
)

from .model import Service
from .reconciler import (
    DONE_STATUS,
    Desired,
    FrontendKey,
    ProgrammedFrontend,
    RoundResult,
    Status,
    fast_init,
)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

SHARDS = 4096
# The shards sit in GROUPS tuples of SHARDS // GROUPS, themselves in GROUPS tuples of
# GROUPS: a change copies its shard, that shard's group and middle tuple and the outer one
# (48 pointers). One flat tuple of 4,096 was copied twice a publish (to a list and back),
# three publishes a round: about a tenth of a one-service round; two levels of 64 still had
# a change copy 128 pointers a map, and the collector's young pass visit each, cold.
GROUPS = 16
_PER_GROUP = SHARDS // GROUPS // GROUPS
_SHIFT = _PER_GROUP.bit_length() - 1
_MID_SHIFT = 2 * _SHIFT
_EMPTY: Dict[Any, Any] = {}  # every shard of a new Shards: never mutated (updated() copies)
_GONE = object()


class Shards(Generic[K, V]):
    """An immutable mapping, copied per shard on change. Never mutate what get() returns."""

    __slots__ = ("_shards", "_len")

    def __init__(self, shards: Optional[Tuple[Tuple[Tuple[Dict[K, V], ...], ...], ...]] = None,
                 length: int = 0):
        self._shards: Tuple[Tuple[Tuple[Dict[K, V], ...], ...], ...] = \
            shards or (((_EMPTY,) * _PER_GROUP,) * GROUPS,) * GROUPS
        self._len = length

    def updated(self, changes: Mapping[K, Optional[V]]) -> Self:
        """A new Shards with `changes` applied (None deletes); self is left as it was."""
        if not changes:
            return self
        outer = list(self._shards)
        copied_mids: Dict[int, List[Tuple[Dict[K, V], ...]]] = {}
        copied_groups: Dict[int, List[Dict[K, V]]] = {}
        copied: Dict[int, Dict[K, V]] = {}
        length = self._len
        mask = _PER_GROUP - 1
        for key, value in changes.items():
            i = hash(key) % SHARDS
            d = copied.get(i)
            if d is None:
                g = i >> _SHIFT
                group = copied_groups.get(g)
                if group is None:
                    o = i >> _MID_SHIFT
                    mid = copied_mids.get(o)
                    if mid is None:
                        mid = copied_mids[o] = list(outer[o])
                    group = copied_groups[g] = list(mid[g & mask])
                d = copied[i] = dict(group[i & mask])
                group[i & mask] = d
            if value is None:
                if d.pop(key, _GONE) is not _GONE:
                    length -= 1
            else:
                before = len(d)
                d[key] = value
                length += len(d) - before
        for g, group in copied_groups.items():
            copied_mids[g >> _SHIFT][g & mask] = tuple(group)
        for o, mid in copied_mids.items():
            outer[o] = tuple(mid)
        return type(self)(tuple(outer), length)

    def get(self, key: K) -> Optional[V]:
        i = hash(key) % SHARDS
        mask = _PER_GROUP - 1
        return self._shards[i >> _MID_SHIFT][(i >> _SHIFT) & mask][i & mask].get(key)

    def get_each(self, keys: Iterable[K]) -> Iterator[Optional[V]]:
        """get() of each key, in order, without a method call a key (a first sync asks
        100,000)."""
        shards, mask = self._shards, _PER_GROUP - 1
        for key in keys:
            i = hash(key) % SHARDS
            yield shards[i >> _MID_SHIFT][(i >> _SHIFT) & mask][i & mask].get(key)

    def dicts(self) -> Iterator[Dict[K, V]]:
        """The 4,096 shards (tests look at what a change copied)."""
        for mid in self._shards:
            for group in mid:
                yield from group

    def values(self) -> Iterator[V]:
        for d in self.dicts():
            yield from d.values()

    def __len__(self) -> int:
        return self._len


_CHUNK_BITS = 6
_CHUNK = 1 << _CHUNK_BITS
_GROUP_BITS = 5
_GROUP = 1 << _GROUP_BITS
_EMPTY_CHUNK: Tuple[Any, ...] = (None,) * _CHUNK
_EMPTY_GROUP: Tuple[Tuple[Any, ...], ...] = (_EMPTY_CHUNK,) * _GROUP


class IdIndex(Generic[V]):
    """An immutable mapping of small ints (the kernel's svc_ids, 1..131,071 by default) as an
    array in chunks of 64, the chunks in groups of 32, copied per chunk and group on change.
    At 100,000 ids it is about 0.8 MiB, where a Shards of them was about 5 MiB of dicts; a
    change copies one chunk, its group and the outer tuple (about 150 pointers at 100,000).
    One level of 256-id chunks had the change copy ~650 pointers, and the collector's young
    pass then visited each of them, cold. get() is None for any id not held."""

    __slots__ = ("_groups", "_len")

    def __init__(self, groups: Tuple[Tuple[Tuple[Optional[V], ...], ...], ...] = (),
                 length: int = 0):
        self._groups = groups
        self._len = length

    def updated(self, changes: Mapping[int, Optional[V]]) -> Self:
        """A new IdIndex with `changes` applied (None deletes); self is left as it was."""
        if not changes:
            return self
        groups: List[Tuple[Tuple[Optional[V], ...], ...]] = list(self._groups)
        copied_groups: Dict[int, List[Tuple[Optional[V], ...]]] = {}
        copied: Dict[int, List[Optional[V]]] = {}
        length = self._len
        for ident, value in changes.items():
            c = ident >> _CHUNK_BITS
            chunk = copied.get(c)
            if chunk is None:
                g = c >> _GROUP_BITS
                group = copied_groups.get(g)
                if group is None:
                    if g >= len(groups):
                        groups.extend([_EMPTY_GROUP] * (g + 1 - len(groups)))
                    group = copied_groups[g] = list(groups[g])
                chunk = copied[c] = list(group[c & (_GROUP - 1)])
            i = ident & (_CHUNK - 1)
            length += (value is not None) - (chunk[i] is not None)
            chunk[i] = value
        for c, chunk in copied.items():
            copied_groups[c >> _GROUP_BITS][c & (_GROUP - 1)] = tuple(chunk)
        for g, group in copied_groups.items():
            groups[g] = tuple(group)
        return type(self)(tuple(groups), length)

    def get(self, ident: int) -> Optional[V]:
        g = ident >> (_CHUNK_BITS + _GROUP_BITS)
        if ident < 0 or g >= len(self._groups):
            return None
        return self._groups[g][(ident >> _CHUNK_BITS) & (_GROUP - 1)][ident & (_CHUNK - 1)]

    def chunks(self) -> Iterator[Tuple[Optional[V], ...]]:
        """The chunks of 64 ids, in order (tests look at what a change copied)."""
        for group in self._groups:
            yield from group

    def values(self) -> Iterator[V]:
        for chunk in self.chunks():
            for v in chunk:
                if v is not None:
                    yield v

    def __len__(self) -> int:
        return self._len


@fast_init
@dataclass(frozen=True, slots=True)
class FrontendView:
    key: FrontendKey
    desired: Optional[Desired]        # None: being deleted
    programmed: Optional[ProgrammedFrontend]  # None: not in the kernel yet
    status: Status

    # Prometheus labels are formatted at scrape, not stored: two strings a frontend were
    # about 19 MiB at 100,000 frontends, and formatting them costs the scrape tens of ms.
    @property
    def service_labels(self) -> str:
        """namespace and service, as Prometheus labels; empty while not desired."""
        d = self.desired
        if d is None:
            return ""
        return f'namespace="{label_value(d.namespace)}",service="{label_value(d.service)}"'

    @property
    def labels(self) -> str:
        """The service's labels with port and protocol; empty while not desired."""
        d = self.desired
        if d is None:
            return ""
        key = self.key
        return f'namespace="{label_value(d.namespace)}",service="{label_value(d.service)}",' \
               f'port="{key.port}",protocol="{key.protocol}"'


def frontend_view(key: FrontendKey, desired: Optional[Desired],
                  programmed: Optional[ProgrammedFrontend], status: Status) -> FrontendView:
    return FrontendView(key, desired, programmed, status)


def as_view(stored: Any) -> FrontendView:
    """What a snapshot stores for a frontend, as its view: a ProgrammedFrontend stands for
    the view of a done frontend written from what it still wants (nearly all of them)."""
    if type(stored) is ProgrammedFrontend:
        return FrontendView(stored.key, stored.desired, stored, DONE_STATUS)
    return stored  # type: ignore[no-any-return]


def stored_view(view: FrontendView) -> Any:
    """What a snapshot stores for `view`: its ProgrammedFrontend when as_view gives the view
    back, else the view. At 100,000 frontends the views were 64 bytes each (6 MiB), and
    building them a tenth of a first sync's publish; readers get them built at read."""
    p = view.programmed
    if p is not None and view.status is DONE_STATUS and p.desired is view.desired and \
            p.desired is not None and p.key is view.key:
        return p
    return view


class FrontendViews(Shards[FrontendKey, Any]):
    """The snapshot's frontends: a Shards of what stored_view keeps, read as FrontendViews
    (built at each read: a held view stays what it was, but two reads give two objects)."""

    __slots__ = ()

    def get(self, key: FrontendKey) -> Optional[FrontendView]:
        stored = Shards.get(self, key)
        return None if stored is None else as_view(stored)

    def values(self) -> Iterator[FrontendView]:
        convert, programmed = as_view, ProgrammedFrontend
        for d in self.dicts():
            for stored in d.values():
                yield convert(stored) if type(stored) is programmed else stored


    def programmed_states(self) -> Iterator[ProgrammedFrontend]:
        """Every frontend's ProgrammedFrontend (desired or not), without building views."""
        programmed = ProgrammedFrontend
        for d in self.dicts():
            for stored in d.values():
                if type(stored) is programmed:
                    yield stored
                elif stored.programmed is not None:
                    yield stored.programmed

    def programmed(self) -> Iterator[Tuple[ProgrammedFrontend, Desired]]:
        """(programmed, desired) of every frontend that has both, without building views:
        for the scrape, which reads 100,000 of them."""
        programmed = ProgrammedFrontend
        for d in self.dicts():
            for stored in d.values():
                if type(stored) is programmed:
                    desired = stored.desired
                    if desired is not None:  # (always: stored_view)
                        yield stored, desired
                else:
                    p, desired = stored.programmed, stored.desired
                    if p is not None and desired is not None:
                        yield p, desired


class ViewIndex(IdIndex[Any]):
    """The views by svc_id, stored as FrontendViews stores them."""

    __slots__ = ()

    def get(self, ident: int) -> Optional[FrontendView]:
        stored = IdIndex.get(self, ident)
        return None if stored is None else as_view(stored)

    def values(self) -> Iterator[FrontendView]:
        return map(as_view, IdIndex.values(self))


def label_value(value: str) -> str:
    """A Prometheus label value, escaped as the text format wants."""
    if "\\" not in value and '"' not in value and "\n" not in value:
        return value  # the common case: validated names need no escaping
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass(frozen=True)
class SourceState:
    kind: str
    config: Optional[str] = None
    ok: Optional[bool] = None          # None: nothing loaded yet
    error: Optional[str] = None
    loads: int = 0
    failures: int = 0
    last_change: Optional[float] = None


def _indexed_svc_id(stored: Any) -> Optional[int]:
    """The svc_id under which by_svc_id holds a stored view (a FrontendView, or a done
    frontend's ProgrammedFrontend): only frontends both desired and programmed have one."""
    if type(stored) is ProgrammedFrontend:
        return stored.svc_id
    if stored.programmed is not None and stored.desired is not None:
        return stored.programmed.svc_id  # type: ignore[no-any-return]
    return None


@dataclass(frozen=True)
class Snapshot:
    generation: int = 0
    services: Shards[Tuple[str, str], Service] = field(default_factory=Shards)
    frontends: FrontendViews = field(default_factory=FrontendViews)
    # The same views by the kernel's svc_id, for readers that hold an id from the kernel
    # (flow events, latency entries): only frontends both desired and programmed.
    by_svc_id: ViewIndex = field(default_factory=ViewIndex)
    source: SourceState = field(default_factory=lambda: SourceState("file"))
    last_round: Optional[RoundResult] = None  # the last round that did something
    failing: int = 0                     # frontends whose last attempt failed
    conflicts: Tuple[str, ...] = ()      # frontends two services claim

    def with_frontends(self, views: Mapping[FrontendKey, Any], **changes: Any) -> "Snapshot":
        """A new Snapshot with these frontends' views replaced (None: gone), and the svc_id
        index kept in step, at the cost of the views given, never of N. A view is given as a
        FrontendView or as what stored_view makes of one (a done frontend's
        ProgrammedFrontend)."""
        by_id: Dict[int, Any] = {}
        if len(self.frontends):  # (a first sync's first round has none to look up)
            # first the ids these frontends held, then what they hold now
            for old in self.frontends.get_each(views):
                svc_id = None if old is None else _indexed_svc_id(old)
                if svc_id is not None:
                    by_id[svc_id] = None
        programmed = ProgrammedFrontend
        for view in views.values():
            if type(view) is programmed:  # _indexed_svc_id inline: nearly every view is
                by_id[view.svc_id] = view
                continue
            svc_id = None if view is None else _indexed_svc_id(view)
            if svc_id is not None:
                by_id[svc_id] = view
        changes["frontends"] = self.frontends.updated(views)
        changes["by_svc_id"] = self.by_svc_id.updated(by_id)
        if not _SNAPSHOT_FIELDS.issuperset(changes):
            raise TypeError(f"Snapshot has no field {sorted(set(changes) - _SNAPSHOT_FIELDS)}")
        # replace() without dataclasses' machinery (a field walk and a frozen __init__ of
        # object.__setattr__ calls): a Snapshot has no __post_init__ to run, once a round.
        new = object.__new__(type(self))
        fields_ = new.__dict__
        fields_.update(self.__dict__)
        fields_.update(changes)
        return new


_SNAPSHOT_FIELDS = frozenset(f.name for f in dataclasses.fields(Snapshot))
