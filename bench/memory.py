#!/usr/bin/env python3
"""Where the agent's memory goes at N services from the Kubernetes source, without HTTP or
the kernel: the breakdown behind "RSS at 100,000 services".

    .venv/bin/python bench/memory.py 100000 [10000 ...] [--agent DIR] [--columns] [--append]

For each N, in a fresh child process: N Services + N EndpointSlices (bench/k8s_source.py's
objects, 3 endpoints each) are paged (500 a page) as tests/k8s_fake_apiserver.py serves them,
then fed through the agent's own code as bench/k8s_sync_cpu.py does: the source's cluster
state (the slices listed first, then the services streamed page by page, as the agent does
when it can), its first delta, the core's first round into an in-memory map (tests/fakemaps.py,
whose stored entries are dropped before measuring: the kernel holds them in the agent), the
snapshot the core publishes, and the full collection the agent does after its first sync.
The pages (the server's bytes) are freed before tracing starts. Measured:

  by owner   the deep size (sys.getsizeof over gc.get_referents, each object counted once,
             for the first owner in the table's order that reaches it) of each structure the
             agent keeps: the source's cache, the core's desired services, the reconciler's
             state, its id allocators, the readers' snapshot, the address-encoding cache;
             and, apart, the source's own: its cache less what the core's desired services
             reach (the Services and Backends both hold)
  by line    tracemalloc (1 frame) at ready, the top allocation sites, and by file
  process    RSS before the source (imports: Python, prometheus_client, the kubernetes
             client; no BCC, whose compiler runs in a child in the agent), RSS at ready, the
             traced total, peak RSS (VmHWM), and the RSS that glibc's malloc_trim(0) gives back

tracemalloc's own bookkeeping inflates RSS in this process; the RSS figures are taken in a
second child without tracemalloc. --agent DIR measures another checkout's agent/ (a
`git archive` of main, for a side-by-side). Results: markdown on stdout; --append adds a
dated section to bench/results/controlplane.md.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def allocator() -> Dict[str, int]:
    """Where the process's resident memory sits, beyond what tracemalloc sees: pymalloc's
    arenas (sys._debugmallocstats: allocated, and the bytes in blocks in use), glibc's heap
    (malloc_info: arenas, their system bytes, the free bytes in them, mmapped blocks) and
    /proc/self/smaps_rollup (anonymous against file-backed: the shared libraries)."""
    import re
    import tempfile

    out: Dict[str, int] = {}
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode()
    for key, pattern in (("pymalloc_arenas", r"# arenas allocated current\s+=\s+([\d,]+)"),
                         ("pymalloc_used", r"# bytes in allocated blocks\s+=\s+([\d,]+)")):
        found = re.search(pattern, text)
        if found:
            out[key] = int(found.group(1).replace(",", ""))
    if "pymalloc_arenas" in out:
        out["pymalloc_arenas"] *= 1 << 20  # 1 MiB an arena (Python 3.10+)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.open_memstream.restype = ctypes.c_void_p
        buf, size = ctypes.c_char_p(), ctypes.c_size_t()
        stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
        libc.malloc_info(0, ctypes.c_void_p(stream))
        libc.fclose(ctypes.c_void_p(stream))
        info = (buf.value or b"").decode()
        libc.free(buf)
    except (OSError, AttributeError):
        info = ""
    tail = info[info.rfind("</heap>"):]
    out["glibc_arenas"] = info.count("<heap nr=")
    for key, pattern in (("glibc_system", r'<system type="current" size="(\d+)"'),
                         ("glibc_free", r'<total type="rest" count="\d+" size="(\d+)"'),
                         ("glibc_mmapped", r'<total type="mmap" count="\d+" size="(\d+)"')):
        found = re.search(pattern, tail)
        if found:
            out[key] = int(found.group(1))
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Anonymous"):
                out["smaps_" + name.lower()] = int(rest.split()[0]) * 1024
    return out


def deep_sizes(owners: List[Tuple[str, List[Any]]]
               ) -> Dict[str, Tuple[int, int, List[Tuple[str, int, int]]]]:
    """(bytes, objects, top types) per owner, each object counted once, for the first owner
    reaching it. Types, modules, functions and classes are not followed (code, not data)."""
    import types

    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
            types.MethodType, types.CodeType)
    seen: set = set()
    out: Dict[str, Tuple[int, int, List[Tuple[str, int, int]]]] = {}
    for name, roots in owners:
        size = count = 0
        by_type: Dict[str, List[int]] = {}
        stack = list(roots)
        while stack:
            obj = stack.pop()
            if id(obj) in seen or isinstance(obj, skip):
                continue
            seen.add(id(obj))
            one = sys.getsizeof(obj)
            size += one
            count += 1
            t = by_type.setdefault(type(obj).__name__, [0, 0])
            t[0] += one
            t[1] += 1
            stack.extend(gc.get_referents(obj))
        top = sorted(by_type.items(), key=lambda kv: -kv[1][0])[:5]
        out[name] = (size, count, [(t, b, c) for t, (b, c) in top])
    return out


def short(filename: str) -> str:
    """agent/nodemesh/... whichever checkout it is in."""
    at = filename.find("/agent/nodemesh/")
    return filename[at + 1:] if at >= 0 else filename


def pages_of(n: int) -> Dict[str, List[bytes]]:
    from k8s_fake_apiserver import COLLECTIONS, FakeApiServer
    from k8s_source import service_object, slice_object

    from nodemesh.sources import kubernetes as k8s

    api = FakeApiServer()
    api.load(service_object(i) for i in range(n))
    api.load(slice_object(i) for i in range(n))
    pages: Dict[str, List[bytes]] = {}
    for resource in ("services", "endpointslices"):
        bodies, query = [], {"limit": "500"}
        while True:
            _, body = api._list_body(COLLECTIONS[resource], None, query)
            bodies.append(body)
            if not k8s._list_head(body.decode()).get("continue"):
                break
            query = {"continue": k8s._list_head(body.decode())["continue"], "limit": "500"}
        pages[resource] = bodies
    return pages


def child(n: int, trace: bool) -> dict:
    """One measurement in this (fresh) process; a JSON-able dict."""
    import tracemalloc

    import kubernetes  # noqa: F401  (the agent imports it: part of its baseline)
    from fakemaps import FakeMaps
    from prometheus_client import CollectorRegistry

    from nodemesh import daemon
    from nodemesh.core import Core, SourceChanged
    from nodemesh.datapath import maps as m
    from nodemesh.health import HealthChecker
    from nodemesh.outlier import OutlierDetector
    from nodemesh.reconciler import Reconciler
    from nodemesh.snapshot import SourceState
    from nodemesh.sources import kubernetes as k8s

    out: dict = {"n": n}
    # As the agent's start does (cli.cmd_run), before this process's first thread.
    out["tuned"] = bool(getattr(daemon, "tune_allocator", lambda: False)())
    gc.collect()
    out["rss_imports"] = rss()
    pages = pages_of(n)
    gc.collect()
    out["rss_imports_pages"] = rss()
    page_bytes = sum(len(b) for bs in pages.values() for b in bs)
    out["page_bytes"] = page_bytes
    if hasattr(daemon, "_collect_less_while_syncing"):
        daemon._collect_less_while_syncing()
    phases: List[Tuple[str, int, int]] = []  # (phase, traced after it, traced peak within it)

    def phase(name: str) -> None:
        if trace:
            now, peak = tracemalloc.get_traced_memory()
            phases.append((name, now, peak))
            tracemalloc.reset_peak()

    if trace:
        tracemalloc.start(1)
    state = k8s._ClusterState(lambda: None, lambda notes: None)
    # As the agent lists: the slices first, then the services page by page, each page's
    # services assembled and delivered at once (partial deltas, which the core programs: the
    # same objects as the full delta's).
    streams = hasattr(state, "stream_services")
    order = (("endpointslice", "endpointslices"), ("service", "services")) if streams else \
        (("service", "services"), ("endpointslice", "endpointslices"))
    for kind, resource in order:
        seen: Any = getattr(k8s, "_SeenKeys", set)()  # what the agent's list keeps
        bodies = pages[resource]
        if kind == "service" and streams and len(bodies) > 1:
            state.stream_services()
        while bodies:  # the agent frees a page once it is parsed
            body = bodies.pop(0)
            state.list_page(kind, k8s._list_items(body.decode("utf-8"), {}), seen)
            del body
            if kind == "service" and streams:
                state.take_delta()
        state.list_done(kind, seen)
    # The agent's list keeps its `seen` keys (and their names: the JSON's copies, not the
    # cache's) only while it lists: so does this one.
    del pages, seen
    phase("list (pages decoded and parsed into the source's cache)")
    delta = state.take_delta()
    phase("first delta (every service assembled)")
    registry = CollectorRegistry()
    fake = FakeMaps()
    reconciler = Reconciler(fake, m.MapSizes())
    core = Core(reconciler, HealthChecker(registry, lambda key: None),
                OutlierDetector(registry, lambda services: None), SourceState("kubernetes"))
    core.post(SourceChanged(delta))
    del delta
    core.step(0, reconcile=False)
    result = core.reconcile(force=True)
    assert result.added == n, result
    phase("core's first round (planned, packed, written; the in-memory map's copy included)")
    for table in fake.data.values():  # the kernel's, not the agent's
        table.clear()
    fake.calls.clear()
    gc.collect()
    phase("the kernel's copy dropped, full collection")
    out["phases"] = phases
    if hasattr(gc, "freeze"):
        gc.freeze()
    out["rss_ready"] = rss()
    out["hwm"] = vm_hwm()
    if trace:
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        stats = snap.statistics("lineno")
        out["traced"] = sum(s.size for s in stats)
        out["lines"] = [(f"{short(s.traceback[0].filename)}:{s.traceback[0].lineno}",
                         s.size, s.count) for s in stats[:25]]
        out["files"] = [(short(s.traceback[0].filename), s.size, s.count)
                        for s in snap.statistics("filename")[:12]]
        del snap, stats
        r = reconciler
        cache = getattr(m.encode_addr, "cache_info", lambda: None)()
        owners = [
            ("source cache (_ClusterState: records, parsed slices, indexes)",
             [state.__dict__]),
            ("core desired services (Service objects not already in the source cache)",
             [core.services]),
            ("reconciler desired (DesiredFrontend per frontend, by_service)",
             [r.desired, r.by_service]),
            ("reconciler programmed (ProgrammedFrontend, backend id dicts)", [r.programmed]),
            ("reconciler endpoint refs (frontends per address, port, protocol)",
             [r._endpoint_refs]),
            ("reconciler status, pending, health watchers",
             [r.status, r.pending, r._watchers, r._watched_by, r.endpoints]),
            ("id allocators (frontend, backend)", [r.svc_ids, r.backend_ids]),
            ("readers' snapshot (views, shard dicts)", [core.snapshot]),
            ("metrics registry", [registry]),
        ]
        out["owners"] = [(name, size, count, types) for name, (size, count, types) in
                         deep_sizes(owners).items()]
        # The source's cache shares its Services (and their Backends) with the core, and
        # the table above counts them as the source's: what the source alone holds is what
        # is left of it once the core's desired services are walked first.
        own = deep_sizes([("core", [core.services]), ("source", [state.__dict__])])["source"]
        out["source_own"] = own
        if cache is not None:
            out["addr_cache"] = cache.currsize
    libc = ctypes.CDLL("libc.so.6")
    before = rss()
    t = time.perf_counter()
    libc.malloc_trim(0)
    out["trim_seconds"] = time.perf_counter() - t
    out["rss_trimmed"] = rss()
    out["trim_gave"] = before - out["rss_trimmed"]
    out["allocator"] = allocator()
    out["frontends"] = len(reconciler.programmed)
    return out


def columns_prototype(n: int) -> dict:
    """What the core's per-frontend state would take in columns, measured (tracemalloc) on
    a prototype of n frontends of 3 backends, against the objects the agent builds now for
    the same frontends (bench/core_round.py's services through Core and Reconciler).

    The columns hold what the reconciler and the readers need of a frontend: its packed key
    (20 bytes, the kernel's SvcKey without the slot) in one bytes object per frontend with a
    dict key -> row (the one Python object a frontend keeps: lookups need a hash table), and
    in array('I'/'H'/'B') columns its svc_id, bank, revision, algorithm, status, service row
    (namespace and name stay in the Service the source holds), the offset and count of its
    backends and slots in shared pools (address as 4 bytes, target port, weight, backend id;
    slots as backend ids). No views: a reader would get a row's fields by index."""
    import array
    import tracemalloc

    from core_round import service
    from fakemaps import FakeMaps
    from prometheus_client import CollectorRegistry

    from nodemesh.core import Core, SourceChanged
    from nodemesh.datapath import maps as m
    from nodemesh.health import HealthChecker
    from nodemesh.outlier import OutlierDetector
    from nodemesh.reconciler import Reconciler
    from nodemesh.snapshot import SourceState
    from nodemesh.sources import Delta

    services = tuple(service(i) for i in range(n))
    gc.collect()
    out: dict = {"n": n}
    # the objects: the reconciler's desired and programmed state and the snapshot, as built
    tracemalloc.start(1)
    registry = CollectorRegistry()
    core = Core(Reconciler(FakeMaps(), m.MapSizes()), HealthChecker(registry, lambda k: None),
                OutlierDetector(registry, lambda s: None), SourceState("kubernetes"))
    core.post(SourceChanged(Delta(upserts=services, full=True)))
    core.step(0, reconcile=False)
    core.reconcile(force=True)
    for table in core.reconciler.maps.data.values():  # the kernel's copy
        table.clear()
    core.reconciler.maps.calls.clear()
    gc.collect()
    out["objects"] = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del core
    gc.collect()
    # the columns, filled with the same frontends
    tracemalloc.start(1)
    rows: Dict[bytes, int] = {}
    svc_id, revision, be_offset, slot_offset, service_row = (array.array("I") for _ in range(5))
    bank, algorithm, status, be_count, slot_count = (array.array("B") for _ in range(5))
    be_addr, be_id, slot_ids = array.array("I"), array.array("I"), array.array("I")
    be_port, be_weight = array.array("H"), array.array("H")
    for row, svc in enumerate(services):
        sp = svc.ports[0]
        rows[m.address_key_prefix(svc.vip, sp.port, m.PROTO_IDS[sp.protocol])] = row
        svc_id.append(row + 1)
        revision.append(1)
        bank.append(0)
        algorithm.append(0)
        status.append(0)
        service_row.append(row)
        be_offset.append(len(be_id))
        be_count.append(len(svc.backends))
        slot_offset.append(len(slot_ids))
        slot_count.append(len(svc.backends))
        for j, b in enumerate(svc.backends):
            be_addr.append(int.from_bytes(m.raw_addr(b.address)[1][:4], "little"))
            be_port.append(sp.target_port)
            be_weight.append(b.weight)
            be_id.append(row * 3 + j + 1)
            slot_ids.append(row * 3 + j + 1)
    gc.collect()
    out["columns"] = tracemalloc.get_traced_memory()[0]
    out["columns_index"] = sys.getsizeof(rows) + sum(sys.getsizeof(k) for k in rows) + \
        sum(sys.getsizeof(v) for v in rows.values() if v > 256)
    tracemalloc.stop()
    return out


def run_child(n: int, trace: bool, agent: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(agent, "agent"), os.path.join(ROOT, "tests"),
         os.path.join(ROOT, "bench")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n),
                           "--trace" if trace else "--no-trace"],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child N={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_columns(n: int, agent: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(agent, "agent"), os.path.join(ROOT, "tests"),
         os.path.join(ROOT, "bench")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--columns-child",
                           str(n)], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"columns child N={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def columns_report(c: dict) -> str:
    n = max(c["n"], 1)
    return "\n".join([
        "", f"| the core's per-frontend state at {c['n']:,} frontends (tracemalloc, "
        "columns_prototype) | size | a frontend |", "|---|---|---|",
        f"| objects now: desired, programmed, status, snapshot views and shards "
        f"(reconciler and core, after the first round) | {mib(c['objects'])} | "
        f"{c['objects'] / n:.0f} B |",
        f"| columns prototype: arrays and one packed key + dict entry a frontend | "
        f"{mib(c['columns'])} | {c['columns'] / n:.0f} B |",
        f"| of which the key -> row dict and its keys | {mib(c['columns_index'])} | "
        f"{c['columns_index'] / n:.0f} B |", ""])


def mib(x: float) -> str:
    return f"{x / MIB:.1f} MiB"


def report(n: int, plain: dict, traced: dict) -> str:
    per = 1024 * max(n, 1)
    lines = [f"### {n:,} services (3 backends each, {traced['frontends']:,} frontends)\n",
             "| process (no tracemalloc) | |", "|---|---|",
             f"| RSS after the imports | {mib(plain['rss_imports'])} |",
             f"| RSS with the list pages too (the agent holds one or two at a time) | "
             f"{mib(plain['rss_imports_pages'])} (pages {mib(plain['page_bytes'])}) |",
             f"| RSS at ready (pages freed, full collection) | {mib(plain['rss_ready'])} |",
             f"| peak RSS (VmHWM) | {mib(plain['hwm'])} |",
             f"| malloc_trim(0) at ready gives back | {mib(plain['trim_gave'])} in "
             f"{plain['trim_seconds'] * 1000:.0f} ms (RSS then {mib(plain['rss_trimmed'])}) |",
             f"| Python heap traced at ready (tracemalloc, other child) | "
             f"{mib(traced['traced'])} = {traced['traced'] / per:.2f} KiB a service |",
             f"| not traced, after the trim: RSS − imports − traced (arenas' free space, "
             f"fragmentation) | "
             f"{mib(plain['rss_trimmed'] - plain['rss_imports'] - traced['traced'])} |",
             ]
    a = plain.get("allocator")
    if a:
        file_backed = a.get("smaps_rss", 0) - a.get("smaps_anonymous", 0)
        lines += [
            f"| of the RSS after the trim: file-backed (the interpreter's and the libraries' "
            f"code) | {mib(file_backed)} |",
            f"| pymalloc (objects of 512 bytes or less): arenas / in blocks in use / free in "
            f"them | {mib(a.get('pymalloc_arenas', 0))} / {mib(a.get('pymalloc_used', 0))} / "
            f"{mib(a.get('pymalloc_arenas', 0) - a.get('pymalloc_used', 0))} |",
            f"| glibc malloc (larger objects, C libraries): arenas, their bytes / free in them "
            f"(mostly given back by the trim) / mmapped blocks | {a.get('glibc_arenas', 0)}, "
            f"{mib(a.get('glibc_system', 0))} / {mib(a.get('glibc_free', 0))} / "
            f"{mib(a.get('glibc_mmapped', 0))} |",
            f"| the agent's allocator set-up (daemon.tune_allocator) applied | "
            f"{'yes' if plain.get('tuned') else 'no'} |"]
    lines += ["",
             "| owner (deep size, each object counted once, first owner wins) | size | "
             "a service | objects | largest types (bytes a service) |",
             "|---|---|---|---|---|"]
    total = 0
    for name, size, count, types in traced["owners"]:
        total += size
        top = ", ".join(f"{t} {b / max(n, 1):.0f}" for t, b, _ in types)
        lines.append(f"| {name} | {mib(size)} | {size / per * 1024:.0f} B | {count:,} | "
                     f"{top} |")
    lines.append(f"| all owners | {mib(total)} | {total / per * 1024:.0f} B | | |")
    if "source_own" in traced:
        size, count, types = traced["source_own"]
        top = ", ".join(f"{t} {b / max(n, 1):.0f}" for t, b, _ in types)
        lines.append(f"| (of the source cache, not shared with the core's desired services: "
                     f"the source's own) | {mib(size)} | {size / per * 1024:.0f} B | "
                     f"{count:,} | {top} |")
    if "addr_cache" in traced:
        lines.append(f"| (not walked) encode_addr cache: {traced['addr_cache']:,} entries | "
                     "see maps.py below | | |")
    if traced.get("phases"):
        lines += ["", "| phase (tracemalloc) | traced after it | peak within it |",
                  "|---|---|---|"]
        for name, now, peak in traced["phases"]:
            lines.append(f"| {name} | {mib(now)} | {mib(peak)} |")
    lines += ["", "| top allocation sites at ready (tracemalloc, 1 frame) | size | blocks |",
              "|---|---|---|"]
    for where, size, count in traced["lines"][:20]:
        lines.append(f"| {where} | {mib(size)} | {count:,} |")
    lines += ["", "| by file | size |", "|---|---|"]
    for where, size, _ in traced["files"][:10]:
        lines.append(f"| {where} | {mib(size)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]), sys.argv[3] == "--trace")))
        return 0
    if len(sys.argv) >= 3 and sys.argv[1] == "--columns-child":
        print(json.dumps(columns_prototype(int(sys.argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sizes", type=int, nargs="+")
    ap.add_argument("--agent", default=ROOT, metavar="DIR",
                    help="the checkout whose agent/ is measured (default: this one)")
    ap.add_argument("--columns", action="store_true",
                    help="also measure the column prototype (columns_prototype) at each N")
    ap.add_argument("--append", action="store_true",
                    help="add a dated section to bench/results/controlplane.md")
    args = ap.parse_args()
    args.agent = os.path.abspath(args.agent)
    if not os.path.isdir(os.path.join(args.agent, "agent", "nodemesh")):
        # Else the child's import falls back on the installed (editable) nodemesh: it would
        # measure this checkout and say it measured the other.
        if os.path.isdir(os.path.join(args.agent, "nodemesh")):  # its agent/ folder given
            args.agent = os.path.dirname(args.agent)
        else:
            ap.error(f"--agent {args.agent}: no agent/nodemesh in it (give a checkout's root)")
    load0 = os.getloadavg()[0]
    parts = []
    for n in args.sizes:
        plain = run_child(n, False, args.agent)
        traced = run_child(n, True, args.agent)
        parts.append(report(n, plain, traced))
        if args.columns:
            parts[-1] += columns_report(run_columns(n, args.agent))
        print(parts[-1], flush=True)
    agent = "" if args.agent == ROOT else f" --agent {args.agent}"
    text = (f"## Memory breakdown, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            f"`bench/memory.py {' '.join(map(str, args.sizes))}{agent}` (definitions: its "
            f"docstring); Python {sys.version.split()[0]}; 1-min load average {load0:.1f} at "
            f"the start, {os.getloadavg()[0]:.1f} at the end (memory figures do not depend "
            f"on the load).\n\n" + "\n".join(parts))
    if args.append:
        path = os.path.join(ROOT, "bench", "results", "controlplane.md")
        with open(path) as f:
            old = f.read().rstrip("\n")
        with open(path, "w") as f:
            f.write(old + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
