"""LAN discovery with mDNS / DNS-SD (peerd's own AsyncZeroconf, never libp2p's mDNS module).

Protocol
--------
Each node registers two services on the link:

- ``<peer id>._peerd._tcp.local.``: SRV to the node's HTTP port, A records for its LAN
  addresses, TXT ``id=<peer id>``, ``v=<peerd version>``, ``port=<http port>`` and, when set,
  ``url=<public URL>``. Peers fetch blobs from ``http://<address>:<port>/p2p/v1/blobs/<cid>``
  with node-signed requests (:mod:`peerd.p2p.lan`).
- ``<peer id>._p2p._udp.local.``: libp2p's mDNS discovery service; one TXT string
  ``dnsaddr=<multiaddr>/p2p/<peer id>`` per libp2p listen address, so stock libp2p nodes on the
  LAN find this one too.

Each node browses both types. A ``_peerd._tcp`` sighting lands in the LAN peer directory (with an
RTT probe of ``/healthz``); a ``_p2p._udp`` sighting is dialled and added to the DHT routing
table. Entries expire ``mdns.peer_ttl_s`` after the last announcement; a goodbye (TTL 0) removes
them at once. Every ``mdns.recheck_s`` the node recomputes its addresses and re-announces when
they changed; a clean stop withdraws both services (goodbye packets).
"""
