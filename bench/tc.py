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

Is direct a fair baseline? It takes the same hops as the NodePort path: the client's veth,
the fabric bridge, the node's eth0, the node's pod veth, the pod (in a cluster an external
client reaching a pod IP is routed through the pod's node, as here). What it lacks is exactly
the NAT: no TC program, no agent. The node forwards it through the kernel's IP stack (no
netfilter rules, so no kernel conntrack in node 1 or 3; only node 2 has rules), while the TC
path hands the packet to the pod's veth with bpf_redirect_neigh and skips that stack. Each
variant has its own pod (one nginx worker each), so TIME_WAIT at one backend does not slow
another.

New connections per second: wrk, Connection: close, against nginx in the pod. Latency: wrk's
p50 over the same run. Within a round direct and the nodemesh variants run back to back (the
order reversed every other round, iptables last), so each round gives a paired ratio
nodemesh/direct taken a few seconds apart: the table gives the median of those per-round
ratios with their min-max (the tolerance: on a shared 2-CPU machine single rounds scatter by
about +-15%). With --bpf-stats, kernel.bpf_stats_enabled is on for the run (restored after)
and each nodemesh round records the TC programs' ns per packet on node 3. Each round also
records the agent's own CPU time (it shares the 2 CPUs with wrk and nginx). Also: the
conntrack map's memory (the kernel's memlock for the pinned `ct` map), per 100,000 flows, and
the node's concurrent flow capacity.

    python bench/tc.py [--sizes 1,1000,10000] [--rounds 3] [--seconds 3] [--bpf-stats]
                       [--variants direct,nodemesh,nodemesh-local,iptables] [--node-conntrack]
"""
from __future__ import annotations

import argparse
import json
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


def kernel_ct_entries(c: Cluster, netns: str) -> int:
    """The kernel conntrack's entries in `netns` (0 when nothing there makes it track)."""
    out = c.run_in(netns, ["conntrack", "-C"], check=False).stdout.strip()
    return int(out) if out.isdigit() else 0


def tc_prog_ids(c: Cluster, netns: str) -> Dict[int, str]:
    """{program id: name} of the TC programs attached in `netns` (node 3's agent)."""
    out = json.loads(c.run_in(netns, ["bpftool", "-j", "net", "show"]).stdout or "[]")
    ids: Dict[int, str] = {}
    for section in out:
        for entry in section.get("tc", []):
            ids[entry["id"]] = entry["name"]
    return ids


def prog_stats(ids: Dict[int, str]) -> Dict[str, Tuple[int, int]]:
    """{program name: (run_cnt, run_time_ns)} summed over the programs of that name."""
    out = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                    text=True, check=True).stdout)
    sums: Dict[str, Tuple[int, int]] = {}
    for prog in out:
        if prog["id"] in ids:
            name = prog.get("name", "")
            cnt, ns = sums.get(name, (0, 0))
            sums[name] = (cnt + prog.get("run_cnt", 0), ns + prog.get("run_time_ns", 0))
    return sums


