"""The TC program, packet by packet, through BPF_PROG_TEST_RUN (Katran's BpfTester as pytest).

Each row: a frame in, the frame expected out (checksums computed from scratch by
tests/packets.py, so equality proves the program's incremental checksum updates) and the
verdict. The program runs in a namespace of its own whose veth owns the node's
addresses (192.0.2.1, 2001:db8::1), with backends on-link and clients routed through it.
"""
from __future__ import annotations

import os
import time
import uuid
from socket import htons, ntohs
from typing import Tuple

import packets as P
import pytest
from tcrun import FORWARDING, NODE_NETNS, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestNetns, run

pytestmark = pytest.mark.root

NODE4, NODE6 = "192.0.2.1", "2001:db8::1"
CLIENT4, CLIENT6 = "198.51.100.7", "2001:db8:c::7"
SNAT_PORTS = (40000, 40063)

CONFIG = """
services:
  - name: web
    vip: 10.96.0.10
    externalIPs: [203.0.113.5]
    ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
    backends: [{address: 192.0.2.10}]
  - name: web6
    vip: fd00::10
    ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
    backends: [{address: "2001:db8::10"}]
  - name: dns
    vip: 10.96.0.53
    ports: [{port: 53, targetPort: 5353, protocol: UDP, nodePort: 30053}]
    backends: [{address: 192.0.2.11}]
  - name: dns6
    vip: fd00::53
    loadBalancerIPs: ["2001:db8:e::53"]
    ports: [{port: 53, targetPort: 5353, protocol: UDP}]
    backends: [{address: "2001:db8::11"}]
  - name: local
    vip: 10.96.0.20
    trafficPolicy: {external: Local}
    ports: [{port: 80, targetPort: 8080, nodePort: 30081}]
    backends: [{address: 192.0.2.12, node: node-a}, {address: 192.0.2.13, node: node-b}]
  - name: local-elsewhere
    vip: 10.96.0.21
    trafficPolicy: {external: Local}
    ports: [{port: 80, targetPort: 8080, nodePort: 30082}]
    backends: [{address: 192.0.2.13, node: node-b}]
  - name: mg
    vip: 10.96.0.30
    algorithm: maglev
    maglev: {tableSize: 307}
    trafficPolicy: {external: Local}
    ports: [{port: 80, targetPort: 8080, nodePort: 30090}]
    backends: [{address: 192.0.2.20, node: node-a}, {address: 192.0.2.21, node: node-a},
               {address: 192.0.2.22, node: node-a}]
  - name: mg6
    vip: fd00::30
    algorithm: maglev
    maglev: {tableSize: 307}
    trafficPolicy: {external: Local}
    loadBalancerIPs: ["2001:db8:e::30"]
    ports: [{port: 80, targetPort: 8080}]
    backends: [{address: "2001:db8::20", node: node-a}, {address: "2001:db8::21", node: node-a},
               {address: "2001:db8::22", node: node-a}]
"""


class TcTester:
    def __init__(self, tc, rec, ifindex: int):
        self.tc, self.rec, self.ifindex = tc, rec, ifindex

    def ingress(self, frame: bytes):
        return run(self.tc.progs["nm_tc_ingress"], frame, self.ifindex)

    def egress(self, frame: bytes):
        return run(self.tc.progs["nm_tc_egress"], frame, self.ifindex)

    def program(self, text: str) -> None:
        from nodemesh import config, selection
        from nodemesh.reconciler import service_frontends

        services = config.parse(text, "tc.yaml")
        ctx = selection.Context(node_name="node-a")
        for svc in services:
            self.rec.set_service(svc.key, service_frontends(svc, ctx), frozenset())
        assert not self.rec.reconcile(force=True).failed

    def verdicts(self):
        from nodemesh.datapath import tc as t
        counts = {}
        for key, n in t.percpu_sum(self.tc.map_fds["tc_stats"], t.TcStatsKey).items():
            k = t.TcStatsKey.from_buffer_copy(key)
            counts[(t.DIRECTIONS[k.direction], t.VERDICTS[k.verdict])] = n
        return counts

    def drops(self):
        from nodemesh.datapath import tc as t
        from nodemesh.datapath.maps import u32
        sums = t.percpu_sum(self.tc.map_fds["tc_drops"], u32)
        return {t.DROP_REASONS[k]: n for k, n in sums.items()}

    def set_config(self, **fields) -> None:
        from dataclasses import replace

        from nodemesh.datapath import bpfsys
        from nodemesh.datapath.maps import u32
        self.tc.settings = replace(self.tc.settings, **fields)
        bpfsys.map_update(self.tc.map_fds["tc_config"], u32(0), self.tc.settings.config())


