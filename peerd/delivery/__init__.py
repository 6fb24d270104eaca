"""Delivery: getting a blob the node lacks.

Order: local store -> LAN peers (mDNS, HTTP between nodes, node-signed) -> libp2p providers
(DHT, ``/peerd/blob/1.0.0``) -> R2 -> on-demand transcode. Each upstream is a :class:`Source`;
the :class:`Resolver` walks them in order and

- makes one upstream fetch for concurrent misses of one blob (single flight);
- checks every byte against the blob's id before the blob is stored or served (the bytes stream
  into a temp file through :meth:`BlobStore.put_stream`, which hashes them; a mismatch leaves
  nothing behind and the offer is reported bad, so its peer drops in the source's order);
- gives each source a timeout, and moves to the next source on a miss, an error or a timeout;
- caches misses briefly, so a storm of requests for an unknown blob costs one search.
- fetches ahead of viewers on request (:meth:`Resolver.prefetch`, bounded, never raising),
  through the same single flight, so the viewer who then asks joins the fetch in flight.

Sources are tried in the order the daemon lists them (the order above); peer sources with no
peer to ask (``idle()``) go after the first source that has one, so a node with no peer yet asks
R2 at once.

A source yields *offers* (one per peer that may have the blob, best first); the resolver takes
them one at a time until one delivers. Sources share one conformance suite
(``tests.support.source_suite``).

:mod:`~peerd.delivery.media` (:class:`MediaResolver`) finds the manifest of a media id the catalog
lacks through the same sources (a manifest is the blob of its media id), verifies and records it.

:mod:`~peerd.delivery.pull` fetches a whole media item (manifest, then every missing blob) from
one named source: R2 (``peerd replicate pull``) or one LAN peer (the coordinator's prefetch).
"""

from peerd.delivery.resolver import BlobStream, Resolver
from peerd.delivery.source import Offer, Source

__all__ = ["BlobStream", "Offer", "Resolver", "Source"]
