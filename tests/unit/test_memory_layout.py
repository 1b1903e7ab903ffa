"""What the agent keeps per frontend stays small (bench/memory.py measures the whole), and the
compact forms behave as the dicts they replace. No root needed."""
import gc
import sys
from dataclasses import replace

import pytest
from fakemaps import FakeMaps

from nodemesh.datapath import maps as m
from nodemesh.model import Backend, Service, ServicePort
from nodemesh.reconciler import (
    COMPACT_IDS,
    BackendIds,
    DesiredFrontend,
    FrontendKey,
    PlainFrontend,
    Reconciler,
)


def deep_size(obj, stop=(str, int, type)):
    """Bytes of obj and the containers it reaches (shared strings, ints, classes not counted)."""
    seen, size, stack = set(), 0, [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, stop):
            continue
        seen.add(id(o))
        size += sys.getsizeof(o)
        stack.extend(gc.get_referents(o))
    return size


def svc(name, vip, addresses):
    return Service(name=name, namespace="default", vip=vip,
                   ports=(ServicePort(port=80, target_port=8080),),
                   backends=tuple(Backend(address=a) for a in addresses))


def test_backend_ids_answer_as_the_dict_they_replace():
    items = {("10.0.0.1", 8080): 7, ("10.0.0.2", 8080): 9, ("fd00::1", 80): 11}
    ids = BackendIds(iter(items.items()))
    assert ids == items and items == ids and len(ids) == 3
    assert ids[("10.0.0.2", 8080)] == 9 and ids.get(("10.0.0.2", 80)) is None
    assert ("fd00::1", 80) in ids and ("fd00::1", 81) not in ids and "junk" not in ids
    assert sorted(ids.items()) == sorted(items.items()) and list(ids) == list(items)
    assert sorted(ids.values()) == [7, 9, 11] and frozenset(ids) == frozenset(items)
    assert BackendIds() == {} and len(BackendIds()) == 0


def test_a_small_frontend_keeps_its_backend_ids_in_less_than_half_a_dict():
    maps = FakeMaps()
    rec = Reconciler(maps, m.MapSizes())
    rec.apply([svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
               svc("big", "10.96.0.2", [f"10.1.0.{i}" for i in range(1, COMPACT_IDS + 2)])])
    small = rec.programmed[FrontendKey(4, "10.96.0.1", 80, "TCP")].backend_ids
    as_dict = dict(small.items())
    assert small == as_dict
    # lookups scan: a frontend with many backends keeps its dict
    big = rec.programmed[FrontendKey(4, "10.96.0.2", 80, "TCP")].backend_ids
    assert isinstance(big, dict) and len(big) == COMPACT_IDS + 1
    # and a restarted agent adopts them in the compact form, with zero writes
    again = Reconciler(maps, m.MapSizes())
    again.adopt()
    adopted = again.programmed[FrontendKey(4, "10.96.0.1", 80, "TCP")].backend_ids
    assert adopted == small and deep_size(adopted) * 2 < deep_size(as_dict)
    before = maps.writes()
    again.apply([svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
                 svc("big", "10.96.0.2", [f"10.1.0.{i}" for i in range(1, COMPACT_IDS + 2)])])
    assert maps.writes() == before
    # once desired again, the adopted frontend packs its ids as a written one does
    p = again.programmed[FrontendKey(4, "10.96.0.1", 80, "TCP")]
    assert type(p.ids) is bytes and p.backend_ids == small


def test_a_programmed_frontend_packs_its_slots_and_backend_ids():
    rec = Reconciler(FakeMaps(), m.MapSizes())
    rec.apply([svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])])
    p = rec.programmed[FrontendKey(4, "10.96.0.1", 80, "TCP")]
    ids = dict(p.backend_ids.items())
    assert sorted(ids) == [("10.0.0.1", 8080), ("10.0.0.2", 8080), ("10.0.0.3", 8080)]
    assert sorted(set(p.slots)) == sorted(ids.values()) and p.slot_count == len(p.slots)
    assert p.backend_ids[("10.0.0.2", 8080)] == ids[("10.0.0.2", 8080)]
    # a u32 an id in two bytes objects, where a tuple of slots, a BackendIds over a tuple of
    # 9 and an int object per id took about 360 bytes more: ~20 MiB at 100,000 frontends
    assert type(p.packed_slots) is bytes and type(p.ids) is bytes
    assert not [o for o in gc.get_referents(p)
                if isinstance(o, (tuple, BackendIds)) and o is not p.limits and o is not p.key]
    own = sys.getsizeof(p) + sys.getsizeof(p.packed_slots) + sys.getsizeof(p.ids)
    assert own <= 260, own


