"""`nodemesh`: run the agent, check a config, inspect a running agent, clean up, demo.

Every option of `run` also reads NODEMESH_<NAME> from the environment (e.g.
NODEMESH_METRICS_ADDR); a flag on the command line wins.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import os
import re
import signal
import sys
from typing import Any, Callable, List, Optional, Tuple

from . import __version__, api


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"NODEMESH_{name.upper().replace('-', '_')}", default)


# Option checks for `run`, as argparse types: a bad value, from a flag or from NODEMESH_*
# (argparse passes a string default through the type too), ends the command with one line
# naming the option before anything is created.

def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not host:port with a port 0-65535 (127.0.0.1:9464, :9464 for every "
            f"address, [::1]:9464; port 0 takes a free one)")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{host} is not an IPv6 address") from None
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"{text!r}: put an IPv6 address in brackets, "
                                         f"e.g. [::1]:9464")
    elif host and not re.fullmatch(r"[A-Za-z0-9.-]+", host):
        raise argparse.ArgumentTypeError(f"{host!r} is not an IPv4 address or a host name")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 86400:  # NaN fails too; longer waits overflow thread timeouts
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds "
                                         f"(at most 86400)")
    return value


MAP_SIZE_MAX = 1 << 24  # 64 times the largest default; the preallocated maps grow with it


def _maglev_rows(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 0 <= value <= 1 << 28:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to {1 << 28} "
                                         f"(1 GiB of rows)")
    return value


def _map_size(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not minimum <= value <= MAP_SIZE_MAX:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {minimum} "
                                             f"to {MAP_SIZE_MAX}")
        return value
    return parse


def _socket_path(text: str) -> str:
    size = len(os.fsencode(text))
    if not 0 < size < 108:  # sun_path holds 108 bytes with the final NUL
        raise argparse.ArgumentTypeError(f"a unix socket path takes 1 to 107 bytes; this one "
                                         f"has {size}")
    return text


def _port_or_zero(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535, or 0 for none)")
    return int(text)


def _uid(text: str) -> int:
    if not (text.isdigit() or text == "-1") or int(text) >= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{text!r} is not a uid (or -1 for none)")
    return int(text)


def mesh_args(r: argparse.ArgumentParser) -> None:
    """run's options for the node-local proxy redirect and same-node acceleration."""
    from .mesh import DEFAULT_ACCELERATE_LOCAL, DEFAULT_PROXY_UID

    r.add_argument("--proxy-port", default=_env("proxy_port", "0"), type=_port_or_zero,
                   help="redirect TCP connects to every service to this node-local proxy port "
                        "(services opt out with proxy: {enabled: false}); 0: only services "
                        "with proxy: {port: N} (default)")
    r.add_argument("--proxy-uid", default=_env("proxy_uid", str(DEFAULT_PROXY_UID)), type=_uid,
                   help="the proxy's uid: its connects are balanced, never redirected "
                        f"(default {DEFAULT_PROXY_UID}; -1: none)")
    r.add_argument("--proxy-cgroup", default=_env("proxy_cgroup"),
                   help="cgroup v2 folder of the proxy: its tasks are never redirected")
    env_accel = _env("accelerate_local")
    r.add_argument("--accelerate-local", action=argparse.BooleanOptionalAction,
                   default=DEFAULT_ACCELERATE_LOCAL if env_accel is None
                   else env_accel.lower() in ("1", "true", "yes"),
                   help="move data between two local TCP sockets with sockmap/sk_msg, "
                        "bypassing TCP/IP (see the README for where it helps and hurts)")


def _one_of(*names: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(names)}")
        return text
    return parse


