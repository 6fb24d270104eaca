"""On-demand renditions on the viewer's request path: produce a segment when it is first asked for.

A ladder rung with ``on_demand = true`` is listed in the playlists with numbered segment URLs
(``s/<rendition>/<seq>.<ext>``, ``s/<rendition>/init.mp4``) whose blobs do not exist until a
viewer asks. :class:`OnDemand` is the daemon service the HLS routes hand such a miss to.

Theory of operation:

* **One production per segment.** A miss starts a task keyed by (media, rendition, seq) - seq -1
  is the init segment - owned by this service, not by the request: every viewer asking for the
  same segment awaits the same task, and a viewer that gives up does not cancel it, so the next
  request finds the segment made. Cancelling the service (the supervisor, on stop) cancels them.
* **Bounded.** The transcode itself waits for one of the Ingestor's ``transcodes`` slots
  (``[media] on_demand_concurrency``), shared with the transcode ``Source``: at most that many
  segments are encoded at once, whatever the number of viewers or segments ahead.
* **The viewer waits up to the request timeout** (``[http] request_timeout_s``), then gets
  :class:`Unavailable` (503 with ``Retry-After``) while the production goes on.
* **Source first.** A segment is derived from the same segment of its source rendition; if the
  node does not hold that blob it is fetched through the resolver (peers, R2) first. If no source
  has it, 503: the media exists but cannot be made right now.
* **Ahead.** A viewer asking for segment n of a rendition whose segment n-1 is already produced
  plays in order: the next ``[media] on_demand_ahead`` segments are produced in the background,
  at most that many per rendition waiting at once, through the same slots.
* **Errors.** Unknown seq: 404 (the HLS routes check it against the manifest). A transcode that
  raises: logged once with its cause, 500 to every waiter, and the next request tries again.

Stored results are ordinary blobs with catalog rows (``Ingestor.produce_segment``): served,
replicated and evicted like any other.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from peerd.catalog.media import segment_cid
from peerd.core.ids import Cid
from peerd.delivery.resolver import Resolver
from peerd.errors import NotFound, PeerdError, Unavailable
from peerd.media.ingest import Ingestor

log = logging.getLogger("peerd.media.ondemand")

Key = tuple[str, str, int]  # media id, rendition id, seq (-1: the init segment)
_MAX_PLANNERS = 16


class OnDemandMetrics:
    """Counters of on-demand production (produced segments: ``peerd_media_on_demand_segments``)."""

    def __init__(self, registry: Any) -> None:
        self.requests = Counter(
            "peerd_media_on_demand_requests",
            "Viewer requests for an on-demand blob not yet produced, by outcome "
            "(ok, timeout, unavailable, not_found, failed)",
            ["outcome"],
            registry=registry,
        )
        self.ahead = Counter(
            "peerd_media_on_demand_ahead",
            "Segments produced ahead of a viewer playing in order, by outcome (ok, failed)",
            ["outcome"],
            registry=registry,
        )


class OnDemand:
    """Daemon service producing on-demand segments for viewers; see the module doc.

    * `await produce(media_id, rendition_id, seq) -> Cid` - the blob of segment ``seq`` (-1: the
      init segment), made now if need be; waits at most ``timeout_s``.
    * `played(media_id, rendition_id, seq, count)` - a viewer asked for segment ``seq`` of a
      rendition of ``count`` segments: produce the next ones if it plays in order.
    """

    name = "ondemand"

    def __init__(
        self,
        ingestor: Ingestor,
        resolver: Resolver,
        *,
        timeout_s: float,
        ahead: int,
        registry: Any,
    ) -> None:
        self.ingestor = ingestor
        self.resolver = resolver
        self.timeout_s = timeout_s
        self.ahead_segments = ahead
        self.m = OnDemandMetrics(registry)
        self._tasks: dict[Key, asyncio.Task[Cid]] = {}
        self._ahead: set[Key] = set()  # produced ahead, not yet done
        self._planners: set[asyncio.Task[None]] = set()
        self._running = False

    async def run(self, ready: Callable[[], None]) -> None:
        """Take requests until cancelled; then cancel every production under way."""
        self._running = True
        ready()
        try:
            await asyncio.Event().wait()
        finally:
            self._running = False
            tasks: list[asyncio.Task[Any]] = [*self._tasks.values(), *self._planners]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def produce(self, media_id: str, rendition_id: str, seq: int) -> Cid:
        """The blob id of segment ``seq`` (-1: init), produced first if needed.

        Raises :class:`Unavailable` (with ``retry_after``) when it is not ready within the
        request timeout or its source cannot be fetched, :class:`NotFound` for what does not
        exist, a 500 :class:`PeerdError` when the transcode fails.
        """
        if not self._running:
            raise Unavailable("on-demand production is not running", retry_after=1)
        task = self._start((media_id, rendition_id, seq))
        try:
            async with asyncio.timeout(self.timeout_s):
                cid = await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise  # the viewer went away
            # The service stopped under a waiting viewer (the node is stopping).
            raise Unavailable("the node is stopping", retry_after=1) from None
        except TimeoutError:
            self.m.requests.labels(outcome="timeout").inc()
            log.info(
                "on-demand segment not ready within the request timeout",
                extra={"media_id": media_id, "rendition": rendition_id, "seq": seq},
            )
            raise Unavailable(
                "segment is being produced; retry", retry_after=self._retry_after()
            ) from None
        except NotFound:
            self.m.requests.labels(outcome="not_found").inc()
            raise
        except Unavailable:
            self.m.requests.labels(outcome="unavailable").inc()
            raise
        except PeerdError:
            self.m.requests.labels(outcome="failed").inc()
            raise
        self.m.requests.labels(outcome="ok").inc()
        return cid

    def _retry_after(self) -> int:
        # Long enough for a slot to free up, short enough for a player's retry budget.
        return max(1, min(10, math.ceil(self.timeout_s / 2)))

    def played(self, media_id: str, rendition_id: str, seq: int, count: int) -> None:
        """Produce segments after ``seq`` in the background if the viewer plays in order."""
        if not self._running or self.ahead_segments == 0 or not 1 <= seq < count - 1:
            return
        if len(self._planners) >= _MAX_PLANNERS:
            return  # a burst of requests: the ones already planning cover it
        task = asyncio.create_task(self._plan_ahead(media_id, rendition_id, seq, count))
        self._planners.add(task)
        task.add_done_callback(self._planners.discard)

    async def _plan_ahead(self, media_id: str, rendition_id: str, seq: int, count: int) -> None:
        catalog = self.ingestor.catalog
        if await segment_cid(catalog, media_id, rendition_id, seq - 1) is None:
            return  # a seek, not playing in order: nothing ahead
        for s in range(seq + 1, min(count, seq + 1 + self.ahead_segments)):
            key = (media_id, rendition_id, s)
            waiting = sum(1 for k in self._ahead if k[:2] == key[:2])
            if waiting >= self.ahead_segments:
                return
            if key in self._tasks or await segment_cid(catalog, *key) is not None:
                continue
            self._ahead.add(key)
            self._start(key).add_done_callback(lambda t, k=key: self._ahead_done(k, t))  # type: ignore[misc]

    def _ahead_done(self, key: Key, task: asyncio.Task[Cid]) -> None:
        self._ahead.discard(key)
        if task.cancelled():
            return
        self.m.ahead.labels(outcome="failed" if task.exception() else "ok").inc()

    def _start(self, key: Key) -> asyncio.Task[Cid]:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.create_task(self._make(key), name=f"ondemand {key[1]}/{key[2]}")
            self._tasks[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return task

    def _done(self, key: Key, task: asyncio.Task[Cid]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved: waiters re-raise it, a production ahead has none

    async def _make(self, key: Key) -> Cid:
        media_id, rendition_id, seq = key
        ing = self.ingestor
        try:
            await self._source_local(media_id, rendition_id, max(seq, 0))
            if seq < 0:
                return await ing.produce_init(media_id, rendition_id)
            return await ing.produce_segment(media_id, rendition_id, seq)
        except (NotFound, Unavailable):
            raise
        except Exception as exc:
            log.error(
                "on-demand transcode failed",
                extra={
                    "media_id": media_id,
                    "rendition": rendition_id,
                    "seq": seq,
                    "error": repr(exc),
                },
                exc_info=exc,
            )
            raise PeerdError(
                f"{media_id}/{rendition_id}/{seq}: transcoding the segment failed"
            ) from exc

    async def _source_local(self, media_id: str, rendition_id: str, seq: int) -> None:
        """Fetch the source rendition's init and segment ``seq`` through the resolver if missing."""
        m = await self.ingestor.load_manifest(media_id)
        r = next((x for x in m.renditions if x.id == rendition_id), None)
        if r is None or not 0 <= seq < len(r.segments):
            raise NotFound(f"{media_id}/{rendition_id}: no segment {seq}")
        if r.recipe is None:
            return
        src = m.rendition(r.recipe.source)
        for cid in (src.init, src.segments[seq].cid):
            if cid is None or await self.ingestor.store.has(Cid(cid)):
                continue
            try:
                await self.resolver.ensure_local_from(Cid(cid))
            except NotFound:
                raise Unavailable(
                    f"{media_id}/{rendition_id}/{seq}: its source blob {cid} is not held here "
                    "and no peer or bucket has it",
                    retry_after=self._retry_after(),
                ) from None
