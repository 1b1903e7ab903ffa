"""The core loop without root: deltas and verdicts reach only the services they name, readers
hold snapshots that never change under them, and crashing workers are restarted."""
import gc
import queue
import threading
from dataclasses import replace

from fakemaps import FakeMaps
from prometheus_client import CollectorRegistry

from nodemesh.core import BackendsChanged, Core, SourceChanged, SourceFailed, Supervisor
from nodemesh.health import HealthChecker
from nodemesh.model import Backend, OutlierDetection, Service, ServicePort
from nodemesh.outlier import OutlierDetector
from nodemesh.reconciler import FrontendKey, Reconciler
from nodemesh.snapshot import SourceState
from nodemesh.sources import Delta


def svc(i, *addresses):
    return Service(name=f"s{i}", namespace="default", vip=f"10.96.0.{i}",
                   ports=(ServicePort(port=80, target_port=8080),),
                   backends=tuple(Backend(address=a) for a in addresses))


def fk(i):
    return FrontendKey(4, f"10.96.0.{i}", 80, "TCP")


class CountingReconciler(Reconciler):
    def __init__(self, maps):
        super().__init__(maps)
        self.set_calls = []

    def set_service(self, key, frontends, watched=frozenset()):
        self.set_calls.append(key)
        return super().set_service(key, frontends, watched)


def make():
    maps = FakeMaps()
    rec = CountingReconciler(maps)
    registry = CollectorRegistry()
    core = Core(rec, HealthChecker(registry, lambda key: None),
                OutlierDetector(registry, lambda services: None), SourceState("file"))
    return core, rec, maps


def synced(core, services):
    core.post(SourceChanged(Delta(upserts=tuple(services), full=True)))
    core.step(0)


def test_nothing_is_programmed_before_the_first_full_set():
    core, rec, maps = make()
    core.post(SourceChanged(Delta(upserts=(svc(1, "10.0.0.1"),))))
    assert core.step(0) is None and not core.synced and maps.count("services") == 0


def test_what_a_source_sent_before_the_core_existed_is_its_first_round():
    # The agent starts its source while the datapath loads, before the core exists: the
    # deltas wait in the queue the core is then given, and nothing is lost.
    events = queue.SimpleQueue()
    events.put(SourceChanged(Delta(upserts=(svc(1, "10.0.0.1"), svc(2, "10.0.0.2")),
                                   full=True)))
    events.put(SourceChanged(Delta(upserts=(svc(2, "10.0.0.3"),))))
    maps = FakeMaps()
    registry = CollectorRegistry()
    core = Core(Reconciler(maps), HealthChecker(registry, lambda key: None),
                OutlierDetector(registry, lambda services: None), SourceState("kubernetes"),
                events=events)
    result = core.step(0)
    assert core.synced and result.added == 2
    assert core.services[("default", "s2")].backends[0].address == "10.0.0.3"


def test_the_first_sync_collects_cycles_rarely_and_then_as_before():
    from nodemesh.daemon import SYNC_GC_THRESHOLDS, _collect_less_while_syncing

    before = gc.get_threshold()
    try:
        restore = _collect_less_while_syncing()
        assert gc.get_threshold() == SYNC_GC_THRESHOLDS and SYNC_GC_THRESHOLDS[0] >= 100_000
        assert restore == before
    finally:
        gc.set_threshold(*before)


def restarted(maps):
    """A new agent's core on the maps a previous one programmed (adopted)."""
    rec = CountingReconciler(maps)
    rec.adopt()
    registry = CollectorRegistry()
    core = Core(rec, HealthChecker(registry, lambda key: None),
                OutlierDetector(registry, lambda services: None), SourceState("kubernetes"))
    return core, rec


def listed(core, *services, deletes=()):
    """A page of the first sync (a partial delta), programmed as the agent does."""
    core.post(SourceChanged(Delta(upserts=services, deletes=deletes, partial=True)))
    core.step(0, reconcile=False)
    return core.reconcile_listed()


