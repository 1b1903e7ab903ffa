"""Attaching the TC programs with pyroute2: a restart takes over its own filters in place, and
cleanup removes exactly what nodemesh added, leaving other filters and qdiscs alone."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from tcrun import TestNetns

pytestmark = [pytest.mark.root, pytest.mark.slow]

SETUP = """
ip link add nmtc0 type veth peer name nmtc1
ip link set nmtc0 up
ip link set nmtc1 up
ip addr add 192.0.2.1/24 dev nmtc0
ip link add nmtc2 type veth peer name nmtc3
ip link set nmtc2 up
tc qdisc add dev nmtc1 clsact
"""
FOREIGN = "bpf bytecode 1,6\\ 0\\ 0\\ 4294967295, classid 1"  # classic BPF: someone else's


def tc(args: str) -> str:
    return subprocess.run(f"tc {args}", shell=True, check=True, capture_output=True,
                          text=True).stdout


def filters(dev: str, hook: str):
    return [line for line in tc(f"filter show dev {dev} {hook}").splitlines() if "handle" in line]


def has_clsact(dev: str) -> bool:
    return "clsact" in tc(f"qdisc show dev {dev}")


@pytest.fixture
def node():
    from nodemesh.datapath.loader import Datapath, cleanup

    bpffs = f"/sys/fs/bpf/nmtc-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with TestNetns(SETUP):
        dp = Datapath(bpffs, None)
        try:
            dp.load()
            yield bpffs, dp
        finally:
            dp.close()
            cleanup(bpffs, force=True)


def load_tc(bpffs, dp):
    from nodemesh.datapath import tc as t

    path = t.TcPath(bpffs, dp.sizes, t.TcSettings())
    path.load()
    return path


def test_a_restart_replaces_its_filters_in_place_and_keeps_conntrack(node):
    from nodemesh.datapath import bpfsys
    from nodemesh.datapath import tc as t

    bpffs, dp = node
    first = load_tc(bpffs, dp)
    first.attach(["nmtc0"])
    key = t.CtKey(proto=6, family=4)
    bpfsys.map_update(first.map_fds["ct"], key, t.CtValue(kind=1))
    ids = {line.split(" id ")[1].split()[0] for line in filters("nmtc0", "ingress")}
    first.close()
    second = load_tc(bpffs, dp)  # a new agent: new programs, the pinned maps
    second.attach(["nmtc0"])
    try:
        after = filters("nmtc0", "ingress")
        assert len(after) == 1 and len(filters("nmtc0", "egress")) == 1
        assert {line.split(" id ")[1].split()[0] for line in after} != ids  # swapped
        assert [k for k, _ in second.conntrack()] and second.attached() == []
    finally:
        second.close()


def test_cleanup_removes_only_what_nodemesh_added(node):
    """nmtc0: a clsact nodemesh made, left empty: removed. nmtc1: a clsact that was there, with
    someone else's filter: both stay. nmtc2: a clsact nodemesh made, to which someone added a
    filter since: it stays, with that filter."""
    from nodemesh.datapath.loader import cleanup

    bpffs, dp = node
    path = load_tc(bpffs, dp)
    path.attach(["nmtc0", "nmtc1", "nmtc2"])
    path.close()
    tc(f"filter add dev nmtc1 ingress prio 7 {FOREIGN}")
    tc(f"filter add dev nmtc2 egress prio 9 {FOREIGN}")
    assert len(filters("nmtc0", "ingress")) == 1 and len(filters("nmtc1", "ingress")) == 2
    dp.close()
    done = cleanup(bpffs)
    assert "removed clsact qdisc from nmtc0" in done
    assert not has_clsact("nmtc0")
    assert has_clsact("nmtc1") and has_clsact("nmtc2")
    for dev, hook, prio in (("nmtc1", "ingress", 7), ("nmtc2", "egress", 9)):
        [left] = filters(dev, hook)
        assert "nm_tc" not in left and f"pref {prio}" in left
    assert filters("nmtc1", "egress") == [] and filters("nmtc2", "ingress") == []
    assert cleanup(bpffs) == []  # idempotent


def test_an_older_agents_smaller_event_counters_are_carried_over_and_conntrack_kept(node):
    """An agent of the build before tc_events grew (1 entry) left its pins: the new agent
    replaces that map by one of the new size holding the old counts, attaches programs that
    use it, and keeps the conntrack map (the same map, its entries) instead of refusing the
    pins and asking for a cleanup that would break every flow."""
    from nodemesh.datapath import bpfsys
    from nodemesh.datapath import tc as t

    bpffs, dp = node
    first = load_tc(bpffs, dp)
    first.attach(["nmtc0"])
    key = t.CtKey(proto=6, family=4)
    bpfsys.map_update(first.map_fds["ct"], key, t.CtValue(kind=1, svc_id=7))
    ct_id = bpfsys.map_info(first.map_fds["ct"]).id
    first.close()
    # the older build's tc_events: one per-CPU counter, 3 and 4 collisions on CPUs 0 and 1
    pin = os.path.join(bpffs, "tc_events")
    os.unlink(pin)
    ncpu = bpfsys.possible_cpus()
    old = bpfsys.map_create(bpfsys.MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, name="tc_events")
    counts = (t.u64 * ncpu)(*([3, 4] + [0] * (ncpu - 2))[:ncpu])
    bpfsys.map_update(old, t.u32(0), counts)
    bpfsys.obj_pin(old, pin)
    old_id = bpfsys.map_info(old).id
    bpfsys.close(old)

    second = load_tc(bpffs, dp)
    second.attach(["nmtc0"])
    try:
        fd = bpfsys.obj_get(pin)
        try:
            info = bpfsys.map_info(fd)
            assert (info.max_entries, info.id != old_id) == (len(t.EVENTS), True)
        finally:
            bpfsys.close(fd)
        assert t.percpu_sum(second.map_fds["tc_events"], t.u32) == {
            i: (sum(counts) if i == 0 else 0) for i in range(len(t.EVENTS))}
        assert second.map_fds and bpfsys.map_info(second.map_fds["ct"]).id == ct_id
        assert [v.svc_id for _, v in second.conntrack()] == [7]
        # the attached programs count into the new map, not the old one
        [line] = filters("nmtc0", "ingress")
        prog_id = line.split(" id ")[1].split()[0]
        maps = json_out(f"bpftool -j prog show id {prog_id}")["map_ids"]
        assert info.id in maps and old_id not in maps
    finally:
        second.close()


def json_out(cmd: str):
    import json

    return json.loads(subprocess.run(cmd, shell=True, check=True, capture_output=True,
                                     text=True).stdout)


def test_only_a_veth_to_a_pod_is_marked_for_redirect_peer(node):
    """forward() hands a packet to a pod with bpf_redirect_peer only towards interfaces whose
    tc_ifaces entry has NM_TC_IFACE_F_PEER (towards any other device the kernel would drop
    it): set for a veth into another netns whose end there is no bridge port (a pod's), not
    for one whose peer is here, nor for one into a bridge in another netns (an uplink, like
    the lab's fabric: a node's NIC would not let a packet skip its transmit)."""
    from nodemesh.datapath import bpfsys
    from nodemesh.datapath import tc as t

    bpffs, dp = node
    pod = f"nmtcp{os.getpid()}{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", pod], check=True)
    try:
        subprocess.run(f"ip link add nmtcp0 type veth peer name eth0 netns {pod} && "
                       f"ip link add nmtcp1 type veth peer name up0 netns {pod} && "
                       f"ip -n {pod} link add br0 type bridge && "
                       f"ip -n {pod} link set up0 master br0 && "
                       "ip link set nmtcp0 up && ip link set nmtcp1 up", shell=True, check=True)
        path = load_tc(bpffs, dp)
        path.attach(["nmtc0", "nmtcp0", "nmtcp1"])
        try:
            flags = {int(k): int(v) for k, v in
                     bpfsys.map_lookup_batch(path.map_fds["tc_ifaces"], t.u32, t.u32)}
            assert flags[path.interfaces["nmtcp0"]] == t.IFACE_F_CLSACT | t.IFACE_F_PEER
            assert flags[path.interfaces["nmtcp1"]] == t.IFACE_F_CLSACT  # bridged: an uplink
            assert flags[path.interfaces["nmtc0"]] == t.IFACE_F_CLSACT   # its peer is here
        finally:
            path.close()
    finally:
        subprocess.run(["ip", "netns", "del", pod], capture_output=True)
