"""Workload identity from the Kubernetes API: Pods on this node, found in a kubelet-shaped
cgroup hierarchy made under the lab's own cgroup, and a MeshPolicy, enforced at connect()."""
import os

import pytest
from helpers import cli, holder_client, remove_workload_cgroups
from k8s_fake_apiserver import FakeApiServer
from test_kubernetes_e2e import service_obj, slice_obj

from nodemesh.datapath import bpfsys
from nodemesh.datapath import maps as m
from nodemesh.datapath.loader import cgroup2_root

pytestmark = [pytest.mark.root, pytest.mark.slow]



def pod(name, uid, sa, qos, labels=None, annotations=None, node="node-a"):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": uid,
                         "labels": labels or {}, "annotations": annotations or {}},
            "spec": {"nodeName": node, "serviceAccountName": sa},
            "status": {"phase": "Running", "qosClass": qos}}


POLICY = {"apiVersion": "nodemesh.io/v1alpha1", "kind": "MeshPolicy",
          "metadata": {"name": "frontend-only", "namespace": "shop"},
          "spec": {"action": "ALLOW", "service": "web", "ports": [80],
                   "from": [{"serviceAccounts": ["frontend"]}]}}


@pytest.fixture
def kubelet(lab):
    """Makes pod cgroups the way the kubelet lays them out, under the lab's cgroup (which
    stands in for --cgroup-root); removes them, deepest first."""
    made = []

    def make(*parts):
        path = os.path.join(lab.cgroup, *parts)
        os.makedirs(path, exist_ok=True)
        made.append(path)
        return path
    try:
        yield make
    finally:
        remove_workload_cgroups(lab, made)


client = holder_client


def kernel_identities(lab):
    fd = bpfsys.obj_get(os.path.join(lab.bpffs, "identities"))
    maps = m.Maps({"identities": fd})
    try:
        return {int(k.value if hasattr(k, "value") else k): v.identity
                for k, v in maps.items("identities")}
    finally:
        maps.close()


def test_pods_on_this_node_get_identities_a_mesh_policy_applies_and_an_annotation_opts_out(
        lab, agent, tmp_path, kubelet, monkeypatch):
    # a: systemd driver, Burstable; b: cgroupfs driver, BestEffort. Each client runs in a
    # container cgroup under its pod's.
    kubelet("kubepods.slice", "kubepods-burstable.slice",
                    "kubepods-burstable-pod1111_aaaa.slice")
    a_ctr = kubelet("kubepods.slice", "kubepods-burstable.slice",
                    "kubepods-burstable-pod1111_aaaa.slice", "cri-containerd-a.scope")
    b_ctr = kubelet("kubepods", "besteffort", "pod2222-bbbb", "ctr")
    kata_ctr = kubelet("kubepods", "pod6666-ffff", "ctr")  # Guaranteed, cgroupfs
    api = FakeApiServer().start()
    try:
        api.put(service_obj(lab.vip4()))
        api.put(slice_obj(lab.backends))
        api.put(pod("a", "1111-aaaa", "frontend", "Burstable", {"app": "web"}))
        api.put(pod("b", "2222-bbbb", "batch", "BestEffort"))
        api.put(pod("ghost", "3333-cccc", "batch", "Guaranteed"))  # no cgroup on this node
        api.put(pod("elsewhere", "4444-dddd", "batch", "Guaranteed", node="node-b"))
        api.put(pod("kata", "6666-ffff", "default", "Guaranteed",
                    annotations={"nodemesh.io/socket-lb": "false"}))
        api.put(POLICY)
        monkeypatch.setenv("NODEMESH_KUBELET_CGROUP_ROOT",
                           os.path.relpath(lab.cgroup, cgroup2_root()))
        agent.start(extra=["--source", "kubernetes", "--kubeconfig",
                           api.write_kubeconfig(tmp_path / "kubeconfig"), "--node-name",
                           "node-a"])
        agent.wait_for(lambda: len(kernel_identities(lab)) == 3, what="three pod identities")
        a = client(lab, a_ctr, f"{lab.vip4()}:80")
        b = client(lab, b_ctr, f"{lab.vip4()}:80")
        assert a("connect 1")[0]["ok"]
        assert b("connect 1")[0].get("error") == "EPERM"
        listing = cli("policy", "list", "-o", "json", "--admin-socket", lab.admin_socket,
                      check=True).stdout
        import json
        view = json.loads(listing)
        assert {w["name"] for w in view["workloads"]} == {"a", "b", "ghost", "kata"}
        # kata opted out (nodemesh.io/socket-lb: "false"): untranslated, the VIP meets the
        # lab's blackhole route in the client netns.
        res = client(lab, kata_ctr, f"{lab.vip4()}:80")("connect 2")
        assert {r.get("error") for r in res} <= {"EINVAL", "ENETUNREACH", "EHOSTUNREACH"}, res
        assert any("ghost" in line for line in view["missing"])
        out = cli("policy", "check", "--from", "shop/b", "--to", "shop/web:80",
                  "--admin-socket", lab.admin_socket, check=True).stdout
        assert "DENY" in out and "batch" in out

        # b is deleted and re-created with the same name: a new uid, a new cgroup, a new
        # identity entry (the old cgroup's is gone).
        old_b = bpfsys.cgroup_id(os.path.dirname(b_ctr))
        before = kernel_identities(lab)
        api.delete("Pod", "shop", "b")
        b2_ctr = kubelet("kubepods", "besteffort", "pod5555-eeee", "ctr")
        api.put(pod("b", "5555-eeee", "batch", "BestEffort"))
        new_b = bpfsys.cgroup_id(os.path.dirname(b2_ctr))
        agent.wait_for(lambda: new_b in kernel_identities(lab) and
                       old_b not in kernel_identities(lab), what="b's new cgroup registered")
        assert kernel_identities(lab)[new_b] == before[old_b]  # same attributes, same number
        b2 = client(lab, b2_ctr, f"{lab.vip4()}:80")
        assert b2("connect 1")[0].get("error") == "EPERM"
        assert a("connect 1")[0]["ok"]
    finally:
        api.stop()