def _table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def cmd_check(args) -> int:
    """Validate a config file, or every file of a config folder (as `run` would read them)."""
    from . import config  # (its YAML and model: not imported before `run` starts its compile)

    folder = os.path.isdir(args.config)
    results: List[Any] = []  # (file, its services or its ConfigError)
    claims = config.Claims()
    try:
        files = config.config_files(args.config) if folder else [args.config]
    except config.ConfigError as e:
        files, results = [], [(args.config, e)]
    for path in files:
        try:
            services = config.load(path)
            clashes = config.cross_file_problems(claims, path, services) if folder else []
            results.append((path, config.ConfigError(path, clashes) if clashes else services))
        except config.ConfigError as e:
            results.append((path, e))
    bad = [r for _, r in results if isinstance(r, config.ConfigError)]
    good = [s for _, r in results if not isinstance(r, config.ConfigError) for s in r]
    frontends = sum(len(s.vips) * len(s.ports) for s in good)

    def problems(e: config.ConfigError) -> List[dict]:
        return [{"path": p.path, "line": p.line, "message": p.message} for p in e.problems]

    if args.output == "json":
        if folder:
            print(json.dumps({"valid": not bad, "file": args.config, "files": [
                {"file": path, "valid": not isinstance(r, config.ConfigError),
                 "problems": problems(r) if isinstance(r, config.ConfigError) else []}
                for path, r in results], "services": len(good), "frontends": frontends},
                indent=2))
        elif bad:
            print(json.dumps({"valid": False, "file": bad[0].filename,
                              "problems": problems(bad[0])}, indent=2))
        else:
            print(json.dumps({"valid": True, "file": args.config, "services": len(good),
                              "frontends": frontends}))
        return 1 if bad else 0
    for e in bad:
        print(str(e), file=sys.stderr)
    if bad and folder:
        print(f"{args.config}: {len(bad)} of {len(results)} files invalid", file=sys.stderr)
    elif not bad:
        print(f"{args.config}: valid ({len(good)} services, {frontends} frontends" +
              (f" in {len(files)} files)" if folder else ")"))
    return 1 if bad else 0


def _port_range(text: str) -> Tuple[int, int]:
    first, _, last = str(text).partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port range FIRST-LAST") from None
    if not 1 <= lo <= hi <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port range (1 <= FIRST <= LAST "
                                         f"<= 65535)")
    return lo, hi


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def lean_log_records() -> None:
    """The agent logs a line a round (a change): its records skip what LOG_FORMAT never
    prints (the caller's file and line, the thread, the process: logging's documented
    optimisations), about a fifth of the line's CPU when it comes cold."""
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None


