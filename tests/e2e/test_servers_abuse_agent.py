"""The real agent under the idle-connection flood of issue 7 item 6: at systemd's default
soft limit of 1,024 descriptors, 1,100 idle clients on the metrics port and 200 on the admin
socket leave scrapes, `nodemesh status` and config reloads working, and the agent's
descriptors bounded."""
import os
import resource
import socket

import pytest
from helpers import TIME_SCALE, cli, config_yaml, service_yaml

from nodemesh import api, metrics, serving

pytestmark = pytest.mark.root


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def idle_clients():
    socks = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # this process holds the clients' ends
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    try:
        yield socks
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def hold(socks, family, addr, n):
    for _ in range(n):
        s = socket.socket(family, socket.SOCK_STREAM)
        socks.append(s)
        s.settimeout(2 * TIME_SCALE)
        s.connect(addr)


def test_idle_clients_at_the_default_descriptor_limit_starve_nothing(lab, agent, idle_clients):
    web = service_yaml("web", lab.vip4(), [b.ipv4 for b in lab.backends])
    agent.write_config(config_yaml(web))
    agent.start()
    pid = agent.proc.pid
    resource.prlimit(pid, resource.RLIMIT_NOFILE,
                     (1024, resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]))
    baseline = fds(pid)

    hold(idle_clients, socket.AF_INET, ("127.0.0.1", agent.metrics_port), 1100)
    hold(idle_clients, socket.AF_UNIX, lab.admin_socket, 200)

    assert agent.metric("nodemesh_ready") == 1
    res = cli("status", "--admin-socket", lab.admin_socket)
    assert res.returncode == 0 and "ready" in res.stdout, res.stderr
    loads = agent.status()["source"]["loads"]
    agent.write_config(config_yaml(service_yaml("web", lab.vip4(), [lab.backends[0].ipv4])))
    agent.wait_for(lambda: agent.status()["source"]["loads"] > loads, what="a reload")
    assert "Too many open files" not in agent.log_text()
    assert fds(pid) <= baseline + metrics.MAX_CONNECTIONS + api.MAX_CONNECTIONS + 8
    assert agent.metric("nodemesh_http_connections_rejected_total", server="metrics") >= \
        1100 - metrics.MAX_CONNECTIONS
    # The clients still hold their ends; the agent closes its own once they sent nothing.
    agent.wait_for(lambda: fds(pid) <= baseline + 4, timeout=serving.HEAD_TIMEOUT + 5,
                   what="the idle connections to be dropped")