def test_the_address_encoding_cache_stays_small_at_100000_addresses():
    m.encode_addr.cache_clear()
    for i in range(20_000):
        m.encode_addr(f"10.{128 + i // 65536}.{i // 256 % 256}.{i % 256}")
    # each entry costs about 250 bytes: 1 MiB at most, where 131,072 entries were 30 MiB
    assert m.encode_addr.cache_info().currsize <= 4096
    assert m.encode_addr("10.128.0.1") == m.encode_addr.__wrapped__("10.128.0.1")


def test_a_desired_frontend_keeps_its_backends_in_one_flat_tuple():
    rec = Reconciler(FakeMaps(), m.MapSizes())
    web = svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    # a weight of 2: not a plain service, its desired state is a DesiredFrontend
    rec.apply([replace(web, backends=web.backends[:2] + (replace(web.backends[2], weight=2),))])
    key = FrontendKey(4, "10.96.0.1", 80, "TCP")
    d = rec.desired[key]
    assert type(d) is DesiredFrontend
    triples = (("10.0.0.1", 8080, 1), ("10.0.0.2", 8080, 1), ("10.0.0.3", 8080, 2))
    assert d.backends == triples
    # built from triples it is the same frontend (what tests and readers construct)
    assert replace(d, flat_backends=triples) == d
    # one tuple of 9 (112 bytes) where 4 tuples took 256: about 14 MiB at 100,000 frontends
    own = deep_size(d) - deep_size(key)
    assert own <= 360, own  # 472 with a tuple per backend


def test_a_plain_frontend_keeps_its_service_and_chooses_its_backends_when_read():
    rec = Reconciler(FakeMaps(), m.MapSizes())
    web = svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    rec.apply([web])
    key = FrontendKey(4, "10.96.0.1", 80, "TCP")
    d = rec.desired[key]
    assert type(d) is PlainFrontend and d.svc is web
    assert d.backends == (("10.0.0.1", 8080, 1), ("10.0.0.2", 8080, 1), ("10.0.0.3", 8080, 1))
    # it is the DesiredFrontend service_frontends made before, field for field
    full = d.full()
    assert type(full) is DesiredFrontend and full == d and d == full and not full != d
    assert full.selection == d.selection == "ready" and full.all_backends == 3
    # its own bytes: the object (its key, service and context are shared); a DesiredFrontend
    # and its flat tuple were 256 bytes a frontend, 24 MiB at 100,000
    assert set(map(id, gc.get_referents(d))) <= {id(d.key), id(web), id(d.ctx), id(PlainFrontend)}
    assert sys.getsizeof(d) <= 56, sys.getsizeof(d)
    # the programmed frontend's packed ids follow the backends it chooses
    assert dict(rec.programmed[key].backend_ids.items()) == {
        ("10.0.0.1", 8080): 1, ("10.0.0.2", 8080): 2, ("10.0.0.3", 8080): 3}


def test_a_changed_plain_frontend_is_told_apart_by_its_backends_without_its_fields(
        monkeypatch):
    """set_service and _plan compare a service's new frontend with its old one each change:
    their backends differ nearly always, and that answers without two field tuples each."""
    rec = Reconciler(FakeMaps(), m.MapSizes())
    web = svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    rec.apply([web])
    key = FrontendKey(4, "10.96.0.1", 80, "TCP")
    old = rec.desired[key]
    moved = PlainFrontend(key, svc("web", "10.96.0.1", ["10.0.0.4", "10.0.0.5", "10.0.0.6"]))
    same = PlainFrontend(key, svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]))
    assert old == same and old.fields() == same.fields()  # equal, field for field
    monkeypatch.setattr(PlainFrontend, "fields", lambda self: pytest.fail("fields built"))
    assert old != moved and not old == moved and moved != old


