"""Issue 14, security defaults proven on the real agent: it needs no capability beyond what
deploy/ grants (CAP_PERFMON and CAP_IPC_LOCK were granted for perf buffers that do not
exist), and its metrics listen on loopback unless told otherwise."""
import os
import re
import signal

import pytest
from helpers import ROOT, config_yaml, service_yaml

pytestmark = pytest.mark.root

# include/uapi/linux/capability.h
CAP_NUMBERS = {"CAP_NET_ADMIN": 12, "CAP_IPC_LOCK": 14, "CAP_SYS_ADMIN": 21,
               "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39}


def unit_capabilities():
    with open(os.path.join(ROOT, "deploy", "systemd", "nodemesh.service")) as f:
        (line,) = [ln for ln in f if ln.startswith("CapabilityBoundingSet=")]
    return line.split("=", 1)[1].split()


def effective(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^CapEff:\s*([0-9a-f]+)$", f.read(), re.M).group(1), 16)


def tcp(lab, count):
    return lab.client(["tcp", "--target", f"{lab.vip4()}:80", "--count", str(count),
                       "--max-seconds", "10"])


def test_the_agent_loads_serves_and_adopts_with_only_the_capabilities_deploy_grants(lab, agent):
    caps = unit_capabilities()
    assert not {"CAP_PERFMON", "CAP_IPC_LOCK"} & set(caps)
    # As root, a process's capabilities are its bounding set: the unit's, and no more.
    agent.prefix = ["setpriv", "--bounding-set=-all," + ",".join(
        "+" + c[4:].lower() for c in caps), "--inh-caps=-all"]
    agent.write_config(config_yaml(service_yaml("web", lab.vip4(),
                                                [b.ipv4 for b in lab.backends])))
    agent.start()  # compiles (in a child with the same set), loads, pins, attaches
    # Within what this test runs with (a container may lack CAP_SYS_RESOURCE, which only
    # kernels < 5.11 need for map memory).
    assert effective(agent.proc.pid) == \
        sum(1 << CAP_NUMBERS[c] for c in caps) & effective(os.getpid())
    r = tcp(lab, 30)
    assert r["ok"] == 30 and set(r["backends"]) == {"b1", "b2", "b3"}, r
    # The restart adopts the pinned programs and links (BPF_*_GET_FD_BY_ID) and rewrites.
    agent.stop(signal.SIGKILL)
    agent.write_config(config_yaml(service_yaml("web", lab.vip4(), [lab.backends[0].ipv4])))
    agent.start()
    agent.wait_for(lambda: set(tcp(lab, 10)["backends"]) == {"b1"}, 10, "the new set")
    assert "Operation not permitted" not in agent.log_text()
