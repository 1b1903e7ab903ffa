"""Issue 14: reconciliation never stalls while the admin socket and the metrics port are
abused. A health probe's verdict change (a backend's health port starts resetting) is timed
from the fault to the kernel's slots, first on a quiet agent, then while 200 clients hold the
admin socket, 50 scrapers loop on /metrics and two clients send malformed requests to both
servers without pause. The test prints both; it asserts only that every change is programmed
(within the 5 s bound of a stall), not a speed."""
import socket
import statistics
import subprocess
import threading
import time
import urllib.request

import pytest
from fault_lab import dump
from helpers import TIME_SCALE, config_yaml, service_yaml

pytestmark = [pytest.mark.root, pytest.mark.slow]

HEALTH_PORT = 9090
JUNK = [b"\x16\x03\x01\x00\xff" * 50, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"POST /v1/status HTTP/1.1\r\nContent-Length: 99999\r\n\r\nx", b"\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n" + b"X: y\r\n" * 3000 + b"\r\n"]


def iptables(netns, op):
    subprocess.run(["ip", "netns", "exec", netns, "iptables", op, "INPUT", "-p", "tcp",
                    "--dport", str(HEALTH_PORT), "-j", "REJECT", "--reject-with", "tcp-reset"],
                   check=True, capture_output=True)


def probe_change_latency(lab, agent, netns):
    """Seconds from the health port failing to the backend leaving the kernel's slots."""
    t0 = time.monotonic()
    iptables(netns, "-I")
    try:
        agent.wait_for(lambda: len(dump(lab.bpffs).backends) == 2, 5, "the ejection")
        return time.monotonic() - t0
    finally:
        iptables(netns, "-D")
        agent.wait_for(lambda: len(dump(lab.bpffs).backends) == 3, 5, "the return")


def test_a_probe_change_reaches_the_kernel_while_the_admin_socket_and_metrics_are_abused(
        linked_lab, linked_agent):
    lab, agent = linked_lab, linked_agent
    lab.start_servers(tcp_ports=(HEALTH_PORT,), udp_ports=())
    web = service_yaml("web", lab.vip4(), [b.ipv4 for b in lab.backends])
    web += (f"    healthCheck: {{type: tcp, port: {HEALTH_PORT}, intervalSeconds: 0.1, "
            f"timeoutSeconds: 0.1, unhealthyThreshold: 1, healthyThreshold: 1}}\n")
    agent.write_config(config_yaml(web))
    agent.start()
    netns = lab.backends[2].netns
    quiet = [probe_change_latency(lab, agent, netns) for _ in range(3)]

    stop, held, counts = threading.Event(), [], {"scrapes": 0, "junk": 0, "errors": 0}

    def scraper():
        while not stop.is_set():
            try:
                with urllib.request.urlopen(agent.url("/metrics"), timeout=10) as r:
                    r.read()
                counts["scrapes"] += 1
            except OSError:
                counts["errors"] += 1

    def junk():
        i = 0
        while not stop.is_set():
            for family, addr in ((socket.AF_INET, ("127.0.0.1", agent.metrics_port)),
                                 (socket.AF_UNIX, lab.admin_socket)):
                try:
                    with socket.socket(family, socket.SOCK_STREAM) as s:
                        s.settimeout(2)
                        s.connect(addr)
                        s.sendall(JUNK[i % len(JUNK)])
                        s.shutdown(socket.SHUT_WR)
                        s.recv(1024)
                except OSError:
                    pass
                counts["junk"] += 1
                i += 1

    threads = [threading.Thread(target=scraper) for _ in range(50)] + \
        [threading.Thread(target=junk) for _ in range(2)]
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(s)
            s.connect(lab.admin_socket)
        for t in threads:
            t.start()
        time.sleep(1)
        abused = [probe_change_latency(lab, agent, netns) for _ in range(3)]
    finally:
        stop.set()
        for t in threads:
            t.join(30 * TIME_SCALE)
        for s in held:
            s.close()
    print(f"probe change -> kernel: quiet median {statistics.median(quiet) * 1000:.0f} ms "
          f"(min {min(quiet) * 1000:.0f}, max {max(quiet) * 1000:.0f}); under abuse median "
          f"{statistics.median(abused) * 1000:.0f} ms (min {min(abused) * 1000:.0f}, max "
          f"{max(abused) * 1000:.0f}); {counts}")
    assert agent.proc.poll() is None and counts["scrapes"] > 50
    assert agent.status()["ready"] is True