def test_after_a_restart_the_first_sync_is_programmed_page_by_page_and_deletes_nothing_early():
    # Services not listed yet keep serving what the previous agent programmed: only the full
    # set, after the last page, can say what nobody wants any more.
    watched = replace(svc(6, "10.0.0.6"), outlier_detection=OutlierDetection())
    core, _, maps = make()
    synced(core, [svc(i, f"10.0.0.{i}") for i in range(1, 6)] + [watched])
    assert maps.count("endpoint_health") == 1
    core, rec = restarted(maps)
    before, mark = maps.writes(), len(maps.calls)
    first = listed(core, svc(1, "10.0.0.1"), svc(2, "10.0.0.9"), svc(7, "10.0.0.7"))
    assert not core.synced and first.added == 1 and first.changed == 1 and first.removed == 0
    assert maps.serving(fk(2)) == [("10.0.0.9", 8080)] and maps.serving(fk(7))
    for i in (3, 4, 5, 6):  # adopted, not listed yet: untouched
        assert maps.serving(fk(i)) == [(f"10.0.0.{i}", 8080)]
    assert maps.count("endpoint_health") == 1
    # A service deleted while the list runs (a relist after 410) is not deleted yet either.
    assert listed(core, svc(3, "10.0.0.3"), deletes=(("default", "s2"),)).removed == 0
    assert maps.serving(fk(2)) == [("10.0.0.9", 8080)]
    # Nothing deleted but the old bank of the frontend that changed (its update order).
    deleted = [(name, n) for op, name, n in maps.calls[mark:] if op == "delete"]
    assert deleted == [("services", 1), ("backends", 1), ("backend_stats", 1)], deleted
    # The full set: now what nobody named goes (s2, s4, s5, s6 and s6's endpoint entry).
    core.post(SourceChanged(Delta(upserts=(svc(1, "10.0.0.1"), svc(3, "10.0.0.3"),
                                           svc(7, "10.0.0.7")), full=True)))
    core.step(0, reconcile=False)
    assert core.synced
    result = core.reconcile(force=True)
    assert result.removed == 4 and result.added == 0 and result.changed == 0
    assert [i for i in range(1, 8) if maps.serving(fk(i))] == [1, 3, 7]
    assert maps.count("endpoint_health") == 0
    assert maps.writes() > before
    assert not rec.pending and len(core.snapshot.frontends) == 3


def test_after_a_restart_with_nothing_changed_the_pages_and_the_full_set_write_nothing():
    services = [svc(i, f"10.0.0.{i}") for i in range(1, 7)]
    core, _, maps = make()
    synced(core, services)
    core, rec = restarted(maps)
    before = maps.writes()
    assert listed(core, *services[:3]).unchanged == 3
    assert listed(core, *services[3:]).unchanged == 3
    core.post(SourceChanged(Delta(upserts=tuple(services), full=True)))
    core.step(0, reconcile=False)
    result = core.reconcile(force=True)
    assert maps.writes() == before and result.writes == 0 and not rec.pending
    assert core.snapshot.source.loads == 1  # the pages are parts of one load
    assert len(core.snapshot.frontends) == 6


def test_a_delta_touches_only_the_services_it_names():
    core, rec, maps = make()
    synced(core, [svc(i, "10.0.0.1") for i in range(1, 51)])
    rec.set_calls.clear()
    before = maps.writes()
    core.post(SourceChanged(Delta(upserts=(svc(7, "10.0.0.2"),), deletes=(("default", "s9"),))))
    result = core.step(0)
    assert sorted(rec.set_calls) == [("default", "s7"), ("default", "s9")]
    assert result.changed == 1 and result.removed == 1
    assert maps.serving(fk(7)) == [("10.0.0.2", 8080)] and maps.serving(fk(9)) is None
    assert maps.writes() - before < 12
    # a quiet round looks at nothing and writes nothing
    rec.set_calls.clear()
    before = maps.writes()
    core.step(0)
    assert rec.set_calls == [] and maps.writes() == before


def test_a_wake_with_nothing_to_do_runs_no_round_and_publishes_no_snapshot():
    core, _, _ = make()
    rounds = []
    core.on_round = rounds.append
    synced(core, [svc(1, "10.0.0.1")])
    rounds.clear()
    taken = core.snapshot
    assert core.step(0) is None  # the loop's periodic wake, with no event
    assert rounds == [] and core.snapshot is taken


