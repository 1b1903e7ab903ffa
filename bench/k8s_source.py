#!/usr/bin/env python3
"""The Kubernetes source at scale: N Services + N EndpointSlices (3 endpoints each).

    .venv/bin/python bench/k8s_source.py 1 10000 100000 [--changes 200]

For each N, the fake API server (tests/k8s_fake_apiserver.py) serves N Services and N
EndpointSlices, shaped like a real cluster's (labels, annotations, managedFields, ownerReferences,
targetRefs), on 127.0.0.1 from this process. The source runs in a subprocess of its own, so the
RSS is the source's alone (Python, the kubernetes client, its cache and the delivered
services), with a callback that writes each delta as a line. Reported:

  synced        start() -> the full delta that ends the first sync (after the partial deltas
                it streams page by page), in the child; and the child's CPU time
                until then (what the wall time would be on an idle machine, give or take)
  RSS           before start(), after the sync, and the peak (VmHWM) over the whole run
  latency       one EndpointSlice changed at a time (an endpoint address replaced): the fake's
                write -> on_change in the child, p50 / p99 over --changes changes
                (CLOCK_MONOTONIC is system-wide, so the two processes' clocks agree)
  CPU / change  the child's user+system CPU over the changes, divided by their number
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "agent"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

ENDPOINTS = 3
TIME = "2025-01-01T00:00:00Z"


def service_object(i: int) -> dict:
    name, namespace = f"svc-{i}", f"ns-{i % 100}"
    vip = f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"
    spec = {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            "selector": {"app.kubernetes.io/name": name}, "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster"}
    applied = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "uid": f"5e7c{i:032x}"[:36],
                         "creationTimestamp": TIME,
                         "labels": {"app.kubernetes.io/name": name,
                                    "app.kubernetes.io/part-of": "bench"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration":
                                         json.dumps(applied)},
                         "managedFields": SERVICE_MANAGED_FIELDS},
            "spec": spec, "status": {"loadBalancer": {}}}


def slice_object(i: int, generation: int = 0) -> dict:
    name, namespace = f"svc-{i}", f"ns-{i % 100}"
    endpoints = []
    for j in range(ENDPOINTS):
        n = i * ENDPOINTS + j
        address = f"10.{128 + n // 65536}.{n // 256 % 256}.{n % 256}"
        if j == ENDPOINTS - 1 and generation:  # a change: this endpoint's pod was replaced
            address = f"10.{200 + generation // 65536}.{generation // 256 % 256}.{generation % 256}"
        endpoints.append({"addresses": [address],
                          "conditions": {"ready": True, "serving": True, "terminating": False},
                          "nodeName": f"node-{n % 50}", "zone": f"zone-{n % 3}",
                          "targetRef": {"kind": "Pod", "namespace": namespace,
                                        "name": f"{name}-pod-{j}-{generation}",
                                        "uid": f"90d{n:033x}"[:36]}})
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{name}-x7k2p", "generateName": f"{name}-",
                         "namespace": namespace, "uid": f"e5{i:034x}"[:36], "generation": 1,
                         "creationTimestamp": TIME,
                         "labels": {"kubernetes.io/service-name": name,
                                    "endpointslice.kubernetes.io/managed-by":
                                        "endpointslice-controller.k8s.io",
                                    "app.kubernetes.io/name": name},
                         "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                                         TIME},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service",
                                              "name": name, "uid": f"5e7c{i:032x}"[:36],
                                              "controller": True, "blockOwnerDeletion": True}],
                         "managedFields": SLICE_MANAGED_FIELDS},
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


# One list shared by every object: the fake never changes a stored object in place.
SERVICE_MANAGED_FIELDS = [{
    "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
    "time": TIME, "fieldsType": "FieldsV1",
    "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-"
                                                  "applied-configuration": {}},
                                "f:labels": {".": {}, "f:app.kubernetes.io/name": {},
                                             "f:app.kubernetes.io/part-of": {}}},
                 "f:spec": {"f:internalTrafficPolicy": {}, "f:ports": {
                     ".": {}, 'k:{"port":80,"protocol":"TCP"}': {
                         ".": {}, "f:name": {}, "f:port": {}, "f:protocol": {},
                         "f:targetPort": {}}},
                     "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}}}]
SLICE_MANAGED_FIELDS = [{
    "manager": "kube-controller-manager", "operation": "Update",
    "apiVersion": "discovery.k8s.io/v1", "time": TIME, "fieldsType": "FieldsV1",
    "fieldsV1": {"f:addressType": {}, "f:endpoints": {}, "f:metadata": {
        "f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
        "f:generateName": {}, "f:labels": {".": {}, "f:app.kubernetes.io/name": {},
                                           "f:endpointslice.kubernetes.io/managed-by": {},
                                           "f:kubernetes.io/service-name": {}},
        "f:ownerReferences": {".": {}, 'k:{"uid":"..."}': {}}}, "f:ports": {}}}]


def served_pages(n: int, head, limit: int = 500) -> dict:
    """The list pages the fake API server serves for N Services and N EndpointSlices of this
    file's shape, `limit` a page, by collection ("services", "endpointslices"): a list of
    (the continue token the page was asked with, None for the first; its body), in order.
    `head(body)` is the page's list metadata (the agent's own reader, of whichever checkout a
    benchmark times). For benchmarks that feed a source its pages without HTTP."""
    from k8s_fake_apiserver import COLLECTIONS, FakeApiServer

    api = FakeApiServer()
    api.load(service_object(i) for i in range(n))
    api.load(slice_object(i) for i in range(n))
    pages = {}
    for collection in ("services", "endpointslices"):
        bodies, query = [], {"limit": str(limit)}
        while True:
            _, body = api._list_body(COLLECTIONS[collection], None, query)
            bodies.append((query.get("continue"), body))
            token = head(body).get("continue")
            if not token:
                break
            query = {"continue": token, "limit": str(limit)}
        pages[collection] = bodies
    return pages


# -- the child: the source alone, reporting every delta on stdout

def child(kubeconfig: str) -> None:
    from prometheus_client import CollectorRegistry

    from nodemesh.sources.kubernetes import KubernetesSource

    def on_change(delta) -> None:
        now = time.monotonic()
        line = {"t": now, "full": delta.full, "upserts": len(delta.upserts),
                "deletes": len(delta.deletes)}
        if not delta.full:
            line["names"] = [s.name for s in delta.upserts]
        print(json.dumps(line), flush=True)

    source = KubernetesSource(kubeconfig=kubeconfig, registry=CollectorRegistry())
    me = psutil.Process()
    print(json.dumps({"started": time.monotonic(), "rss": me.memory_info().rss,
                      "cpu": sum(me.cpu_times()[:2])}), flush=True)
    source.start(on_change, lambda message: None)
    sys.stdin.read()  # until the parent closes our stdin
    source.stop()


# -- the parent: the API server, the changes, the measurements

def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def run(n: int, changes: int) -> dict:
    from k8s_fake_apiserver import FakeApiServer

    api = FakeApiServer()
    api.load(service_object(i) for i in range(n))
    api.load(slice_object(i) for i in range(n))
    # The fake's objects are long-lived: out of the GC's sight, so that collections over them
    # do not delay the changes (tens of ms at 10,000 objects, in this process, not the source).
    gc.freeze()
    api.start()
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = api.write_kubeconfig(os.path.join(tmp, "kubeconfig"))
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", kubeconfig],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lines: "queue.Queue[dict]" = queue.Queue()
        threading.Thread(target=lambda: [lines.put(json.loads(line)) for line in proc.stdout],
                         daemon=True).start()
        child_process = psutil.Process(proc.pid)
        try:
            started = lines.get(timeout=60)
            # The first sync streams: partial deltas page by page, then the full one.
            full = lines.get(timeout=120 + n / 500)
            while not full["full"]:
                full = lines.get(timeout=120 + n / 500)
            assert full["upserts"] == n, full
            rss_synced = child_process.memory_info().rss
            cpu_before = sum(child_process.cpu_times()[:2])

            latencies = []
            for change in range(1, changes + 1):
                i = change * 7919 % n  # spread over the services, each changed once if n allows
                written = time.monotonic()
                api.put(slice_object(i, generation=change))
                while True:
                    line = lines.get(timeout=5)
                    if f"svc-{i}" in line.get("names", ()):
                        latencies.append(line["t"] - written)
                        break
            cpu = sum(child_process.cpu_times()[:2]) - cpu_before
            if os.environ.get("BENCH_LATENCIES"):
                print(sorted(round(x * 1000, 1) for x in latencies), file=sys.stderr)
            result = {
                "n": n, "synced": full["t"] - started["started"],
                "sync_cpu": cpu_before - started["cpu"], "rss_start": started["rss"],
                "rss_synced": rss_synced, "rss_peak": vm_hwm(proc.pid),
                "p50": statistics.median(latencies),
                "p99": statistics.quantiles(latencies, n=100)[98] if changes >= 2
                else latencies[0],
                "cpu_per_change": cpu / changes, "changes": changes,
            }
        finally:
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            api.stop()
    return result


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("services", nargs="*", type=int, default=[1, 10000, 100000])
    parser.add_argument("--changes", type=int, default=200)
    args = parser.parse_args()
    mib = 2 ** 20
    rows = []
    for n in args.services:
        r = run(n, args.changes)
        rows.append(f"| {n:,} | {r['synced']:.2f} s | {r['sync_cpu']:.2f} s | "
                    f"{r['rss_start'] / mib:.0f} MiB | "
                    f"{r['rss_synced'] / mib:.0f} MiB | {r['rss_peak'] / mib:.0f} MiB | "
                    f"{r['p50'] * 1000:.1f} / {r['p99'] * 1000:.1f} ms | "
                    f"{r['cpu_per_change'] * 1000:.2f} ms |")
        print(rows[-1], file=sys.stderr, flush=True)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nKubernetes source, {ENDPOINTS} endpoints per service, {args.changes} single "
          f"EndpointSlice changes; {psutil.cpu_count()} CPUs (load average after: {load}), "
          f"Python {sys.version.split()[0]}\n")
    print("| services | synced | CPU to sync | RSS before start | RSS synced | peak RSS | "
          "change → on_change p50 / p99 | CPU per change |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
