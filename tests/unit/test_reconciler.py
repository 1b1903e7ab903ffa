"""The reconciler against in-memory maps that fail on demand: every step of the write order
is failed in turn, and each time the old set keeps serving, nothing leaks, and the next round
converges. No root needed."""
import errno
import logging

import pytest
from fakemaps import FakeMaps

from nodemesh.datapath import maps as m
from nodemesh.model import Backend, Service, ServicePort
from nodemesh.reconciler import (
    DONE,
    ERROR,
    ID_QUARANTINE,
    CapacityError,
    FrontendKey,
    IdPool,
    Reconciler,
)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def svc(name, vip, addresses, port=80):
    return Service(name=name, namespace="default", vip=vip,
                   ports=(ServicePort(port=port, target_port=8080),),
                   backends=tuple(Backend(address=a) for a in addresses))


def fk(vip, port=80):
    return FrontendKey(4, vip, port, "TCP")


def make(sizes=m.MapSizes()):
    clock = Clock()
    maps = FakeMaps(sizes)
    return Reconciler(maps, sizes, clock=clock), maps, clock


def assert_no_leaks(rec, maps):
    """Exactly what the reconciler believes is programmed is in the kernel, no more."""
    want_services = sum(1 + p.slot_count for p in rec.programmed.values())
    want_backends = {i for p in rec.programmed.values() for i in p.backend_ids.values()}
    assert maps.count("services") == want_services
    assert {m.key_int(k) for k, _ in maps.items("backends")} == want_backends
    assert rec.backend_ids.used == want_backends
    assert rec.svc_ids.used == {p.svc_id for p in rec.programmed.values()}


def serving(maps, key):
    got = maps.serving(key)
    return None if got is None else sorted({a for a, _ in got})


