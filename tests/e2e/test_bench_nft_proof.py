"""The kube-proxy nftables baseline's traversal proof reads the kernel's own counters.

bench/run.py proves that the nftables variant's connections went through kube-proxy's rules
by the packets its endpoint chains' counters saw. It reads them over netlink, one rule dump
per chain (variants.nft_chain_counters), because `nft list chain` loads the whole ruleset
first. Here: the exact ruleset bench/baselines.py writes, one service with three endpoints in
a netns of the test's own (no route off it), real connections from inside the netns to the
VIP, and the counters read both ways must agree and add up to the connections made.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid

import pytest
from tcrun import InNetns

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "bench"))

import baselines as bl  # noqa: E402
import variants as vr  # noqa: E402

pytestmark = pytest.mark.root

CONNECTIONS = 30


def sh(*args: str, stdin: str = "") -> str:
    return subprocess.run(args, input=stdin, capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture
def netns():
    name = f"nmnft{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_the_nftables_proof_counts_each_connection_once(netns):
    ns = ("ip", "netns", "exec", netns)
    sh(*ns, "ip", "link", "set", "lo", "up")
    sh(*ns, "ip", "link", "add", "nmep", "type", "veth", "peer", "name", "nmpeer")
    for link in ("nmep", "nmpeer"):
        sh(*ns, "ip", "link", "set", link, "up")
    endpoints = ["10.250.0.1", "10.250.0.2", "10.250.0.3"]
    for ep in endpoints:
        sh(*ns, "ip", "addr", "add", f"{ep}/32", "dev", "nmep")
    sh(*ns, "ip", "route", "add", "10.96.0.0/16", "dev", "nmep")  # the VIP's route
    spec = bl.SvcSpec("default", "web", "http", "10.96.0.10", 80, endpoints, 8080)
    other = bl.SvcSpec("default", "other", "http", "10.96.0.11", 80, endpoints, 8080)
    text, _ = bl.nftables_ruleset([other, spec], "10.0.0.0/8", [spec])
    sh(*ns, "nft", "-f", "-", stdin=text)

    with InNetns(netns):
        server = socket.socket()
    try:
        server.bind(("0.0.0.0", 8080))
        server.listen(64)
        for _ in range(CONNECTIONS):
            with InNetns(netns):
                client = socket.create_connection((spec.vip, spec.port), timeout=5)
            accepted, _ = server.accept()
            assert accepted.getsockname()[0] in endpoints  # DNATed to an endpoint
            accepted.close()
            client.close()
    finally:
        server.close()

    chains = [spec.nft_endpoint_chain(ep) for ep in endpoints]
    counts = vr.nft_chain_counters(netns, "kube-proxy", chains)
    listed = []
    for chain in chains:
        out = sh(*ns, "nft", "list", "chain", "ip", "kube-proxy", chain)
        listed.append(int(re.search(r"counter packets (\d+)", out).group(1)))
    assert counts == listed
    assert sum(counts) == CONNECTIONS  # NAT chains see a connection's first packet only
    # The service that was not counted has no counter; the lookup says so, not 0.
    assert vr.nft_chain_counters(netns, "kube-proxy", [other.nft_endpoint_chain(
        endpoints[0])]) == [-1]
