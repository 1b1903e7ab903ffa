#!/usr/bin/env python3
"""The slice watch's read and decode of one event, in process: thread CPU an event of
nodemesh's _json_lines + the JSON decode, over a real watch stream (the kubernetes client
against tests/k8s_fake_apiserver.py on 127.0.0.1), one MODIFIED EndpointSlice event at a
time, as bench/controlplane.py's changes come. Compare agent copies side by side:

    PYTHONPATH=<copy>/agent:tests:bench .venv/bin/python bench/k8s_watch_read.py [EVENTS]
"""
import sys
import threading
import time

from k8s_fake_apiserver import FakeApiServer
from k8s_source import slice_object
from kubernetes import client, config

from nodemesh.sources import kubernetes as k


def main() -> None:
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    api = FakeApiServer().start()
    try:
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".kubeconfig") as f:
            api.write_kubeconfig(f.name)
            cfg = client.Configuration()
            config.load_kube_config(f.name, client_configuration=cfg)
        discovery = client.DiscoveryV1Api(client.ApiClient(configuration=cfg))
        api.put(slice_object(1))
        version = str(api.resource_version)
        response = discovery.list_endpoint_slice_for_all_namespaces(
            watch=True, resource_version=version, timeout_seconds=60, _preload_content=False)
        samples = []
        got = threading.Event()

        def read() -> None:
            decode = k._DECODER.decode
            t0 = time.thread_time_ns()
            for line in k._json_lines(response):
                decode(line.decode("utf-8", "surrogatepass"))
                samples.append(time.thread_time_ns() - t0)
                got.set()
                t0 = time.thread_time_ns()
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for n in range(1, events + 1):
            got.clear()
            api.put(slice_object(1, generation=n))
            got.wait(5)
            time.sleep(0.002)
        response.close()
    finally:
        api.stop()
    samples = sorted(samples[10:])  # the first events warm the path
    print(f"{len(samples)} events: read + decode, thread CPU an event median "
          f"{samples[len(samples) // 2] / 1000:.1f} us, p90 "
          f"{samples[len(samples) * 9 // 10] / 1000:.1f} us")


if __name__ == "__main__":
    main()
