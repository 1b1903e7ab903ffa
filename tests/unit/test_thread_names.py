"""The agent's threads carry their names into the kernel (top -H, ps -L, /proc/.../comm)."""
import threading

from nodemesh import threadname


def _comm_of(thread_id: int) -> str:
    with open(f"/proc/self/task/{thread_id}/comm") as f:
        return f.read().strip()


def test_a_started_worker_shows_its_short_name_in_proc_comm():
    seen = []
    t = threadname.Thread(target=lambda: seen.append(_comm_of(threading.get_native_id())),
                          name="kubernetes-endpointslice-watch", daemon=True)
    t.start()
    t.join(10)
    assert seen == ["nm-k8s-eps"]


def test_every_os_name_of_the_agents_threads_fits_the_kernels_15_bytes_and_says_which():
    names = {n: threadname.os_name(n) for n in (
        "kubernetes-service-watch", "kubernetes-endpointslice-watch", "kubernetes-pod-watch",
        "kubernetes-meshpolicy-watch", "kubernetes-service-page", "kubernetes-delivery",
        "kubernetes-decoder-reap", "failure-events", "sockterm", "flow-events", "metrics-0",
        "admin", "health-checks", "file-source")}
    assert all(len(v.encode()) <= 15 and v.startswith("nm-") for v in names.values()), names
    assert len(set(names.values())) == len(names), names
    assert names["kubernetes-service-watch"] == "nm-k8s-svc"
