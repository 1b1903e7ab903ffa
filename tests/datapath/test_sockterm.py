"""SOCK_DESTROY of sockets connected to a removed backend, with real sockets in the lab.

Each client is a small process in a lab namespace that connects to one backend and then sends
and receives every 50 ms, printing "ok <backend>" per answer and "error <ERRNO>" (then exiting)
when the socket fails. After SOCK_DESTROY a connected UDP socket is aborted and left
unconnected: a client blocked in recv() sees ECONNABORTED, one that was between round trips
sees EDESTADDRREQ from its next send() (the socket has no peer any more). Either proves the
socket was destroyed; a client whose socket was not touched keeps printing "ok".
"""
from __future__ import annotations

import errno
import ipaddress
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from nodemesh.datapath import sockterm

pytestmark = pytest.mark.root

UDP_PORT = 5353
HOLD_PORT = 8081  # a --hold server: TCP connections stay open while the client talks
ABORTED = ("error ECONNABORTED", "error EDESTADDRREQ")

CLIENT = r"""
import errno, socket, sys, time
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
s.settimeout(1.0)
s.connect((host, port))
print("connected", *s.getsockname()[:2], flush=True)
while True:
    try:
        s.send(b"ping\n")
        reply = s.recv(100)
        if not reply:
            print("closed", flush=True)
            break
        print("ok", reply.decode().strip(), flush=True)
    except socket.timeout:
        print("timeout", flush=True)
    except OSError as e:
        print("error", errno.errorcode.get(e.errno, e.errno), flush=True)
        break
    time.sleep(0.05)
"""


class Client:
    """A client process and its output lines, read in the background so waits stay bounded."""

    def __init__(self, lab, proto: str, host: str, port: int, netns: str):
        self.target = f"{proto} {host}:{port} from {netns}"
        self.proc = lab.spawn([sys.executable, "-c", CLIENT, proto, host, str(port)],
                              netns=netns, stdout=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.seen: list = []
        threading.Thread(target=self._pump, daemon=True).start()
        connected = self.expect("connected")
        self.local = connected.split()[1:]
        self.expect("ok")

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def _next(self, deadline: float):
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "", False
            try:
                return self.lines.get(timeout=remaining), True
            except queue.Empty:
                continue

    def expect(self, *prefixes: str, timeout: float = 5.0) -> str:
        """The next line starting with one of prefixes; fails on an unexpected error or exit."""
        deadline = time.monotonic() + timeout
        while True:
            line, got = self._next(deadline)
            if not got:
                raise AssertionError(f"{self.target}: no {prefixes} within {timeout} s; "
                                     f"last lines {self.seen[-5:]}")
            if line is None:
                raise AssertionError(f"{self.target}: exited before {prefixes}; "
                                     f"last lines {self.seen[-5:]}")
            self.seen.append(line)
            if line.startswith(prefixes):
                return line
            if line.startswith(("error", "closed")):
                raise AssertionError(f"{self.target}: {line!r} while waiting for {prefixes}")

    def expect_aborted(self, timeout: float = 5.0) -> str:
        line = self.expect(*ABORTED, "error ECONNRESET", timeout=timeout)
        assert line in ABORTED, f"{self.target}: {line!r}, expected one of {ABORTED}"
        return line

    def expect_alive(self, answers: int = 5) -> None:
        """Keeps getting answers: the socket was not touched."""
        for _ in range(answers):
            self.expect("ok")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=5)


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


def address(backend, family: str) -> str:
    if family == "ipv4":
        return backend.ipv4
    if family == "ipv6":
        return backend.ipv6
    return f"::ffff:{backend.ipv4}"  # an AF_INET6 socket talking to an IPv4 backend


@pytest.fixture
def hold_server(lab):
    """b1 also runs a --hold server on HOLD_PORT (IPv4 and IPv6) for long-lived TCP."""
    b1 = lab.backends[0]
    proc = lab.spawn([sys.executable, "-m", "nodemesh.lab.server", "--name", "b1", "--hold",
                      "--tcp", f"{b1.ipv4}:{HOLD_PORT}", "--tcp", f"[{b1.ipv6}]:{HOLD_PORT}"],
                     netns=b1.netns, stdout=subprocess.PIPE, text=True)
    assert "ready" in proc.stdout.readline()
    return proc


def test_the_callers_thread_never_changes_namespace(lab):
    # First in the file: a caller left in a lab namespace would be killed by the lab's teardown.
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        before = os.fstat(own).st_ino
        for paths in ([netns_path(lab.client_ns)], None):
            sockterm.destroy_sockets([(lab.backends[0].ipv4, UDP_PORT)], "UDP", paths)
            after = os.stat("/proc/thread-self/ns/net").st_ino
            if after != before:
                sockterm._setns(own)  # back home, so that the failure is reported, not fatal
            assert after == before, f"the caller's thread was left in namespace {after}"
    finally:
        os.close(own)


