"""Peer-to-peer delivery: LAN HTTP between nodes and libp2p on the internet.

- :mod:`peerd.p2p.lan`: ``GET /p2p/v1/blobs/<cid>`` between LAN nodes, signed with the node key,
  and :class:`~peerd.p2p.lan.LanSource`.
- :mod:`peerd.p2p.puller`: :class:`~peerd.p2p.puller.PeerPuller`, a whole media item from one
  named LAN peer (the coordinator's prefetch by peer).
- :mod:`peerd.p2p.bridge`: the one asyncio <-> trio bridge; py-libp2p runs in one trio thread.
- :mod:`peerd.p2p.node`: the libp2p host (Noise, yamux, identify, ping, Kad-DHT, the blob
  protocol ``/peerd/blob/1.0.0`` framed by :mod:`peerd.core.blobwire`), trio side.
- :mod:`peerd.p2p.service`: the daemon service (provide loop) and
  :class:`~peerd.p2p.service.Libp2pSource`.

:func:`wire` adds the services and the delivery sources (LAN, then libp2p) to a node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peerd.runtime import Runtime


def wire(rt: Runtime, http_port: Callable[[], int | None]) -> list[Any]:
    """Services for mDNS and libp2p (those enabled) and their sources on the node's resolver."""
    from peerd.discovery.mdns import MdnsService
    from peerd.p2p.lan import LanSource, lan_directory
    from peerd.p2p.puller import PeerPuller
    from peerd.p2p.service import Libp2pSource, P2PService

    resolver = rt.extras["resolver"]
    services: list[Any] = []
    directory = lan_directory(rt)
    lan_source: LanSource | None = None
    if rt.settings.mdns.enabled:
        # LAN peers come from mDNS only: without it the LAN source would never have a peer.
        lan_source = LanSource(
            directory,
            rt.identity,
            timeout_s=rt.settings.mdns.fetch_timeout_s,
            max_peers=rt.settings.mdns.max_peers_per_fetch,
        )
        resolver.add_source(lan_source)
        puller = PeerPuller(rt, directory, rt.identity, timeout_s=rt.settings.mdns.fetch_timeout_s)
        rt.extras["peer_puller"] = puller  # the coordinator's prefetch from a named peer
    p2p: P2PService | None = None
    if rt.settings.p2p.enabled:
        p2p = P2PService(rt)
        services.append(p2p)
        resolver.add_source(
            Libp2pSource(
                p2p,
                timeout_s=rt.settings.p2p.fetch_timeout_s,
                max_providers=rt.settings.p2p.max_providers,
            )
        )
    if rt.settings.mdns.enabled:
        closers = [lan_source.close, puller.close] if lan_source is not None else []
        services.append(MdnsService(rt, directory, http_port, p2p, closers))
    return services
