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

    __slots__ = ("namespace", "name", "port_name", "vip", "port", "endpoints", "target_port")

    def __init__(self, namespace: str, name: str, port_name: str, vip: str, port: int,
                 endpoints: Sequence[str], target_port: int):
        self.namespace, self.name, self.port_name = namespace, name, port_name
        self.vip, self.port, self.target_port = vip, port, target_port
        self.endpoints = tuple(endpoints)

    @property
    def port_name_string(self) -> str:  # proxy.ServicePortName.String()
        return f"{self.namespace}/{self.name}:{self.port_name}"

    def svc_chain(self) -> str:
        return "KUBE-SVC-" + _hash(self.port_name_string + "tcp", 16)

    def sep_chain(self, ep: str) -> str:
        return "KUBE-SEP-" + _hash(f"{self.port_name_string}tcp{ep}:{self.target_port}", 16)

    def nft_service_chain(self) -> str:
        return (f"service-{_hash(self.port_name_string + 'tcp', 8)}-"
                f"{self.namespace}/{self.name}/tcp/{self.port_name}")

    def nft_endpoint_chain(self, ep: str) -> str:
        return (f"endpoint-{_hash(f'{self.port_name_string}tcp{ep}:{self.target_port}', 8)}-"
                f"{self.namespace}/{self.name}/tcp/{self.port_name}__{ep}/{self.target_port}")


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
        svc = s.svc_chain()
        n_chains.append(f":{svc} - [0:0]")
        match = (f'-m comment --comment "{s.port_name_string} cluster IP" -m tcp -p tcp '
                 f"-d {s.vip} --dport {s.port}")
        n_rules.append(f"-A KUBE-SERVICES {match} -j {svc}")
        per_svc.append(f"-A {svc} {match} ! -s {cluster_cidr} -j KUBE-MARK-MASQ")
        n = len(s.endpoints)
        for i, ep in enumerate(s.endpoints):
            sep = s.sep_chain(ep)
            comment = "" if large else \
                f' -m comment --comment "{s.port_name_string} -> {ep}:{s.target_port}"'
            stat = (f" -m statistic --mode random --probability {probability(n - i)}"
                    if i < n - 1 else "")
            per_svc.append(f"-A {svc}{comment}{stat} -j {sep}")
        for ep in s.endpoints:
            sep = s.sep_chain(ep)
            n_chains.append(f":{sep} - [0:0]")
            comment = "" if large else f' -m comment --comment "{s.port_name_string}"'
            per_svc.append(f"-A {sep}{comment} -s {ep}/32 -j KUBE-MARK-MASQ")
            per_svc.append(f"-A {sep}{comment} -m tcp -p tcp -j DNAT --to-destination "
                           f"{ep}:{s.target_port}")
    n_rules.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: '
                   'this must be the last rule in this chain" -m addrtype --dst-type LOCAL '
                   "-j KUBE-NODEPORTS")
    text = "\n".join(["*filter", *f_chains, *f_rules, "COMMIT", "*nat", *n_chains, *n_rules,
                      *per_svc, "COMMIT", ""])
    return text, len(f_rules) + len(n_rules) + len(per_svc)


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
        chain = s.nft_service_chain()
        out.append(f"add rule {t} {chain} ip daddr {s.vip} tcp dport {s.port} "
                   f"ip saddr != {cluster_cidr} jump mark-for-masquerade")
        vmap = " , ".join(f"{i} : goto {s.nft_endpoint_chain(ep)}"
                          for i, ep in enumerate(s.endpoints))
        out.append(f"add rule {t} {chain} numgen random mod {len(s.endpoints)} "
                   f"vmap {{ {vmap} }}")
        counter = "counter " if id(s) in counted_ids else ""
        for ep in s.endpoints:
            ec = s.nft_endpoint_chain(ep)
            out.append(f"add rule {t} {ec} ip saddr {ep} jump mark-for-masquerade")
            out.append(f"add rule {t} {ec} {counter}meta l4proto tcp dnat to "
                       f"{ep}:{s.target_port}")
        out.append(f"add element {t} service-ips {{ {s.vip} . tcp . {s.port} : goto {chain} }}")
        count += 3 + 2 * len(s.endpoints)
    return "\n".join(out) + "\n", count


HAPROXY_MAXCONN = 2048  # wrk holds 32; haproxy needs 2 fds a connection + 1 a listener


def haproxy_fds(n: int) -> int:
    """Roughly the file descriptors haproxy asks for with n listeners (it refuses to start
    when RLIMIT_NOFILE cannot be raised that far)."""
    return 2 * HAPROXY_MAXCONN + n + 100


def haproxy_frontend(i: int) -> str:
    """The loopback address of service i's listener: 127.1.0.0 + i (a /8 is all on lo)."""
    return str(ipaddress.IPv4Address("127.1.0.0") + i)


def haproxy_config(services: Sequence[SvcSpec], pidfile: str) -> str:
    out = ["global", f"  pidfile {pidfile}", "  nbthread 1", f"  maxconn {HAPROXY_MAXCONN}",
           "defaults", "  mode tcp", "  timeout connect 5s", "  timeout client 30s",
           "  timeout server 30s", ""]
    for i, s in enumerate(services):
        out.append(f"listen {s.namespace}-{s.name}-{s.port_name}")
        out.append(f"  bind {haproxy_frontend(i)}:{s.port}")
        out.append("  balance random")
        for j, ep in enumerate(s.endpoints):
            out.append(f"  server ep{j} {ep}:{s.target_port}")
    return "\n".join(out) + "\n"
