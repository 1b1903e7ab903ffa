"""Issue 7: cleanup removes only nodemesh's own pins, an agent notices (and repairs, or exits
on) hooks it lost, and two agents never share one pin folder."""
import os
import subprocess
import sys
import time

import pytest
from helpers import ROOT, TIME_SCALE, bpftool_json, cli, config_yaml, free_port, service_yaml

pytestmark = pytest.mark.root


def web(lab, backends=None):
    backends = lab.backends if backends is None else backends
    return service_yaml("web", lab.vip4(), [b.ipv4 for b in backends])


def tcp(lab, count):
    return lab.client(["tcp", "--target", f"{lab.vip4()}:80", "--count", str(count),
                       "--max-seconds", "10"])


def wait_serving(lab, agent, timeout=10.0):
    """Until 5 of 5 VIP connections succeed (bounded); the last result."""
    deadline = time.monotonic() + timeout * TIME_SCALE
    while True:
        r = tcp(lab, 5)
        if r["ok"] == 5 or time.monotonic() > deadline:
            assert r["ok"] == 5, f"{r}\n{agent.log_text()[-3000:]}"
            return r
        time.sleep(0.2)


def link_ids(agent):
    return {h["hook"]: h["link_id"] for h in agent.status()["datapath"]["hooks"]}


# -- cleanup (defect 4) ---------------------------------------------------------------------
def test_cleanup_refuses_a_bpffs_folder_without_the_nodemesh_info_map(lab):
    folder = lab.bpffs + "-foreign"  # not the lab's: the lab's teardown cleans that one
    foreign = os.path.join(folder, "services")  # a name nodemesh uses, but not its map
    try:
        os.makedirs(os.path.join(folder, "sub"))
        subprocess.run(["bpftool", "map", "create", foreign, "type", "hash", "key", "4",
                        "value", "4", "entries", "1", "name", "services"], check=True)
        res = cli("cleanup", "--bpffs", folder)
        assert res.returncode == 1
        assert "no nodemesh info map" in res.stderr and len(res.stderr.splitlines()) == 1
        assert os.path.isdir(os.path.join(folder, "sub")) and os.path.exists(foreign)
    finally:
        for path in (foreign, os.path.join(folder, "sub"), folder):
            if os.path.isdir(path):
                os.rmdir(path)
            elif os.path.lexists(path):
                os.unlink(path)


def test_cleanup_removes_only_what_nodemesh_pins_and_keeps_the_rest(lab, agent):
    agent.write_config(config_yaml(web(lab)))
    agent.start()
    agent.stop()
    extras = [os.path.join(lab.bpffs, "keep"), os.path.join(lab.bpffs, "links", "keep")]
    try:
        for path in extras:
            os.makedirs(path)
        res = cli("cleanup", "--bpffs", lab.bpffs, check=True)
        assert "detached connect4" in res.stdout and "unpinned info" in res.stdout
        assert f"left {extras[0]}" in res.stdout and f"left {extras[1]}" in res.stdout
        assert sorted(os.listdir(lab.bpffs)) == ["keep", "links"]
        assert os.listdir(os.path.join(lab.bpffs, "links")) == ["keep"]
        assert bpftool_json("cgroup", "show", lab.cgroup) in (None, [])
    finally:
        for path in extras:  # else the lab's teardown would (rightly) refuse the folder
            if os.path.isdir(path):
                os.rmdir(path)


def test_cleanup_refuses_while_an_agent_owns_the_folder_and_force_overrides(lab, agent):
    """--force while the agent runs: expected outcome is re-attached (the agent puts its pins
    and links back from the fds it holds)."""
    agent.write_config(config_yaml(web(lab)))
    agent.start()
    res = cli("cleanup", "--bpffs", lab.bpffs)
    assert res.returncode == 1
    assert f"agent (pid {agent.proc.pid}) owns {lab.bpffs}" in res.stderr
    assert len(res.stderr.splitlines()) == 1
    assert tcp(lab, 5)["ok"] == 5  # untouched
    res = cli("cleanup", "--force", "--bpffs", lab.bpffs, check=True)
    assert "detached connect4" in res.stdout
    wait_serving(lab, agent)
    assert agent.proc.poll() is None and agent.status()["ready"] is True
    assert len(link_ids(agent)) == 10  # with getsockopt (sk_msg only with --accelerate-local)