def test_a_wake_with_no_event_still_retries_a_failed_write_when_it_is_due():
    core, rec, maps = make()
    synced(core, [svc(1, "10.0.0.1")])
    maps.fail("update", "backends")
    core.post(SourceChanged(Delta(upserts=(svc(1, "10.0.0.2"),))))
    core.step(0)
    assert fk(1) in rec.pending and maps.serving(fk(1)) == [("10.0.0.1", 8080)]
    now = rec.clock()
    rec.clock = lambda: now + 60  # due now: the periodic wake is the retry's round
    result = core.step(0)
    assert result is not None and not rec.pending
    assert maps.serving(fk(1)) == [("10.0.0.2", 8080)]


def test_an_unchanged_service_in_a_delta_is_not_handed_on():
    core, rec, _ = make()
    synced(core, [svc(1, "10.0.0.1"), svc(2, "10.0.0.1")])
    rec.set_calls.clear()
    core.post(SourceChanged(Delta(upserts=(svc(1, "10.0.0.1"),))))
    core.step(0)
    assert rec.set_calls == []


def test_a_health_verdict_recomputes_only_the_services_that_hold_the_backend():
    core, rec, _ = make()
    synced(core, [svc(i, "10.0.0.1", "10.0.0.2") for i in range(1, 21)])
    rec.set_calls.clear()
    core.post(BackendsChanged(frozenset({("default", "s3"), ("default", "gone")})))
    core.step(0)
    assert rec.set_calls == [("default", "s3")]


def test_a_reader_keeps_the_snapshot_it_took_while_the_loop_moves_on():
    core, _, _ = make()
    synced(core, [svc(1, "10.0.0.1")])
    taken = core.snapshot
    view = taken.frontends.get(fk(1))
    core.post(SourceChanged(Delta(upserts=(svc(1, "10.0.0.2"), svc(2, "10.0.0.3")))))
    core.step(0)
    # views are built at each read (snapshot.FrontendViews): the same view, not the same object
    assert taken.frontends.get(fk(1)) == view and taken.frontends.get(fk(2)) is None
    assert len(taken.services) == 1 and len(core.snapshot.services) == 2
    assert core.snapshot.frontends.get(fk(1)).desired.backends == (("10.0.0.2", 8080, 1),)
    assert core.snapshot.generation > taken.generation


def test_the_svc_id_index_follows_every_round_and_a_released_id_names_nobody():
    core, _, _ = make()
    synced(core, [svc(1, "10.0.0.1"), svc(2, "10.0.0.2"), svc(3, "10.0.0.3")])

    def named():
        out = {}
        for i in (1, 2, 3):
            view = core.snapshot.frontends.get(fk(i))
            if view is not None and view.programmed is not None:
                out[view.programmed.svc_id] = core.snapshot.by_svc_id.get(view.programmed.svc_id)
        return out

    ids = {i: core.snapshot.frontends.get(fk(i)).programmed.svc_id for i in (1, 2, 3)}
    assert {sid: v.desired.service for sid, v in named().items()} == \
        {ids[1]: "s1", ids[2]: "s2", ids[3]: "s3"}
    taken = core.snapshot
    core.post(SourceChanged(Delta(upserts=(svc(1, "10.0.0.9"),), deletes=(("default", "s2"),))))
    core.step(0)
    snap = core.snapshot
    assert snap.by_svc_id.get(ids[2]) is None and len(snap.by_svc_id) == 2
    assert snap.by_svc_id.get(ids[1]) == snap.frontends.get(fk(1))  # the new view, same id
    assert snap.by_svc_id.get(ids[1]).desired.backends == (("10.0.0.9", 8080, 1),)
    assert taken.by_svc_id.get(ids[2]).desired.service == "s2"  # a held snapshot keeps its own


