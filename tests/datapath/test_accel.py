"""Same-node acceleration (--accelerate-local, bpf/lib/accel.h): sockops puts both ends of
a local TCP connection in the sockhash, and sk_msg moves every sendmsg() straight into the
peer's receive queue. Each workload is real sockets over loopback in a netns inside the hooked
cgroup, checked byte for byte; and each proves that the bytes did go socket to socket (the
kernel's own counter), so that a silent fallback to TCP cannot pass for acceleration.
"""
import ctypes
import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from nodemesh.datapath import bpfsys
from nodemesh.datapath import maps as m
from nodemesh.datapath.loader import Datapath, attachments, cleanup
from nodemesh.mesh import MeshOptions, accel_counters, write_mesh_config

pytestmark = pytest.mark.root

CHECK = os.path.join(ROOT, "tests", "accel_check.py")
# Redirected bytes over bytes the workload moved. Nearly all go socket to socket; the share
# that may not is a connection's first writes when they race the server end joining the
# sockhash (it joins when the handshake's last ACK arrives).
MIN_REDIRECTED_SHARE = 0.9


class Accelerated:
    """The datapath loaded with --accelerate-local into a lab's folder and cgroup."""

    def __init__(self, lab):
        self.lab = lab
        self.dp = None
        self.load()

    def ensure_loaded(self):
        """Load again after a test removed the datapath (only then: a load compiles)."""
        if self.dp is None:
            self.load()

    def load(self):
        self.dp = Datapath(self.lab.bpffs, self.lab.cgroup, accelerate=True)
        maps = self.dp.load()
        write_mesh_config(maps, MeshOptions(accelerate_local=True))
        self.dp.attach()

    @property
    def maps(self):
        self.ensure_loaded()
        return self.dp.maps

    def counters(self):
        return accel_counters(self.maps)

    def close(self):
        if self.dp is not None:
            self.dp.close()
        cleanup(self.lab.bpffs)


@pytest.fixture(scope="module")
def accel():
    from nodemesh.lab.topology import new_lab

    lab = new_lab("nma", backends=0)
    a = None
    try:
        a = Accelerated(lab)
        yield a
    finally:
        if a is not None:
            a.close()
        lab.destroy()


def run(accel, scenario, *extra, timeout=120):
    accel.ensure_loaded()
    proc = accel.lab.spawn([sys.executable, CHECK, scenario, *extra], netns=accel.lab.client_ns,
                           in_cgroup=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        accel.lab.processes.remove(proc)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("scenario", ["sha", "reqresp", "churn", "halfclose", "sizes",
                                      "peerclose"])
def test_workload_is_byte_exact_and_goes_socket_to_socket(accel, scenario):
    """sha: 64 MB each way (SHA-256); reqresp: 2,000 request/responses; churn: 200
    concurrent connections, 3 rounds; halfclose: the server sends 8 MB after the client's
    SHUT_WR; sizes: single writes of 1 B .. 1 MB; peerclose: the reader closes mid-stream."""
    before = accel.counters()
    res = run(accel, scenario)
    after = accel.counters()
    assert res["ok"], res
    moved = after["redirected_bytes"] - before["redirected_bytes"]
    assert moved >= MIN_REDIRECTED_SHARE * res["bytes"], (moved, res)


def test_the_sockhash_holds_open_sockets_only(accel):
    """Sockets leave the sockhash by themselves when they close."""
    run(accel, "reqresp")
    assert accel.maps.count("accel_socks") == 0


@pytest.mark.xfail(strict=True, reason="kernel behaviour, not ours: a socket deleted from a "
                   "sockhash loses the redirected bytes it has not read yet (its psock's "
                   "queue is purged); the agent never deletes one (next test)")
def test_a_socket_deleted_from_the_sockhash_mid_stream_keeps_its_unread_bytes(accel, tmp_path):
    """Half of 32 MB each way goes socket to socket; then both ends are deleted from the
    sockhash while the readers are still behind. Strict xfail: the day the kernel keeps those
    bytes, this passes and the precautions can be reconsidered."""
    def take_all_out():
        fd = accel.maps.fd("accel_socks")
        keys = bpfsys.map_keys(fd, ctypes.sizeof(m.SockKey))
        assert len(keys) >= 2  # at least our two ends were in
        for k in keys:
            bpfsys.map_delete(fd, k)
    res = _midway(accel, tmp_path, take_all_out)
    assert res["ok"], res


def _midway(accel, tmp_path, action):
    accel.ensure_loaded()
    pause = str(tmp_path / "go")
    proc = accel.lab.spawn([sys.executable, CHECK, "leave", "--pause-file", pause],
                           netns=accel.lab.client_ns, in_cgroup=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "midway"
        moved_before = accel.counters()["redirected_bytes"]
        assert moved_before > 0
        action()
        open(pause, "w").close()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        accel.lab.processes.remove(proc)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_without_accelerate_local_nothing_joins_the_sockhash(accel):
    """The same cgroup with --no-accelerate-local: the agent detaches sk_msg, and sockops
    adds no socket, so every byte takes TCP."""
    accel.ensure_loaded()
    write_mesh_config(accel.maps, MeshOptions(accelerate_local=False))
    accel.dp.accelerate = False
    try:
        accel.dp.attach()
        assert not os.path.exists(os.path.join(accel.lab.bpffs, "links", "sk_msg"))
        before = accel.counters()
        res = run(accel, "reqresp")
        after = accel.counters()
        assert res["ok"], res
        assert after == before
    finally:
        write_mesh_config(accel.maps, MeshOptions(accelerate_local=True))
        accel.dp.accelerate = True
        accel.dp.attach()


def test_cleanup_while_data_flows_loses_nothing(accel, tmp_path):
    """`nodemesh cleanup` (redirects turned off, the sk_msg link detached, every pin
    removed) mid-stream, with unread bytes queued in both readers: the stream finishes
    byte-exact, the rest over plain TCP; then the datapath comes back."""
    def remove_datapath():
        accel.dp.close()
        accel.dp = None  # the next test that needs it loads it again
        done = cleanup(accel.lab.bpffs)
        assert done[:1] == ["stopped acceleration"] and "detached sk_msg" in done, done
    res = _midway(accel, tmp_path, remove_datapath)
    assert res["ok"], res
    assert not any(a["hook"] == "sk_msg" for a in attachments(accel.lab.bpffs))
