"""Policy at connect(): the new-connection rate with 10,000 rules and 1,000 identities against
the same datapath with no policy, side by side, and the kernel's nanoseconds per connect().

    sudo .venv/bin/python bench/policy.py [--rounds 3] [--seconds 5]

A lab (namespaces, a cgroup, pins: all unique, all removed at the end) with nginx in one
backend and wrk (-t1 -c32, Connection: close) in the client netns, in a workload cgroup 3
levels under the lab's (so the identity lookup walks ancestors). Variants alternate A B A B:

  no-policy   the service programmed, no workload and no policy in the maps
  policy      1,000 workloads (identities), 10,000 rules over 200 services x 5 ports; the
              measured service has 50 of them, and the first allows wrk's identity (the
              rule set is bench/variants.py's policy_mesh, which run.py's nodemesh+policy
              variant loads too)

Kernel time: BPF_ENABLE_STATS (BPF_STATS_RUN_TIME) is turned on for the run, and each round
reads run_time_ns and run_cnt of the connect4 program (bpf_prog_info): ns per connect() is
their difference over the round. Every wrk run is bounded by --seconds.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "agent"))

from variants import POLICY_IDENTITIES, policy_mesh  # noqa: E402

from nodemesh.datapath import bpfsys  # noqa: E402
from nodemesh.datapath.loader import Datapath, cgroup2_root, cleanup  # noqa: E402
from nodemesh.lab.topology import new_lab  # noqa: E402
from nodemesh.model import Backend, Service, ServicePort  # noqa: E402
from nodemesh.policy import Mesh, PolicyTable  # noqa: E402
from nodemesh.reconciler import Reconciler  # noqa: E402

BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
IDENTITIES, SERVICES, PORTS = POLICY_IDENTITIES, 200, 5


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


class ProgInfo(ctypes.Structure):
    """struct bpf_prog_info up to run_cnt (include/uapi/linux/bpf.h)."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
                ("gpl_compatible", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
                ("netns_ino", ctypes.c_uint64), ("nr_jited_ksyms", ctypes.c_uint32),
                ("nr_jited_func_lens", ctypes.c_uint32), ("jited_ksyms", ctypes.c_uint64),
                ("jited_func_lens", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
                ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
                ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32),
                ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
                ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32),
                ("prog_tags", ctypes.c_uint64), ("run_time_ns", ctypes.c_uint64),
                ("run_cnt", ctypes.c_uint64)]


def prog_stats(fd: int):
    info = bpfsys._info(fd, ProgInfo())
    return info.run_time_ns, info.run_cnt


def wrk(lab, cgroup: str, url: str, seconds: int) -> float:
    cmd = (f"echo $$ > {shlex.quote(os.path.join(cgroup, 'cgroup.procs'))} && exec ip netns "
           f"exec {lab.client_ns} wrk -t1 -c32 -d{seconds}s -H 'Connection: close' {url}")
    proc = subprocess.Popen(["sh", "-c", cmd], start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk failed: {out}\n{err}")
    return float(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    import sigterm  # bench/: a kill tears the lab down too
    sigterm.exit_on_sigterm()
    lab = new_lab("nmbp", backends=1, host_blackhole=True)
    workdir = tempfile.mkdtemp(prefix="nodemesh-policy-bench-")
    cgroups = []
    stats_fd = None
    dp = Datapath(lab.bpffs, lab.cgroup)
    try:
        b = lab.backends[0]
        lab.start_nginx(b, 8080, "ok", workdir)
        for i in range(IDENTITIES):
            cgroups.append(os.path.join(lab.cgroup, f"wl-{i}"))
            os.makedirs(cgroups[-1], exist_ok=True)
        client_cg = os.path.join(cgroups[0], "pod", "ctr")
        os.makedirs(client_cg, exist_ok=True)
        services = [Service(f"s{i}", "bench", lab.vip4(10 + i),
                            tuple(ServicePort(80 + p, 8080, "TCP", f"p{p}") for p in range(PORTS)),
                            (Backend(b.ipv4),)) for i in range(SERVICES)]
        rec = Reconciler(dp.load())
        rec.adopt()
        rec.apply(services)
        dp.attach()
        table = PolicyTable(rec.maps, cgroup2_root())
        started = time.monotonic()
        # policy_mesh measures the last service: s0, the one wrk calls
        mesh = policy_mesh(services[::-1], cgroups)
        compiled = table.apply(mesh, services)
        compile_s = time.monotonic() - started
        entries = len(compiled.entries)
        table.apply(Mesh(), services)
        stats_fd = bpfsys.bpf(BPF_ENABLE_STATS, _EnableStatsAttr(type=BPF_STATS_RUN_TIME))
        prog = dp._prog_fds["connect4"]
        url = f"http://{lab.vip4(10)}:80/"
        rates = {"no-policy": [], "policy": []}
        ns = {"no-policy": [], "policy": []}
        wrk(lab, client_cg, url, 1)  # warm-up
        for r in range(args.rounds):
            for variant in ("no-policy", "policy"):
                table.apply(mesh if variant == "policy" else Mesh(), services)
                t0, c0 = prog_stats(prog)
                rate = wrk(lab, client_cg, url, args.seconds)
                t1, c1 = prog_stats(prog)
                rates[variant].append(rate)
                ns[variant].append((t1 - t0) / max(1, c1 - c0))
                print(f"round {r + 1} {variant:>9}: {rate:8.0f} conn/s, "
                      f"{ns[variant][-1]:6.0f} ns per connect4 ({c1 - c0} runs)", flush=True)
        denied = sum(v["denied"] for v in table.stats().values())
        print()
        print(f"policy: {len(mesh.policies):,} rules, {IDENTITIES:,} identities, "
              f"{SERVICES * PORTS:,} frontends -> {entries:,} kernel entries, compiled and "
              f"written in {compile_s:.2f} s; connects denied during the run: {denied}")
        print("| variant | conn/s median (min-max) | ratio | ns per connect4 median (min-max) |")
        print("|---|---|---|---|")
        base = statistics.median(rates["no-policy"])
        for v in ("no-policy", "policy"):
            print(f"| {v} | {statistics.median(rates[v]):.0f} ({min(rates[v]):.0f}-"
                  f"{max(rates[v]):.0f}) | {statistics.median(rates[v]) / base:.3f} | "
                  f"{statistics.median(ns[v]):.0f} ({min(ns[v]):.0f}-{max(ns[v]):.0f}) |")
        print(f"load average {os.getloadavg()[0]:.1f}")
    finally:
        if stats_fd is not None:
            os.close(stats_fd)
        dp.close()
        cleanup(lab.bpffs)
        lab.destroy()  # kills nginx, then removes the lab's cgroup with the workload ones
    return 0


if __name__ == "__main__":
    sys.exit(main())
