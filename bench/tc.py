"""The TC packet path against a direct connection and kube-proxy's iptables NodePort, side by
side, from a client outside the nodes of nodemesh.lab.cluster.

Three nodes, each one forwarding hop between the client and a pod on it:
  direct     client -> pod p1 (10.77.1.2:8080) routed through node 1, nothing else there
  iptables   client -> node 2:30090, kube-proxy's iptables ruleset for N services in node 2
             (bench/baselines.py's exact layout; the measured service is the last of N in
             KUBE-SERVICES, its NodePort rule in KUBE-NODEPORTS), DNAT to p2, MASQUERADE
  nodemesh   client -> node 3:30080, the agent on node 3 (TC path, N services from the
             Kubernetes API), DNAT + SNAT to p3
  nodemesh-local  the same service with externalTrafficPolicy Local (30081): DNAT only

With Connection: close the backend closes first and keeps TIME_WAIT for (backend, node:port)
60 s, while both SNAT variants (nodemesh Cluster, kube-proxy's MASQUERADE) come round to the
same source ports sooner at thousands of connections per second to ONE backend endpoint.
nodemesh gives a new SYN the port of a flow that is over (FIN both ways or RST, 100 ms
silent); kube-proxy's MASQUERADE --random-fully picks a random port whose reply tuple no
conntrack entry holds (the kernel keeps closed entries 120 s in TIME_WAIT). Either way the
SYN may meet the backend's TIME_WAIT of an earlier flow, which refuses it when its timestamp
is older (on this kernel a client's timestamps are unrelated across connections): the
client resets the TIME_WAIT and resends its SYN (Linux: ~10 ms later). So each round also
records the client's SYN retransmits, nodemesh's SNAT collisions and snat_exhausted drops,
and node 2's conntrack statistics, and the table gives round 1 and the later rounds apart.

New connections per second: wrk, Connection: close, against nginx in the pod. Latency: wrk's
p50 over the same run. Variants alternate round by round; medians with min-max. Also: the
conntrack map's memory (the kernel's memlock for the pinned `ct` map), per 100,000 flows, and
the node's concurrent flow capacity.

    python bench/tc.py [--sizes 1,1000,10000] [--rounds 3] [--seconds 3]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "agent"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from baselines import SvcSpec, iptables_ruleset  # noqa: E402

from nodemesh.lab.cluster import FABRIC_GW, Cluster, new_cluster  # noqa: E402


def k8s_objects(n: int, pod: str, node: str) -> List[dict]:
    """N services, one endpoint each; the last is the measured one (nodePort 30080), and one
    more, the same with externalTrafficPolicy Local (nodePort 30081: no SNAT)."""
    out = []
    for i in range(n + 1):
        name = f"svc{i}"
        ip = f"10.96.{i // 250}.{i % 250 + 1}"
        node_port = {n - 1: 30080, n: 30081}.get(i)
        port = {"name": "p", "port": 80, "protocol": "TCP", "targetPort": 8080}
        if node_port:
            port["nodePort"] = node_port
        out.append({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "namespace": "bench"},
                    "spec": {"type": "NodePort" if node_port else "ClusterIP", "clusterIP": ip,
                             "clusterIPs": [ip], "ipFamilies": ["IPv4"], "ports": [port],
                             "externalTrafficPolicy": "Local" if i == n else "Cluster"}})
        out.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": f"{name}-x", "namespace": "bench",
                                 "labels": {"kubernetes.io/service-name": name}},
                    "addressType": "IPv4",
                    "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
                    "endpoints": [{"addresses": [pod], "nodeName": node,
                                   "conditions": {"ready": True}}]})
    return out


def iptables_nodeport(n: int, pod: str) -> str:
    """kube-proxy's ruleset for N services, the last with NodePort 30090 (KUBE-EXT chain)."""
    specs = [SvcSpec("bench", f"svc{i}", "p", f"10.96.{i // 250}.{i % 250 + 1}", 80,
                     [pod], 8080) for i in range(n)]
    text, _ = iptables_ruleset(specs, "10.244.0.0/16")
    last = specs[-1]
    ext = "KUBE-EXT-" + last.svc_chain()[len("KUBE-SVC-"):]
    extra = [f":{ext} - [0:0]",
             f'-A KUBE-NODEPORTS -m comment --comment "{last.port_name_string}" -m tcp -p tcp '
             f"--dport 30090 -j {ext}",
             f'-A {ext} -m comment --comment "masquerade traffic for {last.port_name_string} '
             'external destinations" -j KUBE-MARK-MASQ',
             f"-A {ext} -j {last.svc_chain()}"]
    head, tail = text.rsplit("COMMIT", 1)
    return head + "\n".join(extra) + "\nCOMMIT" + tail


