"""The baselines of bench/run.py, generated the way their real programs generate them.

kube-proxy, iptables mode (pkg/proxy/iptables/proxier.go, syncProxyRules), one ClusterIP
service port with endpoints, as iptables-restore input:

  *nat
  -A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
  -A KUBE-SERVICES -m comment --comment "ns/name:port cluster IP" -m tcp -p tcp -d VIP
      --dport 80 -j KUBE-SVC-<hash>                      (one per service, in service order)
  -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: ..." -m addrtype
      --dst-type LOCAL -j KUBE-NODEPORTS                 (last)
  -A KUBE-SVC-<hash> -m comment ... -d VIP --dport 80 ! -s <cluster CIDR> -j KUBE-MARK-MASQ
  -A KUBE-SVC-<hash> -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-<a>
  -A KUBE-SVC-<hash> -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-<b>
  -A KUBE-SVC-<hash> -j KUBE-SEP-<c>
  -A KUBE-SEP-<a> -s EP/32 -j KUBE-MARK-MASQ
  -A KUBE-SEP-<a> -m tcp -p tcp -j DNAT --to-destination EP:8080
  -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
  -A KUBE-POSTROUTING (RETURN unless marked, clear the mark, MASQUERADE --random-fully)
  *filter: the jumps kube-proxy and kubelet install in INPUT/FORWARD/OUTPUT (ctstate NEW ->
  KUBE-PROXY-FIREWALL, KUBE-SERVICES, ...; KUBE-FIREWALL's localnet DROP; KUBE-FORWARD)

Chain names are kube-proxy's: "KUBE-SVC-" + base32(sha256("ns/name:port" + "tcp"))[:16],
"KUBE-SEP-" + base32(sha256("ns/name:port" + "tcp" + "ip:port"))[:16]. Above 1,000
endpoints kube-proxy drops the "-m comment" of SVC and SEP rules (largeClusterMode); so
does this. kube-proxy writes services in Go map order, so a given service lands anywhere in
KUBE-SERVICES: the measured service is the LAST one here, the unlucky service, which pays for
all N rules in front of it.

kube-proxy, nftables mode (pkg/proxy/nftables/proxier.go): table ip kube-proxy, a
`service-ips` verdict map on `ip daddr . meta l4proto . th dport`, per-service chains that
mark off-cluster sources and pick an endpoint with `numgen random mod N vmap`, per-endpoint
chains that DNAT; the base chains and the endpoints-check/firewall-check filter chains as
kube-proxy makes them. The measured service's endpoint chains carry a `counter` (kube-proxy's
do not): it is the proof that the bench's connections went through them.

haproxy (Debian's), mode tcp: one `listen` section per service, bound to its own loopback
address 127.x.y.z:80 (a node-local proxy has one listener per service), three servers,
balance random, no health checks (kube-proxy has none either).
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
from typing import List, Sequence, Tuple

MASQ_MARK = "0x4000"
LARGE_CLUSTER_ENDPOINTS = 1000  # kube-proxy's largeClusterEndpointsThreshold


def _hash(text: str, n: int) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:n]


class SvcSpec:
    """One ClusterIP service port, the way kube-proxy sees it."""

    __slots__ = ("namespace", "name", "port_name", "vip", "port", "endpoints", "target_port",
                 "protocol")

    def __init__(self, namespace: str, name: str, port_name: str, vip: str, port: int,
                 endpoints: Sequence[str], target_port: int, protocol: str = "tcp"):
        self.namespace, self.name, self.port_name = namespace, name, port_name
        self.vip, self.port, self.target_port = vip, port, target_port
        self.endpoints = tuple(endpoints)
        self.protocol = protocol  # "tcp" or "udp", lower case as kube-proxy hashes it

    def with_endpoints(self, endpoints: Sequence[str]) -> "SvcSpec":
        return SvcSpec(self.namespace, self.name, self.port_name, self.vip, self.port,
                       endpoints, self.target_port, self.protocol)

    @property
    def port_name_string(self) -> str:  # proxy.ServicePortName.String()
        return f"{self.namespace}/{self.name}:{self.port_name}"

    def svc_chain(self) -> str:
        return "KUBE-SVC-" + _hash(self.port_name_string + self.protocol, 16)

    def sep_chain(self, ep: str) -> str:
        return "KUBE-SEP-" + _hash(f"{self.port_name_string}{self.protocol}{ep}:"
                                   f"{self.target_port}", 16)

    def nft_service_chain(self) -> str:
        return (f"service-{_hash(self.port_name_string + self.protocol, 8)}-"
                f"{self.namespace}/{self.name}/{self.protocol}/{self.port_name}")

    def nft_endpoint_chain(self, ep: str) -> str:
        h = _hash(f"{self.port_name_string}{self.protocol}{ep}:{self.target_port}", 8)
        return (f"endpoint-{h}-{self.namespace}/{self.name}/{self.protocol}/{self.port_name}"
                f"__{ep}/{self.target_port}")


def probability(n: int) -> str:
    return f"{1.0 / n:0.10f}"  # kube-proxy's computeProbability


def iptables_ruleset(services: Sequence[SvcSpec], cluster_cidr: str) -> Tuple[str, int]:
    """iptables-restore input for kube-proxy's iptables mode; and its number of rules."""
    large = sum(len(s.endpoints) for s in services) > LARGE_CLUSTER_ENDPOINTS
    f_chains = [":KUBE-SERVICES - [0:0]", ":KUBE-EXTERNAL-SERVICES - [0:0]",
                ":KUBE-FORWARD - [0:0]", ":KUBE-NODEPORTS - [0:0]",
                ":KUBE-PROXY-FIREWALL - [0:0]", ":KUBE-FIREWALL - [0:0]"]
    new = "-m conntrack --ctstate NEW"
    f_rules = [
        f'-A INPUT {new} -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
        '-A INPUT -m comment --comment "kubernetes health check service ports" '
        "-j KUBE-NODEPORTS",
        f'-A INPUT {new} -m comment --comment "kubernetes externally-visible service portals" '
        "-j KUBE-EXTERNAL-SERVICES",
        "-A INPUT -j KUBE-FIREWALL",
        f'-A FORWARD {new} -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        f'-A FORWARD {new} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        f'-A FORWARD {new} -m comment --comment "kubernetes externally-visible service portals"'
        " -j KUBE-EXTERNAL-SERVICES",
        f'-A OUTPUT {new} -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
        f'-A OUTPUT {new} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-A OUTPUT -j KUBE-FIREWALL",
        '-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming '
        'localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP',
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark '
        f"{MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    n_chains = [":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]",
                ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
    n_rules = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
    ]
    per_svc: List[str] = []
    for s in services:
        chains, jump, rules = _ipt_service(s, cluster_cidr, large)
        n_chains.extend(chains)
        n_rules.append(jump)
        per_svc.extend(rules)
    n_rules.append(NODEPORTS_JUMP)
    text = "\n".join(["*filter", *f_chains, *f_rules, "COMMIT", "*nat", *n_chains, *n_rules,
                      *per_svc, "COMMIT", ""])
    return text, len(f_rules) + len(n_rules) + len(per_svc)


