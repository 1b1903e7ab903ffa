"""Faults 4 and 5 (issue 14), with clients connecting throughout.

4. A backend's health flaps every 300 ms: it leaves and rejoins the set each time, every
   connection the datapath admits succeeds (its service port never goes down), the agent
   survives, and the maps stay whole. With two of three flapping, the panic threshold puts
   every backend back whenever fewer than half are healthy, and only then.
5. More frontends than the maps hold: each one that does not fit fails with an error naming
   the limit and the flag that raises it; it is not programmed at all (no slot, backend or
   counter of it), and the services already serving go on untouched."""
import time

import pytest
from fault_lab import Flapper, Traffic, dump
from helpers import config_yaml, service_yaml

pytestmark = [pytest.mark.root, pytest.mark.slow]

UDP = "      - {port: 53, targetPort: 5353, protocol: UDP}"
HEALTH_PORT = 9090


def test_a_health_check_flapping_every_300ms_fails_no_connection(
        linked_lab, linked_agent, tmp_path):
    lab, agent = linked_lab, linked_agent
    b3 = lab.backends[2]
    lab.start_servers(tcp_ports=(HEALTH_PORT,), udp_ports=())  # the health port, on all
    web = service_yaml("web", lab.vip4(), [b.ipv4 for b in lab.backends], extra_ports=UDP)
    web += (f"    healthCheck: {{type: tcp, port: {HEALTH_PORT}, intervalSeconds: 0.1, "
            f"timeoutSeconds: 0.1, unhealthyThreshold: 1, healthyThreshold: 1}}\n")
    agent.write_config(config_yaml(web))
    agent.start()
    failures0 = agent.metric("nodemesh_health_checks_total", result="failure")
    with Traffic(lab, str(tmp_path), max_seconds=60) as traffic, \
            Flapper(b3.netns, HEALTH_PORT, 0.3, 30) as flapper:
        time.sleep(6)
        flips = flapper.flips
    checks_failed = agent.metric("nodemesh_health_checks_total", result="failure") - failures0
    print(f"{flips} flips, {checks_failed:g} failed checks; traffic {traffic.results}")
    assert traffic.failed() == 0 and traffic.ok() > 200, traffic.results
    assert flips >= 10 and checks_failed >= flips / 4
    assert agent.proc.poll() is None and dump(lab.bpffs).stale() == []


def test_two_flapping_backends_never_leave_one_and_panic_exactly_below_the_threshold(
        linked_lab, linked_agent, tmp_path):
    """panicThresholdPercent 50 over 3 backends, two of them flapping out of step: 2 of 3
    healthy (67 %) is a set of 2; 1 of 3 (33 %) is panic, a set of all 3. So the set the
    kernel balances over is never the single healthy backend, and panic comes with all 3."""
    lab, agent = linked_lab, linked_agent
    lab.start_servers(tcp_ports=(HEALTH_PORT,), udp_ports=())
    web = service_yaml("web", lab.vip4(), [b.ipv4 for b in lab.backends], extra_ports=UDP)
    web += (f"    healthCheck: {{type: tcp, port: {HEALTH_PORT}, intervalSeconds: 0.1, "
            f"timeoutSeconds: 0.1, unhealthyThreshold: 1, healthyThreshold: 1}}\n"
            f"    panicThresholdPercent: 50\n")
    agent.write_config(config_yaml(web))
    agent.start()
    seen = []  # (selection, backends in the set), sampled from the agent's programmed state
    with Traffic(lab, str(tmp_path), max_seconds=60) as traffic, \
            Flapper(lab.backends[1].netns, HEALTH_PORT, 0.3, 30), \
            Flapper(lab.backends[2].netns, HEALTH_PORT, 0.45, 30):
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            fe = next(fe for s in agent.services() for fe in s["frontends"] if fe["port"] == 80)
            seen.append((fe["selection"], len(fe["backends"])))
            time.sleep(0.05)
    sizes = {n for _, n in seen}
    print(f"{len(seen)} samples: {sorted(set(seen))}; traffic {traffic.results}")
    assert traffic.failed() == 0 and traffic.ok() > 200, traffic.results
    assert min(sizes) >= 2, seen  # never balanced over the one healthy backend alone
    assert all(n == 3 for sel, n in seen if sel == "panic"), seen
    assert any(sel == "panic" for sel, _ in seen), seen  # both were down at some point
    assert any(sel != "panic" and n == 2 for sel, n in seen), seen  # and one at a time
    assert agent.proc.poll() is None and dump(lab.bpffs).stale() == []


def test_frontends_past_the_maps_capacity_name_the_limit_and_leave_the_rest_serving(
        lab, agent, tmp_path):
    web = service_yaml("web", lab.vip4(), [b.ipv4 for b in lab.backends], extra_ports=UDP)
    agent.write_config(config_yaml(web))
    agent.start(extra=["--map-frontends", "4"])  # ids 1..3: web takes two
    before = dump(lab.bpffs)
    extra = [service_yaml(f"x{i}", lab.vip4(20 + i), [lab.backends[0].ipv4]) for i in range(3)]
    with Traffic(lab, str(tmp_path), max_seconds=60) as traffic:
        agent.write_config(config_yaml(web, *extra))
        agent.wait_for(lambda: agent.status()["failing_frontends"] == 2, 10,
                       "two frontends failing")
        time.sleep(1)
    rows = {s["name"]: s for s in agent.services()}
    errors = [e for s in rows.values() for e in s["status"]["errors"]]
    print(f"errors: {errors}; traffic {traffic.results}")
    assert traffic.failed() == 0 and traffic.ok() > 100, traffic.results
    assert len(errors) == 2 and all("no free frontend id: all 3 are in use (raise "
                                    "--map-frontends)" in e for e in errors), errors
    after = dump(lab.bpffs)
    # The one that fit is whole; the two that did not left nothing behind.
    assert after.stale() == [] and len(after.masters) == 3
    assert len(after.backends) == len(before.backends) + 1
    assert rows["web"]["status"]["programmed"]