def test_a_service_is_programmed_and_an_unchanged_one_costs_no_write():
    rec, maps, _ = make()
    r = rec.apply([svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2"])])
    assert r.added == 1 and r.failed == 0
    assert serving(maps, fk("10.96.0.1")) == ["10.0.0.1", "10.0.0.2"]
    before = maps.writes()
    r = rec.apply([svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2"])])
    assert maps.writes() == before and r.writes == 0
    assert rec.status[fk("10.96.0.1")].state == DONE
    assert_no_leaks(rec, maps)


def test_one_changed_service_among_many_costs_only_its_own_writes():
    rec, maps, _ = make()
    services = [svc(f"s{i}", f"10.96.1.{i}", ["10.0.0.1", "10.0.0.2"]) for i in range(1, 200)]
    rec.apply(services)
    before = maps.writes()
    rec.set_service(("default", "s7"), {})  # nothing else is looked at
    rec.set_service(*_wants(svc("s7", "10.96.1.7", ["10.0.0.1", "10.0.0.3"])))
    assert rec.pending == {fk("10.96.1.7")}
    r = rec.reconcile()
    # one new backend, its slots in the idle bank, the master; then the old bank, the dropped
    # backend and its stats
    assert r.changed == 1 and maps.writes() - before <= 10
    assert serving(maps, fk("10.96.1.7")) == ["10.0.0.1", "10.0.0.3"]
    assert_no_leaks(rec, maps)


def _wants(service):
    from nodemesh.reconciler import service_frontends, watched_endpoints

    return service.key, service_frontends(service), watched_endpoints(service)


# Every step of the write order, failed in turn: (operation, map, calls to let through first)
STEPS = [
    ("delete", "svc_stats", 0),       # 1. stats of reused ids
    ("delete", "backend_stats", 0),
    ("update", "backends", 0),        # 2. new backend entries
    ("update", "services", 0),        # 3. slots in the idle bank
    ("update", "services", 1),        # 4. the master (the second services write)
    ("delete", "services", 0),        # 5. the old bank
    ("delete", "backends", 0),        # 5. dropped backends
]


@pytest.mark.parametrize("op,name,skip", STEPS)
@pytest.mark.parametrize("after", [0, 1])
def test_a_failure_at_any_step_keeps_a_whole_set_serving_and_the_next_round_converges(
        op, name, skip, after):
    rec, maps, clock = make()
    old = ["10.0.0.1", "10.0.0.2"]
    new = ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    rec.apply([svc("web", "10.96.0.1", old)])
    # A removed service makes id reuse (and so the stats deletes) happen on the change.
    rec.apply([svc("web", "10.96.0.1", old), svc("gone", "10.96.0.2", ["10.0.0.9"])])
    rec.apply([svc("web", "10.96.0.1", old)])
    clock.now += ID_QUARANTINE + 1
    maps.fail(op, name, after=after, skip=skip, err=errno.ENOMEM)
    rec.set_service(*_wants(svc("web", "10.96.0.1", new)))
    rec.set_service(*_wants(svc("next", "10.96.0.3", ["10.0.0.5"])))  # reuses gone's ids
    rec.reconcile()
    assert maps.faults[0].times == 0, "the fault never fired"
    assert serving(maps, fk("10.96.0.1")) in (old, new)  # a whole set, never a mix
    st = rec.status[fk("10.96.0.1")]
    if serving(maps, fk("10.96.0.1")) == old:
        assert st.state == ERROR and st.retries == 1 and "keeps serving" in st.error
    maps.faults.clear()
    clock.now += 60
    rec.reconcile()
    rec.reconcile()  # garbage from a failed cleanup step goes in the round after
    assert serving(maps, fk("10.96.0.1")) == new
    assert serving(maps, fk("10.96.0.3")) == ["10.0.0.5"]
    assert rec.status[fk("10.96.0.1")].state == DONE
    assert_no_leaks(rec, maps)


def test_a_failed_frontend_is_retried_with_backoff_and_stays_visible_until_it_succeeds():
    rec, maps, clock = make()
    maps.fail("update", "backends", times=3)
    rec.set_service(*_wants(svc("web", "10.96.0.1", ["10.0.0.1"])))
    rec.reconcile()
    first = rec.status[fk("10.96.0.1")]
    assert first.state == ERROR and first.retries == 1 and first.next_attempt > clock.now
    rec.reconcile()  # not due yet: no attempt
    assert rec.status[fk("10.96.0.1")].retries == 1
    delays = []
    for _ in range(2):
        clock.now = rec.next_attempt()
        rec.reconcile()
        st = rec.status[fk("10.96.0.1")]
        delays.append(st.next_attempt - clock.now)
    assert st.retries == 3 and delays[1] > delays[0]  # backing off
    clock.now = rec.next_attempt()
    rec.reconcile()
    assert rec.status[fk("10.96.0.1")].state == DONE
    assert serving(maps, fk("10.96.0.1")) == ["10.0.0.1"]
    assert_no_leaks(rec, maps)


def test_ids_are_released_only_after_the_kernel_delete_succeeded():
    rec, maps, clock = make()
    rec.apply([svc("web", "10.96.0.1", ["10.0.0.1"])])
    held = set(rec.svc_ids.used)
    maps.fail("delete", "services")
    rec.remove_service(("default", "web"))
    rec.reconcile()
    assert fk("10.96.0.1") in rec.programmed and rec.svc_ids.used == held
    assert rec.status[fk("10.96.0.1")].state == ERROR
    assert serving(maps, fk("10.96.0.1")) == ["10.0.0.1"]
    clock.now += 60
    rec.reconcile()
    assert fk("10.96.0.1") not in rec.programmed and fk("10.96.0.1") not in rec.status
    assert serving(maps, fk("10.96.0.1")) is None
    assert_no_leaks(rec, maps)


def test_freed_ids_are_reused_oldest_first_and_only_after_a_quarantine():
    clock = Clock()
    pool = IdPool(100, "frontend", quarantine=10, clock=clock)
    a, b, _ = pool.allocate(), pool.allocate(), pool.allocate()
    pool.release(b)
    clock.now += 1
    pool.release(a)
    assert pool.allocate() == 4  # both still in quarantine: a fresh id
    clock.now += 10
    assert pool.allocate() == b and pool.allocate() == a  # oldest freed first
    assert pool.take_reused() == {a, b}


def test_a_full_id_space_reuses_a_quarantined_id_rather_than_fail():
    clock = Clock()
    pool = IdPool(2, "frontend", quarantine=10, clock=clock)
    a, _ = pool.allocate(), pool.allocate()
    pool.release(a)
    assert pool.allocate() == a
    with pytest.raises(Exception, match="no free frontend id"):
        pool.allocate()


def test_a_round_of_a_few_frontends_logs_at_debug_a_sync_or_a_failure_at_info(caplog):
    rec, maps, _ = make()
    many = [svc(f"s{i}", f"10.96.4.{i}", ["10.0.0.1"]) for i in range(1, 21)]
    with caplog.at_level(logging.DEBUG, logger="nodemesh.reconciler"):
        rec.apply(many)  # 20 frontends: a sync's worth
        rec.apply(many[:-1] + [svc("s20", "10.96.4.20", ["10.0.0.2"])])  # one changed
        maps.fail("update", "backends")
        rec.apply(many[:-1] + [svc("s20", "10.96.4.20", ["10.0.0.3"])])  # one failed
    summaries = [(r.levelno, r.getMessage()) for r in caplog.records
                 if r.getMessage().startswith("reconciled:")]
    assert [level for level, _ in summaries] == [logging.INFO, logging.DEBUG, logging.INFO]
    assert "20 frontends added" in summaries[0][1] and "1 changed" in summaries[1][1]
    assert "1 failed" in summaries[2][1]


def test_after_an_overflow_a_good_config_programs_at_once_with_one_summary_log_line(caplog):
    sizes = m.MapSizes(frontends=4)  # 3 frontend ids
    rec, maps, clock = make(sizes)
    too_many = [svc(f"s{i}", f"10.96.2.{i}", ["10.0.0.1"]) for i in range(1, 8)]
    with caplog.at_level(logging.ERROR, logger="nodemesh.reconciler"):
        r = rec.apply(too_many)
    assert r.added == 3 and r.failed == 4
    errors = [rec_ for rec_ in caplog.records if rec_.levelno == logging.ERROR]
    assert len(errors) == 1 and "4 frontends not programmed" in errors[0].getMessage()
    # Back to a config that fits, with other services: the removed ones are deleted first,
    # so their ids serve the new ones in the same round (no "no free frontend id").
    good = [svc(f"t{i}", f"10.96.3.{i}", ["10.0.0.1"]) for i in range(1, 4)]
    r = rec.apply(good)
    assert r.failed == 0 and r.added == 3 and r.removed == 3
    assert all(serving(maps, fk(f"10.96.3.{i}")) == ["10.0.0.1"] for i in range(1, 4))
    assert_no_leaks(rec, maps)


def test_prune_rewrites_a_drifted_frontend_and_deletes_what_nobody_wants():
    rec, maps, _ = make()
    rec.apply([svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2"])])
    # someone else's frontend, and a master of ours flipped to an empty bank
    stranger = fk("10.96.9.9")
    maps.update_packed("services", [stranger.map_key(0)], [m.pack_master_value(77, 0, 0, 0, 1)])
    p = rec.programmed[fk("10.96.0.1")]
    maps.update_packed("services", [fk("10.96.0.1").map_key(0)],
                       [m.pack_master_value(p.svc_id, 2, 1 - p.bank, 0, 9)])
    found = rec.prune()
    assert any("nobody wants" in f for f in found) and any("10.96.0.1" in f for f in found)
    assert serving(maps, stranger) is None
    rec.reconcile()
    assert serving(maps, fk("10.96.0.1")) == ["10.0.0.1", "10.0.0.2"]
    assert_no_leaks(rec, maps)


def test_a_restarted_agent_adopts_the_maps_and_writes_nothing_that_is_already_right():
    rec, maps, _ = make()
    services = [svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2"]),
                svc("db", "10.96.0.2", ["10.0.0.3"])]
    rec.apply(services)
    ids = {k: p.svc_id for k, p in rec.programmed.items()}
    again = Reconciler(maps, clock=Clock())
    assert again.adopt() == 2
    before = maps.writes()
    r = again.apply(services)
    assert maps.writes() == before and r.unchanged == 2
    assert {k: p.svc_id for k, p in again.programmed.items()} == ids
    # and what the new config no longer wants is deleted
    again.apply(services[:1])
    assert serving(maps, fk("10.96.0.2")) is None
    assert_no_leaks(again, maps)


def test_a_frontend_claimed_by_two_services_stays_with_the_first():
    rec, maps, _ = make()
    rec.set_service(*_wants(svc("a", "10.96.0.1", ["10.0.0.1"])))
    conflicts = rec.set_service(*_wants(svc("b", "10.96.0.1", ["10.0.0.2"])))
    assert conflicts and "default/a" in conflicts[0]
    rec.reconcile()
    assert serving(maps, fk("10.96.0.1")) == ["10.0.0.1"]


def test_removing_the_last_frontend_of_a_backend_reports_it_for_socket_termination():
    rec, maps, _ = make()
    rec.apply([svc("a", "10.96.0.1", ["10.0.0.1", "10.0.0.2"]),
               svc("b", "10.96.0.2", ["10.0.0.2"])])
    r = rec.apply([svc("a", "10.96.0.1", ["10.0.0.1"]), svc("b", "10.96.0.2", ["10.0.0.2"])])
    assert r.removed_endpoints == []  # 10.0.0.2 still serves b
    r = rec.apply([svc("a", "10.96.0.1", ["10.0.0.1"])])
    assert r.removed_endpoints == [("10.0.0.2", 8080, "TCP", False)]


def test_endpoints_sharing_an_address_are_reported_apart_by_port_and_protocol():
    # one backend address behind three endpoints: 8080/TCP twice, 8081/TCP, 8080/UDP
    def ported(name, vip, target, protocol="TCP"):
        return Service(name=name, namespace="default", vip=vip,
                       ports=(ServicePort(port=80, target_port=target, protocol=protocol),),
                       backends=(Backend(address="10.0.0.9"),))

    rec, _, _ = make()
    everything = [ported("a", "10.96.0.1", 8080), ported("b", "10.96.0.2", 8081),
                  ported("c", "10.96.0.3", 8080, "UDP"), ported("d", "10.96.0.4", 8080)]
    rec.apply(everything)
    assert rec.apply(everything[1:]).removed_endpoints == []  # d still uses 8080/TCP
    assert rec.apply(everything[2:]).removed_endpoints == [("10.0.0.9", 8081, "TCP", False)]
    assert rec.apply(everything[3:]).removed_endpoints == [("10.0.0.9", 8080, "UDP", False)]
    assert rec.apply(everything[1:]).removed_endpoints == []  # b and c back, d stays
    assert sorted(rec.apply([]).removed_endpoints) == [
        ("10.0.0.9", 8080, "TCP", False), ("10.0.0.9", 8080, "UDP", False),
        ("10.0.0.9", 8081, "TCP", False)]
    assert rec._endpoint_refs == {}


def test_state_objects_built_by_the_fast_constructor_stay_frozen_with_their_defaults():
    import dataclasses

    from nodemesh.reconciler import DesiredFrontend, ProgrammedFrontend
    from nodemesh.snapshot import FrontendView

    key = FrontendKey(4, "10.96.0.1", 80, "TCP")
    assert key == FrontendKey(4, "10.96.0.1", 80, "TCP")
    assert hash(key) == hash(FrontendKey(4, "10.96.0.1", 80, "TCP"))
    assert key._replace(port=81) == FrontendKey(4, "10.96.0.1", 81, "TCP")
    assert str(key) == "10.96.0.1:80/TCP" and key < FrontendKey(4, "10.96.0.1", 81, "TCP")
    d = DesiredFrontend(key, "ns", "web", "http", "random", (("10.0.0.1", 8080, 1),), "ready", 1)
    assert d.flat_backends == ("10.0.0.1", 8080, 1)  # __post_init__ still flattens
    assert (d.affinity_timeout, d.limits, d.proxy_port, d.flags) == (0, (0, 0), None, 0)
    p = ProgrammedFrontend(key, 1, 0, "random", 1, (5,), {("10.0.0.1", 8080): 5})
    assert (p.count, p.slot_count, p.desired, p.damaged) == (-1, 1, None, False)
    view = FrontendView(key, d, p, Reconciler(FakeMaps()).status.get(key, "none"))
    for obj, name in ((d, "service"), (p, "svc_id"), (view, "status")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, 1)
    with pytest.raises(AttributeError):  # a tuple: its fields cannot be set either
        key.port = 1  # type: ignore[misc]


def test_ids_taken_many_at_once_are_all_or_none_and_reuse_like_one_at_a_time():
    now = [0.0]
    pool = IdPool(5, "backend", quarantine=10, clock=lambda: now[0])
    assert pool.allocate_many(3) == [1, 2, 3]
    with pytest.raises(CapacityError):
        pool.allocate_many(3)  # two left
    assert len(pool) == 3
    pool.release(2)
    pool.release(1)
    now[0] = 11.0
    # As allocate() hands them out: first the ids the failed call gave back (nothing ever
    # pointed at them), then the freed ones oldest-freed-first once quarantined.
    assert pool.allocate_many(3) == [4, 5, 2]
    assert pool.allocate_many(1) == [1]
    assert len(pool) == 5


def test_a_large_round_writes_chunk_by_chunk_each_in_the_atomic_order(monkeypatch):
    # A first sync packs a chunk's writes at a time (the peak), each chunk still backends,
    # then slots, then masters; a failed chunk leaves the others programmed.
    import nodemesh.reconciler as r

    monkeypatch.setattr(r, "WRITE_CHUNK", 4)
    rec, maps, _ = make()
    maps.fail("update", "backends", skip=1)  # the second chunk's backends
    result = rec.apply([svc(f"s{i}", f"10.96.0.{i}", [f"10.0.0.{i}", f"10.0.1.{i}"])
                        for i in range(1, 11)])
    writes = [(name, n) for op, name, n in maps.calls if op == "update"]
    assert writes == [("backends", 8), ("services", 8), ("services", 4),   # chunk 1
                      ("backends", 8),                                     # chunk 2 fails
                      ("backends", 4), ("services", 4), ("services", 2)]   # chunk 3
    assert (result.added, result.failed) == (6, 4)
    assert_no_leaks(rec, maps)
    assert rec.reconcile(force=True).added == 4  # the failed chunk, retried
    assert_no_leaks(rec, maps)


def _plain_services():
    """Frontends the bulk path takes: three backends, none, IPv6, affinity, two ports."""
    from nodemesh.model import SessionAffinity
    out = [svc(f"plain-{i}", f"10.96.1.{i}", [f"10.1.{i}.{j}" for j in range(1, 4)])
           for i in range(1, 20)]
    out.append(svc("empty", "10.96.2.3", []))
    out.append(svc("six", "fd00:96::3", ["fd00::7", "fd00::8"]))
    out.append(Service(name="sticky", namespace="default", vip="10.96.2.4",
                       ports=(ServicePort(name="a", port=80, target_port=8080),
                              ServicePort(name="b", port=443, target_port=8443)),
                       backends=(Backend(address="10.2.2.1"),),
                       session_affinity=SessionAffinity(timeout_seconds=60)))
    return out


def _first_round(services, bulk, monkeypatch):
    from nodemesh import reconciler as r

    monkeypatch.setattr(r, "_is_plain", r._is_plain if bulk else lambda d: False)
    rec, maps, _ = make()
    result = rec.apply(services)
    assert result.failed == 0 and result.added == len(rec.programmed)
    assert_no_leaks(rec, maps)
    return rec, maps, result


def test_new_plain_frontends_are_written_as_the_general_path_writes_them(monkeypatch):
    """The first sync's bulk path (_add_fresh) against _plan/_write for the same services:
    the same ids, map entries (byte for byte), programmed state and round counts."""
    got = []
    for bulk in (True, False):
        rec, maps, result = _first_round(_plain_services(), bulk, monkeypatch)
        assert len(rec.programmed) == 23
        got.append((maps.data, {k: (p.svc_id, p.slots, dict(p.backend_ids.items()), p.bank,
                                    p.revision, p.slot_count, p.affinity_timeout, p.desired)
                                for k, p in rec.programmed.items()},
                    result.writes, dict(rec._endpoint_refs)))
    assert got[0] == got[1]


def test_a_first_round_mixing_plain_and_other_frontends_serves_the_same_sets(monkeypatch):
    weighted = Service(name="weighted", namespace="default", vip="10.96.2.1",
                       ports=(ServicePort(port=80, target_port=8080),),
                       backends=(Backend(address="10.2.0.1", weight=3),
                                 Backend(address="10.2.0.2")))
    twice = Service(name="twice", namespace="default", vip="10.96.2.2",
                    ports=(ServicePort(port=80, target_port=8080),),
                    backends=(Backend(address="10.2.1.1"), Backend(address="10.2.1.1")))
    services = _plain_services() + [weighted, twice]
    got = []
    for bulk in (True, False):
        rec, maps, result = _first_round(services, bulk, monkeypatch)
        assert len(rec.programmed) == 25
        got.append(({k: sorted(maps.serving(k)) for k in rec.programmed}, result.writes))
    assert got[0] == got[1]
    assert sorted(got[0][0][fk("10.96.2.1")]).count(("10.2.0.1", 8080)) == 3  # its weight


def test_new_plain_frontends_share_one_packed_id_string_for_slots_and_backends():
    # Equal weights: slot i is backend i, so the two u32 strings are the same bytes; one
    # object saves ~40 bytes a frontend (4 MiB at 100,000).
    rec, _, _ = make()
    rec.apply([svc("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])])
    p = rec.programmed[fk("10.96.0.1")]
    assert p.packed_slots is p.ids and p.slots == (1, 2, 3)


def test_a_failed_master_write_in_the_bulk_path_undoes_only_the_frontends_not_written():
    rec, maps, clock = make()
    services = [svc(f"s{i}", f"10.96.3.{i}", [f"10.3.{i}.1", f"10.3.{i}.2"])
                for i in range(1, 6)]
    maps.fail("update", "services", after=2, skip=1)  # the slots go in, masters 3-5 fail
    result = rec.apply(services)
    assert (result.added, result.failed) == (2, 3)
    keys = [fk(f"10.96.3.{i}") for i in range(1, 6)]
    written = [k for k in keys if rec.status[k].state == DONE]
    assert len(written) == 2 and all(rec.status[k].state == ERROR for k in keys
                                     if k not in written)
    for k in keys:  # the two written serve; the others have nothing left in the maps
        assert serving(maps, k) == (sorted(rec.desired[k].backends[i][0] for i in (0, 1))
                                    if k in written else None)
    assert_no_leaks(rec, maps)
    clock.now += 60
    result = rec.reconcile()
    assert (result.added, result.failed) == (3, 0)
    assert_no_leaks(rec, maps)


def test_an_id_range_taken_at_once_sets_the_same_bits_as_one_at_a_time():
    from nodemesh.reconciler import IdSet

    for start, stop in ((1, 2), (1, 8), (3, 21), (8, 16), (5, 200), (9, 9)):
        one, many = IdSet(256), IdSet(256)
        one.add(250)
        many.add(250)
        for i in range(start, stop):
            one.add(i)
        many.add_range(start, stop)
        assert set(many) == set(one) and len(many) == len(one), (start, stop)
