"""Transparent redirect to a node-local proxy (bpf/lib/proxy.h), proven with real proxies.

The lab's client netns holds the proxy, as a pod holds its sidecar: an application's connect to
a service VIP lands on the proxy's loopback port, the proxy reads the original destination with
getsockopt(SO_ORIGINAL_DST), and its own connect to the VIP (as the proxy uid, or from the
proxy cgroup) is balanced to a backend by the socket hooks as usual.
"""
import collections
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers import ROOT, config_yaml, free_port, service_yaml

pytestmark = pytest.mark.root

PROXY_UID = 1337
MESH_PROXY = os.path.join(ROOT, "tests", "mesh_proxy.py")


def start_proxy(lab, port, uid=PROXY_UID):
    """tests/mesh_proxy.py in the client netns and the hooked cgroup; its stdout lines."""
    proc = lab.spawn([sys.executable, MESH_PROXY, "--listen", f"127.0.0.1:{port}",
                      "--listen", f"[::1]:{port}", "--uid", str(uid)],
                     netns=lab.client_ns, in_cgroup=True, stdout=subprocess.PIPE)
    line = b""
    while not line.endswith(b"\n"):  # unbuffered reads, so that select() sees the rest
        chunk = os.read(proc.stdout.fileno(), 6 - len(line))
        assert chunk, "the proxy exited before it was ready"
        line += chunk
    assert line == b"ready\n"
    return proc


def proxy_records(proc, n, timeout=10.0):
    """The next n JSON lines the proxy printed (one per accepted connection)."""
    import select

    buf = getattr(proc, "pending", b"")
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < n and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            buf += os.read(fd, 65536)
    lines = buf.split(b"\n")
    out, proc.pending = lines[:n], b"\n".join(lines[n:]) if len(lines) > n else b""
    return [json.loads(line) for line in out if line]


def run_client(lab, target, count, uid=None):
    """nodemesh.lab.client in the client netns and cgroup, as root or as `uid`."""
    argv = [sys.executable, "-m", "nodemesh.lab.client", "tcp", "--target", target,
            "--count", str(count), "--timeout", "5"]
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    proc = lab.spawn(argv, netns=lab.client_ns, in_cgroup=True, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True, cwd=ROOT)
    out, err = proc.communicate(timeout=60)
    lab.processes.remove(proc)
    assert proc.returncode == 0, err
    return json.loads(out)


def proxied_service(lab, port, proxy_line, vip4, vip6=None):
    svc = service_yaml("web", vip4, [b.ipv4 for b in lab.backends], port=80, target=8080)
    svc += f"    {proxy_line}\n"
    if vip6:
        svc += service_yaml("web6", vip6, [b.ipv6 for b in lab.backends], port=80,
                            target=8080) + f"    {proxy_line}\n"
    return svc


def test_redirected_connections_reach_the_proxy_which_relays_http_to_the_original_service(
        lab, agent):
    port = free_port()
    vip4, vip6 = lab.vip4(30), lab.vip6(30)
    agent.write_config(config_yaml(proxied_service(lab, port, f"proxy: {{port: {port}}}",
                                                   vip4, vip6)))
    agent.start()
    proxy = start_proxy(lab, port)
    for vip, target in ((vip4, f"{vip4}:80"), (vip6, f"[{vip6}]:80")):
        res = run_client(lab, target, 30)
        # Real HTTP through the proxy to every backend; the app still sees the VIP as its peer.
        assert res["ok"] == 30 and res["failed"] == 0, res
        assert set(res["backends"]) == {"b1", "b2", "b3"}, res
        assert res["peer_mismatch"] == 0, res
        records = proxy_records(proxy, 30)
        assert len(records) == 30
        assert all(r.get("original") == [vip, 80] for r in records), records[:3]
    for name in ("web", "web6"):
        assert agent.metric("nodemesh_proxy_redirects_total", namespace="test",
                            service=name) == 30
    # The proxy's 60 upstream connects were balanced like any other, not redirected again.
    assert sum(agent.metric("nodemesh_service_connections_total", namespace="test",
                            service=name, port="80", protocol="TCP")
               for name in ("web", "web6")) == 60
    # Each redirect is a flow event with the verdict proxy_redirect, the VIP beside it; the
    # proxy's upstream connects are flows of their own, translated to a backend.
    r = subprocess.run([sys.executable, "-m", "nodemesh.cli", "flows", "--admin-socket",
                        lab.admin_socket, "-o", "json", "--last", "4096", "--verdict",
                        "proxy_redirect"],
                       capture_output=True, text=True, check=True)
    redirected = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert collections.Counter((f["service"], f["vip"]) for f in redirected) == \
        {("web", f"{vip4}:80"): 30, ("web6", f"[{vip6}]:80"): 30}


