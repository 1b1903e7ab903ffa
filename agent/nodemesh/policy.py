"""L4 authorization at connect(): rules compiled into one verdict per (frontend, identity) for
bpf/lib/policy.h, and the one writer of the identity and policy maps.

Semantics (Istio's AuthorizationPolicy, at L4):
  * a DENY rule that matches denies, whatever else matches;
  * when any ALLOW rule applies to a service, a connection to it that no ALLOW rule matches
    is denied;
  * an AUDIT rule that matches an allowed connection counts it (policy_stats).
A denied connect() or unconnected sendto() fails at once with EPERM, before any packet.
Workloads the agent does not know (identity 0) match only rules without `from`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

from .datapath import maps as m
from .identity import IdentityAllocator, Labels, ResolvedWorkloads, Workload, resolve
from .model import Service

log = logging.getLogger(__name__)

ACTIONS = ("ALLOW", "DENY", "AUDIT")
VERDICT_NAMES = {m.VERDICT_ALLOW: "allow", m.VERDICT_DENY: "deny", m.VERDICT_AUDIT: "audit"}


@dataclass(frozen=True, slots=True)
class PolicySource:
    """Matches a workload when every given field matches (an empty field matches all)."""

    namespaces: Tuple[str, ...] = ()
    service_accounts: Tuple[str, ...] = ()
    labels: Labels = ()  # every one must be on the workload

    def matches(self, key: Optional[Tuple[str, str, Labels]]) -> bool:
        if key is None:
            return False
        ns, sa, labels = key
        have = dict(labels)
        return ((not self.namespaces or ns in self.namespaces) and
                (not self.service_accounts or sa in self.service_accounts) and
                all(have.get(k) == v for k, v in self.labels))


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    namespace: str          # the policy's namespace, and the service's
    action: str             # ALLOW | DENY | AUDIT
    service: str
    ports: Tuple[int, ...] = ()                   # service ports; empty: all
    sources: Tuple[PolicySource, ...] = ()        # any of them; empty: every caller

    def matches(self, key: Optional[Tuple[str, str, Labels]], port: int) -> bool:
        if self.ports and port not in self.ports:
            return False
        return not self.sources or any(s.matches(key) for s in self.sources)


@dataclass(frozen=True, slots=True)
class Mesh:
    """The `workloads:` and `policies:` of the desired state."""

    workloads: Tuple[Workload, ...] = ()
    policies: Tuple[Policy, ...] = ()


@dataclass(frozen=True)
class Decision:
    verdict: str        # allow | deny | audit
    rule: str           # the deciding policy (namespace/name), or why none decides
    errno: str = ""     # what connect() returns when denied


def decide(policies: Sequence[Policy], namespace: str, service: str, port: int,
           key: Optional[Tuple[str, str, Labels]]) -> Tuple[int, int]:
    """(verdict, 1-based index of the deciding policy in `policies`, 0 for none)."""
    mine = [(i, p) for i, p in enumerate(policies, 1)
            if p.namespace == namespace and p.service == service]
    for i, p in mine:
        if p.action == "DENY" and p.matches(key, port):
            return m.VERDICT_DENY, i
    allows = [(i, p) for i, p in mine if p.action == "ALLOW"]
    if allows:
        hit = next((i for i, p in allows if p.matches(key, port)), 0)
        if not hit:
            return m.VERDICT_DENY, 0
        verdict, rule = m.VERDICT_ALLOW, hit
    else:
        verdict, rule = m.VERDICT_ALLOW, 0
    audit = next((i for i, p in mine if p.action == "AUDIT" and p.matches(key, port)), 0)
    if audit:
        return m.VERDICT_AUDIT, audit
    return verdict, rule


def explain(policies: Sequence[Policy], namespace: str, service: str, port: int,
            key: Optional[Tuple[str, str, Labels]]) -> Decision:
    verdict, rule = decide(policies, namespace, service, port, key)
    name = VERDICT_NAMES[verdict]
    if rule:
        p = policies[rule - 1]
        why = f"{p.action} policy {p.namespace}/{p.name}"
    elif verdict == m.VERDICT_DENY:
        why = "no ALLOW policy of this service matches (default deny once one exists)"
    else:
        why = "no policy applies to this service"
    return Decision(name, why, "EPERM" if verdict == m.VERDICT_DENY else "")


# -- compiling into map entries --------------------------------------------------------------

FrontendId = Tuple[int, Tuple[int, int, int, int], int, int]  # family, addr words, port, proto


@dataclass
class Compiled:
    identities: Dict[int, Tuple[int, int]]           # cgroup id -> (identity, flags)
    identity_keys: Dict[int, int]                    # identity -> fingerprint
    entries: Dict[Tuple[FrontendId, int], Tuple[int, int]]  # (frontend, identity) -> verdict
    frontends: Dict[FrontendId, Tuple[str, str, int, str]] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)
    opt_outs: int = 0


def compile_mesh(mesh: Mesh, services: Iterable[Service], allocator: IdentityAllocator,
                 cgroup_root: str) -> Compiled:
    resolved: ResolvedWorkloads = resolve(mesh.workloads, allocator, cgroup_root)
    identities = {cgid: (ident, 0 if w.socket_lb else m.IDENTITY_F_NO_SOCKET_LB)
                  for cgid, (w, ident) in resolved.by_cgroup_id.items()}
    keys: Dict[int, Tuple[str, str, Labels]] = {
        ident: w.key for w, ident in resolved.by_cgroup_id.values()}
    from .identity import fingerprint

    out = Compiled(identities, {i: fingerprint(k) for i, k in keys.items()}, {},
                   missing=resolved.missing,
                   opt_outs=sum(1 for _, f in identities.values() if f))
    by_service: Dict[Tuple[str, str], List[Policy]] = {}
    index: Dict[int, int] = {}  # id(policy) -> its 1-based place in mesh.policies
    for i, p in enumerate(mesh.policies, 1):
        by_service.setdefault((p.namespace, p.service), []).append(p)
        index[id(p)] = i
    # Index identities by service account and namespace: a rule's `from` names a few of them,
    # so only the identities some rule names are decided one by one; every other identity
    # gets the frontend's default (it matches exactly what an unknown caller matches).
    by_sa: Dict[str, List[int]] = {}
    by_ns: Dict[str, List[int]] = {}
    for ident, key in keys.items():
        by_ns.setdefault(key[0], []).append(ident)
        by_sa.setdefault(key[1], []).append(ident)
    for svc in services:
        mine = by_service.get(svc.key)
        if not mine:
            continue
        # Which of this service's policies each identity some rule names matches, from the
        # rules' side: the work follows the rules, not rules x identities.
        hits: Dict[int, Set[int]] = {}
        for i, p in enumerate(mine, 1):
            for src in p.sources:
                if src.service_accounts:
                    pool = [n for sa in src.service_accounts for n in by_sa.get(sa, ())]
                elif src.namespaces:
                    pool = [n for ns in src.namespaces for n in by_ns.get(ns, ())]
                else:
                    pool = list(keys)
                for ident in pool:
                    if src.matches(keys[ident]):
                        hits.setdefault(ident, set()).add(i)
        always = frozenset(i for i, p in enumerate(mine, 1) if not p.sources)
        matched = {ident: always | frozenset(h) for ident, h in hits.items()}
        named = list(matched)
        has_allow = any(p.action == "ALLOW" for p in mine)
        by_port: Dict[int, List[Tuple[int, str]]] = {}
        for vip, sp in svc.frontends():
            family, words = m.encode_addr(vip)
            fe: FrontendId = (family, words, sp.port, m.PROTO_IDS[sp.protocol])
            out.frontends[fe] = (svc.namespace, svc.name, sp.port, sp.protocol)
            applies = by_port.get(sp.port)
            if applies is None:
                applies = by_port[sp.port] = [(i, p.action) for i, p in enumerate(mine, 1)
                                              if not p.ports or sp.port in p.ports]
            default = _verdict(applies, has_allow, always)
            out.entries[(fe, 0)] = _renumber(index, mine, default)
            for ident in named:
                v = _verdict(applies, has_allow, matched[ident])
                if v[0] != default[0]:
                    out.entries[(fe, ident)] = _renumber(index, mine, v)
    return out


def _verdict(applies: Sequence[Tuple[int, str]], has_allow: bool,
             matched: FrozenSet[int]) -> Tuple[int, int]:
    """decide(), from the policies that apply to a port (by index and action) and the set of
    policies whose sources the caller matches: the same answer at compile speed."""
    for i, action in applies:
        if action == "DENY" and i in matched:
            return m.VERDICT_DENY, i
    hit = next((i for i, action in applies if action == "ALLOW" and i in matched), 0)
    if has_allow and not hit:
        return m.VERDICT_DENY, 0
    audit = next((i for i, action in applies if action == "AUDIT" and i in matched), 0)
    if audit:
        return m.VERDICT_AUDIT, audit
    return m.VERDICT_ALLOW, hit


def _renumber(index: Dict[int, int], mine: Sequence[Policy],
              decision: Tuple[int, int]) -> Tuple[int, int]:
    """A decision over one service's policies, its rule numbered in the whole list."""
    verdict, rule = decision
    return (verdict, index[id(mine[rule - 1])]) if rule else decision


