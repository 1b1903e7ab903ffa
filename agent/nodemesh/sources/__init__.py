"""Sources of desired state. A source only produces services; it never touches maps.

Contract (every source implements it):

    source = SomeSource(...)
    source.start(on_change, on_error)   # returns at once; the source works in its own thread
    source.stop()                       # idempotent; joins its thread

    on_change(delta: Delta)             what changed, per service: upserts and deletes. The
                                        first call is the initial sync and has full=True: it
                                        is the whole desired set, and whatever the agent had
                                        that it does not name is deleted. Later calls carry
                                        only what changed, so the agent's work follows the
                                        change, not the number of services.
                                        Before that first full call, a source may send
                                        partial=True deltas: services of the first sync
                                        as they are listed (each complete, with its
                                        backends), which the agent may program at once;
                                        they delete nothing the agent already has, and
                                        the full call still follows with the whole set.
    on_error(message: str)              a problem that did not change the desired set (a bad
                                        file, a lost watch ...); the last good state stays

A source calls on_change from its own thread and must never block on the agent: the agent
only enqueues the delta. `name` is the source's label in metrics ("file", "kubernetes").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Tuple

from ..model import Service

if TYPE_CHECKING:
    from ..policy import Mesh

ServiceKey = Tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Delta:
    upserts: Tuple[Service, ...] = ()
    deletes: Tuple[ServiceKey, ...] = ()
    full: bool = False  # the whole desired set: anything not upserted here is deleted
    origin: str = ""    # what changed, for logs ("web.yaml", "kubernetes")
    mesh: Optional["Mesh"] = None  # workloads and policies, whole, when they changed
    # A part of the first sync, before the full delta: these services are listed and
    # complete; nothing else may be deleted on their account.
    partial: bool = False

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes or self.full or self.mesh is not None)


OnChange = Callable[[Delta], None]
OnError = Callable[[str], None]
