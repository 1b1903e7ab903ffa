"""`nodemesh flows`, the observability options of `nodemesh run`, and the cost line of
`nodemesh status`."""
from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from typing import Any, Callable, Dict, List, Optional

from . import api, flows


def _count(name: str, most: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not 0 <= value <= most:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: a whole number from 0 to {most}")
        return value
    return parse


def add_run_options(r: argparse.ArgumentParser, env: Callable[..., Any],
                    one_of: Callable[..., Callable[[str], str]]) -> None:
    r.add_argument("--flow-events-rate", type=_count("--flow-events-rate", 1_000_000),
                   default=env("flow_events_rate", str(flows.DEFAULT_RATE)),
                   help=f"flow events per second per CPU, enforced in the kernel (default "
                        f"{flows.DEFAULT_RATE}; 0 turns them off)")
    r.add_argument("--flow-events-burst", type=_count("--flow-events-burst", 1_000_000),
                   default=env("flow_events_burst", str(flows.DEFAULT_BURST)),
                   help=f"flow events a CPU may send at once after a quiet spell (default "
                        f"{flows.DEFAULT_BURST})")
    r.add_argument("--backend-latency", default=env("backend_latency", "on"),
                   type=one_of("on", "off"), choices=["on", "off"],
                   help="kernel-measured connect duration, RTT, bytes and retransmits per "
                        "backend (sockops; default on)")
    r.add_argument("--bpf-stats", default=env("bpf_stats", "off"), type=one_of("on", "off"),
                   choices=["on", "off"],
                   help="hold BPF run-time statistics on (BPF_ENABLE_STATS) for the datapath "
                        "cost metrics; every BPF program on the node then reads the clock "
                        "twice per run, about 2 us more a balanced TCP connect (default off)")


def add_flows_parser(sub: Any, common: argparse.ArgumentParser,
                     admin_opts: Callable[[argparse.ArgumentParser], None]) -> None:
    f = sub.add_parser("flows", help="recent flow events of the running agent (--follow to "
                       "stream)", parents=[common])
    admin_opts(f)
    f.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")
    f.add_argument("--service", help="only NAMESPACE/NAME")
    f.add_argument("--backend", help="only this backend address (or address:port)")
    f.add_argument("--verdict", choices=list(flows.VERDICT_IDS))
    f.add_argument("--last", type=int, default=50,
                   help="how many recent flows to show first (default 50)")
    f.set_defaults(func=cmd_flows)


def _query(args: Any, since: int, wait: float, limit: int) -> str:
    q: Dict[str, Any] = {"since": since, "wait": wait, "limit": limit}
    for name in ("service", "backend", "verdict"):
        if getattr(args, name):
            q[name] = getattr(args, name)
    return "/v1/flows?" + urllib.parse.urlencode(q)


def cmd_flows(args: Any) -> int:
    try:
        flows.Filter.parse(args.service, args.backend, args.verdict)
    except ValueError as e:
        print(f"nodemesh flows: {e}", file=sys.stderr)
        return 2
    offset = flows.monotonic_to_wall()
    as_json = args.output == "json"
    header = [not as_json]

    def show(items: List[Dict[str, Any]]) -> None:
        if as_json:
            for item in items:
                print(json.dumps(item))
        else:
            rows = [flows.row(item, offset) for item in items]
            if rows:
                _print_rows(rows, header)
        sys.stdout.flush()

    def fetch(since: int, wait: float, limit: int) -> Dict[str, Any]:
        try:
            return api.get(args.admin_socket, _query(args, since, wait, limit),
                           timeout=wait + 10)
        except api.AdminUnavailable as e:
            print(f"nodemesh: {e}", file=sys.stderr)
            raise SystemExit(1)

    first = fetch(0, 0, max(args.last, 1))
    show(first["flows"][-args.last:] if args.last else [])
    if not first["flows"] and not args.follow and not as_json:
        print("no flows recorded yet")
    seq = first["seq"]
    try:
        while args.follow:
            got = fetch(seq, 1.0, flows.HISTORY)
            show(got["flows"])
            seq = got["seq"]
    except KeyboardInterrupt:
        pass
    return 0


def _print_rows(rows: List[List[str]], header: List[bool]) -> None:
    widths = [14, 14, 5, 24, 22, 22, 22, 7, 0]
    if header[0]:
        print("  ".join(h.ljust(w) for h, w in zip(flows.COLUMNS, widths)).rstrip())
        header[0] = False
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def cost_line(cost: Dict[str, Any]) -> Optional[str]:
    """`kernel:    412 ns per connection (...)` for nodemesh status."""
    if not cost.get("enabled"):
        return None
    per = cost.get("kernel_ns_per_connection")
    progs = cost.get("programs") or {}
    busy = ", ".join(f"{name} {p['ns_per_run']:.0f} ns x {p['runs']}"
                     for name, p in sorted(progs.items()) if p.get("runs"))
    fe = cost.get("flow_events") or {}
    text = (f"kernel:    {per:.0f} ns per connection over {cost['connections']} connections"
            if per is not None else "kernel:    no connection balanced yet")
    text += f" ({busy})" if busy else ""
    if fe:
        text += (f"\nflows:     {fe.get('sent', 0)} events sent, "
                 f"{fe.get('lost_rate_limit', 0)} over the rate limit, "
                 f"{fe.get('lost_ring_full', 0)} lost to a full ring")
    return text
