import os
import tempfile

import pytest

from agent.lab.topology import new_lab


@pytest.fixture
def lab():
    """A fresh lab: 3 backends running the lab server (TCP 8080, UDP 5353), torn down after."""
    lab = new_lab("nmt", backends=3)
    try:
        lab.start_servers(tcp_ports=(8080,), udp_ports=(5353,))
        yield lab
    finally:
        lab.destroy()


@pytest.fixture
def agent(lab, tmp_path):
    from helpers import AgentProcess

    proc = AgentProcess(lab, str(tmp_path))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def linked_lab():
    """A lab whose backends the host (where the agent and its health checks run) can reach:
    a veth from the host into the lab bridge; the lab's VIP range is blackholed in the host."""
    lab = new_lab("nmt", backends=3, host_link=True)
    try:
        lab.start_servers(tcp_ports=(8080,), udp_ports=(5353,))
        yield lab
    finally:
        lab.destroy()


@pytest.fixture
def linked_agent(linked_lab, tmp_path):
    from helpers import AgentProcess

    proc = AgentProcess(linked_lab, str(tmp_path))
    try:
        yield proc
    finally:
        proc.stop()
