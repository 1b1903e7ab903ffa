"""The TC ingress program's cost for a packet of an established flow, in a tight loop:
BPF_PROG_TEST_RUN with `repeat`, which reports the mean ns a run. Less exposed to a busy
machine than bpf_stats during a lab run (one CPU, hot caches, no traffic), so it is the
figure to compare code versions by, side by side (ABAB); it leaves out what the kernel does
after the program (the redirect itself).

The flow is a two-entry cycle: the conntrack entry of tuple A translates it into tuple B and
the entry of B translates it back into A, both established. Each run therefore takes the
whole fast path (parse, one conntrack lookup, a rewrite of both addresses and both ports with
their checksums, the FIB lookup and the redirect) and leaves the packet ready for the next.
`--neighbour` makes the next hop's MAC known (the FIB's SUCCESS answer) rather than
unresolved (NO_NEIGH).

    python bench/tc_cost.py [--repeat 200000] [--trials 5] [--neighbour] [--v6]

To compare a committed version: NODEMESH_BPF_DIR=<a checkout's bpf/> python bench/tc_cost.py
(runs in a network namespace of its own; needs root).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "agent"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import packets as P  # noqa: E402
from tcrun import BPF_PROG_TEST_RUN, FORWARDING, NODE_NETNS, SkbCtx, TestNetns, _TestRunAttr  # noqa: E402

from nodemesh.datapath import bpfsys  # noqa: E402
from nodemesh.datapath import maps as m  # noqa: E402
from nodemesh.datapath import tc as t  # noqa: E402

NEIGHBOURS = """
ip neigh add 192.0.2.10 lladdr 02:00:00:00:00:0a dev nmtc0 nud permanent
ip neigh add 198.51.100.7 lladdr 02:00:00:00:00:07 dev nmtc0 nud permanent
ip neigh add 2001:db8::10 lladdr 02:00:00:00:00:0a dev nmtc0 nud permanent
ip neigh add 2001:db8:c::7 lladdr 02:00:00:00:00:07 dev nmtc0 nud permanent
"""


def entry(src: str, dst: str, sport: int, dport: int) -> t.CtKey:
    family, s = m.encode_addr(src)
    _, d = m.encode_addr(dst)
    return t.CtKey((m.u32 * 4)(*s), (m.u32 * 4)(*d), socket_port(sport), socket_port(dport),
                   6, family, 0)


def socket_port(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def cycle(fd: int, a: t.CtKey, b: t.CtKey, now: int) -> None:
    """a becomes b, b becomes a: both established forward entries."""
    for key, to in ((a, b), (b, a)):
        value = t.CtValue(to.src, to.dst, to.sport, to.dport, t.CT_FORWARD, t.CT_ESTABLISHED,
                          t.CT_F_SNAT, 0, 1, now)
        bpfsys.map_update(fd, key, value)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=200000)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--neighbour", action="store_true")
    ap.add_argument("--v6", action="store_true")
    args = ap.parse_args()
    from nodemesh.datapath.loader import Datapath, bpf_source_dir, cleanup

    bpffs = f"/sys/fs/bpf/nmtccost-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    # Forwarding on: without it the FIB answers "forwarding disabled" and the A -> B runs
    # would hand the packet to the stack instead of redirecting it.
    setup = (NODE_NETNS + FORWARDING).strip()
    if args.neighbour:
        setup += "\n" + NEIGHBOURS.strip()
    with TestNetns(setup):
        dp = Datapath(bpffs, None)
        path = t.TcPath(bpffs, dp.sizes, t.TcSettings())
        try:
            dp.load(in_process=True)
            path.load(in_process=True)
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                ifindex = ipr.link_lookup(ifname="nmtc0")[0]
            client, node, backend = (("2001:db8:c::7", "2001:db8::1", "2001:db8::10")
                                     if args.v6 else ("198.51.100.7", "192.0.2.1",
                                                      "192.0.2.10"))
            a = entry(client, node, 41000, 30080)
            b = entry(node, backend, 40001, 8080)
            import time
            cycle(path.map_fds["ct"], a, b, time.monotonic_ns())
            frame = P.flow(P.TCP, client, node, 41000, 30080, P.ACK, payload=b"x" * 64)
            data = ctypes.create_string_buffer(frame, len(frame))
            out = ctypes.create_string_buffer(len(frame) + 256)
            ctx = SkbCtx(ingress_ifindex=ifindex, ifindex=ifindex)
            results = []
            for _ in range(args.trials):
                # an even number of runs: the packet ends as it began
                attr = _TestRunAttr(prog_fd=path.progs[t.PROG_INGRESS],
                                    data_size_in=len(frame), data_size_out=len(out),
                                    data_in=ctypes.addressof(data), data_out=ctypes.addressof(out),
                                    repeat=args.repeat // 2 * 2, ctx_size_in=ctypes.sizeof(ctx),
                                    ctx_in=ctypes.addressof(ctx))
                bpfsys.bpf(BPF_PROG_TEST_RUN, attr)
                results.append(attr.duration)
            # verdict: the last run's, B back to A, whose destination is the node itself (the
            # FIB says local: TC_ACT_OK); A to B is redirected
            print(f"{bpf_source_dir()}: verdict {attr.retval}, ns a run over {args.trials} "
                  f"trials of {args.repeat}: median {statistics.median(results)}, "
                  f"min {min(results)}, max {max(results)} ({results}); "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            path.close()
            dp.close()
            cleanup(bpffs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