def test_a_frontend_view_formats_its_labels_at_scrape_and_stores_none():
    from nodemesh.reconciler import Status
    from nodemesh.snapshot import frontend_view

    rec = Reconciler(FakeMaps(), m.MapSizes())
    rec.apply([svc("web", "10.96.0.1", ["10.0.0.1"])])
    key = FrontendKey(4, "10.96.0.1", 80, "TCP")
    view = frontend_view(key, rec.desired[key], rec.programmed[key], Status("done"))
    assert view.labels == 'namespace="default",service="web",port="80",protocol="TCP"'
    assert view.service_labels == 'namespace="default",service="web"'
    assert frontend_view(key, None, rec.programmed[key], Status("done")).labels == ""
    # two strings a frontend were about 19 MiB of the snapshot at 100,000 frontends
    assert not [o for o in gc.get_referents(view) if isinstance(o, str)]


def test_publishing_one_change_at_100000_frontends_copies_one_small_shard():
    from nodemesh.snapshot import Shards

    big = Shards().updated({i: i for i in range(100_000)})
    after = big.updated({5: 0})
    copied = [new for old, new in zip(big.dicts(), after.dicts()) if new is not old]
    # about 25 entries (4,096 shards) where 256 shards copied about 400 a change
    assert len(copied) == 1 and len(copied[0]) <= 64, len(copied[0])
    assert after.get(5) == 0 and big.get(5) == 5 and len(after) == len(big) == 100_000


def test_done_frontends_cost_no_status_entry_yet_answer_done():
    from nodemesh.reconciler import DONE, PENDING

    rec = Reconciler(FakeMaps(), m.MapSizes())
    rec.apply([svc(f"s{i}", f"10.96.1.{i}", [f"10.0.1.{i}"]) for i in range(1, 101)])
    key = FrontendKey(4, "10.96.1.7", 80, "TCP")
    assert len(rec.status) == 100 and rec.status[key].state == DONE and key in rec.status
    assert {st.state for st in rec.status.values()} == {DONE}
    # a dict entry each was about 5 MiB at 100,000; nor is the emptied table kept
    assert rec.status._other == {} and sys.getsizeof(rec.status._other) < 100
    rec.set_service(("default", "s7"), {})
    assert rec.status[key].state == PENDING and len(rec.status) == 100
    rec.reconcile()
    assert key not in rec.status and rec.status.get(key) is None and len(rec.status) == 99


def test_a_one_frontend_service_is_indexed_by_its_bare_key_and_grows_to_several():
    rec = Reconciler(FakeMaps(), m.MapSizes())
    one = svc("web", "10.96.0.1", ["10.0.0.1"])
    two = Service(name="web", namespace="default", vip="10.96.0.1",
                  ports=(ServicePort(port=80, target_port=8080),
                         ServicePort(name="tls", port=443, target_port=8443)),
                  backends=one.backends)
    http, tls = FrontendKey(4, "10.96.0.1", 80, "TCP"), FrontendKey(4, "10.96.0.1", 443, "TCP")
    rec.apply([one])
    assert rec.by_service[("default", "web")] == http  # no 1-tuple: 4.5 MiB at 100,000
    rec.apply([two])
    assert set(rec.frontends_of(("default", "web"))) == {http, tls}
    assert set(rec.programmed) == {http, tls}
    rec.apply([replace(two, ports=two.ports[1:])])
    assert rec.frontends_of(("default", "web")) == (tls,) and set(rec.programmed) == {tls}
    rec.apply([])
    assert rec.frontends_of(("default", "web")) == () and rec.programmed == {}


