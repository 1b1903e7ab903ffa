#!/usr/bin/env python3
"""Does same-node acceleration (--accelerate-local: sockops + sk_msg) pay? Side by side, in
one run, with and without it, on the direct path and through the node-local proxy.

    .venv/bin/python bench/accel.py                 # 5 rounds of 2 s per measurement
    .venv/bin/python bench/accel.py --reps 7 --seconds 3

Setup, all in one lab client netns inside the hooked cgroup (nothing leaves the machine: the
servers listen on loopback, the lab's VIP range is blackholed): nginx (1 worker) on
127.0.0.1:8081 answering /64 (64 B body) and /16k (16 KiB body), an iperf3 server on
127.0.0.1:5201, and Debian's HAProxy (mode tcp, `server 0.0.0.0:0`) on 127.0.0.1:15001 in a
child cgroup given as --proxy-cgroup. Two services with `proxy: {port: 15001}` send their
VIPs to HAProxy, which connects on to the original destination and is balanced to the local
nginx / iperf3: app -> proxy -> backend, both hops local.

Variants: `off` and `on` differ only in mesh_config.accelerate (the same programs stay
attached), flipped between runs: rounds go off, on, off, on ... (ABAB), after one warm-up of
each. Measurements (each a fresh process, so no socket outlives its variant):
  throughput, 1 and 16 streams       iperf3 -c 127.0.0.1 [-P 16], Gbit/s (receiver)
  req/resp latency p50/p99, 64 B / 16 KiB   wrk -t1 -c1 --latency (one keep-alive connection)
  new connections/s                  wrk -t1 -c16 -H "Connection: close"
  the same through the proxy         the VIPs instead of 127.0.0.1 (redirected to HAProxy)
Reported: median and min-max over the rounds, and the ratio of medians on/off.
Results: bench/results/accel-<date>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "agent"))

from nodemesh.datapath.loader import Datapath, cleanup  # noqa: E402
from nodemesh.lab.topology import Lab, new_lab  # noqa: E402
from nodemesh.mesh import MeshOptions, accel_counters, write_mesh_config  # noqa: E402
from nodemesh.model import Backend, Service, ServicePort  # noqa: E402
from nodemesh.reconciler import Reconciler  # noqa: E402

PROXY_PORT = 15001


def run_in(lab: Lab, argv: List[str], timeout: float) -> str:
    proc = lab.spawn(argv, netns=lab.client_ns, in_cgroup=True, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        lab.processes.remove(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {err.strip()[:300]}")
    return out


def iperf(lab: Lab, host: str, streams: int, seconds: float) -> float:
    for attempt in range(3):
        out = run_in(lab, ["iperf3", "-c", host, "-p", "5201", "-t", str(seconds), "-P",
                           str(streams), "-J"], seconds + 20)
        result = json.loads(out)
        if "sum_received" in result.get("end", {}):
            return result["end"]["sum_received"]["bits_per_second"] / 1e9
        # iperf3's one server answers "busy" while it still winds down the previous test.
        time.sleep(1.0)
    raise RuntimeError(f"iperf3 gave no result: {result.get('error', out[:200])}")


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1e6}


def _latency(text: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        raise RuntimeError(f"no {pct}% in wrk output:\n{text}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk_latency(lab: Lab, url: str, seconds: float) -> Tuple[float, float]:
    out = run_in(lab, ["wrk", "-t1", "-c1", f"-d{seconds:g}s", "--latency", url], seconds + 20)
    return _latency(out, "50"), _latency(out, "99")


def wrk_conns(lab: Lab, url: str, seconds: float) -> float:
    out = run_in(lab, ["wrk", "-t1", "-c16", f"-d{seconds:g}s", "-H", "Connection: close", url],
                 seconds + 20)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or "Non-2xx" in out:
        raise RuntimeError(f"wrk failed:\n{out}")
    return float(m.group(1))


def start_servers(lab: Lab, workdir: Path, proxy_cgroup: str) -> None:
    tmp = workdir / "nginx"
    tmp.mkdir(parents=True, exist_ok=True)
    www = workdir / "www"
    www.mkdir(exist_ok=True)
    (www / "64").write_bytes(b"y" * 64)
    (www / "16k").write_bytes(b"x" * 16384)
    (workdir / "nginx.conf").write_text(f"""pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
worker_processes 1;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000; sendfile off; default_type text/plain;
  client_body_temp_path {tmp}; proxy_temp_path {tmp};
  fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{ listen 127.0.0.1:8081 reuseport backlog=4096;
           root {www}; }}
}}
""")
    lab.spawn(["nginx", "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"],
              netns=lab.client_ns, in_cgroup=True)
    lab.spawn(["iperf3", "-s", "-B", "127.0.0.1", "-p", "5201"], netns=lab.client_ns,
              in_cgroup=True, stdout=subprocess.DEVNULL)
    (workdir / "haproxy.cfg").write_text(f"""global
  maxconn 8192
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend mesh
  bind 127.0.0.1:{PROXY_PORT}
  default_backend original
backend original
  server original 0.0.0.0:0