@pytest.fixture(scope="module")
def tester():
    from nodemesh.datapath import tc as t
    from nodemesh.datapath.loader import Datapath, cleanup
    from nodemesh.reconciler import Reconciler

    bpffs = f"/sys/fs/bpf/nmtc-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with TestNetns(NODE_NETNS + FORWARDING) as ns:
        dp = Datapath(bpffs, None)
        path = t.TcPath(bpffs, dp.sizes, t.TcSettings(snat_port_min=SNAT_PORTS[0],
                                                      snat_port_max=SNAT_PORTS[1]))
        try:
            rec = Reconciler(dp.load(in_process=True))
            path.load(in_process=True)
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                ifindex = ipr.link_lookup(ifname="nmtc0")[0]
            path.interfaces = {"nmtc0": ifindex}
            path.sync_addresses()
            tt = TcTester(path, rec, ifindex)
            tt.program(CONFIG)
            tt.ns = ns
            yield tt
        finally:
            path.close()
            dp.close()
            cleanup(bpffs)


def snat_port(out: bytes) -> int:
    port = P.parse(out).sport
    assert SNAT_PORTS[0] <= port <= SNAT_PORTS[1], port
    return port


# -- new flows: DNAT (+ SNAT), and the replies translated back --------------------------------

@pytest.mark.parametrize("proto,client,node,nodeport,backend,target", [
    (P.TCP, CLIENT4, NODE4, 30080, "192.0.2.10", 8080),
    (P.UDP, CLIENT4, NODE4, 30053, "192.0.2.11", 5353),
    (P.TCP, CLIENT6, NODE6, 30080, "2001:db8::10", 8080),
], ids=["tcp4-nodeport", "udp4-nodeport", "tcp6-nodeport"])
def test_a_nodeport_flow_is_translated_both_ways_with_correct_checksums(
        tester, proto, client, node, nodeport, backend, target):
    # client -> node:nodePort becomes node:snat -> backend:target, sent on (redirect)
    verdict, out = tester.ingress(P.flow(proto, client, node, 41000, nodeport))
    assert verdict == TC_ACT_REDIRECT
    port = snat_port(out)
    assert out == P.flow(proto, node, backend, port, target)
    # backend:target -> node:snat (its answer) becomes node:nodePort -> client
    verdict, back = tester.ingress(P.flow(proto, backend, node, target, port, flags=P.SYN | P.ACK,
                                          payload=b"world"))
    assert verdict == TC_ACT_REDIRECT
    assert back == P.flow(proto, node, client, nodeport, 41000, flags=P.SYN | P.ACK,
                          payload=b"world")


@pytest.mark.parametrize("proto,client,addr,port,backend,target", [
    (P.TCP, CLIENT4, "203.0.113.5", 80, "192.0.2.10", 8080),
    (P.UDP, CLIENT6, "2001:db8:e::53", 53, "2001:db8::11", 5353),
], ids=["externalIP-tcp4", "loadBalancerIP-udp6"])
def test_external_and_load_balancer_addresses_are_translated(tester, proto, client, addr, port,
                                                             backend, target):
    verdict, out = tester.ingress(P.flow(proto, client, addr, 42000, port))
    assert verdict == TC_ACT_REDIRECT
    node = NODE6 if ":" in client else NODE4  # the FIB's source towards the backend
    assert out == P.flow(proto, node, backend, snat_port(out), target)


def test_a_udp_datagram_without_checksum_keeps_none(tester):
    verdict, out = tester.ingress(P.flow(P.UDP, CLIENT4, NODE4, 43000, 30053, udp_csum=False))
    assert verdict == TC_ACT_REDIRECT
    assert out == P.flow(P.UDP, NODE4, "192.0.2.11", snat_port(out), 5353, udp_csum=False)