def _policy_key(fe: FrontendId, identity: int) -> bytes:
    family, (a, b, c, d), port, proto = fe
    k = m.PolicyKey()
    k.addr[:] = (a, b, c, d)
    k.port, k.proto, k.family, k.identity = m.port_be(port), proto, family, identity
    return bytes(k)


class PolicyTable:
    """The one writer of identities, identity_keys, policy and policy_config. apply() writes
    the difference from what it wrote last (or found pinned at start): new and changed
    entries first, then removals, so a frontend never passes through an empty policy."""

    def __init__(self, maps: m.Maps, cgroup_root: str):
        self.maps = maps
        self.cgroup_root = cgroup_root
        self.allocator = IdentityAllocator()
        self.mesh = Mesh()
        self.compiled: Optional[Compiled] = None
        self._identities: Dict[int, Tuple[int, int]] = {}
        self._policy: Dict[bytes, Tuple[int, int]] = {}
        self._keys: Dict[int, int] = {}
        self._adopt()

    def _adopt(self) -> None:
        self._keys = {m.key_int(k): int(v.value if hasattr(v, "value") else v)
                      for k, v in self.maps.items("identity_keys")}
        self.allocator.adopt((i, fp) for i, fp in self._keys.items())
        self._identities = {int(k.value if hasattr(k, "value") else k): (v.identity, v.flags)
                            for k, v in self.maps.items("identities")}
        self._policy = {bytes(k): (v.verdict, v.rule) for k, v in self.maps.items("policy")}

    def apply(self, mesh: Mesh, services: Iterable[Service]) -> Compiled:
        self.mesh = mesh
        c = compile_mesh(mesh, services, self.allocator, self.cgroup_root)
        for line in c.missing:
            log.warning("workload not found: %s", line)
        want_ids = c.identities
        want_pol = {_policy_key(fe, ident): v for (fe, ident), v in c.entries.items()}
        self._sync("identity_keys", self._keys, c.identity_keys,
                   lambda k: bytes(m.u32(k)), lambda v: bytes(m.u64(v)), delete=False)
        self._sync("identities", self._identities, want_ids, lambda k: bytes(m.u64(k)),
                   lambda v: bytes(m.Identity(*v)))
        self._sync("policy", self._policy, want_pol, lambda k: k,
                   lambda v: bytes(m.PolicyValue(*v)))
        self.maps.update_packed("policy_config", [bytes(m.u32(0))],
                                [bytes(m.PolicyConfig(c.opt_outs))])
        self.compiled = c
        return c

    def _sync(self, name, have: Dict, want: Dict, pack_key, pack_value, delete=True) -> None:
        changed = [k for k, v in want.items() if have.get(k) != v]
        self.maps.update_packed(name, [pack_key(k) for k in changed],
                                [pack_value(want[k]) for k in changed])
        for k in changed:
            have[k] = want[k]
        if delete:
            gone = [k for k in have if k not in want]
            self.maps.delete_batch(name, [pack_key(k) for k in gone])
            for k in gone:
                del have[k]

    def stats(self) -> Dict[Tuple[str, str], Dict[str, int]]:
        """{(namespace, service): {"denied": n, "audited": n}} summed over ports and CPUs."""
        if self.compiled is None:
            return {}
        by_key = {_policy_key(fe, 0): (ns, name)
                  for fe, (ns, name, _, _) in self.compiled.frontends.items()}
        out: Dict[Tuple[str, str], Dict[str, int]] = {
            v: {"denied": 0, "audited": 0} for v in by_key.values()}
        for key, per_cpu in self.maps.items("policy_stats"):
            svc = by_key.get(bytes(key))
            if svc is None:
                continue
            out[svc]["denied"] += sum(int(v.denied) for v in per_cpu)
            out[svc]["audited"] += sum(int(v.audited) for v in per_cpu)
        return out

    def rules(self) -> List[Dict[str, object]]:
        """The compiled rules, for `nodemesh policy list`."""
        return [{"index": i, "namespace": p.namespace, "name": p.name, "action": p.action,
                 "service": p.service, "ports": list(p.ports),
                 "from": [{"namespaces": list(s.namespaces),
                           "serviceAccounts": list(s.service_accounts),
                           "labels": dict(s.labels)} for s in p.sources]}
                for i, p in enumerate(self.mesh.policies, 1)]

    def check(self, source: str, namespace: str, service: str, port: int) -> Dict[str, object]:
        """What the kernel decides for `source` (NS/POD, a workload's name, or a cgroup path
        relative to the cgroup mount) connecting to NS/SVC:PORT."""
        w = self._find(source)
        key = w.key if w else None
        d = explain(self.mesh.policies, namespace, service, port, key)
        ident = self.allocator.keys.get(key) if key else None
        return {"from": source, "workload": None if w is None else
                {"namespace": w.namespace, "serviceAccount": w.service_account,
                 "labels": dict(w.labels), "cgroup": w.cgroup, "identity": ident},
                "to": f"{namespace}/{service}:{port}", "verdict": d.verdict, "rule": d.rule,
                "errno": d.errno}

    def _find(self, source: str) -> Optional[Workload]:
        for w in self.mesh.workloads:
            if source in (f"{w.namespace}/{w.name}", w.cgroup, w.cgroup.strip("/"),
                          "/" + w.cgroup.strip("/")):
                return w
        return None


