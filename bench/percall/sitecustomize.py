"""Per-call thread CPU of the agent's change path, for bench/controlplane.py runs.

    mkdir /tmp/pc; NODEMESH_BENCH_PERCALL=/tmp/pc PYTHONPATH=bench/percall:<copy>/agent \
        .venv/bin/python bench/controlplane.py --sizes 100000 --sources kubernetes \
        --changes 100 --idle-seconds 10 --scrapes 1
    .venv/bin/python bench/percall_report.py /tmp/pc/percall-<agent pid>.txt [OTHER]

Python imports this file at start-up (sitecustomize) in every process with bench/percall on
PYTHONPATH; with NODEMESH_BENCH_PERCALL set it wraps the functions below, records each call's
time.thread_time_ns (inclusive) and the cyclic collector's passes, and writes them to
DIR/percall-PID.txt at exit. py-spy (--profile) sees too few of a change's samples to say
where its ~1.5 ms goes (it took 6 of 146 samples of the core as running); this does, at
~1-2 us of overhead a wrapped call, so the run's own CPU figures are not a plain run's.
A function some agent copy lacks is reported and skipped.
"""
import os
import sys

# (module, function or Class.method): the change path, core and source threads
FUNCTIONS = [
    ("nodemesh.core", "Core.step"), ("nodemesh.core", "Core._fold"),
    ("nodemesh.core", "Core.reconcile"), ("nodemesh.core", "Core._push_dirty"),
    ("nodemesh.core", "Core._publish"), ("nodemesh.core", "Core.selection_context"),
    ("nodemesh.core", "Core._quiet_round_has_work"), ("nodemesh.core", "Core._apply_mesh"),
    ("nodemesh.core", "replace"),
    ("nodemesh.reconciler", "Reconciler.reconcile"),
    ("nodemesh.reconciler", "Reconciler.set_service"),
    ("nodemesh.reconciler", "Reconciler._plan"), ("nodemesh.reconciler", "Reconciler._write"),
    ("nodemesh.reconciler", "Reconciler._delete_old_banks"),
    ("nodemesh.reconciler", "Reconciler.next_attempt"),
    ("nodemesh.reconciler", "Reconciler._log"), ("nodemesh.reconciler", "Reconciler._refer"),
    ("nodemesh.reconciler", "Reconciler._sync_endpoint_health"),
    ("nodemesh.reconciler", "Reconciler._collect_garbage"),
    ("nodemesh.reconciler", "Reconciler._commit"),
    ("nodemesh.reconciler", "Reconciler._delete_unreferenced"),
    ("nodemesh.reconciler", "service_frontends"),
    ("nodemesh.datapath.maps", "Maps.update_joined"),
    ("nodemesh.datapath.maps", "Maps.delete_batch"),
    ("nodemesh.datapath.bpfsys", "map_update_batch"),
    ("nodemesh.datapath.bpfsys", "map_delete_batch"),
    ("nodemesh.datapath.bpfsys", "map_update_packed"),
    ("nodemesh.datapath.bpfsys", "map_delete_packed"),
    ("logging", "StreamHandler.emit"),
    ("nodemesh.snapshot", "Snapshot.with_frontends"), ("nodemesh.snapshot", "Shards.updated"),
    ("nodemesh.snapshot", "IdIndex.updated"),
    ("nodemesh.daemon", "Agent.desired"), ("nodemesh.daemon", "Agent._after_round"),
    ("nodemesh.outlier", "OutlierDetector.expire"),
    ("nodemesh.datapath.loader", "Datapath.check_and_repair"),
    ("nodemesh.sources.kubernetes", "_Watcher._handle"),
    ("nodemesh.sources.kubernetes", "_ClusterState.put"),
    ("nodemesh.sources.kubernetes", "_ClusterState.take_delta"),
    ("nodemesh.sources.kubernetes", "KubernetesSource._deliver"),
    ("nodemesh.sources.kubernetes", "KubernetesSource._watch_changed"),
]


def _install(out: str) -> None:
    import atexit
    import functools
    import gc
    import importlib
    import signal
    import threading
    import time

    records = []
    clock, now = time.thread_time_ns, time.monotonic

    def wrap(module: str, qualname: str) -> None:
        mod = importlib.import_module(module)
        owner_name, _, attr = qualname.rpartition(".")
        owner = getattr(mod, owner_name) if owner_name else mod
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a, **k):
            t0 = clock()
            r = fn(*a, **k)
            records.append((now(), qualname, clock() - t0, threading.get_ident(),
                            getattr(r, "changed", "")))
            return r
        static = isinstance(getattr(owner, "__dict__", {}).get(attr), staticmethod)
        setattr(owner, attr, staticmethod(timed) if static else timed)

    for module, qualname in FUNCTIONS:
        try:
            wrap(module, qualname)
        except Exception as e:  # noqa: BLE001 - another copy of the agent may lack it
            print("percall: cannot wrap", module, qualname, e, file=sys.stderr)
    import nodemesh.core
    import nodemesh.reconciler
    nodemesh.core.service_frontends = nodemesh.reconciler.service_frontends  # imported by name
    started = {}

    def collector(phase, info):
        if phase == "start":
            started[threading.get_ident()] = clock()
        else:
            t0 = started.pop(threading.get_ident(), None)
            if t0 is not None:
                records.append((now(), "gc%d" % info["generation"], clock() - t0,
                                threading.get_ident(), ""))
    gc.callbacks.append(collector)

    def dump(*_):
        main = threading.main_thread().ident
        with open(os.path.join(out, "percall-%d.txt" % os.getpid()), "w") as f:
            for t, name, ns, thread, extra in records:
                f.write(f"{t:.6f} {name} {ns} {'main' if thread == main else thread} {extra}\n")
    atexit.register(dump)
    signal.signal(signal.SIGUSR2, dump)


if os.environ.get("NODEMESH_BENCH_PERCALL"):
    _install(os.environ["NODEMESH_BENCH_PERCALL"])
