"""The Kubernetes source end to end: a local API server with real list/watch semantics, the
agent watching it, and real connections that follow an EndpointSlice change."""
import statistics
import time

import pytest
from k8s_fake_apiserver import FakeApiServer

pytestmark = [pytest.mark.root, pytest.mark.slow]


def service_obj(vip):
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                     "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                                "targetPort": "http-alt"}],
                     "selector": {"app": "web"}, "sessionAffinity": "None",
                     "internalTrafficPolicy": "Cluster"}}


def slice_obj(backends, ready=None):
    ready = ready or {}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abcde", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web",
                                    "endpointslice.kubernetes.io/managed-by":
                                        "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            # the named targetPort resolves here, by the service port's name
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [b.ipv4],
                           "conditions": {"ready": ready.get(b.name, True),
                                          "serving": True, "terminating": False},
                           "nodeName": "node-a", "zone": "zone-a"} for b in backends]}


def test_an_endpointslice_change_reaches_the_kernel_and_moves_real_connections(
        lab, agent, tmp_path):
    api = FakeApiServer().start()
    try:
        api.put(service_obj(lab.vip4()))
        api.put(slice_obj(lab.backends[:1]))
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        agent.start(extra=["--source", "kubernetes", "--kubeconfig", kubeconfig])
        r = lab.client(["tcp", "--target", f"{lab.vip4()}:80", "--count", "30"])
        assert r["backends"] == {"b1": 30}

        # Move the endpoints back and forth; time each change until the kernel serves it.
        latencies = []
        sets = [lab.backends[1:], lab.backends[:1], lab.backends, lab.backends[2:]] * 3
        for backends in sets:
            want = {b.ipv4 for b in backends}
            t0 = time.monotonic()
            api.put(slice_obj(backends))
            agent.wait_for(lambda: {b["address"] for s in agent.services()
                                    for fe in s["frontends"] for b in fe["backends"]} == want,
                           timeout=5, what=f"{want} programmed")
            latencies.append(time.monotonic() - t0)
        r = lab.client(["tcp", "--target", f"{lab.vip4()}:80", "--count", "30"])
        assert r["backends"] == {"b3": 30} and r["failed"] == 0
        # A not-ready endpoint leaves the set.
        api.put(slice_obj(lab.backends, ready={"b1": False, "b2": False}))
        agent.wait_for(lambda: lab.client(["tcp", "--target", f"{lab.vip4()}:80", "--count",
                                           "20"])["backends"] == {"b3": 20}, timeout=5,
                       what="only the ready endpoint")
        # The service goes away: its frontend is removed from the kernel.
        api.delete("Service", "shop", "web")
        agent.wait_for(lambda: agent.services() == [], timeout=5, what="the service removed")
        st = agent.status()
        assert st["source"]["kind"] == "kubernetes"
        assert agent.metric("nodemesh_source_last_sync_timestamp_seconds",
                            source="kubernetes") > 0
        print(f"EndpointSlice change -> kernel map, as seen through the admin API: median "
              f"{statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} "
              f"ms over {len(latencies)} changes")
    finally:
        api.stop()