""")
    # Join the proxy cgroup before `ip netns exec`, which remounts /sys.
    lab.spawn(["sh", "-c", f"echo $$ > {proxy_cgroup}/cgroup.procs && exec ip netns exec "
                           f"{lab.client_ns} haproxy -db -f {workdir / 'haproxy.cfg'}"],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)


def measurements(lab: Lab, vip_http: str, vip_iperf: str, seconds: float
                 ) -> Dict[str, Callable[[], Dict[str, float]]]:
    def lat(url, tag):
        def f():
            p50, p99 = wrk_latency(lab, url, seconds)
            return {f"{tag} p50 (µs)": p50, f"{tag} p99 (µs)": p99}
        return f
    return {
        "tput1": lambda: {"throughput 1 stream (Gbit/s)": iperf(lab, "127.0.0.1", 1, seconds)},
        "tput16": lambda: {"throughput 16 streams (Gbit/s)":
                           iperf(lab, "127.0.0.1", 16, seconds)},
        "lat64": lat("http://127.0.0.1:8081/64", "req/resp 64 B"),
        "lat16k": lat("http://127.0.0.1:8081/16k", "req/resp 16 KiB"),
        "conns": lambda: {"new connections/s": wrk_conns(lab, "http://127.0.0.1:8081/64",
                                                         seconds)},
        "p_tput1": lambda: {"proxy: throughput 1 stream (Gbit/s)":
                            iperf(lab, vip_iperf, 1, seconds)},
        "p_lat64": lat(f"http://{vip_http}/64", "proxy: req/resp 64 B"),
        "p_lat16k": lat(f"http://{vip_http}/16k", "proxy: req/resp 16 KiB"),
        "p_conns": lambda: {"proxy: new connections/s": wrk_conns(lab, f"http://{vip_http}/64",
                                                                  seconds)},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" /
                                         f"accel-{time.strftime('%Y-%m-%d')}.md"))
    args = ap.parse_args()
    import sigterm  # bench/: a kill tears the lab down too
    sigterm.exit_on_sigterm()
    lab = new_lab("nmb", backends=0, host_blackhole=True)
    workdir = Path(f"/tmp/{lab.prefix}-accel")
    workdir.mkdir(exist_ok=True)
    proxy_cgroup = os.path.join(lab.cgroup, "proxy")
    dp = None
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        os.makedirs(proxy_cgroup, exist_ok=True)
        dp = Datapath(lab.bpffs, lab.cgroup, accelerate=True)
        maps = dp.load()
        vip_http, vip_iperf = lab.vip4(80), lab.vip4(81)
        Reconciler(maps).apply([
            Service("web", "bench", vip_http, (ServicePort(80, 8081),), (Backend("127.0.0.1"),),
                    proxy_port=PROXY_PORT),
            Service("iperf", "bench", vip_iperf, (ServicePort(5201, 5201),),
                    (Backend("127.0.0.1"),), proxy_port=PROXY_PORT)])

        def variant(on: bool) -> None:
            write_mesh_config(maps, MeshOptions(proxy_cgroup=proxy_cgroup, proxy_uid=None,
                                                accelerate_local=on))
        variant(True)
        dp.attach()
        start_servers(lab, workdir, proxy_cgroup)
        tests = measurements(lab, vip_http, vip_iperf, args.seconds)
        results: Dict[str, Dict[str, List[float]]] = {"off": {}, "on": {}}
        moved = {"off": 0, "on": 0}
        for rnd in range(args.reps + 1):  # round 0: warm-up, not counted
            for name in ("off", "on"):
                variant(name == "on")
                before = accel_counters(maps)["redirected_bytes"]
                for key, fn in tests.items():
                    for label, value in fn().items():
                        if rnd:
                            results[name].setdefault(label, []).append(value)
                moved[name] += accel_counters(maps)["redirected_bytes"] - before
                print(f"round {rnd} {name}: done", file=sys.stderr, flush=True)
        load_after = os.getloadavg()
        write_report(args, results, moved, load_before, load_after,
                     time.monotonic() - started)
    finally:
        if dp is not None:
            dp.close()
        cleanup(lab.bpffs)
        lab.destroy()
        try:
            os.rmdir(proxy_cgroup)
        except OSError:
            pass
    return 0


def write_report(args, results, moved, load_before, load_after, elapsed) -> None:
    def cell(values: List[float]) -> str:
        return f"{statistics.median(values):.4g} ({min(values):.4g}–{max(values):.4g})"
    lines = [f"# Same-node acceleration (--accelerate-local): {time.strftime('%Y-%m-%d')}",
             "",
             f"`.venv/bin/python bench/accel.py --reps {args.reps} --seconds {args.seconds:g}` "
             f"on {os.cpu_count()} CPUs, kernel {os.uname().release}; {elapsed:.0f} s. "
             f"Load average {load_before[0]:.1f} before, {load_after[0]:.1f} after: other "
             "engineers' tests and benchmarks were running on this machine at the same time, "
             "so ranges are wide; read the medians and the ratios, not single runs.",
             "",
             f"Rounds alternate off/on (ABAB), {args.reps} rounds after a warm-up, "
             f"{args.seconds:g} s per measurement. Medians (min–max). Ratio: on / off "
             "(> 1 is better for throughput and connections/s, < 1 is better for latency).",
             "",
             "| measurement | off | on | on/off |",
             "|---|---|---|---|"]
    for label in results["off"]:
        off, on = results["off"][label], results["on"][label]
        lines.append(f"| {label} | {cell(off)} | {cell(on)} | "
                     f"{statistics.median(on) / statistics.median(off):.2f} |")
    lines += ["",
              f"Bytes the sk_msg program moved socket to socket during the measured rounds: "
              f"off {moved['off']:,}, on {moved['on']:,} (proof that `on` was accelerated "
              "and `off` was not).", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
