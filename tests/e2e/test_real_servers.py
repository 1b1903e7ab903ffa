"""Real servers and clients users know: nginx behind a VIP reached with curl, dnsmasq behind a
VIP asked with dig (dig rejects a reply from an unexpected source, so it proves recvmsg's
reverse translation)."""
import collections
import shutil
import subprocess

import pytest
from helpers import config_yaml, service_yaml

pytestmark = pytest.mark.root


def run_in_client(lab, argv, timeout=20):
    proc = lab.spawn(argv, netns=lab.client_ns, in_cgroup=True, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    lab.processes.remove(proc)
    return proc.returncode, out, err


@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx not installed (make setup)")
def test_nginx_backends_behind_a_vip_answer_curl(lab, agent, tmp_path):
    for b in lab.backends:
        lab.start_nginx(b, 8081, f"nginx-{b.name}", str(tmp_path), connections=256)
    agent.write_config(config_yaml(service_yaml("nginx", lab.vip4(20),
                                                [b.ipv4 for b in lab.backends], target=8081)))
    agent.start()
    seen = collections.Counter()
    for _ in range(30):
        code, out, err = run_in_client(lab, ["curl", "-s", "--max-time", "3", "--retry", "3",
                                             "--retry-connrefused",
                                             f"http://{lab.vip4(20)}/"])
        assert code == 0, err
        seen[out.strip()] += 1
    assert set(seen) == {"nginx-b1", "nginx-b2", "nginx-b3"}


@pytest.mark.skipif(not shutil.which("dnsmasq") or not shutil.which("dig"),
                    reason="dnsmasq or dig not installed (make setup)")
def test_dnsmasq_backends_behind_a_vip_answer_dig(lab, agent):
    for b in lab.backends:
        lab.spawn(["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv",
                   "--no-hosts", f"--listen-address={b.ipv4}", "--bind-interfaces",
                   "--port=5300", f"--txt-record=who.nodemesh.test,{b.name}",
                   f"--pid-file=/run/nodemesh/{lab.prefix}-{b.name}-dnsmasq.pid",
                   "--user=root"], netns=b.netns)
    agent.write_config(config_yaml(service_yaml("dns", lab.vip4(53), [b.ipv4 for b in
                                                                     lab.backends],
                                                port=53, target=5300, protocol="UDP")))
    agent.start()
    seen = collections.Counter()
    for _ in range(30):
        code, out, err = run_in_client(lab, ["dig", f"@{lab.vip4(53)}", "-p", "53",
                                             "who.nodemesh.test", "TXT", "+short", "+tries=3",
                                             "+time=1"])
        assert code == 0 and "unexpected source" not in out + err, out + err
        seen[out.strip().strip('"')] += 1
    assert set(seen) == {"b1", "b2", "b3"}


def test_the_demo_runs_once_and_removes_everything(tmp_path):
    import os
    import sys

    from helpers import ROOT, free_port

    port = free_port()
    res = subprocess.run([sys.executable, "-m", "nodemesh.cli", "demo", "--once",
                          "--metrics-addr", f"127.0.0.1:{port}"], capture_output=True,
                         text=True, cwd=ROOT, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "300 ok, 0 failed" in res.stdout
    assert "nodemesh_backend_connections_total" in res.stdout
    assert "demo cleaned up" in res.stdout
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                          text=True).stdout.split() if n.startswith("nmd")]
    assert not [d for d in os.listdir("/sys/fs/bpf") if d.startswith("nmd")]