class Run(NamedTuple):
    rate: float       # requests (= connections) per second
    p50: float        # ms
    requests: int
    syn_retrans: int  # SYNs the client retransmitted during the run
    extra: Dict[str, int]  # per variant: SNAT collisions, conntrack statistics


def wrk(c: Cluster, url: str, seconds: int) -> Tuple[float, float, int]:
    """(requests per second, p50 latency in ms, requests) of wrk with Connection: close."""
    out = c.run_in(c.client, ["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", "-H",
                              "Connection: close", url], timeout=seconds + 30).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    m = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p50 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        print(f"  wrk {url}: {errors.group(0)}", flush=True)
    return rate, p50, requests


def nstat(c: Cluster, netns: str, name: str) -> int:
    """A TCP counter of `netns` (nstat -a: absolute, since the namespace was made)."""
    out = c.run_in(netns, ["nstat", "-asz", name]).stdout
    m = re.search(rf"^{name}\s+(\d+)", out, re.M)
    return int(m.group(1)) if m else 0


def syn_retransmits(c: Cluster) -> int:
    return nstat(c, c.client, "TcpExtTCPSynRetrans")


def nodemesh_counters(c: Cluster, node) -> Dict[str, int]:
    text = c.metrics(node)
    out = {}
    for name, pattern in (("snat_collisions", r"^nodemesh_snat_collisions_total (\S+)$"),
                          ("snat_exhausted",
                           r'^nodemesh_drops_total\{reason="snat_exhausted"\} (\S+)$')):
        m = re.search(pattern, text, re.M)
        out[name] = int(float(m.group(1))) if m else 0
    return out


CT_STATS = ("insert_failed", "drop", "invalid", "clash_resolve", "early_drop")


def conntrack_counters(c: Cluster, netns: str) -> Dict[str, int]:
    """The kernel conntrack's statistics in `netns` (summed over CPUs), and its TIME_WAIT
    entries."""
    out = dict.fromkeys(CT_STATS, 0)
    for m in re.finditer(r"(\w+)=(\d+)", c.run_in(netns, ["conntrack", "-S"]).stdout):
        if m.group(1) in out:
            out[m.group(1)] += int(m.group(2))
    listing = c.run_in(netns, ["conntrack", "-L", "-p", "tcp", "--state", "TIME_WAIT"],
                       check=False).stdout
    out["time_wait_entries"] = listing.count("\n")
    return out


def measure(c: Cluster, name: str, url: str, seconds: int, n1, n2, n3) -> Run:
    """One wrk run, with the counters that say where connections waited or failed."""
    pod = {"direct": n1, "iptables": n2}.get(name, n3).pod_netns

    def counters() -> Dict[str, int]:
        # SYNs the backend's TIME_WAIT refused for an older timestamp (PAWS)
        out = {"backend_paws_timewait": nstat(c, pod, "TcpExtPAWSTimewait")}
        if name == "iptables":
            out.update(conntrack_counters(c, n2.netns))
        if name.startswith("nodemesh"):
            out.update(nodemesh_counters(c, n3))
        return out
    syn0, before = syn_retransmits(c), counters()
    rate, p50, requests = wrk(c, url, seconds)
    syn1, after = syn_retransmits(c), counters()
    extra = {k: v - before.get(k, 0) for k, v in after.items() if k != "time_wait_entries"}
    if "time_wait_entries" in after:
        extra["time_wait_entries"] = after["time_wait_entries"]
    return Run(rate, p50, requests, syn1 - syn0, extra)


