"""Policy semantics (Istio's, at L4), the mesh config sections, and identities: no root."""
import pytest

from nodemesh import config, meshconfig
from nodemesh.datapath import maps as m
from nodemesh.identity import IdentityAllocator, fingerprint, kubelet_cgroup_candidates
from nodemesh.policy import Policy, PolicySource, decide, explain

FRONTEND = ("shop", "frontend", (("app", "web"),))
BATCH = ("shop", "batch", ())
OTHER_NS = ("ops", "frontend", (("app", "web"),))


def allow(name="allow", ports=(), **src):
    return Policy(name, "shop", "ALLOW", "web", ports, (PolicySource(**src),) if src else ())


def deny(name="deny", ports=(), **src):
    return Policy(name, "shop", "DENY", "web", ports, (PolicySource(**src),) if src else ())


def audit(name="audit", **src):
    return Policy(name, "shop", "AUDIT", "web", (), (PolicySource(**src),) if src else ())


def verdict(policies, key, port=80):
    return decide(policies, "shop", "web", port, key)[0]


def test_no_policy_allows_everyone():
    assert verdict([], FRONTEND) == m.VERDICT_ALLOW
    assert verdict([], None) == m.VERDICT_ALLOW


def test_an_allow_policy_denies_everyone_it_does_not_match():
    ps = [allow(service_accounts=("frontend",))]
    assert verdict(ps, FRONTEND) == m.VERDICT_ALLOW
    assert verdict(ps, BATCH) == m.VERDICT_DENY
    assert verdict(ps, None) == m.VERDICT_DENY  # an unknown workload matches no source


def test_deny_wins_over_allow():
    ps = [allow(service_accounts=("frontend",)), deny(namespaces=("shop",))]
    assert verdict(ps, FRONTEND) == m.VERDICT_DENY
    assert decide(ps, "shop", "web", 80, FRONTEND)[1] == 2  # the DENY decided


def test_ports_narrow_a_rule_but_an_allow_still_closes_the_other_ports():
    ps = [allow(ports=(80,), service_accounts=("frontend",))]
    assert verdict(ps, FRONTEND, 80) == m.VERDICT_ALLOW
    assert verdict(ps, FRONTEND, 443) == m.VERDICT_DENY


def test_audit_allows_and_marks_what_it_matches():
    ps = [audit(service_accounts=("batch",))]
    assert verdict(ps, BATCH) == m.VERDICT_AUDIT
    assert verdict(ps, FRONTEND) == m.VERDICT_ALLOW
    assert verdict(ps + [deny(service_accounts=("batch",))], BATCH) == m.VERDICT_DENY


def test_sources_match_every_given_field():
    ps = [allow(namespaces=("shop",), labels=(("app", "web"),))]
    assert verdict(ps, FRONTEND) == m.VERDICT_ALLOW
    assert verdict(ps, OTHER_NS) == m.VERDICT_DENY
    assert verdict(ps, BATCH) == m.VERDICT_DENY


def test_policies_of_other_services_do_not_apply():
    other = Policy("x", "shop", "ALLOW", "db", (), (PolicySource(service_accounts=("x",)),))
    assert verdict([other], BATCH) == m.VERDICT_ALLOW


def test_explain_names_the_rule_and_the_errno():
    d = explain([allow(service_accounts=("frontend",))], "shop", "web", 80, BATCH)
    assert (d.verdict, d.errno) == ("deny", "EPERM") and "default deny" in d.rule
    d = explain([allow(service_accounts=("frontend",))], "shop", "web", 80, FRONTEND)
    assert d.verdict == "allow" and d.rule == "ALLOW policy shop/allow"


def test_identities_are_per_distinct_attributes_and_stable_across_restarts():
    first = IdentityAllocator()
    a, b = first.identity(FRONTEND), first.identity(BATCH)
    assert a != b and first.identity(("shop", "frontend", (("app", "web"),))) == a
    restarted = IdentityAllocator()
    restarted.adopt([(a, fingerprint(FRONTEND)), (b, fingerprint(BATCH))])
    assert restarted.identity(BATCH) == b and restarted.identity(FRONTEND) == a
    assert restarted.identity(OTHER_NS) not in (a, b)


@pytest.mark.parametrize("qos, want", [
    ("Guaranteed", ["kubepods.slice/kubepods-pod1a_2b.slice", "kubepods/pod1a-2b"]),
    ("Burstable", ["kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a_2b.slice",
                   "kubepods/burstable/pod1a-2b"]),
    ("BestEffort", ["kubepods.slice/kubepods-besteffort.slice/"
                    "kubepods-besteffort-pod1a_2b.slice", "kubepods/besteffort/pod1a-2b"]),
])
def test_kubelet_cgroup_layouts_for_both_drivers_and_every_qos_class(qos, want):
    assert kubelet_cgroup_candidates("1a-2b", qos) == want


