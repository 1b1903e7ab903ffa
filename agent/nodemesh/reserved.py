"""VIPs that would capture this node's own traffic: loopback, link-local and every address
the node holds. The connect hook rewrites any destination that matches a VIP, so a VIP of
127.0.0.1 or of the node's own IP would send the node's local traffic (its kubelet, its DNS
cache, ssh to itself) to the service's backends. These are refused unless the service says
`allowReservedVIP: true`. (Addresses that can never be a unicast destination, such as
0.0.0.0/8, multicast and broadcast, are refused by config.py with no override.)"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import FrozenSet, Optional

# The node's addresses change rarely, and a config of 100,000 services asks 100,000 times.
_CACHE_SECONDS = 2.0
_lock = threading.Lock()
_cached: FrozenSet[str] = frozenset()
_cached_at = -1e9


def node_addresses() -> FrozenSet[str]:
    """The canonical text of every address on this node's interfaces (the host's network
    namespace, the one the agent runs in), read with pyroute2 (RTM_GETADDR)."""
    global _cached, _cached_at
    with _lock:
        if time.monotonic() - _cached_at < _CACHE_SECONDS:
            return _cached
        from pyroute2 import IPRoute

        # pyroute2 logs every netlink message at debug (and resets its level on import):
        # one read here would flood an agent's debug log.
        logging.getLogger("pyroute2").setLevel(logging.INFO)

        found = set()
        with IPRoute() as ipr:
            for msg in ipr.get_addr():
                text = msg.get("IFA_ADDRESS") or msg.get("IFA_LOCAL")
                if text:
                    found.add(ipaddress.ip_address(text.split("%")[0]).compressed)
        _cached, _cached_at = frozenset(found), time.monotonic()
        return _cached


def forget() -> None:
    """Read the node's addresses again at the next check (tests add and remove some)."""
    global _cached_at
    with _lock:
        _cached_at = -1e9


def reserved_vip(vip: str) -> Optional[str]:
    """Why `vip` (canonical text) would capture local traffic, or None."""
    if ":" in vip or vip.startswith(("127.", "169.254.")):  # else neither can be
        addr = ipaddress.ip_address(vip)
        if addr.is_loopback:
            return "it is a loopback address: the node's own local traffic would be balanced"
        if addr.is_link_local:
            return "it is link-local: the node's link-local traffic would be balanced"
    if vip in node_addresses():
        return "it is an address of this node: traffic to the node itself would be balanced"
    return None
