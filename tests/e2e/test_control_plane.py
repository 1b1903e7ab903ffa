"""Control plane v2 as a user meets it: one changed service costs one service's writes, a
frontend that cannot be programmed stays visible with its error until it succeeds, and going
back to a config that fits programs everything at once."""
import pytest
from helpers import config_yaml, service_yaml

pytestmark = pytest.mark.root


def many(lab, n, changed=None):
    """n services on VIPs .20 .. of the lab, all on backend 0; service `changed` on 1."""
    out = []
    for i in range(n):
        backend = lab.backends[1] if i == changed else lab.backends[0]
        out.append(service_yaml(f"s{i}", lab.vip4(20 + i), [backend.ipv4]))
    return config_yaml(*out)


def reached(lab, vip_index):
    res = lab.client(["tcp", "--target", f"{lab.vip4(vip_index)}:80", "--count", "5"])
    return set(res["backends"]) if res["ok"] == 5 else set()


def test_one_changed_service_among_many_costs_only_its_own_map_writes(lab, agent):
    agent.write_config(many(lab, 150))
    agent.start()
    before = agent.metric("nodemesh_reconcile_map_writes_total")
    agent.write_config(many(lab, 150, changed=7))
    agent.wait_for(lambda: reached(lab, 27) == {lab.backends[1].name}, timeout=5,
                   what="service s7 on its new backend")
    writes = agent.metric("nodemesh_reconcile_map_writes_total") - before
    # one backend entry, one slot, one master; then the old slot and the old backend
    assert 0 < writes <= 6, writes
    assert reached(lab, 26) == {lab.backends[0].name}  # its neighbours untouched


def test_frontends_past_capacity_show_their_error_and_a_config_that_fits_applies_at_once(
        lab, agent):
    # --map-frontends 4: ids 1..3. Five services: two cannot be programmed.
    agent.write_config(many(lab, 5))
    agent.start(extra=["--map-frontends", "4"])
    agent.wait_for(lambda: agent.status()["failing_frontends"] == 2, timeout=5,
                   what="two failing frontends reported")
    rows = {s["name"]: s for s in agent.services()}
    failing = [n for n, s in rows.items() if not s["status"]["programmed"]]
    assert len(failing) == 2
    assert all("no free frontend id" in rows[n]["status"]["errors"][0] for n in failing)
    assert agent.metric("nodemesh_frontends_failing") == 2
    # the programmed three serve; the old state is consistent
    assert sum(1 for i in range(5) if reached(lab, 20 + i)) == 3
    # one summary line per round, not one line per failed frontend
    assert agent.log_text().count("frontends not programmed") >= 1
    assert "no free frontend id" not in "".join(
        line for line in agent.log_text().splitlines() if "not programmed" not in line)
    # Back to three other services: the removed ones are deleted first, so all three
    # program in the same round (before: "no free frontend id" for up to 30 s).
    agent.write_config(config_yaml(*(service_yaml(f"t{i}", lab.vip4(40 + i),
                                                  [lab.backends[2].ipv4]) for i in range(3))))
    agent.wait_for(lambda: agent.status()["failing_frontends"] == 0 and
                   len(agent.services()) == 3, timeout=3, what="the fitting config applied")
    assert all(reached(lab, 40 + i) == {lab.backends[2].name} for i in range(3))
