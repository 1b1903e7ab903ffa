"""A run killed halfway leaves its lab behind (netns, cgroup, pinned maps and links); the next
run's processes all reap it as they start, at the same time (the suite's xdist workers do).
They must not trip over each other: one tears the lab down, the others find it gone."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root

AGENT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "agent")

MAKE_AND_DIE = """
import os, signal
from nodemesh.lab.topology import new_lab
from nodemesh.datapath.loader import Datapath
lab = new_lab("nmt", backends=1)
dp = Datapath(lab.bpffs, lab.cgroup)
dp.load()
dp.attach()
print(lab.prefix, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # a crash: nothing torn down
"""

# Imported first, then all three let go at once, as the workers do.
REAP = ("import sys\nfrom nodemesh.lab.topology import reap_stale\nprint('set', flush=True)\n"
        "sys.stdin.readline()\nprint(reap_stale())")


def python(code: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=AGENT)
    return subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_three_reapers_at_once_remove_a_crashed_lab_without_errors():
    crashed = python(MAKE_AND_DIE)
    out, err = crashed.communicate(timeout=300)
    prefix = out.strip()
    assert crashed.returncode == -9 and prefix, err
    assert os.path.isdir(f"/sys/fs/bpf/{prefix}")  # pins and links left behind
    reapers = [python(REAP) for _ in range(3)]
    for p in reapers:
        assert p.stdout.readline().strip() == "set"
    for p in reapers:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [(p.wait(timeout=120), *p.communicate()) for p in reapers]
    for rc, out, err in results:
        assert rc == 0, err
    assert not os.path.exists(f"/sys/fs/bpf/{prefix}")
    assert not os.path.exists(f"/run/nodemesh/lab/{prefix}.json")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in netns


def test_what_tc_tests_of_a_dead_process_left_is_reaped_and_a_live_ones_kept():
    import uuid

    import tcrun

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid nobody has now: a killed run's
    tag = uuid.uuid4().hex[:6]
    dead_ns, live_ns = f"nmtc{gone.pid}{tag}", f"nmtc{os.getpid()}{tag}"
    dead_pins, live_pins = f"/sys/fs/bpf/nmtc-{gone.pid}-{tag}", f"/sys/fs/bpf/nmtc-{os.getpid()}-{tag}"
    server = None
    try:
        for ns in (dead_ns, live_ns):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        for folder in (dead_pins, live_pins):
            os.mkdir(folder)
        server = sleeper_in(dead_ns)
        reaped = tcrun.reap_stale()
        assert dead_ns in reaped and dead_pins in reaped
        assert server.wait(timeout=10) == -9
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert dead_ns not in listed and not os.path.exists(dead_pins)
        assert live_ns in listed and os.path.isdir(live_pins)  # this process is alive
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for ns in (dead_ns, live_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for folder in (dead_pins, live_pins):
            if os.path.isdir(folder):
                os.rmdir(folder)


def sleeper_in(netns: str) -> subprocess.Popen:
    """A stand-in for a pod server: a process of its own session inside the netns."""
    return subprocess.Popen(["nsenter", f"--net=/run/netns/{netns}", "sleep", "600"],
                            start_new_session=True)


def test_a_dead_clusters_netns_goes_with_the_servers_running_inside():
    import uuid

    from nodemesh.lab import cluster

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid nobody has now: a killed run's
    ns = f"{cluster.PREFIX}{gone.pid}x{uuid.uuid4().hex[:4]}-n0"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    server = sleeper_in(ns)
    try:
        assert ns.split("-")[0] in cluster.reap_stale()
        assert server.wait(timeout=10) == -9  # killed, not left serving in a nameless netns
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert ns not in listed
    finally:
        server.kill()
        server.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
