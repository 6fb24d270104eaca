"""Peer-to-peer delivery: LAN HTTP between nodes and libp2p on the internet.

- :mod:`peerd.p2p.lan`: ``GET /p2p/v1/blobs/<cid>`` between LAN nodes, signed with the node key,
  and :class:`~peerd.p2p.lan.LanSource` (also a whole media item from one named LAN peer, the
  coordinator's prefetch by peer).
- :mod:`peerd.p2p.bridge`: the one asyncio <-> trio bridge; py-libp2p runs in one trio thread.
- :mod:`peerd.p2p.node`: the libp2p host (Noise, yamux, identify, ping, Kad-DHT, the blob
  protocol ``/peerd/blob/1.0.0`` framed by :mod:`peerd.core.blobwire`), trio side.
- :mod:`peerd.p2p.service`: the daemon service (provide loop) and
  :class:`~peerd.p2p.service.Libp2pSource`.

The daemon (:func:`peerd.daemon.build_services`) builds these services and puts the LAN and
libp2p sources on the node's resolver, in that order.
"""