MESH = """services: []
workloads:
  - {cgroup: a/b, namespace: shop, serviceAccount: frontend, labels: {app: web}, name: a}
  - {cgroup: c, namespace: shop, socketLB: false}
policies:
  - {name: p, namespace: shop, action: ALLOW, service: web, ports: [80],
     from: [{serviceAccounts: [frontend]}]}
"""


def test_mesh_sections_parse(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH)
    config.load(str(path))  # the services parser accepts the sections
    mesh = meshconfig.load(str(path))
    assert [w.cgroup for w in mesh.workloads] == ["a/b", "c"]
    assert mesh.workloads[1].socket_lb is False and mesh.workloads[1].service_account == "default"
    assert mesh.policies[0].sources[0].service_accounts == ("frontend",)


@pytest.mark.parametrize("text, problem", [
    ("workloads: [{cgroup: '../x', namespace: a}]", "workloads[0].cgroup: '../x' is not a cgroup"),
    ("workloads: [{cgroup: x, socketLB: 'no'}]", "workloads[0].socketLB: 'no' must be true"),
    ("policies: [{name: p, action: PERMIT, service: web}]",
     "policies[0].action: 'PERMIT' is not an action (one of: ALLOW, DENY, AUDIT)"),
    ("policies: [{name: p, action: DENY}]", "policies[0].service: is required"),
    ("policies: [{name: p, action: DENY, service: web, ports: [0]}]",
     "policies[0].ports[0]: 0 is not a port"),
    ("policies: [{name: p, action: DENY, service: web, from: [{team: x}]}]",
     "policies[0].from[0].team: unknown field"),
    ("workloads: [{cgroup: x}, {cgroup: x}]", "workloads[1].cgroup: x is listed twice"),
])
def test_bad_mesh_config_names_the_field(text, problem):
    with pytest.raises(config.ConfigError) as e:
        config.parse(text)
    assert problem in str(e.value)


def test_compiled_entries_agree_with_decide_for_every_identity_and_port(monkeypatch):
    """The compiler's fast path (sets of matched policies per identity) gives decide()'s
    answer everywhere: random policies, identities and ports."""
    import random

    import nodemesh.policy as P
    from nodemesh.identity import ResolvedWorkloads, Workload
    from nodemesh.model import Backend, Service, ServicePort

    rng = random.Random(3)
    sas, nss = [f"sa{i}" for i in range(6)], ["shop", "ops"]
    workloads = [Workload(f"cg/{i}", rng.choice(nss), rng.choice(sas),
                          (("app", rng.choice("xy")),), name=f"w{i}") for i in range(20)]
    policies = []
    for i in range(40):
        sources = tuple(PolicySource(
            namespaces=tuple(rng.sample(nss, rng.randint(0, 1))),
            service_accounts=tuple(rng.sample(sas, rng.randint(0, 2))),
            labels=(("app", rng.choice("xy")),) if rng.random() < 0.3 else ())
            for _ in range(rng.randint(0, 2)))
        policies.append(Policy(f"p{i}", "shop", rng.choice(["ALLOW", "DENY", "AUDIT"]),
                               rng.choice(["web", "db"]),
                               tuple(rng.sample([80, 81, 82], rng.randint(0, 2))), sources))
    services = [Service(n, "shop", f"10.0.0.{k}", tuple(ServicePort(p, 8080) for p in
                                                        (80, 81, 82)), (Backend("10.1.0.1"),))
                for k, n in enumerate(["web", "db"], 1)]
    monkeypatch.setattr(P, "resolve", lambda ws, alloc, root: ResolvedWorkloads(
        {100 + i: (w, alloc.identity(w.key)) for i, w in enumerate(ws)}, []))
    alloc = IdentityAllocator()
    c = P.compile_mesh(P.Mesh(tuple(workloads), tuple(policies)), services, alloc, "/")
    for svc in services:
        for sp in svc.ports:
            fe = (4, m.encode_addr(svc.vip)[1], sp.port, 6)
            default = c.entries[(fe, 0)]
            assert default == decide(policies, "shop", svc.name, sp.port, None)
            for w in workloads:
                ident = alloc.identity(w.key)
                got = c.entries.get((fe, ident), default)
                want = decide(policies, "shop", svc.name, sp.port, w.key)
                assert got[0] == want[0], (svc.name, sp.port, w)
                if (fe, ident) in c.entries:
                    assert got == want
