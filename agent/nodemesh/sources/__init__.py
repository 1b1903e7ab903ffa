"""Sources of desired state. A source only produces services; it never touches maps.

Contract (every source implements it):

    source = SomeSource(...)
    source.start(on_change, on_error)   # returns at once; the source works in its own thread
    source.stop()                       # idempotent; joins its thread

    on_change(services: list[model.Service])  the COMPLETE desired set, called on every change
                                              (never a delta); the first call is the initial sync
    on_error(message: str)                    a problem that did not change the desired set
                                              (bad file, lost watch ...); the last good set stays

`name` is the source's label in metrics ("file", "kubernetes").
"""
from __future__ import annotations

from typing import Callable, List

from ..model import Service

OnChange = Callable[[List[Service]], None]
OnError = Callable[[str], None]