def test_local_policy_keeps_the_client_address_and_uses_only_local_backends(tester):
    for sport in range(44000, 44020):  # 2 backends, one on this node: never the other
        verdict, out = tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, sport, 30081))
        assert verdict == TC_ACT_REDIRECT
        assert out == P.flow(P.TCP, CLIENT4, "192.0.2.12", sport, 8080)
    # The reply leaves through this interface: egress gives it the node's address back.
    verdict, out = tester.egress(P.flow(P.TCP, "192.0.2.12", CLIENT4, 8080, 44000, P.SYN | P.ACK))
    assert verdict == TC_ACT_OK
    assert out == P.flow(P.TCP, NODE4, CLIENT4, 30081, 44000, P.SYN | P.ACK)


def test_local_policy_without_a_local_backend_drops_and_counts(tester):
    before = tester.drops().get("no_backend", 0)
    frame = P.flow(P.TCP, CLIENT4, NODE4, 45000, 30082)
    verdict, out = tester.ingress(frame)
    assert verdict == TC_ACT_SHOT
    assert tester.drops()["no_backend"] == before + 1


# -- Maglev: the row of the flow's hash -------------------------------------------------------

MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """nm_mix64 (bpf/lib/maglev.h), splitmix64's finalizer."""
    x ^= x >> 30
    x = x * 0xBF58476D1CE4E5B9 & MASK64
    x ^= x >> 27
    x = x * 0x94D049BB133111EB & MASK64
    return x ^ (x >> 31)


def tc_maglev_row(client: str, sport: int, frontend: str, port: int, proto: int,
                  rows: int) -> int:
    """What every node computes for a flow: nm_maglev_hash(flow_identity(p), key) % rows
    (bpf/tc_nodeport.c, bpf/lib/maglev.h), over the words as they lie in memory."""
    from nodemesh.datapath import maps as m

    family, src = m.encode_addr(client)
    _, fe = m.encode_addr(frontend)  # a NodePort's key: the all-zero address
    h = mix64(((src[0] << 32) | src[1]) ^ htons(sport))
    flow = mix64(h ^ ((src[2] << 32) | src[3]) ^ (family << 48))
    h = mix64(flow ^ ((fe[0] << 32) | fe[3]))
    h = mix64(h ^ ((fe[1] << 32) | fe[2]))
    h = mix64(h ^ ((htons(port) << 16) | proto))
    return ((h ^ (h >> 32)) & 0xFFFFFFFF) % rows


@pytest.mark.parametrize("client,addr,key_addr,port,backends", [
    (CLIENT4, NODE4, "0.0.0.0", 30090, ["192.0.2.20", "192.0.2.21", "192.0.2.22"]),
    (CLIENT6, "2001:db8:e::30", "2001:db8:e::30", 80,
     ["2001:db8::20", "2001:db8::21", "2001:db8::22"]),
], ids=["nodeport4", "loadBalancerIP6"])
def test_maglev_on_the_tc_path_takes_the_table_row_of_the_flows_hash(tester, client, addr,
                                                                      key_addr, port, backends):
    """The backend of each new flow is the one in row hash(client address, source port,
    frontend) of the table every agent builds alike: nothing node-specific goes in, so
    every node sends a flow to the same backend, and one client's flows spread."""
    from nodemesh import maglev

    table = maglev.build_table([(maglev.backend_key(b, 8080), 1) for b in backends], 307)
    got, want = {}, {}
    for sport in range(50000, 50048):  # Local policy: no SNAT port is used up
        verdict, out = tester.ingress(P.flow(P.TCP, client, addr, sport, port))
        assert verdict == TC_ACT_REDIRECT
        got[sport] = P.parse(out).dst
        want[sport] = backends[table[tc_maglev_row(client, sport, key_addr, port, P.TCP,
                                                   307)]]
    assert got == want
    assert set(got.values()) == set(backends)


# -- what is left alone ----------------------------------------------------------------------