def test_a_connection_from_the_proxy_uid_is_never_redirected(lab, agent):
    port = free_port()
    vip = lab.vip4(31)
    agent.write_config(config_yaml(proxied_service(lab, port, f"proxy: {{port: {port}}}",
                                                   vip)))
    agent.start()
    proxy = start_proxy(lab, port)
    res = run_client(lab, f"{vip}:80", 20, uid=PROXY_UID)
    assert res["ok"] == 20 and set(res["backends"]) <= {"b1", "b2", "b3"}, res
    assert proxy_records(proxy, 1, timeout=1.0) == []
    assert agent.metric("nodemesh_proxy_redirects_total", namespace="test", service="web") == 0
    assert agent.metric("nodemesh_service_connections_total", namespace="test", service="web",
                        port="80", protocol="TCP") == 20


def test_node_default_proxy_port_and_per_service_opt_out(lab, agent):
    port = free_port()
    vip_in, vip_out = lab.vip4(32), lab.vip4(33)
    agent.write_config(config_yaml(
        service_yaml("meshed", vip_in, [b.ipv4 for b in lab.backends], target=8080),
        service_yaml("plain", vip_out, [b.ipv4 for b in lab.backends], target=8080)
        + "    proxy: {enabled: false}\n"))
    agent.start(extra=["--proxy-port", str(port)])
    proxy = start_proxy(lab, port)
    assert run_client(lab, f"{vip_in}:80", 10)["ok"] == 10
    assert [r["original"] for r in proxy_records(proxy, 10)] == [[vip_in, 80]] * 10
    assert run_client(lab, f"{vip_out}:80", 10)["ok"] == 10
    assert proxy_records(proxy, 1, timeout=1.0) == []
    assert agent.metric("nodemesh_proxy_redirects_total", namespace="test",
                        service="meshed") == 10


@pytest.mark.skipif(not shutil.which("haproxy") or not shutil.which("nginx"),
                    reason="haproxy or nginx not installed (make setup)")
