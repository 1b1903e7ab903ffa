"""The connect4 hook's cost per connect, and where it goes: parts compiled out one at a time.

A lab (tests' topology: a client netns with no route off the machine, 3 backends running the
lab server) with the datapath attached to its child cgroup and one TCP service; a client in
the cgroup does N connects to the VIP (each closed with an RST, SO_LINGER 0, so no TIME_WAIT
piles up) and the program's run_time_ns / run_cnt over those connects (BPF_ENABLE_STATS,
held by an fd for the measurement only: whatever kernel.bpf_stats_enabled says is left as it
is) gives ns a connect. Flow events are on at the agent's defaults (1000/s per CPU, burst 200),
as in a running agent.

Each variant is a measuring build: a copy of bpf/ whose sock_lb.c starts with the variant's
`#define NM_COST_NO_<PART>` lines (sock_lb.c's guards; the agent never defines them). Variants
run round-robin (ABAB...), --rounds times, each round a fresh load, so a change of machine
load spreads over all of them.

    sudo .venv/bin/python bench/sock_cost.py [--connects 20000] [--rounds 3] [--variants full,flow]
        [--services N]

--services N programs N - 1 other services beside the measured one (VIPs from 10.96.0.1, never
connected to; 3 endpoints each, distinct, so `endpoint_health` holds 3N entries as in an agent
with N services): the maps every connection looks up (services, backends, endpoint_health)
then have N services' entries, and a lookup whose cost grows with N shows.

`full` is the build as shipped; `none` compiles out everything but the service lookup and the
backend choice. `twostorages` (not a part compiled out: the way before one storage a socket)
creates a TCP socket's second storage (sock_conn) for sockops' count state, for before/after:

    sudo .venv/bin/python bench/sock_cost.py --variants twostorages,full --rounds 5

`--build-into DIR` only writes the builds (DIR/<variant>) for other benchmarks to load, e.g.
the pair with every part but the lookup and the choice compiled out:

    sudo .venv/bin/python bench/sock_cost.py --variants none --build-into /tmp/nm-builds
    sudo NODEMESH_BPF_DIR=/tmp/nm-builds/none .venv/bin/python bench/run.py --sizes 1 \
        --variants direct,nodemesh --workloads conn --seconds 1 --pair-rounds 60 --reps 1 \
        --skip-extra --output /tmp/pair-none.md

sockops' parts have builds too, judged by sockops' column: `health` (no endpoint_health
lookup), `latency` (no backend_latency), `eparray` (conn_counts and endpoint_health as arrays
by a stand-in endpoint id: what an endpoint-id design would save), `nostatecb` (no state
callbacks; counts never go down):

    sudo .venv/bin/python bench/sock_cost.py \
        --variants full,health,latency,eparray,eparray+latency --connects 6000 --chunk 100 \
        --rounds 6

`git:<ref>` is the bpf/ folder of a commit (`git archive`), loaded by this agent: before/after
across commits, e.g. `--variants git:main,full`. Each connect's sockops runs are measured too
(a connect closed with an RST runs sockops 7 times: TIMEOUT_INIT, RWND_INIT, NEEDS_ECN,
TCP_CONNECT, ACTIVE_ESTABLISHED and two state changes), reported as ns a connect.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "agent"))

PARTS = {
    "policy": "NM_COST_NO_POLICY",     # nm_policy_decide
    "proxy": "NM_COST_NO_PROXY",       # the proxy redirect check
    "account": "NM_COST_NO_ACCOUNT",   # per-service stats
    "flow": "NM_COST_NO_FLOW",         # nm_flow_emit
    "revnat": "NM_COST_NO_REVNAT",     # the socket's storage: reverse translation + count state
    "netns": "NM_COST_NO_NETNS",       # bpf_get_netns_cookie
    # sockops' parts (its ns a connect shows them): the endpoint_health lookups, and
    # lib/latency.h's (two backend_latency LRU lookups a connection)
    "health": "NM_COST_NO_HEALTH",
    "latency": "NM_COST_NO_LATENCY",
    # not a part compiled out: conn_counts and endpoint_health as arrays by an endpoint id (a
    # stand-in id, so counts are wrong): what that change would save in sockops, measured
    "eparray": "NM_COST_EP_ARRAY",
    # not a part compiled out: no state callbacks (so no CLOSE: counts only grow), for the
    # cgroup-BPF run machinery of the 2-4 STATE_CB runs a connection (bench/sock_path.py)
    "nostatecb": "NM_COST_NO_STATE_CB",
    # not a part compiled out: the former way, count state in a second storage (sock_conn)
    "twostorages": "NM_COST_TWO_STORAGES",
    # not a part compiled out: the former way, a frontend's count in the svc_conn_counts hash
    "svchash": "NM_COST_SVC_HASH",
}
# One chunk of connects per line read; "<failures> <client CPU ns>" printed after each (also
# bench/sock_path.py's client, which reads the CPU).
CLIENT = r"""
import resource, socket, struct, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
linger = struct.pack("ii", 1, 0)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
for line in sys.stdin:
    fails = 0
    t0 = cpu()
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        try:
            s.connect((host, port))
        except OSError:
            fails += 1
        s.close()
    print(fails, int((cpu() - t0) * 1e9), flush=True)
