"""Which segments to fetch ahead of a viewer, from where its stream is (pure; no I/O).

A node fetching a media item it does not hold reads the next segments before the viewer asks
(:meth:`peerd.http.hls.HlsRoutes.fetch_ahead`). A player reads one rendition front to back, but
its ABR moves between renditions, and a segment fetched ahead in the rendition it is leaving is
read from R2 or a peer for nobody. Where a stream is tells which rendition comes next:

* its **first segment** was asked for at a rendition the player chose before it had measured
  anything (a model player starts at the lowest; hls.js at its estimate): its ABR picks the
  next one from that very download, so nothing is fetched ahead of it;
* a segment of the rendition it **asked for before**: the player stays on it, so the next
  ``n`` segments of that rendition are fetched;
* a segment **after a switch**: nothing either (the init of its new rendition did that);
* an **init segment**: the player is moving to that rendition where it is, so the ``n``
  segments after its last one are fetched (at startup, with no segment asked yet, only the
  first, which it asks for next).

A stream is what the caller names it (a viewer's token for its media); with none, every
request is treated as the rendition the viewer stays on. At most ``max_streams`` streams are
remembered, the oldest forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from peerd.core.manifest import PlayOrder


class Lookahead:
    """Per-stream positions and the segments to fetch ahead (see the module doc)."""

    def __init__(self, n: int, max_streams: int = 4096) -> None:
        self.n = n
        self.max_streams = max_streams
        # stream -> (its rendition's segment ids, index of the last segment it asked for)
        self._at: OrderedDict[Hashable, tuple[tuple[str, ...], int]] = OrderedDict()

    def ahead(self, order: PlayOrder, cid: str, stream: Hashable | None) -> tuple[str, ...]:
        """The segment ids to fetch ahead of a request for ``cid`` by ``stream``."""
        got = order.at.get(cid)
        if got is None or self.n <= 0:
            return ()
        cids, nxt = got
        if stream is None:
            return cids[nxt : nxt + self.n]
        last = self._at.get(stream)
        if nxt == 0:  # an init segment (a segment's next index is its own plus one)
            if last is None:
                return cids[:1]
            start = last[1] + 1
            return cids[start : start + self.n]
        self._at[stream] = (cids, nxt - 1)
        self._at.move_to_end(stream)
        while len(self._at) > self.max_streams:
            self._at.popitem(last=False)
        if last is None or last[0] != cids:
            return ()
        return cids[nxt : nxt + self.n]
