"""The soak (issue 14; not CI): the real agent for 10 minutes under a steady connection rate,
with backend churn, UDP flows, health flapping and config reloads, in a disposable lab.

    .venv/bin/python bench/soak.py [--minutes 10] [--out bench/results]

Every --sample seconds it records the agent's RSS, descriptors and threads (psutil) and every
map's entry count; at the end it counts failed connections (the target is zero), lists any
stale map entry, and writes bench/results/soak.md, soak.json and soak.png (RSS and map
entries over time). Root only: it builds a lab (netns, a cgroup, pins) and removes it.

What runs at once:
- TCP clients (new connection each time) and UDP clients (new socket per datagram) to `web`
  (TCP 80, UDP 53), and TCP clients to `sticky` (session affinity);
- every 0.5 s the config is rewritten with a new backend set and weights for both, and
  reloaded (SIGHUP);
- every 30 s, 500 filler services are added or removed in the same file (a large reload);
- web's third backend fails its health checks (a TCP reset on its health port) and recovers
  every 300 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "agent")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import psutil  # noqa: E402
from fault_lab import Flapper, Traffic, dump  # noqa: E402
from helpers import AgentProcess, config_yaml, service_yaml  # noqa: E402

from nodemesh.lab.topology import new_lab, reap_stale  # noqa: E402

HEALTH_PORT = 9090
UDP = "      - {port: 53, targetPort: 5353, protocol: UDP}"


def config(lab, step: int, fillers: bool) -> str:
    b = lab.backends
    sets = [[0, 1, 2], [1, 2], [0, 2], [0, 1, 2], [2, 0], [0, 1]]
    web_set = [b[i] for i in sets[step % len(sets)]]
    sticky_set = [b[i] for i in sets[(step + 2) % len(sets)]]
    web = service_yaml("web", lab.vip4(), [x.ipv4 for x in web_set],
                       weights=[1 + (step + j) % 3 for j in range(len(web_set))],
                       extra_ports=UDP)
    web += (f"    healthCheck: {{type: tcp, port: {HEALTH_PORT}, intervalSeconds: 0.1, "
            f"timeoutSeconds: 0.1, unhealthyThreshold: 1, healthyThreshold: 1}}\n")
    sticky = service_yaml("sticky", lab.vip4(11), [x.ipv4 for x in sticky_set]) + \
        "    sessionAffinity: {clientIP: {timeoutSeconds: 60}}\n"
    filler = "".join(service_yaml(f"f{i}", f"10.96.{i // 250}.{i % 250 + 1}",
                                  ["10.250.0.1", "10.250.0.2"], namespace="fill")
                     for i in range(500)) if fillers else ""
    return config_yaml(web, sticky, filler)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    seconds = args.minutes * 60
    reap_stale()
    import sigterm  # bench/: a kill tears the lab down too
    sigterm.exit_on_sigterm()
    lab = new_lab("nms", backends=3, host_link=True)
    workdir = tempfile.mkdtemp(prefix="nodemesh-soak-")
    agent = AgentProcess(lab, workdir)
    samples, reloads = [], [0]
    try:
        lab.start_servers(tcp_ports=(8080, HEALTH_PORT), udp_ports=(5353,))
        agent.write_config(config(lab, 0, False))
        agent.start()
        proc = psutil.Process(agent.proc.pid)
        stop = threading.Event()

        def churn():
            step = 0
            while not stop.wait(0.5):
                step += 1
                agent.write_config(config(lab, step, fillers=(step // 60) % 2 == 1))
                agent.send(signal.SIGHUP)
                reloads[0] += 1

        started = time.monotonic()
        with Traffic(lab, workdir, max_seconds=seconds + 60, tcp_clients=2, udp_clients=1) \
                as web, \
                Traffic(lab, workdir, vip=lab.vip4(11), tcp_clients=1, udp_clients=0,
                        max_seconds=seconds + 60) as sticky, \
                Flapper(lab.backends[2].netns, HEALTH_PORT, 0.3, seconds + 60) as flapper:
            churner = threading.Thread(target=churn, daemon=True)
            churner.start()
            while time.monotonic() - started < seconds:
                with proc.oneshot():
                    sample = {"t": round(time.monotonic() - started, 1),
                              "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                              "fds": proc.num_fds(), "threads": proc.num_threads()}
                sample.update(dump(lab.bpffs).counts())
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                time.sleep(args.sample)
            stop.set()
            churner.join()
            flips = flapper.flips
        # The last config, applied, then what the maps hold.
        agent.write_config(config(lab, 0, False))
        agent.send(signal.SIGHUP)
        time.sleep(2)
        final = dump(lab.bpffs)
        status = agent.status()
        result = {
            "minutes": args.minutes, "reloads_written": reloads[0],
            "reloads_applied": status["source"]["loads"], "health_flips": flips,
            "web": web.results, "sticky": sticky.results,
            "failed": web.failed() + sticky.failed(), "ok": web.ok() + sticky.ok(),
            "stale_after": final.stale(), "final_counts": final.counts(),
            "agent_alive": agent.proc.poll() is None,
            "worker_restarts": agent.metric("nodemesh_worker_restarts_total"),
            "load_average": os.getloadavg(), "samples": samples,
        }
    finally:
        agent.stop()
        lab.destroy()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_report(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return 0 if result["failed"] == 0 and not result["stale_after"] else 1


def write_report(result: dict, out: str) -> None:
    s = result["samples"]
    first, last = s[0], s[-1]
    peak = {k: max(x[k] for x in s) for k in first if k != "t"}
    lines = [
        f"# Soak: {result['minutes']:g} minutes (bench/soak.py)", "",
        f"- connections and flows: {result['ok']} ok, **{result['failed']} failed**",
        f"- config reloads: {result['reloads_written']} written, "
        f"{result['reloads_applied']} applied; health flips: {result['health_flips']}",
        f"- stale map entries after the last reload: {result['stale_after'] or 'none'}",
        f"- agent alive at the end: {result['agent_alive']}; worker restarts: "
        f"{result['worker_restarts']:g}; load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in result['load_average'])}", "",
        "| | first sample | last sample | peak |", "|---|---|---|---|",
    ]
    lines += [f"| {k} | {first[k]} | {last[k]} | {peak[k]} |" for k in first if k != "t"]
    lines += ["", "![RSS and map entries over time](soak.png)", ""]
    with open(os.path.join(out, "soak.md"), "w") as f:
        f.write("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    t = [x["t"] / 60 for x in s]
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    a.plot(t, [x["rss_mib"] for x in s], label="RSS (MiB)")
    a.plot(t, [x["fds"] for x in s], label="descriptors")
    a.plot(t, [x["threads"] for x in s], label="threads")
    a.set_ylabel("agent")
    a.legend()
    for key in ("services", "backends", "svc_stats", "backend_stats", "revnat", "affinity",
                "endpoint_health"):
        b.plot(t, [max(x[key], 0.5) for x in s], label=key)
    b.set_yscale("log")
    b.set_ylabel("map entries")
    b.set_xlabel("minutes")
    b.legend(fontsize="small", ncol=2)
    fig.suptitle(f"nodemesh soak: {result['failed']} failed of {result['ok']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "soak.png"), dpi=80)


if __name__ == "__main__":
    sys.exit(main())
