"""Workloads, policies and connection limits through the agent as users run it: a config
file, the CLI, metrics, and real connections from two workload cgroups."""
import json
import os
import subprocess
import sys
import time

import pytest
from helpers import TIME_SCALE, cli, holder_client, remove_workload_cgroups

from nodemesh.datapath.loader import cgroup2_root

pytestmark = [pytest.mark.root, pytest.mark.slow]

HOLD_PORT = 9090


@pytest.fixture
def cgroups(lab):
    paths = {n: os.path.join(lab.cgroup, f"wl-{n}") for n in ("a", "b")}
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    try:
        yield paths
    finally:
        remove_workload_cgroups(lab, paths.values())


client = holder_client


def config(lab, cgroups, policy_action="ALLOW"):
    rel = {n: os.path.relpath(p, cgroup2_root()) for n, p in cgroups.items()}
    backends = "\n".join(f"      - {{address: {b.ipv4}}}" for b in lab.backends)
    return f"""services:
  - name: web
    namespace: shop
    vip: {lab.vip4()}
    ports: [{{port: 80, targetPort: 8080}}]
    backends:
{backends}
  - name: held
    namespace: shop
    vip: {lab.vip4(11)}
    ports: [{{port: 80, targetPort: {HOLD_PORT}}}]
    connectionLimits: {{maxConnections: 2}}
    backends:
{backends}
workloads:
  - {{cgroup: {rel['a']}, name: a, namespace: shop, serviceAccount: frontend,
     labels: {{app: web}}}}
  - {{cgroup: {rel['b']}, name: b, namespace: shop, serviceAccount: batch}}
policies:
  - name: frontend-only
    namespace: shop
    action: {policy_action}
    service: web
    ports: [80]
    from: [{{serviceAccounts: [frontend]}}]
  - {{name: watch-held, namespace: shop, action: AUDIT, service: held}}
"""


def flows(lab, *args):
    r = cli("flows", "--admin-socket", lab.admin_socket, "-o", "json", "--last", "4096", *args,
            check=True)
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def test_agent_enforces_policies_and_limits_from_its_config_and_explains_them(
        lab, agent, cgroups):
    for b in lab.backends:  # servers that keep connections open, for the limit
        proc = lab.spawn([sys.executable, "-m", "nodemesh.lab.server", "--name", b.name,
                          "--tcp", f"{b.ipv4}:{HOLD_PORT}", "--hold"], netns=b.netns,
                         stdout=subprocess.PIPE, text=True)
        assert "ready" in proc.stdout.readline()
    agent.write_config(config(lab, cgroups))
    agent.start()
    a = client(lab, cgroups["a"], f"{lab.vip4()}:80")
    b = client(lab, cgroups["b"], f"{lab.vip4()}:80")
    assert all(r["ok"] for r in a("connect 3"))
    denied = b("connect 4")
    assert [r["error"] for r in denied] == ["EPERM"] * 4

    out = cli("policy", "check", "--from", "shop/b", "--to", "shop/web:80",
              "--admin-socket", lab.admin_socket, check=True).stdout
    assert "DENY" in out and "EPERM" in out and "default deny" in out
    out = cli("policy", "check", "--from", "shop/a", "--to", "shop/web:80",
              "--admin-socket", lab.admin_socket, check=True).stdout
    assert "ALLOW" in out and "shop/frontend-only" in out
    listing = cli("policy", "list", "--admin-socket", lab.admin_socket, check=True).stdout
    assert "frontend-only" in listing and "serviceAccounts=['frontend']" in listing
    assert agent.metric("nodemesh_policy_verdicts_total", namespace="shop", service="web",
                        verdict="denied") == 4
    # Each refusal is also a flow event, with the VIP and the service beside it.
    denied_flows = flows(lab, "--verdict", "denied")
    assert [(f["service"], f["vip"], f["backend"]) for f in denied_flows] == \
        [("web", f"{lab.vip4()}:80", "")] * 4

    # connectionLimits: the third held connection is refused at once.
    held = client(lab, cgroups["a"], f"{lab.vip4(11)}:80")
    res = held("open 3")
    assert [r["ok"] for r in res] == [True, True, False] and res[2]["error"] == "ECONNREFUSED"
    assert agent.metric("nodemesh_connection_limit_overflows_total", namespace="shop",
                        service="held", port="80", protocol="TCP") == 1
    dropped = flows(lab, "--verdict", "dropped")
    assert [(f["service"], f["reason"]) for f in dropped] == [("held", 1)]  # connection_limit
    active = sum(v for (name, labels), v in agent.metrics().items()
                 if name == "nodemesh_backend_active_connections" and
                 ("service", "held") in labels)
    assert active == 2
    # AUDIT records the policy's decision, made before the limit refused the third.
    assert agent.metric("nodemesh_policy_verdicts_total", namespace="shop", service="held",
                        verdict="audit") == 3

    # Flip the policy to DENY for the frontend: the next connect from a is refused. The file
    # source polls every 0.25 s, so this measures the agent's whole path, bounded at 1.5 s.
    started = time.monotonic()
    agent.write_config(config(lab, cgroups, policy_action="DENY"))
    while time.monotonic() - started < 1.5 * TIME_SCALE:
        if a("connect 1")[0].get("error") == "EPERM":
            break
        time.sleep(0.01)
    took = time.monotonic() - started
    assert took < 1.5 * TIME_SCALE, f"still allowed after {took:.2f}s"
    assert all(r["ok"] for r in b("connect 2"))  # DENY frontend: batch is allowed again