def test_haproxy_relays_nginx_to_the_original_destination_with_the_split_intact(
        lab, agent, tmp_path):
    """Debian's HAProxy as the node proxy: `server ... 0.0.0.0:0` forwards each connection to
    its SO_ORIGINAL_DST. HAProxy runs as root inside --proxy-cgroup, so it is exempt by
    cgroup, not uid; its upstream connects are balanced round robin with weights 1:2:3."""
    for b in lab.backends:
        lab.start_nginx(b, 8081, f"nginx-{b.name}", str(tmp_path), connections=256)
    port = free_port()
    vip = lab.vip4(34)
    svc = service_yaml("nginx", vip, [b.ipv4 for b in lab.backends], target=8081,
                       algorithm="round_robin", weights=[1, 2, 3])
    agent.write_config(config_yaml(svc + f"    proxy: {{port: {port}}}\n"))
    proxy_cgroup = os.path.join(lab.cgroup, "proxy")
    os.makedirs(proxy_cgroup, exist_ok=True)
    try:
        agent.start(extra=["--proxy-cgroup", proxy_cgroup, "--proxy-uid", "-1"])
        conf = tmp_path / "haproxy.cfg"
        conf.write_text(f"""global
  maxconn 256
defaults
  mode tcp
  timeout connect 5s
  timeout client 10s
  timeout server 10s
frontend mesh
  bind 127.0.0.1:{port}
  default_backend original
backend original
  server original 0.0.0.0:0
""")
        # Join the cgroup before `ip netns exec`, which remounts /sys (and hides cgroupfs).
        argv = ["sh", "-c", f"echo $$ > {proxy_cgroup}/cgroup.procs && exec ip netns exec "
                            f"{lab.client_ns} haproxy -db -f {conf}"]
        log = open(tmp_path / "haproxy.log", "w")
        haproxy = lab.spawn(argv, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 5
        while not _listening(lab, port):
            assert haproxy.poll() is None and time.monotonic() < deadline, \
                f"haproxy did not listen: {(tmp_path / 'haproxy.log').read_text()}"
            time.sleep(0.1)
        seen = collections.Counter()
        for _ in range(60):
            proc = lab.spawn(["curl", "-s", "--max-time", "5", f"http://{vip}/"],
                             netns=lab.client_ns, in_cgroup=True, stdout=subprocess.PIPE,
                             text=True)
            out, _ = proc.communicate(timeout=10)
            lab.processes.remove(proc)
            seen[out.strip()] += 1
        # Smooth weighted round robin is exact over whole cycles of 6: no tolerance needed.
        assert seen == {"nginx-b1": 10, "nginx-b2": 20, "nginx-b3": 30}, seen
        assert agent.metric("nodemesh_proxy_redirects_total", namespace="test",
                            service="nginx") == 60
    finally:
        lab.destroy()  # haproxy leaves, and the lab removes its child cgroups too
        if os.path.isdir(proxy_cgroup):
            os.rmdir(proxy_cgroup)


def _listening(lab, port) -> bool:
    res = subprocess.run(["ip", "netns", "exec", lab.client_ns, "ss", "-Hltn",
                          f"sport = :{port}"], capture_output=True, text=True)
    return bool(res.stdout.strip())


def test_the_agent_accelerates_the_app_to_proxy_hop_and_stops_when_restarted_without(
        lab, agent):
    """`run --accelerate-local` with a proxied service: the app -> proxy hop (both ends in the
    cgroup) goes socket to socket, the proxy -> backend hop (the backend is in another netns,
    outside the cgroup) falls back to TCP; the metrics say so. Restarted without the option,
    the agent detaches sk_msg and nothing more is redirected."""
    port = free_port()
    vip = lab.vip4(35)
    agent.write_config(config_yaml(proxied_service(lab, port, f"proxy: {{port: {port}}}",
                                                   vip)))
    agent.start(extra=["--accelerate-local"])
    start_proxy(lab, port)
    res = run_client(lab, f"{vip}:80", 20)
    assert res["ok"] == 20 and res["peer_mismatch"] == 0, res
    moved = agent.metric("nodemesh_sockmap_redirected_bytes_total")
    # Each request and response crossed the app -> proxy hop: at least 20 requests' bytes.
    assert moved >= 20 * len(b"GET / HTTP/1.0\r\nHost: nodemesh\r\n\r\n"), moved
    assert agent.metric("nodemesh_sockmap_fallbacks_total") > 0
    assert os.path.exists(os.path.join(lab.bpffs, "links", "sk_msg"))
    agent.stop()
    agent.start(extra=[])
    assert not os.path.exists(os.path.join(lab.bpffs, "links", "sk_msg"))
    res = run_client(lab, f"{vip}:80", 10)
    assert res["ok"] == 10, res
    assert agent.metric("nodemesh_sockmap_redirected_bytes_total") == moved


def test_a_forced_cleanup_under_an_accelerating_agent_is_repaired_with_acceleration_on(
        lab, agent):
    """cleanup --force switches redirection off before it unpins; the running agent puts its
    pins and links back within its 2 s check, and acceleration with them."""
    from helpers import cli

    from nodemesh.datapath import bpfsys
    from nodemesh.datapath import maps as m

    agent.write_config(config_yaml(service_yaml("web", lab.vip4(36),
                                                [b.ipv4 for b in lab.backends])))
    agent.start(extra=["--accelerate-local"])
    cli("cleanup", "--force", "--bpffs", lab.bpffs, check=True)

    def accelerating():
        try:
            fd = bpfsys.obj_get(os.path.join(lab.bpffs, "mesh_config"))
        except OSError:
            return False
        try:
            cfg = m.MeshConfig()
            return bpfsys.map_lookup(fd, m.u32(0), cfg) and cfg.accelerate == 1 and \
                os.path.exists(os.path.join(lab.bpffs, "links", "sk_msg"))
        finally:
            bpfsys.close(fd)
    agent.wait_for(accelerating, timeout=10, what="acceleration repaired")