@pytest.mark.parametrize("frame,verdict_name", [
    (P.eth(P.ip(CLIENT4, NODE4, P.TCP, P.l4(P.TCP, CLIENT4, NODE4, 46000, 30080), frag=0x2000)),
     "fragment"),
    (P.eth(P.ip(CLIENT4, NODE4, P.UDP, b"\0" * 16, frag=0x0010)), "fragment"),
    (P.eth(P.ip(CLIENT6, NODE6, P.TCP, P.l4(P.TCP, CLIENT6, NODE6, 46000, 30080), frag=1)),
     "fragment"),
    (P.eth(P.ip(CLIENT4, NODE4, P.GRE, b"\0" * 24)), "unknown_protocol"),
    (P.eth(P.ip(CLIENT6, NODE6, P.GRE, b"\0" * 24)), "unknown_protocol"),
    (P.flow(P.TCP, CLIENT4, "192.0.2.99", 46000, 30080), "pass"),   # not the node's address
    (P.flow(P.TCP, CLIENT4, NODE4, 46000, 22), "pass"),             # no such nodePort
], ids=["v4-first-fragment", "v4-later-fragment", "v6-fragment", "v4-gre", "v6-gre",
        "nodeport-on-a-foreign-address", "not-a-nodeport"])
def test_fragments_unknown_protocols_and_others_pass_untouched_and_are_counted(
        tester, frame, verdict_name):
    before = tester.verdicts().get(("ingress", verdict_name), 0)
    verdict, out = tester.ingress(frame)
    assert (verdict, out) == (TC_ACT_OK, frame)
    assert tester.verdicts()[("ingress", verdict_name)] == before + 1


# -- ICMP errors about translated flows ------------------------------------------------------

@pytest.mark.parametrize("client,node,backend", [(CLIENT4, NODE4, "192.0.2.10"),
                                                 (CLIENT6, NODE6, "2001:db8::10")],
                         ids=["icmp4-frag-needed", "icmp6-packet-too-big"])
def test_an_icmp_error_from_the_backend_is_translated_back_to_the_client(tester, client, node,
                                                                        backend):
    v6 = ":" in client
    verdict, out = tester.ingress(P.flow(P.TCP, client, node, 47000, 30080, payload=b"x" * 40))
    port = snat_port(out)
    # The backend says the packet we sent it (node:snat -> backend:8080) was too big ...
    sent = out[14:]
    verdict, back = tester.ingress(P.icmp_error(backend, node, sent, v6))
    assert verdict == TC_ACT_REDIRECT
    # ... the client hears it from the node, about the packet it sent (client -> node:30080).
    original = P.ip(client, node, P.TCP, P.l4(P.TCP, client, node, 47000, 30080,
                                               b"x" * 40))
    assert back == P.icmp_error(node, client, original, v6), port


# -- conntrack: flows keep their backend, collisions, exhaustion, expiry ----------------------

def test_an_established_flow_keeps_its_backend_when_the_backend_set_changes(tester):
    _, out = tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, 48000, 30080))
    port = snat_port(out)
    tester.ingress(P.flow(P.TCP, "192.0.2.10", NODE4, 8080, port, P.SYN | P.ACK))
    tester.program(CONFIG.replace("backends: [{address: 192.0.2.10}]",
                                  "backends: [{address: 192.0.2.14}]"))
    try:
        verdict, out = tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, 48000, 30080, P.ACK))
        assert verdict == TC_ACT_REDIRECT
        assert out == P.flow(P.TCP, NODE4, "192.0.2.10", port, 8080, P.ACK)  # the old backend
        _, fresh = tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, 48001, 30080))
        assert P.parse(fresh).dst == "192.0.2.14"                            # new flows: new
    finally:
        tester.program(CONFIG)


def test_snat_ports_collide_then_run_out_and_the_drop_is_named(tester):
    """One SNAT port: the first flow takes it; a second flow to the same backend collides
    NM_SNAT_TRIES times and is dropped (snat_exhausted); its reply tuple would be the same."""
    tester.set_config(snat_port_min=50000, snat_port_max=50000)
    try:
        verdict, out = tester.ingress(P.flow(P.UDP, CLIENT4, NODE4, 49000, 30053))
        assert verdict == TC_ACT_REDIRECT and P.parse(out).sport == 50000
        before = tester.drops().get("snat_exhausted", 0)
        verdict, _ = tester.ingress(P.flow(P.UDP, CLIENT4, NODE4, 49001, 30053))
        assert verdict == TC_ACT_SHOT
        assert tester.drops()["snat_exhausted"] == before + 1
    finally:
        tester.set_config(snat_port_min=SNAT_PORTS[0], snat_port_max=SNAT_PORTS[1])


BACKEND4 = "192.0.2.10"