def cmd_run(args) -> int:
    from .datapath import loader
    from .datapath.loader import DatapathError
    from .datapath.maps import MapSizes
    from .datapath.tc import TcSettings

    tc = TcSettings(ct_entries=args.map_conntrack, tcp_syn_seconds=args.ct_tcp_syn_timeout,
                    tcp_established_seconds=args.ct_tcp_established_timeout,
                    tcp_closing_seconds=args.ct_tcp_closing_timeout,
                    udp_seconds=args.ct_udp_timeout, snat_port_min=args.snat_ports[0],
                    snat_port_max=args.snat_ports[1])
    if tc.problems():
        for problem in tc.problems():
            logging.getLogger("nodemesh").error("%s", problem)
        return 2
    sizes = MapSizes(service_entries=args.map_service_entries, frontends=args.map_frontends,
                     backends=args.map_backends, revnat=args.map_revnat)
    # The compile (clang in a child, ~2 s of a CPU and on the critical path of every start)
    # starts before the agent's own modules are imported (~0.1-0.2 s of this CPU, more on a
    # loaded node). A SIGTERM or SIGINT that comes before the agent's handlers are in place
    # is kept for them: the start then stops as any stopped start does (Agent.run), ending
    # the compile and cleaning up.
    stopped: List[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _: stopped.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    datapath = None
    try:
        datapath = loader.start(args.bpffs, args.cgroup, sizes, args.accelerate_local)
        from .daemon import install_signals, tune_allocator

        tune_allocator()  # before any thread (the compile is a process, not one): see there
        lean_log_records()
        agent = _make_agent(args, sizes, tc)
    except BaseException as e:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if datapath is not None:
            datapath.abandon_load()
            datapath.close()
        if isinstance(e, DatapathError):
            logging.getLogger("nodemesh").error("%s", e)
            return 2
        raise
    install_signals(agent)
    if stopped:
        agent.stop()
    try:
        return agent.run(datapath)
    except DatapathError as e:
        logging.getLogger("nodemesh").error("%s", e)
        return 2
    except RuntimeError as e:
        logging.getLogger("nodemesh").error("%s", e)
        return 2


def _make_agent(args, sizes, tc) -> Any:
    """`nodemesh run`'s Agent, from its options."""
    from .daemon import Agent, Options
    from .mesh import MeshOptions
    from .observability import Settings

    opts = Options(config=args.config, source=args.source, kubeconfig=args.kubeconfig,
                   metrics_addr=args.metrics_addr, metrics_detail=args.metrics_detail,
                   cgroup=args.cgroup, bpffs=args.bpffs,
                   admin_socket=args.admin_socket, node_name=args.node_name,
                   node_zone=args.node_zone,
                   resync_seconds=args.resync_seconds,
                   mesh=MeshOptions(proxy_port=args.proxy_port,
                                    proxy_uid=args.proxy_uid if args.proxy_uid >= 0 else None,
                                    proxy_cgroup=args.proxy_cgroup,
                                    accelerate_local=args.accelerate_local),
                   sizes=sizes,
                   maglev_max_rows=args.maglev_max_rows,
                   interfaces=tuple(dict.fromkeys(args.interface)), tc=tc,
                   observe=Settings(flow_events_rate=args.flow_events_rate,
                                    flow_events_burst=args.flow_events_burst,
                                    backend_latency=args.backend_latency == "on",
                                    bpf_stats=args.bpf_stats == "on"))
    return Agent(opts)


def _admin(args, endpoint: str) -> Any:
    try:
        return api.get(args.admin_socket, endpoint)
    except api.AdminUnavailable as e:
        print(f"nodemesh: {e}", file=sys.stderr)
        raise SystemExit(1)


def _load_state(ok: Optional[bool]) -> str:
    return "last load OK" if ok else "LAST LOAD REJECTED" if ok is False else "no load yet"


def cmd_status(args) -> int:
    st = _admin(args, "/v1/status")
    if args.output == "json":
        print(json.dumps(st, indent=2))
        return 0
    src = st["source"]
    dp = st["datapath"]
    print(f"nodemesh {st['version']} (pid {st['pid']}), "
          f"{'ready' if st['ready'] else 'NOT READY'}, up {st['uptime_seconds']}s")
    print(f"source:    {src['kind']}" + (f" {src['config']}" if src.get("config") else "") +
          f" — {_load_state(src['ok'])}"
          f" ({src['loads']} applied, {src['failures']} rejected)")
    if src.get("error"):
        print("           " + src["error"].replace("\n", "\n           "))
    print(f"datapath:  cgroup {dp['cgroup']}, pins {dp['bpffs']}"
          f" ({'adopted' if dp['adopted_pins'] else 'new'}, loaded in {dp['load_seconds']}s)")
    hooks = ", ".join(f"{h['hook']}#{h['prog_id']}" for h in dp["hooks"] if h["attached"])
    print(f"hooks:     {hooks or 'none attached'}")
    print(f"services:  {st['services']} ({st['frontends']} frontends"
          + (f", {st['failing_frontends']} failing: see 'nodemesh services'"
             if st.get("failing_frontends") else "") + ")")
    for conflict in st.get("conflicts") or []:
        print(f"  conflict: {conflict}")
    la = st.get("last_apply")
    if la:
        print(f"last sync: +{la['added']} ~{la['changed']} -{la['removed']} ={la['unchanged']}"
              f" !{la['failed']}, {la['writes']} map writes in {la['seconds']}s")
        for err in la["errors"]:
            print(f"  error: {err}")
    health = st.get("health") or {}
    checks = health.get("checks") or []
    if checks:
        bad = [c for c in checks if c["state"] == "unhealthy"]
        print(f"checks:    {len(checks)} targets, {len(bad)} unhealthy" +
              "".join(f"\n  unhealthy: {c['namespace']}/{c['service']} {c['address']}:"
                      f"{c['port']} ({c['last_error']})" for c in bad))
    out = [e for e in health.get("ejections") or [] if e["ejected_for_seconds"]]
    for e in out:
        print(f"ejected:   {e['namespace']}/{e['service']} {e['backend']} for another "
              f"{e['ejected_for_seconds']}s (ejection #{e['times']})")
    if health.get("terminated_sockets"):
        print(f"sockets:   {health['terminated_sockets']} terminated to removed backends")
    ev = dp.get("events") or {}
    if any(ev.values()):
        print("events:    " + ", ".join(f"{k}={v}" for k, v in ev.items() if v))
    from .flowscli import cost_line

    line = cost_line(dp.get("cost") or {})
    if line:
        print(line)
    return 0


def cmd_policy_list(args) -> int:
    view = _admin(args, "/v1/policy")
    if args.output == "json":
        print(json.dumps(view, indent=2))
        return 0
    rows = [[str(r["index"]), f"{r['namespace']}/{r['name']}", r["action"],
             f"{r['namespace']}/{r['service']}", ",".join(map(str, r["ports"])) or "*",
             "; ".join(" ".join(f"{k}={v}" for k, v in src.items() if v) or "*"
                       for src in r["from"]) or "*"] for r in view["rules"]]
    print(_table(rows, ["#", "POLICY", "ACTION", "SERVICE", "PORTS", "FROM"]) if rows
          else "no policies")
    wl = [[f"{w['namespace']}/{w['name'] or '-'}", w["serviceAccount"],
           ",".join(f"{k}={v}" for k, v in w["labels"].items()) or "-", str(w["identity"]),
           "off" if not w["socketLB"] else "on", w["cgroup"]] for w in view["workloads"]]
    if wl:
        print()
        print(_table(wl, ["WORKLOAD", "SERVICEACCOUNT", "LABELS", "IDENTITY", "SOCKET LB",
                          "CGROUP"]))
    for line in view["missing"]:
        print(f"not found: {line}")
    for v in view["verdicts"]:
        print(f"{v['namespace']}/{v['service']}: {v['denied']} denied, {v['audited']} audited")
    return 0


def cmd_policy_check(args) -> int:
    from urllib.parse import urlencode

    d = _admin(args, "/v1/policy/check?" + urlencode({"from": args.source, "to": args.target}))
    if args.output == "json":
        print(json.dumps(d, indent=2))
        return 0
    who = d["workload"]
    ident = (f"identity {who['identity']} ({who['namespace']}, {who['serviceAccount']})"
             if who else "no known workload (identity 0)")
    errno_text = f", connect() fails with {d['errno']}" if d["errno"] else ""
    print(f"{d['from']} -> {d['to']}: {d['verdict'].upper()}{errno_text}\n  from: {ident}\n"
          f"  by:   {d['rule']}")
    return 0


def cmd_services(args) -> int:
    from .metrics import backend_label

    services = _admin(args, "/v1/services")
    if args.output == "json":
        print(json.dumps(services, indent=2))
        return 0
    rows = []
    for svc in services:
        for fe in svc["frontends"]:
            host = f"[{fe['vip']}]" if ":" in fe["vip"] else fe["vip"]
            bes = " ".join(
                f"{backend_label(b['address'], b['port'])}(w{b['weight']},{b['connections']})"
                for b in fe["backends"]) or "-"
            state = fe.get("state", "done")
            if state == "error":
                state = f"error (try {fe['retries']}): {fe['error']}"
            rows.append([f"{svc['namespace']}/{svc['name']}", f"{host}:{fe['port']}/"
                         f"{fe['protocol']}", state, fe["algorithm"], fe["selection"],
                         str(fe["connections"]), str(fe["no_backend"]), bes])
    if not rows:
        print("no services programmed")
        return 0
    print(_table(rows, ["SERVICE", "FRONTEND", "STATE", "ALGORITHM", "SET", "CONNS", "REFUSED",
                        "BACKENDS (weight, conns)"]))
    return 0


def cmd_cleanup(args) -> int:
    from .datapath import loader

    try:
        done = loader.cleanup(args.bpffs, force=args.force)
    except (loader.DatapathError, OSError) as e:
        print(f"nodemesh cleanup: {e}", file=sys.stderr)
        return 1
    if not done:
        print(f"nothing to clean: {args.bpffs} does not exist")
    for line in done:
        print(line)
    return 0


def cmd_preflight(args) -> int:
    from . import preflight

    checks = preflight.run_checks(args.cgroup)
    if not args.no_load and all(c.ok for c in checks):
        checks.append(preflight.program_types())
    for c in checks:
        mark = "ok  " if c.ok else "FAIL"
        print(f"[{mark}] {c.name}: {c.detail}")
        if not c.ok and c.fix:
            print(f"       fix: {c.fix}")
    bad = [c for c in checks if not c.ok]
    print("this node can run nodemesh" if not bad else
          f"this node cannot run nodemesh: {len(bad)} check(s) failed")
    return 0 if not bad else 1


def cmd_demo(args) -> int:
    from . import demo

    return demo.run(once=args.once, metrics_addr=args.metrics_addr, connections=args.connections)


def build_parser() -> argparse.ArgumentParser:
    from .datapath.loader import DEFAULT_BPFFS
    from .datapath.maps import MapSizes
    from .datapath.tc import TcSettings

    sizes = MapSizes()
    p = argparse.ArgumentParser(prog="nodemesh", description="In-kernel service load balancing "
                                "agent (eBPF socket hooks) with kernel-sourced metrics.")
    p.add_argument("--version", action="version", version=f"nodemesh {__version__}")
    levels = ["debug", "info", "warning", "error"]
    p.add_argument("--log-level", default=_env("log_level", "info"), type=_one_of(*levels),
                   choices=levels)
    sub = p.add_subparsers(dest="command", required=True)
    # Also accepted after the subcommand (`nodemesh run --log-level debug`); SUPPRESS keeps the
    # global value when it is not given there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["debug", "info", "warning", "error"])

    def admin_opts(sp):
        sp.add_argument("--admin-socket", default=_env("admin_socket", api.DEFAULT_SOCKET))
        sp.add_argument("-o", "--output", choices=["table", "json"], default="table")

    r = sub.add_parser("run", help="run the agent in the foreground", parents=[common])
    r.add_argument("--config", default=_env("config"),
                   help="YAML services file, or a folder of *.yaml files (file source)")
    r.add_argument("--source", default=_env("source", "file"),
                   type=_one_of("file", "kubernetes"), choices=["file", "kubernetes"])
    r.add_argument("--kubeconfig", default=_env("kubeconfig"))
    r.add_argument("--metrics-addr", default=_env("metrics_addr", "127.0.0.1:9464"),
                   type=_host_port, help="host:port, [v6 address]:port, or :port for every "
                                         "address (default 127.0.0.1:9464)")
    r.add_argument("--metrics-detail", default=_env("metrics_detail", "service"),
                   type=_one_of("service", "backend"), choices=["service", "backend"],
                   help="service: per-service series only (default; bounded at 100,000 "
                        "services); backend: per-backend series too")
    r.add_argument("--cgroup", default=_env("cgroup"),
                   help="cgroup v2 folder for the socket hooks (default: the cgroup v2 root)")
    r.add_argument("--bpffs", default=_env("bpffs", DEFAULT_BPFFS))
    r.add_argument("--admin-socket", default=_env("admin_socket", api.DEFAULT_SOCKET),
                   type=_socket_path)
    r.add_argument("--interface", action="append",
                   default=[i for i in (_env("interface") or "").split(",") if i],
                   help="attach the TC packet path (NodePorts, externalIPs, loadBalancerIPs) "
                        "to this interface; repeatable (NODEMESH_INTERFACE: comma-separated)")
    tcs = TcSettings()
    r.add_argument("--snat-ports", default=_env("snat_ports", "32768-60999"), type=_port_range,
                   help="source ports SNAT allocates from, FIRST-LAST (default 32768-60999)")
    for state, default in (("tcp-syn", tcs.tcp_syn_seconds),
                           ("tcp-established", tcs.tcp_established_seconds),
                           ("tcp-closing", tcs.tcp_closing_seconds), ("udp", tcs.udp_seconds)):
        r.add_argument(f"--ct-{state}-timeout", type=int,
                       default=int(_env(f"ct_{state.replace('-', '_')}_timeout", default)),
                       help=f"conntrack lifetime in seconds ({state}; default {default})")
    r.add_argument("--map-conntrack", default=_env("map_conntrack", tcs.ct_entries),
                   type=_map_size(2), help="conntrack entries, two per flow (LRU, "
                                           "preallocated: about 160 bytes each)")
    r.add_argument("--node-name", default=_env("node_name", os.uname().nodename))
    r.add_argument("--node-zone", default=_env("node_zone"),
                   help="this node's zone, for trafficDistribution: PreferClose (the kubernetes "
                        "source reads it from the Node)")
    r.add_argument("--resync-seconds", default=_env("resync_seconds", "300"), type=_seconds,
                   help="how often the kernel maps are compared with the agent's state (a "
                        "full read: about 2 s of CPU at 100,000 services)")
    # Minimums: id 0 means "none" in frontends and backends, so 2 is the least that holds
    # one; a frontend takes a master entry and a slot in services.
    r.add_argument("--map-service-entries", type=_map_size(2),
                   default=_env("map_service_entries", sizes.service_entries))
    r.add_argument("--map-frontends", default=_env("map_frontends", sizes.frontends),
                   type=_map_size(2))
    r.add_argument("--map-backends", default=_env("map_backends", sizes.backends),
                   type=_map_size(2))
    r.add_argument("--map-revnat", default=_env("map_revnat", sizes.revnat), type=_map_size(1))
    r.add_argument("--maglev-max-rows", default=_env("maglev_max_rows", 1 << 24),
                   type=_maglev_rows, help="rows all Maglev tables may hold together (4 bytes "
                   "each in the kernel, twice with the spare tables); default 16777216 = 64 MiB")
    mesh_args(r)
    from .flowscli import add_run_options

    add_run_options(r, _env, _one_of)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check", help="validate a config file (exit 1 if invalid)", parents=[common])
    c.add_argument("--config", default=_env("config"), required=_env("config") is None,
                   help="YAML services file, or a folder of *.yaml files")
    c.add_argument("-o", "--output", choices=["text", "json"], default="text")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser("status", help="the running agent's state", parents=[common])
    admin_opts(s)
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("services", help="programmed services with kernel counters",
                       parents=[common])
    admin_opts(s)
    s.set_defaults(func=cmd_services)

    pol = sub.add_parser("policy", help="workload policies: list them, or check a connection",
                         parents=[common])
    psub = pol.add_subparsers(dest="policy_command", required=True)
    pl = psub.add_parser("list", help="compiled policies, workloads and kernel verdict counts")
    admin_opts(pl)
    pl.set_defaults(func=cmd_policy_list)
    pc = psub.add_parser("check", help="what the kernel decides for one connection, and why")
    pc.add_argument("--from", dest="source", required=True, metavar="NS/POD|CGROUP")
    pc.add_argument("--to", dest="target", required=True, metavar="NS/SVC:PORT")
    admin_opts(pc)
    pc.set_defaults(func=cmd_policy_check)
    from .flowscli import add_flows_parser

    add_flows_parser(sub, common, admin_opts)

    cl = sub.add_parser("cleanup", help="detach the hooks and remove the pins nodemesh made "
                        "(idempotent)", parents=[common])
    cl.add_argument("--bpffs", default=_env("bpffs", DEFAULT_BPFFS))
    cl.add_argument("--force", action="store_true",
                    help="clean up even while an agent owns the folder (it restores its pins "
                         "within seconds: stop it first)")
    cl.set_defaults(func=cmd_cleanup)

    pf = sub.add_parser("preflight", help="check what this node offers", parents=[common])
    pf.add_argument("--no-load", action="store_true",
                    help="skip compiling and loading the programs")
    pf.add_argument("--cgroup", default=_env("cgroup"),
                    help="the cgroup the agent will attach to (default: the cgroup v2 root)")
    pf.set_defaults(func=cmd_preflight)

    d = sub.add_parser("demo", help="backends in netns behind a VIP, balanced, with metrics",
                       parents=[common])
    d.add_argument("--once", action="store_true", help="exit after showing the balance")
    d.add_argument("--metrics-addr", default="127.0.0.1:9464")
    d.add_argument("--connections", type=int, default=300)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format=LOG_FORMAT)
    try:
        return args.func(args) or 0
    except BrokenPipeError:
        # `nodemesh services | head`: the reader left; stop quietly, as cat does. Point
        # stdout at /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a pipe's writer


if __name__ == "__main__":
    sys.exit(main())