def test_publishing_one_change_copies_one_group_of_shards_not_the_whole_table():
    from nodemesh.snapshot import GROUPS, SHARDS, Shards

    big = Shards().updated({i: i for i in range(100_000)})
    after = big.updated({5: 0})
    # 16 tuples of 16 groups of 16 shards: one group tuple, its middle one and the outer one
    # are new (48 pointers copied, where a flat tuple of 4,096 was copied to a list and back
    # each publish)
    assert len(after._shards) == GROUPS and {len(g) for g in after._shards} == {GROUPS}
    assert {len(g) for mid in after._shards for g in mid} == {SHARDS // GROUPS // GROUPS}
    assert sum(1 for old, new in zip(big._shards, after._shards) if new is not old) == 1
    assert sum(1 for old, new in zip((g for m in big._shards for g in m),
                                     (g for m in after._shards for g in m)) if new is not old) == 1
    assert sum(1 for old, new in zip(big.dicts(), after.dicts()) if new is not old) == 1


def test_endpoints_counted_alike_share_one_count_object():
    rec = Reconciler(FakeMaps(), m.MapSizes())
    rec.apply([svc(f"s{i}", f"10.96.1.{i}", [f"10.0.1.{i}", f"10.0.2.{i}"])
               for i in range(1, 51)])
    counts = list(rec._endpoint_refs.values())
    # one int object of 36 bytes for the 100 endpoints (8080/TCP, used once): about 10 MiB
    # at 300,000 endpoints when each had its own
    assert len(counts) == 100 and len({id(v) for v in counts}) == 1
    rec.apply([svc(f"s{i}", f"10.96.1.{i}", [f"10.0.1.{i}"]) for i in range(1, 51)])
    assert len(rec._endpoint_refs) == 50 and len({id(v) for v in rec._endpoint_refs.values()}) == 1


def test_the_svc_id_index_is_an_array_copied_per_chunk():
    from nodemesh.snapshot import IdIndex, Shards

    ids = range(1, 100_001)
    index = IdIndex().updated({i: str(i) for i in ids})
    assert len(index) == 100_000 and index.get(77) == "77" and index.get(0) is None
    assert index.get(2 ** 32 - 1) is None and index.get(-1) is None
    after = index.updated({77: None, 100_001: "new"})
    assert after.get(77) is None and index.get(77) == "77" and len(after) == 100_000
    changed = [c for c, d in zip(index.chunks(), after.chunks()) if c is not d]
    assert len(changed) == 2  # 77's chunk and 100,001's, of 1,568 (49 groups of 32)
    assert list(after.values())[-2:] == ["100000", "new"]
    # about a sixth of the dicts of a Shards with the same ids
    assert deep_size(index) * 4 < deep_size(Shards().updated({i: str(i) for i in ids}))


def test_a_new_desired_state_that_needs_no_write_keeps_the_packed_ids_right():
    maps = FakeMaps()
    rec = Reconciler(maps, m.MapSizes())
    web = svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    rec.apply([web])
    key = FrontendKey(4, "10.96.0.1", 80, "TCP")
    ids = dict(rec.programmed[key].backend_ids.items())
    before = maps.writes()
    # a fourth backend, not ready: the desired frontend changes (all_backends), the kernel not
    rec.apply([replace(web, backends=web.backends + (Backend(address="10.0.0.4", ready=False),))])
    p = rec.programmed[key]
    assert maps.writes() == before and p.desired == rec.desired[key]
    assert type(p.ids) is bytes and dict(p.backend_ids.items()) == ids
    assert maps.serving(key) == sorted(ids)


def test_a_first_written_frontend_stores_only_its_ids_and_reads_the_rest_from_desired():
    from nodemesh.reconciler import ProgrammedFrontend

    rec = Reconciler(FakeMaps(), m.MapSizes())
    rec.apply([svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2"])])
    key = FrontendKey(4, "10.96.0.1", 80, "TCP")
    p = rec.programmed[key]
    assert p._rest is None and sys.getsizeof(p) <= 80  # 15 slots were 152 bytes with GC's
    assert (p.bank, p.algorithm, p.revision, p.damaged, p.count, p.maglev_rows, p.flags,
            p.limits, p.proxy_port, p.affinity_timeout) == \
        (0, "random", 1, False, -1, 0, 0, (0, 0), None, 0)
    # the constructor makes the same record from every field, and keeps what differs
    again = ProgrammedFrontend(**p.fields())
    assert again == p and again._rest is None
    damaged = p.replace(damaged=True)
    assert damaged.damaged and damaged._rest is not None and damaged != p
    assert damaged.replace(damaged=False) == p
