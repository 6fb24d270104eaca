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
table. Every ``mdns.recheck_s`` the node recomputes its addresses and re-announces when they
changed; a clean stop withdraws both services (goodbye packets).

Liveness
--------
The directory has no timer of its own: a LAN peer stays while zeroconf can resolve it. Every
record a node announces carries the TTL ``mdns.peer_ttl_s`` (rounded up to whole seconds), so
its peers' zeroconf caches hold its SRV, TXT and A records that long after its last answer.
zeroconf's browser only reports a service Added, Updated or Removed, never that unchanged records
were refreshed, and re-asks for the PTR only (at 75% of its TTL, which zeroconf raises to at least
1125 s). So every ``mdns.recheck_s`` the node resolves each peer it browsed: answered from the
cache while the records live, by a query once they expired; a peer that answers stays (its RTT
probed again), one that does not within 3 s (``RESOLVE_MS``) is dropped. Hence:

- a goodbye (TTL 0, sent on a clean stop) removes the peer at once;
- a peer that dies without one (SIGKILL, power cut, cable pulled) leaves within its own
  ``peer_ttl_s`` + this node's ``recheck_s`` + 3 s (default 120 + 30 + 3 s);
- a peer back before the browser removes its PTR is found again at the next check; later, by
  its announcement when it restarts.
"""