def open_flow(tester, sport: int) -> int:
    """A TCP flow to the Cluster NodePort, answered by the backend: its SNAT port."""
    verdict, out = tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, sport, 30080))
    assert verdict == TC_ACT_REDIRECT, "a port was free"
    port = P.parse(out).sport
    tester.ingress(P.flow(P.TCP, BACKEND4, NODE4, 8080, port, P.SYN | P.ACK))
    tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, sport, 30080, P.ACK))
    return port


# How a flow ends, as (from the client?, TCP flags) packets; "half-closed" does not end it.
# Each case has a 2-port SNAT range and client ports of its own: the flows of one case stay.
ENDINGS = {
    "fin-both-ways": [(False, P.FIN | P.ACK), (True, P.FIN | P.ACK), (False, P.ACK)],
    "rst-from-backend": [(False, P.RST)],
    "rst-from-client": [(True, P.RST | P.ACK)],
    "established": [],
    "half-closed": [(True, P.FIN | P.ACK), (False, P.ACK)],  # the backend may still send
}


def two_ports(ending: str) -> Tuple[int, int]:
    first = 50010 + 2 * list(ENDINGS).index(ending)
    return first, first + 1


def end_flow(tester, sport: int, port: int, ending: str) -> None:
    for from_client, flags in ENDINGS[ending]:
        frame = (P.flow(P.TCP, CLIENT4, NODE4, sport, 30080, flags) if from_client else
                 P.flow(P.TCP, BACKEND4, NODE4, 8080, port, flags))
        assert tester.ingress(frame)[0] == TC_ACT_REDIRECT


@pytest.mark.parametrize("ending", ["fin-both-ways", "rst-from-backend", "rst-from-client"])
def test_a_syn_takes_over_the_snat_port_of_a_flow_that_is_over(tester, ending):
    """Two SNAT ports, both held by flows that are over (closing, not expired): a new SYN
    takes one over at once (after the 100 ms reuse age), its reply reaches the new client,
    and a late packet of the old flow is not translated into the new flow."""
    lo, hi = two_ports(ending)
    sport = 52000 + 10 * (lo - 50010)
    tester.set_config(snat_port_min=lo, snat_port_max=hi)
    try:
        old = {open_flow(tester, s): s for s in (sport, sport + 1)}
        assert set(old) == {lo, hi}
        for port, sport in old.items():
            end_flow(tester, sport, port, ending)
        time.sleep(0.15)  # older than NM_SNAT_REUSE_AFTER_NS (100 ms): an age, not a timing
        verdict, out = tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, sport + 2, 30080))
        assert verdict == TC_ACT_REDIRECT
        port = P.parse(out).sport
        assert out == P.flow(P.TCP, NODE4, BACKEND4, port, 8080)
        # A late packet of the flow that had this port: not sent on as the new flow ...
        verdict, late = tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, old[port], 30080, P.ACK))
        assert verdict == TC_ACT_SHOT or P.parse(late).sport != port, "NATed into the new flow"
        # ... and the backend's answer on that port still goes to the new client.
        verdict, back = tester.ingress(P.flow(P.TCP, BACKEND4, NODE4, 8080, port,
                                              P.SYN | P.ACK))
        assert verdict == TC_ACT_REDIRECT
        assert back == P.flow(P.TCP, NODE4, CLIENT4, 30080, sport + 2, P.SYN | P.ACK)
    finally:
        tester.set_config(snat_port_min=SNAT_PORTS[0], snat_port_max=SNAT_PORTS[1])


@pytest.mark.parametrize("ending", ["established", "half-closed"])
def test_a_syn_is_dropped_as_snat_exhausted_while_the_port_holders_are_not_over(tester, ending):
    """The same two ports held by established flows, or by half-closed ones (the client sent
    FIN, the backend may still be sending): the SYN gets no port, and the drop is counted."""
    lo, hi = two_ports(ending)
    sport = 53000 + 10 * (lo - 50010)
    tester.set_config(snat_port_min=lo, snat_port_max=hi)
    try:
        for s in (sport, sport + 1):
            end_flow(tester, s, open_flow(tester, s), ending)
        time.sleep(0.15)
        before = tester.drops().get("snat_exhausted", 0)
        verdict, _ = tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, sport + 2, 30080))
        assert verdict == TC_ACT_SHOT
        assert tester.drops()["snat_exhausted"] == before + 1
    finally:
        tester.set_config(snat_port_min=SNAT_PORTS[0], snat_port_max=SNAT_PORTS[1])


