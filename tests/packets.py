"""Ethernet frames built byte by byte with struct and ipaddress, for BPF_PROG_TEST_RUN tables.

Every checksum is computed here from scratch, so a table's expected packet checks the
datapath's incremental checksum updates. No scapy: it is not installed, and these few
headers are a page of code.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Optional

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
TCP, UDP, ICMP, ICMPV6, GRE = 6, 17, 1, 58, 47
SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08
MAC_A, MAC_B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        return s.packed + d.packed + struct.pack("!BBH", 0, proto, length)
    return s.packed + d.packed + struct.pack("!IxxxB", length, proto)


def l4(proto: int, src: str, dst: str, sport: int, dport: int, payload: bytes = b"",
       flags: int = SYN, udp_csum: bool = True) -> bytes:
    """A TCP or UDP segment with its checksum over the pseudo-header of src -> dst."""
    if proto == TCP:
        hdr = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 65535, 0, 0)
        seg = hdr + payload
        c = csum(_pseudo(src, dst, TCP, len(seg)) + seg)
        return seg[:16] + struct.pack("!H", c) + seg[18:]
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if not udp_csum:
        return seg
    c = csum(_pseudo(src, dst, UDP, len(seg)) + seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def ip(src: str, dst: str, proto: int, payload: bytes, frag: int = 0, ttl: int = 64) -> bytes:
    """An IPv4 (20-byte header, checksummed) or IPv6 header with payload. frag: the IPv4
    frag_off field, or for IPv6 anything non-zero to put a fragment header first."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1234, frag, ttl, proto,
                          0, s.packed, d.packed)
        return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload
    nexthdr = proto
    if frag:
        payload = struct.pack("!BBHI", proto, 0, 1, 0xABCD) + payload  # offset 0, M flag
        nexthdr = 44
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nexthdr, ttl, s.packed,
                       d.packed) + payload


def eth(packet: bytes) -> bytes:
    v6 = packet[0] >> 4 == 6
    return MAC_A + MAC_B + struct.pack("!H", ETH_P_IPV6 if v6 else ETH_P_IP) + packet


def flow(proto: int, src: str, dst: str, sport: int, dport: int, flags: int = SYN,
         payload: bytes = b"hello", udp_csum: bool = True) -> bytes:
    """A whole frame of one TCP or UDP packet."""
    return eth(ip(src, dst, proto, l4(proto, src, dst, sport, dport, payload, flags, udp_csum)))


def icmp_error(src: str, dst: str, quoted: bytes, v6: bool, mtu: int = 1280) -> bytes:
    """An ICMP 'fragmentation needed' (IPv4) or ICMPv6 'packet too big' from src to dst,
    quoting the first bytes of `quoted` (an IP packet)."""
    if not v6:
        body = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quoted[:28]
        body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
        return eth(ip(src, dst, ICMP, body))
    body = struct.pack("!BBHI", 2, 0, 0, mtu) + quoted[:48]
    c = csum(_pseudo(src, dst, ICMPV6, len(body)) + body)
    body = body[:2] + struct.pack("!H", c) + body[4:]
    return eth(ip(src, dst, ICMPV6, body))


@dataclass(frozen=True)
class Parsed:
    src: str
    dst: str
    proto: int
    sport: Optional[int]
    dport: Optional[int]


def parse(frame: bytes) -> Parsed:
    """Addresses and ports of a frame (what a table row needs to read an allocated port)."""
    pkt = frame[14:]
    if pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 0xF) * 4
        src, dst, proto, rest = (str(ipaddress.IPv4Address(pkt[12:16])),
                                 str(ipaddress.IPv4Address(pkt[16:20])), pkt[9], pkt[ihl:])
    else:
        src, dst, proto, rest = (ipaddress.IPv6Address(pkt[8:24]).compressed,
                                 ipaddress.IPv6Address(pkt[24:40]).compressed, pkt[6], pkt[40:])
    if proto in (TCP, UDP):
        sport, dport = struct.unpack("!HH", rest[:4])
        return Parsed(src, dst, proto, sport, dport)
    return Parsed(src, dst, proto, None, None)
