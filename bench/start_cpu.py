#!/usr/bin/env python3
"""Where the CPU of an agent's start goes: every process and thread of a running
bench/controlplane.py (its own: the fake API server; the agent; the agent's compiler and
decoding-worker children), sampled from /proc/PID/task/TID/schedstat every 50 ms from the
agent's start until its log says "ready:".

    sudo .venv/bin/python bench/controlplane.py --sizes 100000 --sources kubernetes \\
        --changes 5 --logs DIR & sudo .venv/bin/python bench/start_cpu.py $!

Prints the CPU seconds of each (process, thread) to ready, each process's sum, and each
process's CPU per second of the start (its critical path: which work overlaps, which
waits). A child that exits before ready (the compiler) counts to its last sample (up to
50 ms short). This sampler is a process of its own (a few % of a CPU), outside the bench's
figures. Nothing here changes what it reads.
"""
from __future__ import annotations

import collections
import glob
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

INTERVAL = 0.05
TIMEOUT = 600.0


def _tree(pid: int) -> List[int]:
    found, i = [pid], 0
    while i < len(found):
        for path in glob.glob(f"/proc/{found[i]}/task/*/children"):
            try:
                with open(path) as f:
                    found += [int(x) for x in f.read().split()]
            except OSError:
                pass
        i += 1
    return found


def _role(pid: int, bench: int) -> str:
    if pid == bench:
        return "bench (fake API server)"
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            argv = f.read().split("\0")
    except OSError:
        return "?"
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else " ".join(argv[:2])
    return {"nodemesh.cli": "agent", "nodemesh.datapath.compile": "compiler",
            "nodemesh.sources.kubernetes_decoder": "decoding worker"}.get(module, module)


def main() -> int:
    bench = int(sys.argv[1])
    last: Dict[Tuple[int, int], Tuple[str, str, int]] = {}
    roles: Dict[int, str] = {}
    base: Dict[Tuple[int, int], int] = {}
    per_second: Dict[Tuple[int, str], float] = collections.defaultdict(float)
    started: Optional[float] = None
    log: Optional[str] = None
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{bench}"):
            print("the bench ended", file=sys.stderr)
            return 1
        for pid in _tree(bench):
            role = roles.get(pid) or roles.setdefault(pid, _role(pid, bench))
            if role == "agent" and started is None:
                started = time.monotonic()
                base = {k: v[2] for k, v in last.items()}
                try:
                    log = os.readlink(f"/proc/{pid}/fd/1")
                except OSError:
                    pass
            for task in glob.glob(f"/proc/{pid}/task/*"):
                tid = int(task.rsplit("/", 1)[1])
                try:
                    with open(task + "/schedstat") as f:
                        ns = int(f.read().split()[0])
                    with open(task + "/comm") as f:
                        name = f.read().strip()
                except OSError:
                    continue
                before = last.get((pid, tid))
                last[(pid, tid)] = (role, name, ns)
                if started is not None:
                    prev = before[2] if before else base.get((pid, tid), 0)
                    per_second[(int(time.monotonic() - started), role)] += (ns - prev) / 1e9
        if log is not None:
            with open(log, errors="replace") as f:
                if "ready:" in f.read():
                    break
        time.sleep(INTERVAL)
    else:
        print("no ready in time", file=sys.stderr)
        return 1
    assert started is not None
    total = collections.defaultdict(float)
    by_process = collections.defaultdict(float)
    for key, (role, name, ns) in last.items():
        seconds = (ns - base.get(key, 0)) / 1e9
        total[(role, name)] += seconds
        by_process[role] += seconds
    print(f"CPU from the agent's start to ready ({time.monotonic() - started:.1f} s):")
    for (role, name), seconds in sorted(total.items(), key=lambda x: -x[1]):
        if seconds >= 0.05:
            print(f"  {seconds:7.2f} s  {role:24s} {name}")
    print("by process: " + ", ".join(f"{role} {s:.2f} s" for role, s in
                                     sorted(by_process.items(), key=lambda x: -x[1])))
    print("each second of the start, CPU seconds by process:")
    for second in sorted({s for s, _ in per_second}):
        print(f"  {second:3d}  " + "  ".join(f"{role} {v:.2f}" for (s, role), v in
                                             sorted(per_second.items()) if s == second))
    return 0


if __name__ == "__main__":
    sys.exit(main())