def test_a_client_port_inside_the_snat_range_is_kept_while_it_is_free(tester):
    """The client's own port is tried first: the same client tuple then meets its own
    TIME_WAIT at the backend, whose timestamps it always exceeds. Another client with the
    same port gets a different one (a port from the hashed start is this one for about 1
    tuple in 100, so without the rule the first assertion fails for the other 99)."""
    tester.set_config(snat_port_min=50100, snat_port_max=50199)
    try:
        verdict, out = tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, 50150, 30080))
        assert verdict == TC_ACT_REDIRECT and P.parse(out).sport == 50150
        verdict, out = tester.ingress(P.flow(P.TCP, "198.51.100.8", NODE4, 50150, 30080))
        assert verdict == TC_ACT_REDIRECT
        assert P.parse(out).sport != 50150 and 50100 <= P.parse(out).sport <= 50199
    finally:
        tester.set_config(snat_port_min=SNAT_PORTS[0], snat_port_max=SNAT_PORTS[1])


def test_conntrack_entries_expire_after_their_state_lifetime(tester):
    """UDP lives udp_seconds after its last datagram: then its entries are a miss for the
    datapath and the agent's sweep removes them; a TCP flow that saw FIN moves to closing."""
    tester.set_config(udp_seconds=1, tcp_closing_seconds=1)
    try:
        _, out = tester.ingress(P.flow(P.UDP, CLIENT4, NODE4, 51000, 30053))
        port = snat_port(out)
        _, tcp = tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, 51001, 30080))
        tport = snat_port(tcp)
        tester.ingress(P.flow(P.TCP, "192.0.2.10", NODE4, 8080, tport, P.SYN | P.ACK))
        tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, 51001, 30080, P.FIN | P.ACK))
        from nodemesh.datapath import tc as t
        states = {v.state for k, v in tester.tc.conntrack()
                  if (ntohs(k.sport), ntohs(k.dport)) in ((51001, 30080), (8080, tport))}
        assert states == {t.CT_CLOSING}  # both directions
        time.sleep(1.3)
        # An expired flow's reply is no longer translated ...
        verdict, back = tester.ingress(P.flow(P.UDP, "192.0.2.11", NODE4, 5353, port))
        assert verdict == TC_ACT_OK and P.parse(back).dst == NODE4
        # ... and the sweep removes what is left of both flows.
        keys = lambda: {(ntohs(k.sport), ntohs(k.dport))  # noqa: E731
                        for k, _ in tester.tc.conntrack()}
        assert (51001, 30080) in keys()
        assert tester.tc.sweep() >= 2
        assert (51001, 30080) not in keys() and (51000, 30053) not in keys()
    finally:
        tester.set_config(udp_seconds=60, tcp_closing_seconds=10)


# -- the Python mirrors of bpf/lib/tc_types.h -------------------------------------------------

def test_tc_map_mirrors_match_what_bcc_compiled(tester):
    import ctypes

    from nodemesh.datapath import tc as t

    for spec in t.TC_MAPS:
        table = tester.tc.bpf[spec.name.encode()]
        leaf = table.Leaf._type_ if spec.percpu else table.Leaf  # BCC: one value per CPU
        for mirror, generated in ((spec.key, table.Key), (spec.value, leaf)):
            assert ctypes.sizeof(mirror) == ctypes.sizeof(generated), spec.name
            for name, _ in getattr(mirror, "_fields_", []):
                assert getattr(mirror, name).offset == getattr(generated, name).offset, \
                    (spec.name, name)


