"""Faults 1, 2 and 8 (issue 14), with TCP connections and UDP flows running throughout:
SIGKILL in each phase of the agent's life (and of a cleanup), then SIGTERM in the middle of a
large reload, and a config changed while the agent is down. No connection may fail, nothing may be half-applied, and the
restarted agent converges without rewriting what is already right."""
import os
import signal
import threading
import time

import pytest
from fault_lab import Traffic, dump
from helpers import cli, config_yaml, service_yaml

pytestmark = [pytest.mark.root, pytest.mark.slow]

UDP = "      - {port: 53, targetPort: 5353, protocol: UDP}"
MANY = 2000  # services in the "large reload": about a second of parsing and writing here


def web(lab, backends=None):
    backends = lab.backends if backends is None else backends
    return service_yaml("web", lab.vip4(), [b.ipv4 for b in backends], extra_ports=UDP)


def filler(n, start=0):
    # VIPs outside the lab's range and never connected to: load for the reconciler only.
    return "".join(service_yaml(f"f{i}", f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",
                                ["10.250.0.1", "10.250.0.2"], namespace="fill")
                   for i in range(start, start + n))


def new_log(agent, mark):
    return agent.log_text()[mark:]


def test_sigkill_in_every_phase_fails_no_connection_and_the_agent_converges(
        lab, agent, tmp_path):
    agent.write_config(config_yaml(web(lab)))
    agent.start()
    killed = {}
    with Traffic(lab, str(tmp_path), max_seconds=150) as traffic:
        # Steady state.
        agent.stop(signal.SIGKILL)
        killed["steady"] = True
        # Start-up before the maps load: BCC is still compiling.
        mark = len(agent.log_text())
        agent.start(wait=False)
        time.sleep(0.3)
        killed["before maps"] = "datapath loaded" not in new_log(agent, mark)
        agent.stop(signal.SIGKILL)
        # Start-up after the maps load (adopted), before the first sync is applied: a
        # window of tens of ms for one service, aimed at from a 50 ms poll of the log, so up
        # to 5 tries (a late kill is one more steady-state kill).
        for _ in range(5):
            mark = len(agent.log_text())
            agent.start(wait=False)
            agent.wait_for(lambda: "datapath loaded" in new_log(agent, mark), 60, "the maps")
            agent.stop(signal.SIGKILL)
            killed["after maps"] = "ready:" not in new_log(agent, mark)
            if killed["after maps"]:
                break
        # In the middle of a large reload.
        agent.start()
        mark = len(agent.log_text())
        agent.write_config(config_yaml(web(lab), filler(MANY)))
        agent.send(signal.SIGHUP)
        agent.wait_for(lambda: "reload requested" in new_log(agent, mark), 5, "the SIGHUP")
        time.sleep(0.05)  # into the parse: the whole reload can take under 0.3 s here
        agent.stop(signal.SIGKILL)  # short to aim at from outside (test_reconciler covers them)
        at_kill = dump(lab.bpffs)
        programmed = len(at_kill.masters) - 2
        killed["mid reload"] = programmed < MANY
        # The next agent finishes the reload, rewriting none of what was already right.
        agent.start()
        agent.wait_for(lambda: len(dump(lab.bpffs).masters) == MANY + 2, 30, "convergence")
        after = agent.status()["last_apply"]
        # SIGTERM in the middle of the next large reload (fault 8): it stops cleanly, and
        # what it leaves in the kernel is whole, frontend by frontend.
        mark = len(agent.log_text())
        agent.write_config(config_yaml(web(lab, lab.backends[:1]), filler(MANY, MANY // 2)))
        agent.send(signal.SIGHUP)
        agent.wait_for(lambda: "reload requested" in new_log(agent, mark), 5, "the SIGHUP")
        time.sleep(0.5)
        rc = agent.stop(signal.SIGTERM)
        at_term = dump(lab.bpffs)
        time.sleep(0.5)  # the datapath, agent-less, keeps serving
    print(f"killed: {killed}; at the kill {programmed} of {MANY} services programmed; "
          f"the next agent's first round: {after}; SIGTERM mid reload with "
          f"{len(at_term.masters)} frontends in the kernel; traffic: {traffic.results}")
    assert traffic.failed() == 0 and traffic.ok() > 500, traffic.results
    assert killed == {"steady": True, "before maps": True, "after maps": True,
                      "mid reload": True}
    assert dump(lab.bpffs).stale() == []
    # It adopted the frontends programmed before the kill with zero writes, and wrote the rest.
    assert after["unchanged"] == programmed + 2
    assert rc == 0 and at_term.stale() == []
    assert "stopped; the datapath stays in the kernel" in new_log(agent, mark)


def test_a_cleanup_killed_halfway_is_finished_by_the_next_agent_and_the_next_cleanup(
        lab, agent):
    """SIGKILL during `nodemesh cleanup`, reproduced exactly: it unpins in sorted order (each
    link pin is the link's last reference, so unpinning detaches), and is cut off after the
    links and the maps up to `info`, its marker. The next agent rebuilds and serves; a
    cleanup after that removes everything."""
    agent.write_config(config_yaml(web(lab)))
    agent.start()
    agent.stop(signal.SIGKILL)
    links = os.path.join(lab.bpffs, "links")
    for name in sorted(os.listdir(links)):
        os.unlink(os.path.join(links, name))
    for name in sorted(os.listdir(lab.bpffs)):
        if name != "links" and name <= "info":
            os.unlink(os.path.join(lab.bpffs, name))
    agent.start()
    r = lab.client(["tcp", "--target", f"{lab.vip4()}:80", "--count", "30"])
    assert r["ok"] == 30 and set(r["backends"]) == {"b1", "b2", "b3"}, r
    assert dump(lab.bpffs).stale() == []
    assert agent.stop() == 0
    assert cli("cleanup", "--bpffs", lab.bpffs).returncode == 0
    assert not os.path.exists(lab.bpffs)


def test_a_config_changed_while_the_agent_is_down_never_drops_a_service_in_both(
        lab, agent, tmp_path):
    """web is in both configs (with other backends), gone is only in the old, new only in
    the new. While the next agent adopts the pins and converges, web never misses: its
    master is read every 2 ms and its clients never fail."""
    b1, b2, b3 = lab.backends
    gone = service_yaml("gone", lab.vip4(12), [b1.ipv4])
    agent.write_config(config_yaml(web(lab, [b1, b2]), gone, filler(300)))
    agent.start()
    assert agent.stop() == 0
    agent.write_config(config_yaml(web(lab, [b3]), filler(300, 200),
                                   service_yaml("new", lab.vip4(13), [b2.ipv4])))
    missing, reads, stop = [], [0], threading.Event()

    def watch():
        while not stop.is_set():
            masters = {p for p, (_, count, _) in dump(lab.bpffs).masters.items() if count}
            reads[0] += 1
            if len(masters) < 2 + 100:  # web's TCP and UDP + the 100 fillers in both
                missing.append(len(masters))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    with Traffic(lab, str(tmp_path), max_seconds=60) as traffic:
        watcher.start()
        try:
            agent.start()
            agent.wait_for(lambda: set(lab.client(["tcp", "--target", f"{lab.vip4()}:80",
                                                    "--count", "10"])["backends"]) == {"b3"},
                           10, "web on its new backend")
        finally:
            stop.set()
            watcher.join()
    print(f"{reads[0]} reads of the masters during the restart; traffic {traffic.results}")
    assert traffic.failed() == 0 and traffic.ok() > 100, traffic.results
    assert missing == [] and reads[0] > 10
    new = lab.client(["tcp", "--target", f"{lab.vip4(13)}:80", "--count", "5"])
    assert new["backends"] == {"b2": 5}
    assert lab.client(["tcp", "--target", f"{lab.vip4(12)}:80", "--count", "3"])["ok"] == 0
    d = dump(lab.bpffs)
    assert d.stale() == [] and len(d.masters) == 2 + 300 + 1
