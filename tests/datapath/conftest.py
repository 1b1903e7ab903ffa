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
def datapath(lab):
    """The programs loaded into the lab's pin folder and attached to the lab's cgroup, with a
    reconciler to program them: the datapath without the agent around it."""
    from agent.datapath.loader import Datapath, cleanup
    from agent.reconciler import Reconciler

    dp = Datapath(lab.bpffs, lab.cgroup)
    try:
        maps = dp.load()
        rec = Reconciler(maps)
        rec.adopt()
        dp.attach()
        yield rec
    finally:
        dp.close()
        cleanup(lab.bpffs)
