"""The reconciler's batch writes through Maps on real kernel maps (unpinned, made and closed
here): packed elements in order, deletes that skip missing keys, failures that say how far
they got. A change's writes go through preallocated buffers; a first sync's chunks do not fit
them and take the other way: both are covered."""
import ctypes
import errno
import sys

import pytest

from nodemesh.datapath import bpfsys
from nodemesh.datapath import maps as m

pytestmark = pytest.mark.root


@pytest.fixture
def maps():
    fds = {}
    try:
        for name, capacity in (("services", 4096), ("backends", 16), ("backend_stats", 64)):
            spec = m.MAP_BY_NAME[name]
            fds[name] = bpfsys.map_create(spec.map_type, ctypes.sizeof(spec.key),
                                          ctypes.sizeof(spec.value), capacity, name=name)
        yield m.Maps(fds)
    finally:
        for fd in fds.values():
            bpfsys.close(fd)


def _backends(ids):
    return (b"".join(m.pack_u32(i) for i in ids),
            b"".join(m.pack_backend(f"10.0.0.{i}", 8080, 6, 7, m.BACKEND_ACTIVE) for i in ids))


def _stored(maps, name):
    return {bytes(k): bytes(v) for k, v in maps.items(name)}


@pytest.mark.parametrize("count", [3, 1000], ids=["a change", "a first sync's chunk"])
def test_packed_slots_are_written_and_their_old_bank_deleted(maps, count):
    prefix = m.address_key_prefix("10.96.0.1", 80, 6)
    keys, values = m.pack_slot_keys(prefix, 0, count), m.pack_slot_values(range(count))
    maps.update_joined("services", b"".join(keys), b"".join(values))
    assert _stored(maps, "services") == dict(zip(keys, values))
    assert maps.delete_batch("services", keys) == count
    assert _stored(maps, "services") == {}


def test_a_delete_skips_keys_already_gone_and_deletes_the_rest(maps):
    maps.update_joined("backends", *_backends([1, 3, 5]))
    # 2 and 4 are missing: the batch stops at each; the rest go one by one
    assert maps.delete_batch("backends", [m.pack_u32(i) for i in (1, 2, 3, 4, 5)]) == 3
    assert _stored(maps, "backends") == {}
    assert maps.delete_batch("backends", [m.pack_u32(i) for i in (1, 2)]) == 0


def test_deleting_stats_nobody_made_raises_nothing_on_the_way(maps):
    """A change deletes the stats of the backends it dropped and of the ids it reuses, most
    of which no connection ever made: a missing key is the usual case, not an error."""
    raised = []

    def trace(frame, event, arg):
        if event == "exception":
            raised.append(arg[0].__name__)
        return trace
    sys.settrace(trace)
    try:
        gone = maps.delete_batch("backend_stats", [m.pack_u32(i) for i in (7, 8, 9)])
    finally:
        sys.settrace(None)
    assert gone == 0 and raised == []


def test_a_failed_write_says_how_many_elements_went_in(maps):
    # backends holds 16: the 17th of a batch fails with E2BIG after 16 written
    with pytest.raises(bpfsys.BPFError) as failed:
        maps.update_joined("backends", *_backends(range(1, 18)))
    assert failed.value.errno == errno.E2BIG and failed.value.done == 16
    assert len(_stored(maps, "backends")) == 16


def test_keys_and_values_of_different_counts_are_refused_naming_the_map(maps):
    keys, values = _backends([1, 2])
    with pytest.raises(ValueError, match="backends"):
        maps.update_joined("backends", keys, values[:-1])
    assert _stored(maps, "backends") == {}