"""


def build(variant: str, src: Path, tmp: Path) -> Path:
    """A copy of the sources with the variant's parts compiled out, or a commit's bpf/."""
    out = tmp / variant.replace("/", "_").replace(":", "_")
    if variant.startswith("git:"):
        tar = subprocess.run(["git", "-C", ROOT, "archive", variant[4:], "bpf"], check=True,
                             stdout=subprocess.PIPE).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True)
        (tmp / "bpf").rename(out)
        return out
    shutil.copytree(src, out)
    if variant == "full":
        parts: List[str] = []
    elif variant == "none":
        # the connect hook's parts (as sock5 measured `none`): sockops keeps its lookups
        parts = [p for p, d in PARTS.items()
                 if d.startswith("NM_COST_NO_") and p not in ("health", "latency", "nostatecb")]
    else:
        parts = variant.split("+")
    defines = "".join(f"#define {PARTS[p]} 1\n" for p in parts)
    text = (out / "sock_lb.c").read_text()
    (out / "sock_lb.c").write_text(defines + text)
    return out


def filler_services(lab, n: int) -> list:
    """n services never connected to, with 3 distinct endpoints each on addresses nobody
    holds (VIPs 10.96.0.1 on; targetPort 10000 + i)."""
    import ipaddress

    from nodemesh.model import Backend, Service, ServicePort
    first = ipaddress.IPv4Address("10.96.0.1")
    return [Service(f"filler-{i}", "bench", str(first + i),
                    (ServicePort(80, 10000 + i % 50000, "TCP", "http"),),
                    tuple(Backend(f"198.18.{lab.subnet}.{201 + j}", 1) for j in range(3)))
            for i in range(n)]


def hooks_up(dp):
    """Load the datapath `dp` (adopting its pins), turn flow events on at the agent's default
    rate, attach the hooks; the Reconciler that programs it."""
    from nodemesh import flows
    from nodemesh.reconciler import Reconciler

    maps = dp.load()
    rec = Reconciler(maps)
    rec.adopt()
    flows.configure(maps, flows.DEFAULT_RATE, flows.DEFAULT_BURST, True)
    dp.attach()
    return rec


def measure(lab, variant_dir: Path, connects: int, chunk: int,
            services: int = 1) -> Tuple[List[float], List[float]]:
    """ns a connect of each chunk of `chunk` connects: connect4's, and sockops' (all its runs
    over the chunk, divided by the connects)."""
    from nodemesh.bpfstats import enable_stats, fdinfo
    from nodemesh.datapath import bpfsys
    from nodemesh.datapath.loader import Datapath, cleanup
    from nodemesh.model import Backend, Service, ServicePort

    os.environ["NODEMESH_BPF_DIR"] = str(variant_dir)
    dp = Datapath(lab.bpffs, lab.cgroup)
    stats = None
    try:
        rec = hooks_up(dp)
        vip = lab.vip4(10)
        rec.apply([*filler_services(lab, services - 1),
                   Service("web", "bench", vip, (ServicePort(80, 8080, "TCP", "http"),),
                           tuple(Backend(b.ipv4, 1) for b in lab.backends))])
        fd = dp.programs["connect4"]
        ops_fd = dp.programs["sockops"]
        stats = enable_stats()
        if stats is None:
            raise SystemExit("BPF_ENABLE_STATS refused: run as root on Linux >= 5.8")
        proc = lab.spawn([sys.executable, "-c", CLIENT, vip, "80", str(chunk)],
                         netns=lab.client_ns, in_cgroup=True, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        out: List[float] = []
        ops: List[float] = []
        try:
            for _ in range(max(connects // chunk, 1)):
                before, ops_before = fdinfo(fd), fdinfo(ops_fd)
                proc.stdin.write("go\n")
                proc.stdin.flush()
                failed = (proc.stdout.readline().split() or ["no answer"])[0]
                after, ops_after = fdinfo(fd), fdinfo(ops_fd)
                if failed != "0":
                    raise SystemExit(f"client failed: {failed!r} connects of {chunk}")
                runs = after["run_cnt"] - before["run_cnt"]
                if runs < chunk:
                    raise SystemExit(f"connect4 ran {runs} times for {chunk} connects")
                out.append((after["run_time_ns"] - before["run_time_ns"]) / runs)
                ops.append((ops_after["run_time_ns"] - ops_before["run_time_ns"]) / runs)
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)
            lab.processes.remove(proc)
        return out, ops
    finally:
        bpfsys.close(stats)
        dp.close()
        cleanup(lab.bpffs)
        os.environ.pop("NODEMESH_BPF_DIR", None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connects", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=250,
                    help="connects a sample: each round gives connects/chunk samples")
    ap.add_argument("--services", type=int, default=1,
                    help="services programmed (the measured one and N - 1 others)")
    ap.add_argument("--variants", default="full,none," + ",".join(PARTS),
                    help="comma-separated: full, none, a part, or parts joined by +")
    ap.add_argument("--build-into", metavar="DIR",
                    help="only write each variant's build to DIR/<variant> and exit: for "
                    "NODEMESH_BPF_DIR=DIR/<variant> bench/run.py ... (the pair with a build)")
    args = ap.parse_args()
    if args.build_into:
        from nodemesh.datapath.loader import bpf_source_dir as source_dir
        os.makedirs(args.build_into, exist_ok=True)
        for v in args.variants.split(","):
            print(build(v, source_dir(), Path(args.build_into)))
        return 0
    if not 0 < args.connects <= 200000 or not 0 < args.rounds <= 20 or \
            not 0 < args.chunk <= args.connects or not 0 < args.services <= 50000:
        raise SystemExit("--connects must be in 1..200000, --rounds in 1..20, --chunk in "
                         "1..connects and --services in 1..50000")
    variants = args.variants.split(",")
    for v in variants:
        if v not in ("full", "none") and not v.startswith("git:") and \
                any(p not in PARTS for p in v.split("+")):
            raise SystemExit(f"--variants: unknown part in {v!r} (known: {', '.join(PARTS)})")
    from nodemesh.datapath.loader import bpf_source_dir
    from nodemesh.lab.topology import new_lab

    src = bpf_source_dir()
    # Per variant: each chunk's ns a connect, and each round's lowest chunk. On a loaded machine
    # a chunk in which the client (and the program in it) was preempted or shared its CPU
    # reads high; the lowest chunk of a round is the least disturbed one.
    results: Dict[str, List[float]] = {v: [] for v in variants}
    lows: Dict[str, List[float]] = {v: [] for v in variants}
    ops_all: Dict[str, List[float]] = {v: [] for v in variants}
    ops_lows: Dict[str, List[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="nm-sockcost-") as tmp:
        # Every build is made before the first run, so editing bpf/ meanwhile changes nothing.
        builds = {v: build(v, src, Path(tmp)) for v in variants}
        import sigterm  # bench/: a kill tears the lab down too
        sigterm.exit_on_sigterm()
        lab = new_lab("nmb", backends=3)
        try:
            lab.start_servers(tcp_ports=(8080,), udp_ports=())
            for r in range(args.rounds):
                for v in variants:
                    chunks, ops = measure(lab, builds[v], args.connects, args.chunk,
                                          args.services)
                    results[v] += chunks
                    lows[v].append(min(chunks))
                    ops_all[v] += ops
                    ops_lows[v].append(min(ops))
                    print(f"round {r + 1} {v}: median {statistics.median(chunks):.0f}, lowest "
                          f"{min(chunks):.0f} ns/connect over {len(chunks)} chunks of "
                          f"{args.chunk}; sockops median {statistics.median(ops):.0f}, lowest "
                          f"{min(ops):.0f} (load {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            lab.destroy()
    full = statistics.median(lows["full"]) if "full" in lows else None
    print(f"\n{src}: ns a connect, {args.connects} connects x {args.rounds} rounds "
          f"in chunks of {args.chunk}, {args.services} services; "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"  {'variant':24} {'connect4: lowest chunk':>22} {'median':>8} "
          f"{'sockops: lowest chunk':>22} {'median':>8}   (lowest: median of rounds' lowest)")
    for v in variants:
        low = statistics.median(lows[v])
        saved = f"  full - this: {full - low:+.0f}" if full is not None and v != "full" else ""
        print(f"  {v:24} {low:22.0f} {statistics.median(results[v]):8.0f} "
              f"{statistics.median(ops_lows[v]):22.0f} {statistics.median(ops_all[v]):8.0f}"
              f"{saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
