"""Which backends take new connections, and how weights become selection slots.

Pure functions: no kernel, no I/O, unit-tested on their own.

The datapath picks a slot uniformly (random) or by a shared counter (round_robin), so weights
are expressed by how many slots a backend holds:
  * weights are reduced by their greatest common divisor (3:3:6 takes 4 slots, not 12);
  * above MAX_SLOTS they are apportioned by largest remainder, each live backend keeping at
    least one slot (the error is then at most one slot in MAX_SLOTS per backend);
  * round_robin orders the slots so that each backend's turns are spread evenly and no
    backend comes twice in a row (see smooth_sequence).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import reduce
from math import gcd
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

from .model import Backend, Service, all_serving

MAX_SLOTS = 16384  # per frontend; slot indexes are 15 bits in the key


@dataclass(frozen=True)
class Context:
    """What selection needs beyond the service: where this node is, and which backends the
    health checks and the outlier detector have taken out, as (namespace, service, address)."""

    node_name: Optional[str] = None
    node_zone: Optional[str] = None
    unhealthy: FrozenSet[Tuple[str, str, str]] = frozenset()


NO_CONTEXT = Context()


def eligible(backends: Sequence[Backend], service: Optional[Service] = None,
             ctx: Context = NO_CONTEXT) -> Tuple[List[Backend], str]:
    """Backends that take new connections, and why that set (shown in status).

    In order:
      1. weight 0 takes nothing; internalTrafficPolicy Local keeps only this node's backends;
      2. ready (and not terminating) backends are the candidates; when none is ready, those
         still serving while terminating are used rather than refusing every connection
         (Kubernetes' ProxyTerminatingEndpoints);
      3. candidates that failed health checks or were ejected as outliers drop out, unless
         fewer than panicThresholdPercent of the candidates would remain: then all are used,
         as Envoy's panic mode does, so a bad health check cannot black-hole a service;
      4. trafficDistribution PreferClose keeps the backends in this node's zone while that
         zone is not itself in panic (enough of its backends healthy), else spills over.
    """
    pool = [b for b in backends if b.weight > 0]
    local = service is not None and service.internal_traffic_policy == "Local"
    if local:
        pool = [b for b in pool if b.node is not None and b.node == ctx.node_name]
    candidates = [b for b in pool if b.ready and not b.terminating]
    why = "ready"
    if not candidates:
        candidates = [b for b in pool if b.serving]
        why = "terminating-fallback"
        if not candidates:
            return [], "none-local" if local else "none"
    if service is None or not ctx.unhealthy:
        healthy = candidates
    else:
        ns, name = service.namespace, service.name
        healthy = [b for b in candidates if (ns, name, b.address) not in ctx.unhealthy]
    threshold = service.panic_threshold_percent if service is not None else 0
    if len(healthy) * 100 < threshold * len(candidates) or not healthy:
        return candidates, "panic"
    if service is not None and service.traffic_distribution == "PreferClose" and ctx.node_zone:
        zone_all = [b for b in candidates if b.zone == ctx.node_zone]
        zone_ok = [b for b in healthy if b.zone == ctx.node_zone]
        if zone_ok and len(zone_ok) * 100 >= threshold * len(zone_all):
            return zone_ok, "zone-local"
        return healthy, "zone-spillover" if zone_all else why
    return healthy, why if len(healthy) == len(candidates) else why + "-healthy"


def all_eligible(service: Service, ctx: Context = NO_CONTEXT) -> bool:
    """True only if eligible(service.backends, service, ctx) is every backend, in order, for
    "ready": it has backends, all ready, not terminating and of weight 1, nothing is taken
    out, and its options (Service.simple) leave topology and panic out of it. Nearly every
    frontend of a first sync, whose choice then costs one pass over the backends' states
    rather than eligible's lists. False says nothing: ask eligible."""
    return bool(service.backends) and not ctx.unhealthy and service.simple() and \
        all_serving(service.backends)


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


def _fits(count: int, free: int, left_same: bool, right_same: bool) -> bool:
    """Can `count` copies of one backend fill `free` path positions with none adjacent, when
    the position before the path (and after it) may hold the same backend?"""
    n = free - (1 if left_same else 0) - (1 if right_same else 0)
    return count <= max(0, (n + 1) // 2)


def smooth_sequence(counts: Sequence[int]) -> List[int]:
    """Round-robin order over slot counts: a list of indexes into counts, index i appearing
    counts[i] times, spread evenly and, read as a ring, never the same backend twice in a row
    while no backend holds more than half the slots.

    Each backend's turns have ideal times (j + phase_i) / counts[i], phases staggered so that
    backends do not all fall due together; the earliest due backend goes next unless it went
    last or taking it would force a repeat later (checked in O(1) from the largest remaining
    count). nginx's smooth weighted round robin repeats at the wrap (1:1:2 gives c a b c c a b
    c); this does not (a c b c a c b c)."""
    live = [i for i, c in enumerate(counts) if c > 0]
    if not live:
        return []
    if all(counts[i] == counts[live[0]] for i in live):
        # Equal weights: plain rotation, the common case, in O(total).
        return [i for _ in range(counts[live[0]]) for i in live]
    total = sum(counts)
    remaining = {i: counts[i] for i in live}
    taken = {i: 0 for i in live}
    phase = {i: (pos + 0.5) / len(live) for pos, i in enumerate(live)}
    by_remaining: Dict[int, int] = {}  # remaining count -> how many backends have it
    for i in live:
        by_remaining[counts[i]] = by_remaining.get(counts[i], 0) + 1

    def due(i: int) -> Tuple[float, int, int]:
        return ((taken[i] + phase[i]) / counts[i], -remaining[i], i)

    def take(i: int) -> None:
        r = remaining[i]
        by_remaining[r] -= 1
        if not by_remaining[r]:
            del by_remaining[r]
        remaining[i] = r - 1
        taken[i] += 1
        if r - 1:
            by_remaining[r - 1] = by_remaining.get(r - 1, 0) + 1

    def feasible_after(i: int, first: int, free: int) -> bool:
        # After taking i, every backend must still fit the free positions between i (on the
        # left) and the ring's first pick (on the right). Only i, first and the backend with
        # the most turns left can fail that, so three checks suffice.
        take(i)
        ok = _fits(remaining[i], free, True, i == first) and \
            (first == i or _fits(remaining[first], free, False, True)) and \
            (not by_remaining or _fits(max(by_remaining), free, False, False))
        untake(i)
        return ok

    def untake(i: int) -> None:
        r = remaining[i]
        if r:
            by_remaining[r] -= 1
            if not by_remaining[r]:
                del by_remaining[r]
        remaining[i] = r + 1
        taken[i] -= 1
        by_remaining[r + 1] = by_remaining.get(r + 1, 0) + 1

    heap = [due(i) for i in live]
    heapq.heapify(heap)
    out: List[int] = []
    prev = first = -1
    for step in range(total):
        free = total - step - 1
        skipped = []
        pick = -1
        while heap:
            entry = heapq.heappop(heap)
            i = entry[2]
            if i != prev and feasible_after(i, first if first >= 0 else i, free):
                pick = i
                break
            skipped.append(entry)
        if pick < 0:  # no repeat-free choice exists (a backend holds over half the slots)
            pick = skipped.pop(0)[2] if skipped else prev
        for entry in skipped:
            heapq.heappush(heap, entry)
        take(pick)
        out.append(pick)
        if remaining[pick]:
            heapq.heappush(heap, due(pick))
        prev = pick
        if first < 0:
            first = pick
    return out


def expanded_sequence(counts: Sequence[int]) -> List[int]:
    """Slots for random selection: each index repeated counts[i] times (order is irrelevant)."""
    return [i for i, c in enumerate(counts) for _ in range(c)]


def slots_for(algorithm: str, weights: Sequence[int]) -> List[int]:
    if len(weights) <= MAX_SLOTS and all(w == 1 for w in weights):
        # Equal weights, nearly every service: one slot each, in order, whatever the
        # algorithm (what slot_counts and either sequence give, without their work).
        return list(range(len(weights)))
    counts = slot_counts(weights)
    if algorithm == "round_robin":
        return smooth_sequence(counts)
    return expanded_sequence(counts)