def test_a_flow_is_named_by_one_lookup_not_by_a_walk_of_every_frontend():
    # At 100,000 frontends the reader's old name table took a walk of all of them whenever
    # an id was unknown and a round had been published (milliseconds of CPU per change).
    from dataclasses import replace

    from nodemesh.flows import ServiceNames
    from nodemesh.snapshot import Shards

    class NoWalk(Shards):
        def values(self):
            raise AssertionError("walked every frontend to name one flow")

    core, _, _ = make()
    synced(core, [svc(1, "10.0.0.1"), svc(2, "10.0.0.2")])
    s2 = core.snapshot.frontends.get(fk(2)).programmed.svc_id
    snap = core.snapshot
    snap = replace(snap, frontends=NoWalk(snap.frontends._shards, len(snap.frontends)))
    names = ServiceNames(lambda: snap)
    assert names(s2) == ("default", "s2")
    assert names(60000) == ("", "")  # an id nobody holds


def test_a_rejected_source_update_is_reported_and_changes_nothing():
    core, _, maps = make()
    synced(core, [svc(1, "10.0.0.1")])
    before = maps.writes()
    core.post(SourceFailed("web.yaml:3: services[0].vip: 'x' is not an IP address"))
    core.step(0)
    src = core.snapshot.source
    assert src.ok is False and src.failures == 1 and "services[0].vip" in src.error
    assert maps.writes() == before and maps.serving(fk(1)) == [("10.0.0.1", 8080)]


def test_a_crashing_worker_is_restarted_and_one_that_keeps_crashing_gives_up():
    stop = threading.Event()
    gave_up, counted = [], []
    runs = []

    def flaky():
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("bug")

    sup = Supervisor(stop, gave_up.append, counted.append)
    sup.spawn("flaky", flaky)
    sup.join(5)
    assert len(runs) == 3 and counted == ["flaky", "flaky"] and not gave_up

    def broken():
        raise RuntimeError("always")

    sup.spawn("broken", broken)
    sup.join(10)
    assert gave_up and "broken" in gave_up[0]
    stop.set()


def test_the_snapshot_keeps_the_last_rounds_counts_but_not_the_keys_it_touched():
    core, _, _ = make()
    synced(core, [svc(i, f"10.0.0.{i}") for i in range(1, 51)])
    last = core.snapshot.last_round
    assert (last.added, last.writes > 0) == (50, True)
    # the touched keys (every frontend after a first sync) are for the publish, not readers
    assert last.touched == set() and last.removed_endpoints == []


def test_health_checks_and_outlier_settings_follow_a_service_that_gains_and_loses_them():
    # The core calls the checker and the detector only for services that have (or had) them.
    from nodemesh.model import HealthCheck

    core, _, _ = make()
    plain = svc(1, "10.0.0.1")
    synced(core, [plain])
    core.reconcile()
    assert core.health.snapshot() == [] and not core.outlier._services
    checked = replace(plain, health_check=HealthCheck(),
                      outlier_detection=OutlierDetection(consecutive_failures=3))
    core.post(SourceChanged(Delta(upserts=(checked,))))
    core.step(0)
    assert len(core.health.snapshot()) == 1 and (plain.key in core.outlier._services)
    core.post(SourceChanged(Delta(upserts=(plain,))))
    core.step(0)
    assert core.health.snapshot() == [] and not core.outlier._services


class PublishCounting(Core):
    """Counts the snapshots the core makes readers see (each a Snapshot built)."""

    published = 0

    def __setattr__(self, name, value):
        if name == "snapshot":
            self.published += 1
        super().__setattr__(name, value)


def test_a_change_round_builds_one_snapshot_with_the_source_services_and_frontends():
    # A change used to build three Snapshots (the source's load, the services, the
    # frontends); readers see one, complete, and a round builds only that one.
    registry = CollectorRegistry()
    core = PublishCounting(Reconciler(FakeMaps()), HealthChecker(registry, lambda key: None),
                           OutlierDetector(registry, lambda services: None),
                           SourceState("file"))
    synced(core, [svc(1, "10.0.0.1"), svc(2, "10.0.0.2")])
    before, loads = core.published, core.snapshot.source.loads
    core.post(SourceChanged(Delta(upserts=(svc(1, "10.0.0.9"),))))
    assert core.step(0).changed == 1
    snap = core.snapshot
    assert core.published - before == 1
    assert snap.source.loads == loads + 1 and snap.source.ok
    assert snap.services.get(("default", "s1")).backends[0].address == "10.0.0.9"
    assert snap.frontends.get(fk(1)).programmed is not None
    # Before the first full set, or told not to reconcile, a step still publishes what it
    # folded in: the source's failure is seen at once.
    core.post(SourceFailed("bad"))
    core.step(0, reconcile=False)
    assert core.snapshot.source.ok is False and core.snapshot.services is snap.services