# -- UDP -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["ipv4", "ipv6", "ipv4-mapped"])
def test_connected_udp_socket_to_a_removed_backend_is_destroyed_and_others_are_not(lab, family):
    b1, b2 = lab.backends[0], lab.backends[1]
    to_b1 = Client(lab, "udp", address(b1, family), UDP_PORT, lab.client_ns)
    to_b2 = Client(lab, "udp", address(b2, family), UDP_PORT, lab.client_ns)
    removed = b1.ipv6 if family == "ipv6" else b1.ipv4  # a mapped socket matches the IPv4 form

    result = sockterm.destroy_sockets([(removed, UDP_PORT)], "UDP")

    assert result.errors == []
    client_ns = result.for_netns(netns_path(lab.client_ns))
    assert client_ns is not None, "the client's namespace was not enumerated"
    assert (client_ns.matched, client_ns.destroyed) == (1, 1)
    assert result.destroyed == 1
    [sock] = client_ns.sockets
    assert sock.remote == (removed, UDP_PORT) and sock.outcome == "destroyed"
    assert sock.family == (4 if family == "ipv4" else 6)
    to_b1.expect_aborted()
    to_b2.expect_alive()


def test_the_backends_own_udp_socket_keeps_serving_after_the_destroy(lab):
    b1 = lab.backends[0]
    first = Client(lab, "udp", b1.ipv4, UDP_PORT, lab.client_ns)
    assert sockterm.destroy_sockets([(b1.ipv4, UDP_PORT)], "UDP").destroyed == 1
    first.expect_aborted()
    # The server's socket is bound, not connected, so it was never a candidate.
    Client(lab, "udp", b1.ipv4, UDP_PORT, lab.client_ns).expect_alive()


def test_only_the_destination_port_named_is_matched(lab):
    b1 = lab.backends[0]
    client = Client(lab, "udp", b1.ipv4, UDP_PORT, lab.client_ns)
    result = sockterm.destroy_sockets([(b1.ipv4, UDP_PORT + 1)], "UDP")
    assert (result.matched, result.destroyed, result.errors) == (0, 0, [])
    client.expect_alive()


def test_sockets_in_every_namespace_are_found_unless_namespaces_are_named(lab):
    b1, b2, b3 = lab.backends
    from_client = Client(lab, "udp", b1.ipv4, UDP_PORT, lab.client_ns)
    from_b3 = Client(lab, "udp", b1.ipv4, UDP_PORT, b3.netns)
    b3_to_b2 = Client(lab, "udp", b2.ipv4, UDP_PORT, b3.netns)

    only_client = sockterm.destroy_sockets([(b1.ipv4, UDP_PORT)], "UDP",
                                           [netns_path(lab.client_ns)])
    assert only_client.destroyed_by_netns() == {netns_path(lab.client_ns): 1}
    from_client.expect_aborted()
    from_b3.expect_alive()

    everywhere = sockterm.destroy_sockets([(b1.ipv4, UDP_PORT)], "UDP")
    assert everywhere.errors == []
    assert {p: n for p, n in everywhere.destroyed_by_netns().items() if n} == \
        {netns_path(b3.netns): 1}
    from_b3.expect_aborted()
    b3_to_b2.expect_alive()


def test_a_dry_run_counts_what_would_be_destroyed_and_destroys_nothing(lab):
    b1 = lab.backends[0]
    client = Client(lab, "udp", b1.ipv6, UDP_PORT, lab.client_ns)
    result = sockterm.count_sockets([(b1.ipv6, UDP_PORT)], "udp")
    assert result.dry_run and result.protocol == "UDP"
    assert (result.matched, result.destroyed) == (1, 0)
    [sock] = result.for_netns(netns_path(lab.client_ns)).sockets
    assert sock.outcome == "would-destroy" and sock.state == "ESTABLISHED"
    assert sock.local == (client.local[0], int(client.local[1]))
    assert sock.cookie > 0 and sock.inode > 0
    client.expect_alive()


def test_no_matching_sockets_gives_zero_and_no_errors(lab):
    b3 = lab.backends[2]
    for protocol in ("UDP", "TCP"):
        result = sockterm.destroy_sockets([(b3.ipv4, UDP_PORT), (b3.ipv6, 8080)], protocol)
        assert (result.matched, result.destroyed, result.errors) == (0, 0, [])
        assert netns_path(lab.client_ns) in result.destroyed_by_netns()
    assert sockterm.destroy_sockets([], "UDP").namespaces == []


