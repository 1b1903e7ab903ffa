"""Which backends take new connections, and how weights become selection slots.

Pure functions: no kernel, no I/O, unit-tested on their own.

The datapath picks a slot uniformly (random) or by a shared counter (round_robin), so weights
are expressed by how many slots a backend holds:
  * weights are reduced by their greatest common divisor (3:3:6 takes 4 slots, not 12);
  * above MAX_SLOTS they are apportioned by largest remainder, each live backend keeping at
    least one slot (the error is then at most one slot in MAX_SLOTS per backend);
  * round_robin orders the slots as nginx's smooth weighted round robin does, so a heavy
    backend's turns are spread out instead of coming in a burst.
"""
from __future__ import annotations

from functools import reduce
from math import gcd
from typing import List, Sequence, Tuple

from .model import Backend

MAX_SLOTS = 16384  # per frontend; slot indexes are 15 bits in the key


def eligible(backends: Sequence[Backend]) -> Tuple[List[Backend], str]:
    """Backends that take new connections, and why that set (for status).

    Ready backends with a weight above zero take new connections. When none is ready, backends
    that are still serving while terminating are used rather than refusing every connection
    (Kubernetes' ProxyTerminatingEndpoints)."""
    ready = [b for b in backends if b.ready and not b.terminating and b.weight > 0]
    if ready:
        return ready, "ready"
    serving = [b for b in backends if b.serving and b.weight > 0]
    if serving:
        return serving, "terminating-fallback"
    return [], "none"


def slot_counts(weights: Sequence[int], max_slots: int = MAX_SLOTS) -> List[int]:
    """How many slots each weight gets; zero weights get none."""
    live = [w for w in weights if w > 0]
    if not live:
        return [0] * len(weights)
    if len(live) > max_slots:
        raise ValueError(f"{len(live)} backends exceed the {max_slots} slots of a frontend")
    g = reduce(gcd, live)
    reduced = [w // g for w in weights]
    total = sum(reduced)
    if total <= max_slots:
        return reduced
    # Largest remainder over the slots left after every live backend's guaranteed one.
    spare = max_slots - len(live)
    wsum = sum(live)
    exact = [(w * spare / wsum) if w > 0 else 0.0 for w in weights]
    counts = [int(x) + (1 if w > 0 else 0) for x, w in zip(exact, weights)]
    left = max_slots - sum(counts)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    for i in order[:left]:
        if weights[i] > 0:
            counts[i] += 1
    return counts


def smooth_sequence(counts: Sequence[int]) -> List[int]:
    """nginx's smooth weighted round robin over slot counts: a list of indexes into counts,
    each index i appearing counts[i] times, as evenly spread as the weights allow."""
    total = sum(counts)
    live = [i for i, c in enumerate(counts) if c > 0]
    if all(counts[i] == counts[live[0]] for i in live) if live else True:
        # Equal weights: plain rotation, the common case, without the O(total * n) walk.
        return [i for _ in range(counts[live[0]] if live else 0) for i in live]
    current = [0] * len(counts)
    out = []
    for _ in range(total):
        best = -1
        for i in live:
            current[i] += counts[i]
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= total
        out.append(best)
    return out


def expanded_sequence(counts: Sequence[int]) -> List[int]:
    """Slots for random selection: each index repeated counts[i] times (order is irrelevant)."""
    return [i for i, c in enumerate(counts) for _ in range(c)]


def slots_for(algorithm: str, weights: Sequence[int]) -> List[int]:
    counts = slot_counts(weights)
    if algorithm == "round_robin":
        return smooth_sequence(counts)
    return expanded_sequence(counts)