def agent_cpu_ms(node) -> int:
    """The agent's user + system CPU time so far (ms); its pid is nsenter's, exec'd into python."""
    try:
        with open(f"/proc/{node.agent.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1000 // os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError):
        return 0


def measure(c: Cluster, name: str, url: str, seconds: int, n1, n2, n3,
            prog_ids: Dict[int, str]) -> Run:
    """One wrk run, with the counters that say where connections waited or failed."""
    pod = {"direct": n1, "iptables": n2}.get(name, n3).pod_netns

    def counters() -> Dict[str, int]:
        # SYNs the backend's TIME_WAIT refused for an older timestamp (PAWS)
        out = {"backend_paws_timewait": nstat(c, pod, "TcpExtPAWSTimewait")}
        if name == "iptables":
            out.update(conntrack_counters(c, n2.netns))
        if name.startswith("nodemesh"):
            out.update(nodemesh_counters(c, n3))
            # does the node's own (kernel) conntrack track the flows too? Its entries now
            out["node3_kernel_ct"] = kernel_ct_entries(c, n3.netns)
            for prog, (cnt, ns) in prog_stats(prog_ids).items():
                out[f"{prog}_runs"], out[f"{prog}_ns"] = cnt, ns
        return out
    syn0, before = syn_retransmits(c), counters()
    cpu0 = agent_cpu_ms(n3)  # around wrk alone: the scrapes above cost the agent CPU too
    rate, p50, requests = wrk(c, url, seconds)
    before["agent_cpu_ms"], cpu1 = cpu0, agent_cpu_ms(n3)
    syn1, after = syn_retransmits(c), counters()
    after["agent_cpu_ms"] = cpu1
    extra = {k: v - before.get(k, 0) for k, v in after.items()
             if k not in ("time_wait_entries", "node3_kernel_ct")}
    for k in ("time_wait_entries", "node3_kernel_ct"):
        if k in after:
            extra[k] = after[k]
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
    ap.add_argument("--bpf-stats", action="store_true",
                    help="turn kernel.bpf_stats_enabled on for the run: ns per packet")
    ap.add_argument("--variants", default="direct,nodemesh,nodemesh-local,iptables")
    ap.add_argument("--node-conntrack", action="store_true",
                    help="make nodes 1 and 3 track connections in the kernel as a node with "
                         "any stateful firewall rule does (one conntrack rule in FORWARD)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    chosen = args.variants.split(",")
    stats_before = None
    if args.bpf_stats:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            stats_before = f.read().strip()
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write("1")
    try:
        return bench(args, sizes, chosen)
    finally:
        if stats_before is not None:
            with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
                f.write(stats_before)


def bench(args, sizes: List[int], chosen: List[str]) -> int:
    from k8s_fake_apiserver import FakeApiServer
    from tcrun import InNetns

    workdir = tempfile.mkdtemp(prefix="nm-bench-tc-")
    import sigterm  # bench/: a kill tears the lab down too
    sigterm.exit_on_sigterm()
    c = new_cluster(workdir, 3)
    results: Dict[Tuple[int, str], List[Run]] = {}
    facts: List[str] = [f"load average at the start: "
                        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"]
    try:
        n1, n2, n3 = c.nodes
        for node in c.nodes:
            c.start_pod_servers(node)
        c.run_in(c.client, ["ip", "route", "add", "10.77.1.0/24", "via", n1.address])
        c.run_in(n2.netns, ["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])
        if args.node_conntrack:
            # A rule that needs conntrack makes the kernel track every packet of the netns
            # (node 2 has kube-proxy's rules, so it tracks anyway). Direct's forwarded packets
            # then pay for it; the TC path's redirected ones, which leave before the IP
            # stack, should not: node 3's entries after each round show which.
            for node in (n1, n3):
                c.run_in(node.netns, ["iptables", "-A", "FORWARD", "-m", "conntrack",
                                      "--ctstate", "INVALID", "-j", "DROP"])
            facts.append("--node-conntrack: nodes 1 and 3 track connections (nf_conntrack)")
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
            urls = {"direct": f"http://{n1.pod}:8080/who",
                    "nodemesh": f"http://{n3.address}:30080/who",
                    "nodemesh-local": f"http://{n3.address}:30081/who",
                    "iptables": f"http://{n2.address}:30090/who"}
            variants = {k: v for k, v in urls.items() if k in chosen}
            prog_ids = tc_prog_ids(c, n3.netns)
            for name, url in variants.items():  # warm-up, and a check that each answers
                assert c.curl(url).strip() in ("p1", "p2", "p3"), name
                wrk(c, url, 1)
            paired = [v for v in variants if v != "iptables"]
            for r in range(args.rounds):
                # direct and the nodemesh variants back to back (ABAB across rounds), then
                # iptables, whose runs are slow and not what the ratios compare
                order = paired if r % 2 == 0 else list(reversed(paired))
                for name in order + (["iptables"] if "iptables" in variants else []):
                    run = measure(c, name, variants[name], args.seconds, n1, n2, n3, prog_ids)
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
        print(report(results, sizes, facts, " ".join(sys.argv), chosen))
    finally:
        c.destroy()
    return 0


def ns_per_connection(runs: List[Run]) -> str:
    """Both TC programs' bpf_stats time over the connections wrk made: what a connection
    costs in them, whatever the packet count (a skipped egress run is cheap but counted)."""
    ns = sum(r.extra.get(f"{p}_ns", 0) for r in runs for p in ("nm_tc_ingress", "nm_tc_egress"))
    conns = sum(r.requests for r in runs)
    return f"{ns / conns:,.0f}" if ns and conns else "-"


def ns_per_packet(runs: List[Run], prog: str) -> str:
    cnt = sum(r.extra.get(f"{prog}_runs", 0) for r in runs)
    ns = sum(r.extra.get(f"{prog}_ns", 0) for r in runs)
    return f"{ns / cnt:,.0f}" if cnt and ns else "-"


def report(results, sizes, facts, command: str, chosen: List[str]) -> str:
    def med(vals):
        return statistics.median(vals), min(vals), max(vals)

    lines = [f"# TC path benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"`{command}`; load average {os.getloadavg()[0]:.1f} at the end.", "",
             "All rounds, and round 1 (fresh ports and conntrack) apart from the later rounds "
             "(steady state: ports come round again). SYN retx: the client's retransmitted "
             "SYNs per round (median): SYNs lost or refused (e.g. by a backend's TIME_WAIT); "
             "a Linux client resends after ~10 ms when refused, 1 s when lost. Backend PAWS: "
             "SYNs the backend's TIME_WAIT refused for an older timestamp, per round "
             "(median). Paired ratio: the median of each round's rate / that round's direct "
             "rate, with min-max. Agent CPU: node 3's agent during wrk, ms per round (median). "
             "ns/packet: the TC programs on node 3 by bpf_stats over all rounds (--bpf-stats); "
             "ns/conn: both programs' time over all rounds / the connections made.",
             "",
             "| N services | variant | new conns/s median (min-max) | ratio to direct | "
             "paired ratio median (min-max) | round 1 | rounds 2+ median | p50 latency ms | "
             "SYN retx | backend PAWS | agent CPU ms | ns/packet ingress, egress | ns/conn |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        direct_runs = results[(n, "direct")]
        direct = med([r.rate for r in direct_runs])[0]
        for name in [v for v in ("direct", "nodemesh", "nodemesh-local", "iptables")
                     if v in chosen]:
            runs = results[(n, name)]
            rates = med([r.rate for r in runs])
            pr = med([r.rate / d.rate for r, d in zip(runs, direct_runs)])
            later = statistics.median([r.rate for r in runs[1:]] or [runs[0].rate])
            lat = med([r.p50 for r in runs])
            retx = statistics.median([r.syn_retrans for r in runs])
            paws = statistics.median([r.extra.get("backend_paws_timewait", 0) for r in runs])
            cpu = statistics.median([r.extra.get("agent_cpu_ms", 0) for r in runs])
            cost = (f"{ns_per_packet(runs, 'nm_tc_ingress')}, "
                    f"{ns_per_packet(runs, 'nm_tc_egress')} | {ns_per_connection(runs)}"
                    if name.startswith("nodemesh") else " | ")
            lines.append(f"| {n:,} | {name} | {rates[0]:,.0f} ({rates[1]:,.0f}-{rates[2]:,.0f}) "
                         f"| {rates[0] / direct:.2f}x | {pr[0]:.2f}x ({pr[1]:.2f}-{pr[2]:.2f}) "
                         f"| {runs[0].rate:,.0f} | {later:,.0f} | {lat[0]:.2f} | {retx:.0f} | "
                         f"{paws:.0f} | {cpu:.0f} | {cost} |")
    lines.append("")
    for n in sizes:
        if "nodemesh" not in chosen or "iptables" not in chosen:
            continue
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
    for n in sizes:
        kct = [r.extra.get("node3_kernel_ct", 0) for v in ("nodemesh", "nodemesh-local")
               if v in chosen for r in results[(n, v)]]
        if kct:
            lines.append(f"- N={n}: node 3's kernel conntrack (nf_conntrack) after each nodemesh "
                         f"round: up to {max(kct):,} entries (0: it does not track these flows)")
    lines += [f"- {f}" for f in facts]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