def test_the_selection_context_is_reused_while_nothing_is_taken_out():
    core, _, _ = make()
    first = core.selection_context()
    assert core.selection_context() is first and first.unhealthy == frozenset()
    core.outlier.state[("default", "s1", "10.0.0.1")] = type(
        "Ejected", (), {"until": 1.0})()
    taken = core.selection_context()
    assert taken.unhealthy == {("default", "s1", "10.0.0.1")}
    core.outlier.state.clear()
    assert core.selection_context() is first


def test_a_done_frontend_is_stored_as_its_programmed_state_and_read_as_its_view():
    # A FrontendView a frontend was 6 MiB at 100,000: the view of a done frontend is
    # (key, p.desired, p, done), so the snapshot keeps p and builds the view when read.
    from nodemesh.reconciler import DONE_STATUS, ERROR, ProgrammedFrontend
    from nodemesh.snapshot import FrontendView

    core, rec, maps = make()
    synced(core, [svc(1, "10.0.0.1"), svc(2, "10.0.0.2")])
    stored = [v for d in core.snapshot.frontends.dicts() for v in d.values()]
    assert len(stored) == 2 and all(type(v) is ProgrammedFrontend for v in stored)
    view = core.snapshot.frontends.get(fk(1))
    assert type(view) is FrontendView and view.status is DONE_STATUS
    assert view.programmed is rec.programmed[fk(1)] and view.desired is rec.desired[fk(1)]
    assert core.snapshot.by_svc_id.get(view.programmed.svc_id) == view
    assert sorted(v.key for v in core.snapshot.frontends.values()) == [fk(1), fk(2)]
    # a frontend whose change failed is not what its programmed state says: a view, with
    # the error, the old programmed state and the new desired one
    maps.fail("update", "backends")
    core.post(SourceChanged(Delta(upserts=(svc(1, "10.0.0.3"),))))
    core.step(0)
    failing = core.snapshot.frontends.get(fk(1))
    assert failing.status.state == ERROR and "injected" in failing.status.error
    assert failing.desired.backends == (("10.0.0.3", 8080, 1),)
    assert failing.programmed.desired.backends == (("10.0.0.1", 8080, 1),)
    assert core.snapshot.by_svc_id.get(failing.programmed.svc_id) == failing
    assert type(core.snapshot.frontends.get(fk(2))) is FrontendView


def test_a_full_set_after_partial_deltas_keeps_the_keys_and_drops_and_dirties_only_what_moved():
    # The first sync's full set after its partial deltas: the core's dict keeps the key
    # tuples it holds (new ones, the old freed, left a 64-byte hole each at 100,000
    # services), takes what changed, drops what the full set no longer names.
    core, rec, maps = make()
    core.post(SourceChanged(Delta(upserts=(svc(1, "10.0.0.1"), svc(2, "10.0.0.2"),
                                           svc(3, "10.0.0.3")), partial=True)))
    core.step(0, reconcile=False)
    core.reconcile_listed()  # programmed, nothing dirty
    entries = maps.count("services")  # three services' entries
    kept = svc(1, "10.0.0.1")
    same = core.services[("default", "s2")]
    keys_before = {k: k for k in core.services}
    core.post(SourceChanged(Delta(upserts=(kept, same, svc(4, "10.0.0.4")), full=True)))
    core.step(0, reconcile=False)
    assert set(core.services) == {("default", "s1"), ("default", "s2"), ("default", "s4")}
    assert core.services[("default", "s1")] is kept and core.services[("default", "s2")] is same
    assert all(k is keys_before[k] for k in core.services if k in keys_before)
    # s1 equal (not dirty), s2 the same object, s3 gone, s4 new.
    assert core._dirty == {("default", "s3"), ("default", "s4")}
    assert core.synced
    core.step(0)
    assert {s.name for s in core.snapshot.services.values()} == {"s1", "s2", "s4"}
    assert maps.count("services") == entries  # s3's gone, s4's in