NODEPORTS_JUMP = ('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: '
                  'this must be the last rule in this chain" -m addrtype --dst-type LOCAL '
                  "-j KUBE-NODEPORTS")


def _ipt_service(s: SvcSpec, cluster_cidr: str, large: bool) -> Tuple[List[str], str,
                                                                         List[str]]:
    """One service port's nat chains: (chain declarations, its KUBE-SERVICES rule, rules)."""
    svc = s.svc_chain()
    chains = [f":{svc} - [0:0]"]
    p = s.protocol
    match = (f'-m comment --comment "{s.port_name_string} cluster IP" -m {p} -p {p} '
             f"-d {s.vip} --dport {s.port}")
    rules = [f"-A {svc} {match} ! -s {cluster_cidr} -j KUBE-MARK-MASQ"]
    n = len(s.endpoints)
    for i, ep in enumerate(s.endpoints):
        comment = "" if large else \
            f' -m comment --comment "{s.port_name_string} -> {ep}:{s.target_port}"'
        stat = (f" -m statistic --mode random --probability {probability(n - i)}"
                if i < n - 1 else "")
        rules.append(f"-A {svc}{comment}{stat} -j {s.sep_chain(ep)}")
    for ep in s.endpoints:
        sep = s.sep_chain(ep)
        chains.append(f":{sep} - [0:0]")
        comment = "" if large else f' -m comment --comment "{s.port_name_string}"'
        rules.append(f"-A {sep}{comment} -s {ep}/32 -j KUBE-MARK-MASQ")
        rules.append(f"-A {sep}{comment} -m {p} -p {p} -j DNAT --to-destination "
                     f"{ep}:{s.target_port}")
    return chains, f"-A KUBE-SERVICES {match} -j {svc}", rules