# -- an agent whose hooks are gone (defect 5) -----------------------------------------------
def test_removed_link_pins_are_reattached(lab, agent):
    """Expected: re-attached, agent stays ready."""
    agent.write_config(config_yaml(web(lab)))
    agent.start()
    before = link_ids(agent)
    for name in os.listdir(os.path.join(lab.bpffs, "links")):
        os.unlink(os.path.join(lab.bpffs, "links", name))  # the last reference: links go
    agent.wait_for(lambda: "datapath repaired" in agent.log_text(), 10, "the repair")
    wait_serving(lab, agent)
    after = link_ids(agent)
    assert set(after) == set(before) and not set(after.values()) & set(before.values())
    assert agent.metric("nodemesh_ready") == 1


def test_a_recreated_cgroup_gets_the_hooks_again(lab, agent):
    """Expected: re-attached to the new cgroup at the same path, agent stays ready."""
    agent.write_config(config_yaml(web(lab)))
    agent.start()
    old_id = os.stat(lab.cgroup).st_ino
    os.rmdir(lab.cgroup)  # no process lives in it between client runs
    os.mkdir(lab.cgroup)
    assert os.stat(lab.cgroup).st_ino != old_id
    wait_serving(lab, agent)
    assert {h["cgroup_id"] for h in agent.status()["datapath"]["hooks"]} == \
        {os.stat(lab.cgroup).st_ino}
    assert agent.metric("nodemesh_ready") == 1


def test_a_removed_cgroup_makes_the_agent_exit_non_zero(lab, agent):
    """Expected: not repairable (nothing to attach to): not ready, exit 1 for a restart."""
    agent.write_config(config_yaml(web(lab)))
    agent.start()
    os.rmdir(lab.cgroup)
    try:
        rc = agent.proc.wait(timeout=10 * TIME_SCALE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the agent kept running without its cgroup:\n{agent.log_text()[-2000:]}")
    assert rc == 1
    assert "cannot repair the datapath" in agent.log_text()


# -- two agents, one folder (defect 8) ------------------------------------------------------
def test_a_second_agent_on_the_same_bpffs_is_refused_and_the_first_keeps_serving(
        lab, agent, tmp_path):
    agent.write_config(config_yaml(web(lab)))
    agent.start()
    other = tmp_path / "other.yaml"  # a different backend set: a fight would show
    other.write_text(config_yaml(web(lab, backends=lab.backends[:1])))
    second = subprocess.Popen(
        [sys.executable, "-m", "nodemesh.cli", "run", "--config", str(other), "--cgroup",
         lab.cgroup, "--bpffs", lab.bpffs, "--admin-socket", str(tmp_path / "second.sock"),
         "--metrics-addr", f"127.0.0.1:{free_port()}", "--resync-seconds", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        out, _ = second.communicate(timeout=30 * TIME_SCALE)
    except subprocess.TimeoutExpired:
        second.kill()
        out, _ = second.communicate()
        pytest.fail(f"the second agent was not refused:\n{out[-2000:]}")
    assert second.returncode != 0
    assert f"another nodemesh agent (pid {agent.proc.pid}) owns {lab.bpffs}" in out
    assert "Traceback" not in out
    time.sleep(6 * TIME_SCALE)  # past the first agent's resync (5 s)
    assert "drifted" not in agent.log_text()
    r = tcp(lab, 60)
    assert r["ok"] == 60 and set(r["backends"]) == {"b1", "b2", "b3"}
