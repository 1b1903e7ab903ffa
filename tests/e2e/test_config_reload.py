"""A config folder under a running agent: hostile reloads (issue 7) are rejected, the old state
keeps serving real connections, status and metrics say so, and the next good edit applies."""
import json
import os

import pytest
from helpers import cli, config_yaml, service_yaml

pytestmark = pytest.mark.root


def write(path, text):
    tmp = f"{path}.tmp"  # not *.yaml: the agent never reads it
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def laughs():
    out = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    out += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(out) + "\n"


def test_hostile_reloads_keep_the_old_state_serving_and_the_next_good_edit_applies(
        lab, agent, tmp_path):
    folder = tmp_path / "conf.d"
    folder.mkdir()
    web = folder / "web.yaml"
    write(web, config_yaml(service_yaml("web", lab.vip4(), [b.ipv4 for b in lab.backends])))
    write(folder / "db.yaml", config_yaml(service_yaml("db", lab.vip4(11),
                                                       [lab.backends[2].ipv4])))
    agent.config = str(folder)
    agent.start()

    def reached(vip):
        r = lab.client(["tcp", "--target", f"{vip}:80", "--count", "30"])
        return set(r["backends"]) if r["ok"] == 30 else set()

    assert reached(lab.vip4()) == {"b1", "b2", "b3"}
    hostile = ["services:\n  - name: !foo web\n", laughs()]
    for i, text in enumerate(hostile, 1):
        write(web, text)
        agent.wait_for(lambda: agent.metric("nodemesh_config_reload_failures_total",
                                            source="file") == i, what=f"rejection {i}")
        assert agent.proc.poll() is None
        assert agent.metric("nodemesh_config_last_reload_successful", source="file") == 0
        status = json.loads(cli("status", "--admin-socket", lab.admin_socket, "-o", "json",
                                check=True).stdout)
        assert status["source"]["ok"] is False and f"{web}:" in status["source"]["error"]
        assert reached(lab.vip4()) == {"b1", "b2", "b3"}  # the last good state serves
    assert "billion laughs" in status["source"]["error"]
    assert reached(lab.vip4(11)) == {"b3"}

    # The next good edit applies, to this file alone.
    write(web, config_yaml(service_yaml("web", lab.vip4(), [lab.backends[0].ipv4])))
    agent.wait_for(lambda: reached(lab.vip4()) == {"b1"}, what="the good edit")
    assert agent.metric("nodemesh_config_last_reload_successful", source="file") == 1
    assert agent.status()["source"]["ok"] is True
    assert reached(lab.vip4(11)) == {"b3"}