def test_a_socket_closed_between_the_dump_and_the_destroy_counts_as_gone(lab, monkeypatch):
    b1 = lab.backends[0]
    client = Client(lab, "udp", b1.ipv4, UDP_PORT, lab.client_ns)
    real_destroy = sockterm._DiagConnection.destroy

    def close_it_first(self, *args):
        client.stop()  # its socket closes with the process
        return real_destroy(self, *args)

    monkeypatch.setattr(sockterm._DiagConnection, "destroy", close_it_first)
    result = sockterm.destroy_sockets([(b1.ipv4, UDP_PORT)], "UDP", [netns_path(lab.client_ns)])
    [ns] = result.namespaces
    assert (ns.matched, ns.destroyed, ns.gone, ns.errors) == (1, 0, 1, [])
    assert ns.sockets[0].outcome == "gone"


def test_a_kernel_without_sock_destroy_is_reported_not_raised(lab, monkeypatch):
    b1 = lab.backends[0]
    clients = [Client(lab, "udp", b1.ipv4, UDP_PORT, lab.client_ns) for _ in range(2)]
    tries = []

    def like_a_kernel_without_inet_diag_destroy(self, *args):
        tries.append(args)
        return errno.EOPNOTSUPP

    monkeypatch.setattr(sockterm._DiagConnection, "destroy",
                        like_a_kernel_without_inet_diag_destroy)
    result = sockterm.destroy_sockets([(b1.ipv4, UDP_PORT)], "UDP", [netns_path(lab.client_ns)])
    assert (result.matched, result.destroyed, len(tries)) == (2, 0, 1)  # no second try
    assert [s.outcome for s in result.for_netns(netns_path(lab.client_ns)).sockets] == \
        ["failed: EOPNOTSUPP"] * 2
    assert result.errors == [f"{netns_path(lab.client_ns)}: SOCK_DESTROY is not supported by "
                             "this kernel (it needs CONFIG_INET_DIAG_DESTROY)"]
    for client in clients:
        client.expect_alive(answers=2)


def test_the_filter_program_is_a_chain_of_conditions_and_jumps_to_the_end():
    v4, v6 = ipaddress.ip_address("198.18.0.11"), ipaddress.ip_address("fd6e:6d::b")
    program = sockterm.destination_filter([(v4, 53), (v6, 5353)])
    cond4 = struct.pack("=BBxxi", socket.AF_INET, 32, 53) + v4.packed        # 12 bytes
    cond6 = struct.pack("=BBxxi", socket.AF_INET6, 128, 5353) + v6.packed    # 24 bytes
    assert program == (
        struct.pack("=BBH", sockterm.INET_DIAG_BC_D_COND, 16, 20) + cond4   # no: over the JMP
        + struct.pack("=BBH", sockterm.INET_DIAG_BC_JMP, 4, 32)              # to the end: accept
        + struct.pack("=BBH", sockterm.INET_DIAG_BC_D_COND, 28, 32) + cond6  # no: past the end
    )


def test_a_long_destination_list_is_filtered_in_the_kernel_in_several_dumps(lab):
    """More destinations than one bytecode program holds (1000), the real one the last of the
    third program: the far jumps of a long program and the split into dumps both must be right.
    Destinations are sorted by family, address and port, so decoys on lower ports of the same
    backend come first. No traffic goes to them: they are only conditions in the filter."""
    b1 = lab.backends[0]
    client = Client(lab, "udp", b1.ipv6, UDP_PORT, lab.client_ns)
    decoys = [(b1.ipv4, port) for port in range(20000, 20500)]
    decoys += [(b1.ipv6, port) for port in range(UDP_PORT - 2499, UDP_PORT)]
    result = sockterm.destroy_sockets([*decoys, (b1.ipv6, UDP_PORT)], "UDP",
                                      [netns_path(lab.client_ns)])
    assert (result.matched, result.destroyed, result.errors) == (1, 1, [])
    client.expect_aborted()


