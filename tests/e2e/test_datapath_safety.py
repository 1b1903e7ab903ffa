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
