#!/usr/bin/env python3
"""Per-call thread CPU a change from bench/percall (see its sitecustomize.py), one or two
runs side by side: each wrapped function's calls a change, total CPU a change and median a
call, over the change loop (from the first one-frontend round to the last).

    .venv/bin/python bench/percall_report.py A.txt [B.txt]
"""
import collections
import statistics
import sys


def per_change(path):
    rows = []
    with open(path) as f:
        for line in f:
            p = line.split()
            rows.append((float(p[0]), p[1], int(p[2]), p[3], p[4] if len(p) > 4 else ""))
    changes = [r[0] for r in rows if r[1] == "Reconciler.reconcile" and r[4] == "1"]
    t0, t1 = changes[0] - 0.3, changes[-1] + 0.05
    calls = collections.defaultdict(list)
    for t, name, ns, thread, _ in rows:
        if t0 <= t <= t1:
            calls[(name, "core" if thread == "main" else "other")].append(ns)
    n = len(changes)
    return n, {k: (len(v) / n, sum(v) / n / 1000, statistics.median(v) / 1000)
               for k, v in calls.items()}


def main() -> None:
    runs = [per_change(p) for p in sys.argv[1:3]]
    keys = sorted(set().union(*(r[1] for r in runs)), key=lambda k: -runs[0][1].get(k, (0, 0))[1])
    print("changes: " + ", ".join(str(r[0]) for r in runs))
    print(f"{'function':40s} {'thread':6s}" + "".join(
        f" | {'calls/chg':>9s} {'us/chg':>8s} {'median':>8s}" for _ in runs))
    for k in keys:
        print(f"{k[0]:40s} {k[1]:6s}" + "".join(
            " | {:9.2f} {:8.1f} {:8.1f}".format(*r[1].get(k, (0, 0, 0))) for r in runs))


if __name__ == "__main__":
    main()