# -- TCP -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_an_established_tcp_connection_is_destroyed_only_when_tcp_is_asked(lab, hold_server,
                                                                          family):
    b1 = lab.backends[0]
    backend = address(b1, family)
    client = Client(lab, "tcp", backend, HOLD_PORT, lab.client_ns)

    assert sockterm.destroy_sockets([(backend, HOLD_PORT)], "UDP").matched == 0
    client.expect_alive()

    dry = sockterm.count_sockets([(backend, HOLD_PORT)], "TCP")
    # Only the client's end: not the listener, nor the server's accepted end (remote: client).
    assert [(s.state, s.remote) for s in dry.for_netns(netns_path(lab.client_ns)).sockets] \
        == [("ESTABLISHED", (backend, HOLD_PORT))]
    assert dry.matched == 1

    result = sockterm.destroy_sockets([(backend, HOLD_PORT)], "TCP")
    assert (result.destroyed, result.errors) == (1, [])
    line = client.expect("error", "closed")
    assert line == "error ECONNABORTED"
    # The listener is untouched: a new connection is served.
    Client(lab, "tcp", backend, HOLD_PORT, lab.client_ns).expect_alive()


# -- namespaces ----------------------------------------------------------------------------------
def test_enumeration_finds_each_namespace_once_named_ones_by_name(lab):
    found = sockterm.network_namespaces()
    inodes = [ns.inode for ns in found]
    assert len(inodes) == len(set(inodes))
    paths = {ns.path for ns in found}
    for name in [lab.client_ns, *(b.netns for b in lab.backends)]:
        assert netns_path(name) in paths
    assert os.stat("/proc/self/ns/net").st_ino in inodes


@pytest.fixture
def doomed_namespaces(lab):
    """Two namespaces about to disappear: one held only by a process (found through
    /proc/PID/ns/net), one named under /run/netns."""
    sleeper = lab.spawn(["unshare", "--net", "sleep", "60"])
    own = os.stat("/proc/self/ns/net").st_ino
    deadline = time.monotonic() + 5
    while os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino == own:
        assert time.monotonic() < deadline, "unshare did not make a namespace"
        time.sleep(0.02)
    named = f"{lab.prefix}-doomed"
    subprocess.run(["ip", "netns", "add", named], check=True)
    try:
        yield sleeper, named
    finally:
        subprocess.run(["ip", "netns", "del", named], capture_output=True)


def test_namespaces_that_vanish_before_they_are_entered_do_not_break_the_call(
        lab, doomed_namespaces, monkeypatch):
    b1 = lab.backends[0]
    client = Client(lab, "udp", b1.ipv4, UDP_PORT, lab.client_ns)
    sleeper, named = doomed_namespaces
    sleeper_ns = f"/proc/{sleeper.pid}/ns/net"
    real_enumeration = sockterm.network_namespaces

    def enumerate_then_end_both():
        found = real_enumeration()
        assert {sleeper_ns, netns_path(named)} <= {ns.path for ns in found}
        os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait(timeout=5)  # with its only process gone, the namespace is freed
        # Half of `ip netns del`: unmounted, so the name is left as a plain empty file.
        subprocess.run(["umount", netns_path(named)], check=True)
        return found

    monkeypatch.setattr(sockterm, "network_namespaces", enumerate_then_end_both)
    result = sockterm.destroy_sockets([(b1.ipv4, UDP_PORT)], "UDP")
    # (Others may be listed too, when a concurrent lab is torn down meanwhile.)
    assert {sleeper_ns, netns_path(named)} <= set(result.vanished)
    assert result.errors == []
    assert result.destroyed == 1
    client.expect_aborted()


def test_bad_namespace_paths_are_reported_and_the_others_still_done(lab, tmp_path):
    b1 = lab.backends[0]
    client = Client(lab, "udp", b1.ipv4, UDP_PORT, lab.client_ns)
    not_a_netns = tmp_path / "plain-file"
    not_a_netns.write_text("")
    paths = [str(tmp_path / "missing"), str(not_a_netns), netns_path(lab.client_ns),
             f"/proc/{os.getpid()}/ns/net", netns_path(lab.client_ns)]  # and a repeat
    result = sockterm.destroy_sockets([(b1.ipv4, UDP_PORT)], "UDP", paths)
    assert result.vanished == [str(tmp_path / "missing")]
    assert result.errors == [f"{not_a_netns}: not a network namespace"]
    assert result.destroyed_by_netns() == {str(not_a_netns): 0, netns_path(lab.client_ns): 1,
                                           f"/proc/{os.getpid()}/ns/net": 0}
    client.expect_aborted()


@pytest.mark.parametrize("destinations, protocol", [
    ([("198.18.0.1", 53)], "SCTP"),
    ([("not-an-address", 53)], "UDP"),
    ([("0.0.0.0", 53)], "UDP"),
    ([("198.18.0.1", 0)], "UDP"),
    ([("198.18.0.1", 70000)], "TCP"),
])
def test_bad_arguments_are_refused_before_any_work(destinations, protocol):
    with pytest.raises(ValueError):
        sockterm.destroy_sockets(destinations, protocol)