def test_a_closing_flow_whose_reply_entry_the_lru_evicted_is_reopened_both_ways(tester):
    """The LRU evicts entries one by one, so a flow that is over can lose its reply entry
    while its forward entry lives (under churn the map is full of closing flows). A SYN from
    the same client port reopens the forward entry; the reply entry is rebuilt from it, so
    the backend's SYN-ACK reaches the client. Without the rebuild the SYN went on and the
    SYN-ACK came back untranslated (a bench's curl hung on exactly this)."""
    from nodemesh.datapath import bpfsys
    from nodemesh.datapath.tc import CtKey

    sport = 54321
    port = open_flow(tester, sport)
    end_flow(tester, sport, port, "fin-both-ways")
    gone = [k for k, v in tester.tc.conntrack() if (ntohs(k.sport), ntohs(k.dport)) == (8080, port)]
    assert len(gone) == 1
    bpfsys.map_delete_batch(tester.tc.map_fds["ct"], (CtKey * 1)(*gone), 1)
    verdict, out = tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, sport, 30080))
    assert verdict == TC_ACT_REDIRECT
    assert out == P.flow(P.TCP, NODE4, BACKEND4, port, 8080)
    verdict, back = tester.ingress(P.flow(P.TCP, BACKEND4, NODE4, 8080, port, P.SYN | P.ACK))
    assert verdict == TC_ACT_REDIRECT, "the backend's answer was not translated back"
    assert back == P.flow(P.TCP, NODE4, CLIENT4, 30080, sport, P.SYN | P.ACK)


def ct_tuples(tester):
    return {(ntohs(k.sport), ntohs(k.dport)) for k, _ in tester.tc.conntrack()}


@pytest.mark.parametrize("sport,snat_range", [
    (55100, (50300, 50363)),   # the client's port is outside the SNAT range: a hashed port
    (50410, (50400, 50463)),   # inside: the flow kept the client's own port
], ids=["hashed-snat-port", "client-port-kept"])
def test_a_flow_whose_forward_entry_the_lru_evicted_keeps_its_translation(tester, sport,
                                                                        snat_range):
    """The LRU evicts the forward entry of an established flow and keeps its reply entry. The
    client's next packet (an ACK with data, no SYN) still reaches the same backend from the
    same SNAT port: the forward entry is rebuilt from the reply entry, not a new flow made
    (which took another port, so the backend answered an unknown tuple with an RST)."""
    from nodemesh.datapath import bpfsys
    from nodemesh.datapath.tc import CtKey

    tester.set_config(snat_port_min=snat_range[0], snat_port_max=snat_range[1])
    try:
        port = open_flow(tester, sport)
        fwd = [k for k, v in tester.tc.conntrack() if (ntohs(k.sport), ntohs(k.dport)) ==
               (sport, 30080)]
        assert len(fwd) == 1
        bpfsys.map_delete_batch(tester.tc.map_fds["ct"], (CtKey * 1)(*fwd), 1)
        verdict, out = tester.ingress(P.flow(P.TCP, CLIENT4, NODE4, sport, 30080, P.ACK,
                                             payload=b"more"))
        assert verdict == TC_ACT_REDIRECT
        assert out == P.flow(P.TCP, NODE4, BACKEND4, port, 8080, P.ACK, payload=b"more")
        assert (sport, 30080) in ct_tuples(tester)
        # The backend's answer still goes back to the client.
        verdict, back = tester.ingress(P.flow(P.TCP, BACKEND4, NODE4, 8080, port, P.ACK))
        assert (verdict, back) == (TC_ACT_REDIRECT,
                                   P.flow(P.TCP, NODE4, CLIENT4, 30080, sport, P.ACK))
    finally:
        tester.set_config(snat_port_min=SNAT_PORTS[0], snat_port_max=SNAT_PORTS[1])


@pytest.mark.parametrize("flags", [P.ACK, P.ACK | P.PSH, P.FIN | P.ACK, P.RST, P.RST | P.ACK,
                                   P.SYN | P.ACK],
                         ids=["ack", "data", "fin", "rst", "rst-ack", "syn-ack"])
def test_a_tcp_packet_of_no_known_flow_other_than_a_syn_starts_none(tester, flags):
    """Only a SYN starts a TCP flow. An ACK, FIN or RST of a flow nodemesh does not know (an
    agent that lost its state, a stray packet) takes no SNAT port, picks no backend and
    makes no conntrack entry: it goes to the stack untouched (which answers a NodePort's
    ACK with an RST, as it would without nodemesh)."""
    sport = 55200 + flags
    frame = P.flow(P.TCP, CLIENT4, NODE4, sport, 30080, flags)
    before = tester.verdicts().get(("ingress", "pass"), 0)
    verdict, out = tester.ingress(frame)
    assert (verdict, out) == (TC_ACT_OK, frame)
    assert (sport, 30080) not in ct_tuples(tester)
    assert tester.verdicts()[("ingress", "pass")] == before + 1