def admin_view(table: Optional[PolicyTable], path: str,
               query: Dict[str, str]) -> Tuple[int, object]:
    """The admin API's /v1/policy (list) and /v1/policy/check answers: (HTTP code, body)."""
    if table is None:
        return 503, {"error": "the agent has not loaded its datapath yet"}
    if path == "/v1/policy":
        c = table.compiled
        workloads = [{"namespace": w.namespace, "name": w.name, "cgroup": w.cgroup,
                      "serviceAccount": w.service_account, "labels": dict(w.labels),
                      "socketLB": w.socket_lb, "identity": table.allocator.keys.get(w.key)}
                     for w in table.mesh.workloads]
        stats = [{"namespace": ns, "service": name, **v}
                 for (ns, name), v in sorted(table.stats().items())]
        return 200, {"rules": table.rules(), "workloads": workloads,
                     "missing": list(c.missing) if c else [],
                     "entries": len(c.entries) if c else 0, "verdicts": stats}
    source, target = query.get("from", ""), query.get("to", "")
    try:
        ns_svc, port = target.rsplit(":", 1)
        namespace, service = ns_svc.split("/", 1)
        port_n = int(port)
    except ValueError:
        return 400, {"error": f"--to {target!r}: expected NAMESPACE/SERVICE:PORT"}
    if not source:
        return 400, {"error": "--from is required: NAMESPACE/POD or a cgroup path"}
    return 200, table.check(source, namespace, service, port_n)
