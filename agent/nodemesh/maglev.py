"""Maglev lookup tables (Eisenbud et al., NSDI 2016), built by the agent for `algorithm: maglev`.

A table has M rows (M prime); the datapath picks row hash(client, frontend) % M, and each row
names a backend. Every backend walks its own permutation of the rows, (offset + j * skip) % M,
and the backends take turns claiming the next row of their permutation that is still free,
until every row is claimed. The result:

* **Consistent across agents.** offset and skip come from two independent hashes of a stable
  backend key, "address:port" (never an id, which differs between agents), and the backends
  take their turns in the order of their keys. Two agents with the same backends build the
  same table, whatever order the backends arrived in.
* **Little disruption.** Removing one of N backends moves its ~M/N rows and, because the other
  permutations are undisturbed until they meet a row the removed one held, only a few more.
  tests/unit/test_maglev.py states and checks the bound.
* **Weights.** Katran's MaglevHashV2 scheme: in every round each backend gains its weight in
  credit and claims one row whenever its credit reaches the largest weight, so it ends with
  rows in proportion to its weight (a weight-0 backend gets none).
"""
from __future__ import annotations

import hashlib
from typing import List, Sequence, Tuple

DEFAULT_TABLE_SIZE = 16381
MIN_TABLE_SIZE = 7
MAX_TABLE_SIZE = 131071  # 512 KiB of rows per table, twice (active + spare) in the kernel
# The Maglev paper keeps the load within ~1% of even once M >= 100 * N; below M >= N a table
# cannot even give every backend a row.
ROWS_PER_BACKEND_ADVICE = 100


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def check_table_size(size: object) -> str:
    """'' if `size` can be a table size, else why not (for a config error)."""
    if isinstance(size, bool) or not isinstance(size, int):
        return f"{size!r} is not a table size (a prime {MIN_TABLE_SIZE}-{MAX_TABLE_SIZE})"
    if not MIN_TABLE_SIZE <= size <= MAX_TABLE_SIZE:
        return f"{size} is not a table size (a prime {MIN_TABLE_SIZE}-{MAX_TABLE_SIZE})"
    if not is_prime(size):
        return (f"{size} is not prime: Maglev needs a prime table size so that every skip "
                f"walks all rows (e.g. 251, 1021, 4093, 16381, 65521)")
    return ""


def backend_key(address: str, port: int) -> str:
    """The stable identity a backend is hashed by: its canonical address and target port."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _hash64(key: bytes, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, person=person).digest(), "little")


def permutation(key: str, size: int) -> Tuple[int, int]:
    """(offset, skip) of a backend's walk over the rows: two independent hashes of its key.
    skip is 1..size-1, so with a prime size every walk visits every row once."""
    raw = key.encode()
    offset = _hash64(raw, b"nodemesh-mg-off") % size
    skip = _hash64(raw, b"nodemesh-mg-skip") % (size - 1) + 1
    return offset, skip


def build_table(backends: Sequence[Tuple[str, int]], size: int = DEFAULT_TABLE_SIZE
                ) -> List[int]:
    """The table for `backends`, a sequence of (stable key, weight): for each of the `size`
    rows the index in `backends` of the backend that owns it. All rows are -1 when no backend
    has a weight. Raises ValueError for a size that is not prime or duplicate keys."""
    why = check_table_size(size)
    if why:
        raise ValueError(why)
    keys = [k for k, _ in backends]
    if len(set(keys)) != len(keys):
        raise ValueError("backend keys must be unique")
    # Turn order follows the keys, not the input order: the same set gives the same table.
    live = sorted((i for i, (_, w) in enumerate(backends) if w > 0), key=lambda i: keys[i])
    table = [-1] * size
    if not live:
        return table
    weights = [backends[i][1] for i in live]
    top = max(weights)
    walks = [permutation(keys[i], size) for i in live]
    pos = [offset for offset, _ in walks]
    skips = [skip for _, skip in walks]
    credit = [0] * len(live)
    filled = 0
    turns = range(len(live))
    while True:
        for t in turns:
            credit[t] += weights[t]
            if credit[t] < top:
                continue
            credit[t] -= top
            p, skip = pos[t], skips[t]
            while table[p] >= 0:  # the next row of this backend's walk that nobody holds
                p += skip
                if p >= size:
                    p -= size
            table[p] = live[t]
            p += skip
            pos[t] = p - size if p >= size else p
            filled += 1
            if filled == size:
                return table


def row_changes(old: Sequence[int], new: Sequence[int]) -> List[int]:
    """The rows whose backend differs between two tables of one size."""
    return [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
