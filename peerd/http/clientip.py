"""The viewer's address: ``CF-Connecting-IP`` only when the TCP peer is a trusted proxy.

cloudflared connects to the node from loopback and adds ``CF-Connecting-IP``. Anyone who can reach
the port directly could send that header too, so it is believed only when the connection comes
from one of the configured proxy networks; otherwise the TCP peer address is the client.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(specs: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings to networks; ValueError names a bad one."""
    return tuple(ipaddress.ip_network(s, strict=False) for s in specs)


def _in(addr: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in networks)


def client_ip(request: web.BaseRequest, trusted: tuple[Network, ...]) -> str:
    """The client address of ``request`` as far as it can be trusted."""
    return client_of(request.remote or "", request.headers.get("CF-Connecting-IP"), trusted)


@functools.lru_cache(maxsize=4096)
def client_of(peer: str, cf_connecting_ip: str | None, trusted: tuple[Network, ...]) -> str:
    """The client address from the TCP ``peer`` and its ``CF-Connecting-IP`` header (cached:
    the uplink admission asks on every blob request, and parsing addresses costs microseconds)."""
    if trusted and _in(peer, trusted):
        forwarded = (cf_connecting_ip or "").strip()
        if forwarded:
            try:
                return str(ipaddress.ip_address(forwarded))
            except ValueError:
                return peer
    return peer


@functools.lru_cache(maxsize=4096)
def trusted_peer(peer: str, trusted: tuple[Network, ...]) -> bool:
    """Whether the TCP ``peer`` is one of the trusted proxies (whose headers are believed)."""
    return bool(trusted) and _in(peer, trusted)