def iptables_change(services: Sequence[SvcSpec], changed: Sequence[Tuple[SvcSpec, SvcSpec]],
                    cluster_cidr: str) -> str:
    """`iptables-restore --noflush` input for one endpoint change, as kube-proxy's partial
    sync writes it (MinimizeIPTablesRestore, the default since 1.27): the top-level chains
    and the whole KUBE-SERVICES chain again, only the changed services' KUBE-SVC and new
    KUBE-SEP chains, and `-X` for the KUBE-SEP chains no longer used. `services` is the new
    full set; `changed` pairs each changed service port's (old, new) spec."""
    full, _ = iptables_ruleset(services, cluster_cidr)
    filter_part = full[:full.index("*nat\n")]
    large = sum(len(s.endpoints) for s in services) > LARGE_CLUSTER_ENDPOINTS
    chains = [":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]",
              ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
    rules = [line for line in full.splitlines() if line.startswith(
        ("-A KUBE-SERVICES ", "-A KUBE-POSTROUTING ", "-A KUBE-MARK-MASQ "))]
    deletes = []
    for old, new in changed:
        c, _, r = _ipt_service(new, cluster_cidr, large)
        chains.extend(c)
        rules.extend(r)
        stale = [old.sep_chain(ep) for ep in old.endpoints if ep not in new.endpoints]
        chains.extend(f":{sep} - [0:0]" for sep in stale)  # declared (flushed), then removed
        deletes.extend(f"-X {sep}" for sep in stale)
    return filter_part + "\n".join(["*nat", *chains, *rules, *deletes, "COMMIT", ""])


def nftables_ruleset(services: Sequence[SvcSpec], cluster_cidr: str,
                     counted: Sequence[SvcSpec] = ()) -> Tuple[str, int]:
    """`nft -f` input for kube-proxy's nftables mode; and its number of rules + elements."""
    t = "ip kube-proxy"
    out = [
        f'add table {t} {{ comment "rules for kube-proxy" ; }}',
        f"add chain {t} mark-for-masquerade",
        f"add chain {t} masquerading",
        f"add chain {t} services",
        f"add chain {t} firewall-check",
        f"add chain {t} endpoints-check",
        f"add chain {t} filter-prerouting {{ type filter hook prerouting priority -110 ; }}",
        f"add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}",
        f"add chain {t} filter-input {{ type filter hook input priority -110 ; }}",
        f"add chain {t} filter-output {{ type filter hook output priority -110 ; }}",
        f"add chain {t} nat-output {{ type nat hook output priority -100 ; }}",
        f"add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}",
        f"add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}",
        f'add chain {t} reject-chain {{ comment "helper for @no-endpoint-services / '
        '@no-endpoint-nodeports" ; }',
        f"add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}",
        f"add rule {t} masquerading mark and {MASQ_MARK} == 0 return",
        f"add rule {t} masquerading mark set mark xor {MASQ_MARK}",
        f"add rule {t} masquerading masquerade fully-random",
        f"add rule {t} filter-prerouting ct state new jump firewall-check",
        f"add rule {t} filter-forward ct state new jump endpoints-check",
        f"add rule {t} filter-input ct state new jump endpoints-check",
        f"add rule {t} filter-output ct state new jump endpoints-check",
        f"add rule {t} filter-output ct state new jump firewall-check",
        f"add rule {t} nat-output jump services",
        f"add rule {t} nat-postrouting jump masquerading",
        f"add rule {t} nat-prerouting jump services",
        f"add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; "
        'comment "destinations that are subject to LoadBalancerSourceRanges" ; }',
        f"add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
        f"add rule {t} reject-chain reject",
        f"add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : "
        'verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }',
        f"add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; "
        'comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }',
        f"add rule {t} endpoints-check ip daddr . meta l4proto . th dport vmap "
        "@no-endpoint-services",
        f"add rule {t} endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 "
        "meta l4proto . th dport vmap @no-endpoint-nodeports",
        f"add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; "
        'comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }',
        f"add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; "
        'comment "NodePort traffic" ; }',
        f"add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips",
        f"add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 "
        "meta l4proto . th dport vmap @service-nodeports",
    ]
    count = sum(1 for line in out if line.startswith("add rule"))
    counted_ids = {id(s) for s in counted}
    # Chains first, as kube-proxy's transaction does: a vmap may only name a chain that exists.
    for s in services:
        out.append(f"add chain {t} {s.nft_service_chain()}")
        out.extend(f"add chain {t} {s.nft_endpoint_chain(ep)}" for ep in s.endpoints)
    for s in services:
        out.extend(_nft_service_rules(s, cluster_cidr, id(s) in counted_ids))
        out.append(f"add element {t} service-ips {{ {s.vip} . {s.protocol} . {s.port} : "
                   f"goto {s.nft_service_chain()} }}")
        count += 3 + 2 * len(s.endpoints)
    return "\n".join(out) + "\n", count


def _nft_service_rules(s: SvcSpec, cluster_cidr: str, counter: bool) -> List[str]:
    t = "ip kube-proxy"
    chain = s.nft_service_chain()
    out = [f"add rule {t} {chain} ip daddr {s.vip} {s.protocol} dport {s.port} "
           f"ip saddr != {cluster_cidr} jump mark-for-masquerade"]
    vmap = " , ".join(f"{i} : goto {s.nft_endpoint_chain(ep)}"
                      for i, ep in enumerate(s.endpoints))
    out.append(f"add rule {t} {chain} numgen random mod {len(s.endpoints)} vmap {{ {vmap} }}")
    count = "counter " if counter else ""
    for ep in s.endpoints:
        ec = s.nft_endpoint_chain(ep)
        out.append(f"add rule {t} {ec} ip saddr {ep} jump mark-for-masquerade")
        out.append(f"add rule {t} {ec} {count}meta l4proto {s.protocol} dnat to "
                   f"{ep}:{s.target_port}")
    return out


def nftables_change(changed: Sequence[Tuple[SvcSpec, SvcSpec]], cluster_cidr: str,
                    counted: Sequence[SvcSpec] = ()) -> str:
    """One `nft -f` transaction for an endpoint change, as kube-proxy's nftables mode syncs
    it: the new endpoint chains, the service chain flushed and rewritten, and the endpoint
    chains no longer used flushed and deleted (kube-proxy defers that delete by a second;
    here it is in the same transaction). Independent of N by construction."""
    t = "ip kube-proxy"
    counted_ids = {id(s) for s in counted}
    out: List[str] = []
    for old, new in changed:
        out.extend(f"add chain {t} {new.nft_endpoint_chain(ep)}" for ep in new.endpoints
                   if ep not in old.endpoints)
        out.append(f"flush chain {t} {new.nft_service_chain()}")
        out.extend(f"flush chain {t} {new.nft_endpoint_chain(ep)}" for ep in new.endpoints)
        out.extend(_nft_service_rules(new, cluster_cidr, id(new) in counted_ids))
    for old, new in changed:
        for ep in old.endpoints:
            if ep not in new.endpoints:
                out.append(f"flush chain {t} {old.nft_endpoint_chain(ep)}")
                out.append(f"delete chain {t} {old.nft_endpoint_chain(ep)}")
    return "\n".join(out) + "\n"


HAPROXY_MAXCONN = 2048  # wrk holds 32; haproxy needs 2 fds a connection + 1 a listener


def haproxy_fds(n: int) -> int:
    """Roughly the file descriptors haproxy asks for with n listeners (it refuses to start
    when RLIMIT_NOFILE cannot be raised that far)."""
    return 2 * HAPROXY_MAXCONN + n + 100


def haproxy_frontend(i: int) -> str:
    """The loopback address of service i's listener: 127.1.0.0 + i (a /8 is all on lo)."""
    return str(ipaddress.IPv4Address("127.1.0.0") + i)


def haproxy_listen_name(s: SvcSpec) -> str:
    return f"{s.namespace}-{s.name}-{s.port_name}"


def haproxy_config(services: Sequence[SvcSpec], pidfile: str, stats_socket: str = "") -> str:
    """One `listen` per TCP service port (haproxy has no UDP), on the service's own loopback
    address: service i (in order of first appearance) listens on haproxy_frontend(i). The
    stats socket (level admin) is how a control plane changes servers at run time."""
    listeners = sum(1 for s in services if s.protocol == "tcp")
    out = ["global", f"  pidfile {pidfile}", "  nbthread 1", f"  maxconn {HAPROXY_MAXCONN}",
           f"  ulimit-n {haproxy_fds(listeners)}"]
    if stats_socket:
        out.append(f"  stats socket {stats_socket} mode 600 level admin")
    out += ["defaults", "  mode tcp", "  timeout connect 5s", "  timeout client 30s",
            "  timeout server 30s", ""]
    index: dict = {}
    for s in services:
        i = index.setdefault((s.namespace, s.name), len(index))
        if s.protocol != "tcp":
            continue
        out.append(f"listen {haproxy_listen_name(s)}")
        out.append(f"  bind {haproxy_frontend(i)}:{s.port}")
        out.append("  balance random")
        for j, ep in enumerate(s.endpoints):
            out.append(f"  server ep{j} {ep}:{s.target_port}")
    return "\n".join(out) + "\n"


def haproxy_change(changed: Sequence[Tuple[SvcSpec, SvcSpec]]) -> str:
    """Runtime API commands (one line, `;`-separated) that point a listen section's servers
    at the new endpoints, as a dynamic control plane does without a reload."""
    cmds = []
    for old, new in changed:
        if new.protocol != "tcp":
            continue
        for j, ep in enumerate(new.endpoints):
            cmds.append(f"set server {haproxy_listen_name(new)}/ep{j} addr {ep} port "
                        f"{new.target_port}")
    return "; ".join(cmds) + "\n"