def memlock(pin: str) -> int:
    out = subprocess.run(["bpftool", "map", "show", "pinned", pin], capture_output=True,
                         text=True, check=True).stdout
    return int(re.search(r"memlock (\d+)B", out).group(1))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,1000,10000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    from k8s_fake_apiserver import FakeApiServer
    from tcrun import InNetns

    workdir = tempfile.mkdtemp(prefix="nm-bench-tc-")
    c = new_cluster(workdir, 3)
    results: Dict[Tuple[int, str], List[Run]] = {}
    facts: List[str] = []
    try:
        n1, n2, n3 = c.nodes
        for node in c.nodes:
            c.start_pod_servers(node)
        c.run_in(c.client, ["ip", "route", "add", "10.77.1.0/24", "via", n1.address])
        c.run_in(n2.netns, ["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])
        for n in sizes:
            with InNetns(c.fabric):
                api = FakeApiServer(host=FABRIC_GW)
            api.load(k8s_objects(n, n3.pod, n3.name))
            api.start()
            kubeconfig = api.write_kubeconfig(f"{workdir}/kubeconfig")
            t0 = time.monotonic()
            c.start_agent(n3, kubeconfig)
            c.wait_ready(n3, timeout=180)
            facts.append(f"N={n}: agent on node 3 ready in {time.monotonic() - t0:.1f} s")
            rules = iptables_nodeport(n, n2.pod)
            subprocess.run(["ip", "netns", "exec", n2.netns, "iptables-restore"], input=rules,
                           text=True, check=True)
            variants = {"direct": f"http://{n1.pod}:8080/who",
                        "iptables": f"http://{n2.address}:30090/who",
                        "nodemesh": f"http://{n3.address}:30080/who",
                        "nodemesh-local": f"http://{n3.address}:30081/who"}
            for name, url in variants.items():  # warm-up, and a check that each answers
                assert c.curl(url).strip() in ("p1", "p2", "p3"), name
                wrk(c, url, 1)
            for r in range(args.rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for name in order:
                    run = measure(c, name, variants[name], args.seconds, n1, n2, n3)
                    results.setdefault((n, name), []).append(run)
                    print(f"N={n} round {r + 1} {name}: {run.rate:.0f} conn/s, p50 "
                          f"{run.p50:.3f} ms, {run.requests} conns, client SYN retransmits "
                          f"{run.syn_retrans}, {run.extra}", flush=True)
            if n == sizes[-1]:
                ct = memlock(f"{n3.bpffs}/ct")
                facts.append(f"conntrack map: {ct} B memlock for 131,072 entries = "
                             f"{ct / 131072:.0f} B an entry; 100,000 flows (200,000 entries) "
                             f"= {ct / 131072 * 200000 / 2**20:.1f} MiB")
            os.killpg(n3.agent.pid, 15)
            n3.agent.wait(timeout=30)
            c.processes.remove(n3.agent)
            api.stop()
            subprocess.run(["ip", "netns", "exec", n2.netns, "iptables", "-t", "nat", "-F"])
        print(report(results, sizes, facts, " ".join(sys.argv)))
    finally:
        c.destroy()
    return 0


def report(results, sizes, facts, command: str) -> str:
    def med(vals):
        return statistics.median(vals), min(vals), max(vals)

    lines = [f"# TC path benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"`{command}`; load average {os.getloadavg()[0]:.1f} at the end.", "",
             "All rounds, and round 1 (fresh ports and conntrack) apart from the later rounds "
             "(steady state: ports come round again). SYN retx: the client's retransmitted "
             "SYNs per round (median): SYNs lost or refused (e.g. by a backend's TIME_WAIT); "
             "a Linux client resends after ~10 ms when refused, 1 s when lost. Backend PAWS: "
             "SYNs the backend's TIME_WAIT refused for an older timestamp, per round "
             "(median).", "",
             "| N services | variant | new conns/s median (min-max) | ratio to direct | "
             "round 1 | rounds 2+ median | ratio to direct, rounds 2+ | p50 latency ms | "
             "SYN retx | backend PAWS |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        direct = med([r.rate for r in results[(n, "direct")]])[0]
        later_direct = statistics.median([r.rate for r in results[(n, "direct")][1:]] or
                                         [direct])
        for name in ("direct", "nodemesh", "nodemesh-local", "iptables"):
            runs = results[(n, name)]
            rates = med([r.rate for r in runs])
            later = statistics.median([r.rate for r in runs[1:]] or [runs[0].rate])
            lat = med([r.p50 for r in runs])
            retx = statistics.median([r.syn_retrans for r in runs])
            paws = statistics.median([r.extra.get("backend_paws_timewait", 0) for r in runs])
            lines.append(f"| {n:,} | {name} | {rates[0]:,.0f} ({rates[1]:,.0f}-{rates[2]:,.0f}) "
                         f"| {rates[0] / direct:.2f}x | {runs[0].rate:,.0f} | {later:,.0f} | "
                         f"{later / later_direct:.2f}x | {lat[0]:.2f} | {retx:.0f} | "
                         f"{paws:.0f} |")
    lines.append("")
    for n in sizes:
        nm = results[(n, "nodemesh")]
        conns = sum(r.requests for r in nm)
        coll = sum(r.extra.get("snat_collisions", 0) for r in nm)
        exh = sum(r.extra.get("snat_exhausted", 0) for r in nm)
        ipt = results[(n, "iptables")]
        ct = {k: sum(r.extra.get(k, 0) for r in ipt) for k in CT_STATS}
        tw = max(r.extra.get("time_wait_entries", 0) for r in ipt)
        lines.append(f"- N={n}: nodemesh (Cluster) SNAT collisions {coll:,} over {conns:,} "
                     f"connections ({coll / max(conns, 1):.3f} a connection), snat_exhausted "
                     f"drops {exh:,}; iptables: node 2's conntrack over its rounds "
                     + ", ".join(f"{k} {v:,}" for k, v in ct.items())
                     + f", up to {tw:,} TIME_WAIT entries after a round")
    lines += [f"- {f}" for f in facts]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
