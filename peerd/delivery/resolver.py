"""The resolver: single-flight, verified, ordered fetching of missing blobs.

A source answers a blob in one of two ways that must not be confused: it does not have it (it
offers nothing), or it failed (it raised, timed out, or its offer broke or sent wrong bytes).
Only when every source said the first is the blob missing (:class:`NotFound`, remembered for
``miss_ttl_s``). A failure is retried -- all sources again, with backoff -- for up to
``retry_s``; if no source delivers by then the answer is :class:`Unavailable` (503 with
``Retry-After``): a bucket's passing 503 or a reset connection must never tell a viewer the
segment does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram

from peerd.core.ids import Cid
from peerd.delivery.source import Offer, Source, looks_idle
from peerd.errors import (
    BudgetSpent,
    IntegrityError,
    NotFound,
    PeerdError,
    StoreFull,
    Unavailable,
    UpstreamError,
)
from peerd.store import BlobStore

log = logging.getLogger("peerd.delivery")

RETRY_BASE_S = 0.2  # the first pause before asking the sources again after a failure
RETRY_MAX_S = 2.0


@dataclass
class BlobStream:
    """What :meth:`Resolver.open_stream` returns: a local ``path``, or ``chunks`` streaming from
    a trusted source (``size`` bytes in all) while the blob is verified and stored."""

    path: Path | None
    size: int | None
    source: str
    chunks: AsyncIterator[bytes] | None = None


class Tee:
    """Bytes of one trusted offer, replayed to any number of readers (:meth:`reader`) while
    being stored."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ends: list[int] = []  # byte offset just past each chunk
        self.size: int | None = None
        self.source = ""
        # The source whose bytes ended up in the store (the fetch's winner), once finished.
        self.path_source = "local"
        self.streaming = False
        self.done = False
        self.error: PeerdError | None = None
        self.path: Path | None = None
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def ready(self) -> int:
        """How many of :attr:`chunks` a reader may pass on now.

        A chunk that ends before the announced size cannot be the last one, so it goes out at
        once (a viewer's first byte does not wait for the second chunk); the last chunk only
        once the fetch is done, i.e. the whole blob verified.
        """
        n = len(self.chunks)
        if self.done or (n and self.size is not None and self.ends[-1] < self.size):
            return n
        return max(n - 1, 0)

    def begin(self, size: int | None, source: str) -> None:
        self.size = size
        self.source = source
        self.streaming = True
        self.started.set()
        self._notify()

    def push(self, chunk: bytes) -> None:
        if self.error is None:
            self.ends.append((self.ends[-1] if self.ends else 0) + len(chunk))
            self.chunks.append(chunk)
            self._notify()

    def fail(self, exc: PeerdError) -> None:
        if self.error is None and not self.done:
            self.error = exc
            self._notify()

    def finish(self, path: Path | None, exc: PeerdError | None) -> None:
        self.done = True
        self.path = path
        if exc is not None and self.error is None:
            self.error = exc
        if path is None and self.error is None:
            self.error = NotFound("blob fetch ended without a result")
        # If the streamed offer failed and a retry or another source then delivered, ``error``
        # stays set: readers that already got bytes carry on from the stored file (reader()).
        self.started.set()
        self.finished.set()
        self._notify()

    async def reader(self) -> AsyncIterator[bytes]:
        """The streamed bytes, each chunk as soon as :meth:`ready` allows it.

        Should the streamed offer break (a body cut for good), the reader waits for the fetch
        to end: if it stored the blob (retried, or from another source) and the bytes passed
        on so far are its start, the rest comes from the verified file, so the viewer's
        response completes; otherwise the error is raised (and the response is cut short).
        """
        i = 0
        while True:
            if self.error is not None:
                await self.finished.wait()
                sent = self.ends[i - 1] if i else 0
                if self.path is None or not await asyncio.to_thread(
                    _starts_with, self.path, b"".join(self.chunks[:i])
                ):
                    raise self.error
                async for chunk in _file_tail(self.path, sent):
                    yield chunk
                return
            if i < self.ready():
                yield self.chunks[i]
                i += 1
                continue
            if self.done:
                sent = self.ends[-1] if self.ends else 0
                if self.path is not None and self.size is not None and sent < self.size:
                    # The store already held the blob (another fetch finished first) and took
                    # no more bytes from the source: the rest comes from the verified file.
                    async for chunk in _file_tail(self.path, sent):
                        yield chunk
                return
            await self._changed.wait()


def _starts_with(path: Path, prefix: bytes) -> bool:
    with path.open("rb") as f:
        return f.read(len(prefix)) == prefix


async def _file_tail(path: Path, offset: int, chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
    """The bytes of ``path`` from ``offset`` on, read in a thread."""
    f = await asyncio.to_thread(path.open, "rb")
    try:
        await asyncio.to_thread(f.seek, offset)
        while data := await asyncio.to_thread(f.read, chunk):
            yield data
    finally:
        await asyncio.to_thread(f.close)


def source_order(sources: list[Source]) -> list[Source]:
    """The sources in the order to ask them now: ``sources``, except that when the first ones
    all look idle (no peer to ask, :func:`looks_idle`), the first that does not goes before
    them. A node with no peer yet asks R2 at once, not after a lookup that cannot find anything
    (a libp2p provider search is a hop to its thread); the idle sources are still asked, after
    it, should it not deliver."""
    lead = 0
    while lead < len(sources) and looks_idle(sources[lead]):
        lead += 1
    if not lead or lead == len(sources):
        return sources
    return [sources[lead], *sources[:lead], *sources[lead + 1 :]]


class Resolver:
    """Makes a blob local, from the first source that delivers it whole and correct."""

    def __init__(
        self,
        store: BlobStore,
        sources: Sequence[Source],
        *,
        registry: CollectorRegistry | None = None,
        miss_ttl_s: float = 5.0,
        retry_s: float = 10.0,
        max_blob_bytes: int = 256 * 1024 * 1024,
        max_prefetches: int = 4,
        clock: Callable[[], float] = time.monotonic,
        may_prefetch: Callable[[], bool] | None = None,
        on_fetched: Callable[[Cid, str], None] | None = None,
    ) -> None:
        self.store = store
        # Told of every blob stored from a source, with the source's name (tiering remembers
        # those a peer sent: the bucket may hold them too, see peerd.replication.tiering).
        self.on_fetched = on_fetched
        # Whether optional fetches may go on (False once the R2 request budget runs low).
        self.may_prefetch = may_prefetch
        self.sources = list(sources)
        self.miss_ttl_s = miss_ttl_s
        self.retry_s = retry_s
        self.max_blob_bytes = max_blob_bytes
        self._clock = clock
        self._inflight: dict[Cid, asyncio.Future[tuple[Path, str]]] = {}
        self._tees: dict[Cid, Tee] = {}
        self._tee_tasks: set[asyncio.Task[None]] = set()
        self._misses: dict[Cid, float] = {}
        self.max_prefetches = max_prefetches
        self._prefetching = 0
        reg = registry or CollectorRegistry()
        self.m_fetches = Counter(
            "peerd_fetches",
            "Upstream fetch attempts by source and outcome",
            ["source", "outcome"],
            registry=reg,
        )
        self.m_bytes = Counter(
            "peerd_fetched_bytes", "Verified bytes fetched by source", ["source"], registry=reg
        )
        self.m_latency = Histogram(
            "peerd_fetch_seconds",
            "Time to fetch and verify a missing blob, by source",
            ["source"],
            registry=reg,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.m_retries = Counter(
            "peerd_fetch_retries",
            "Rounds over the sources repeated because one failed (none delivered)",
            registry=reg,
        )
        self.m_unavailable = Counter(
            "peerd_fetch_unavailable",
            "Fetches given up as unavailable (503): sources kept failing for retry_s",
            registry=reg,
        )
        self.m_prefetch = Counter(
            "peerd_prefetches",
            "Background fetches ahead of viewers (started, skipped, ok, failed)",
            ["outcome"],
            registry=reg,
        )

    async def ensure_local(self, cid: Cid) -> Path:
        """The local file of ``cid``, fetching it first if needed. NotFound if no source has it;
        Unavailable if a source failed and none delivered within ``retry_s``."""
        return (await self._ensure(cid, None))[0]

    async def ensure_local_from(self, cid: Cid) -> tuple[Path, str]:
        """Like :meth:`ensure_local`, plus the name of the source that supplied the bytes.

        ``"local"`` when the blob was already held; otherwise the delivering source's name
        (``lan``, ``libp2p``, ``r2``, ``transcode``...), also for callers that joined an upstream
        fetch in flight, so bytes-by-source metrics credit the real origin.
        """
        return await self._ensure(cid, None)

    async def open_stream(self, cid: Cid, *, known_absent: bool = False) -> BlobStream:
        """Deliver ``cid`` as soon as possible: a local file, or bytes streaming while stored.

        * Held locally: ``BlobStream(path=...)``.
        * Missing, and the first source to answer is *trusted* (its offer has
          ``meta["trusted"] == "1"``, i.e. the node's own R2 bucket): its bytes are handed to the
          caller as they arrive, while :meth:`BlobStore.put_stream` hashes and stores them. The
          final chunk is released only after the hash matched, so on a mismatch the caller's
          iterator raises before the body is complete and the HTTP layer aborts the response
          (the viewer never receives a complete wrong body; Content-Length shows it truncated).
        * Missing, and delivered by an untrusted source (LAN, libp2p): the whole blob is verified
          and stored first, then ``BlobStream(path=...)`` -- the same as :meth:`ensure_local`.

        Concurrent calls share one upstream fetch (with each other and with ensure_local); late
        joiners replay the bytes received so far. The fetch runs in its own task, so a viewer
        that goes away does not abort the store. NotFound if no source has the blob,
        Unavailable if they kept failing. A caller that arrives after the streamed offer broke
        waits for the fetch's retry and gets the stored file.

        ``known_absent``: the caller has just seen that the blob's file is not there (the HLS
        route stats it), so the catalog lookup is skipped: it costs a thread hop on a viewer's
        first byte. Should the blob land in between, the store keeps the copy it has.
        """
        if not known_absent:
            try:
                return BlobStream(path=await self.store.open_path(cid), size=None, source="local")
            except NotFound:
                pass
        tee = self._tees.get(cid)
        if tee is None:
            if cid in self._inflight:
                path, source = await self._ensure(cid, None)
                return BlobStream(path=path, size=None, source=source)
            tee, _ = self._start_tee(cid)
        await tee.started.wait()
        if tee.streaming and tee.error is None:
            return BlobStream(path=None, size=tee.size, source=tee.source, chunks=tee.reader())
        await tee.finished.wait()
        if tee.path is None:
            assert tee.error is not None
            raise tee.error
        return BlobStream(path=tee.path, size=None, source=tee.path_source)

    def _start_tee(self, cid: Cid) -> tuple[Tee, asyncio.Task[None]]:
        tee = Tee()
        self._tees[cid] = tee
        task = asyncio.get_running_loop().create_task(self._tee_fetch(cid, tee))
        self._tee_tasks.add(task)

        def ended(_task: asyncio.Task[None]) -> None:
            self._tee_tasks.discard(_task)
            # A task cancelled before it ran (shutdown) never ran _tee_fetch's own ending:
            # the tee must not stay behind for later viewers to wait on.
            if self._tees.get(cid) is tee:
                del self._tees[cid]
            if not tee.done:
                tee.finish(None, Unavailable(f"fetch of {cid} was cancelled"))

        task.add_done_callback(ended)
        return tee, task

    def prefetch(self, cid: Cid) -> bool:
        """Start fetching ``cid`` in the background, for a viewer expected to ask for it soon.

        The fetch is the one :meth:`open_stream` makes, so a viewer who asks while it is under
        way joins it and streams the bytes received so far: no second upstream request. Does
        nothing (returns False) if the blob is being fetched already, missed a moment ago, or
        ``max_prefetches`` fetches are running (prefetching must never crowd out viewers), or
        ``may_prefetch`` says no (the month's R2 request budget is running low: optional
        spending stops first).
        The caller checks that the blob is not held. Errors are counted, never raised: a
        viewer who then asks gets the ordinary miss path.
        """
        until = self._misses.get(cid)
        if (
            cid in self._tees
            or cid in self._inflight
            or (until is not None and until > self._clock())
            or self._prefetching >= self.max_prefetches
            or (self.may_prefetch is not None and not self.may_prefetch())
        ):
            self.m_prefetch.labels(outcome="skipped").inc()
            return False
        self._prefetching += 1
        self.m_prefetch.labels(outcome="started").inc()
        tee, task = self._start_tee(cid)

        def settled(_task: asyncio.Task[None]) -> None:
            self._prefetching -= 1
            self.m_prefetch.labels(outcome="ok" if tee.path is not None else "failed").inc()

        task.add_done_callback(settled)
        return True

    async def _tee_fetch(self, cid: Cid, tee: Tee) -> None:
        try:
            path, tee.path_source = await self._ensure(cid, tee, checked=True)
        except BaseException as exc:
            tee.finish(None, exc if isinstance(exc, PeerdError) else UpstreamError(repr(exc)))
            if not isinstance(exc, Exception):
                raise
        else:
            tee.finish(path, None)
        finally:
            self._tees.pop(cid, None)

    async def _ensure(
        self, cid: Cid, tee: Tee | None, *, checked: bool = False
    ) -> tuple[Path, str]:
        # ``checked``: open_stream looked a moment ago; looking again only delays the upstream
        # request (if the blob arrived in between, the store notices and keeps its copy).
        if not checked:
            try:
                return await self.store.open_path(cid), "local"
            except NotFound:
                pass
        fut = self._inflight.get(cid)
        if fut is not None:
            return await asyncio.shield(fut)
        until = self._misses.get(cid)
        if until is not None:
            if until > self._clock():
                raise NotFound(f"blob {cid} is not available from any source")
            del self._misses[cid]
        fut = asyncio.get_running_loop().create_future()
        self._inflight[cid] = fut
        try:
            got = await self._fetch(cid, tee)
            if self.on_fetched is not None:
                self.on_fetched(cid, got[1])
        except BaseException as exc:
            if isinstance(exc, NotFound):
                self._misses[cid] = self._clock() + self.miss_ttl_s
            if not fut.done():
                if isinstance(exc, asyncio.CancelledError):
                    fut.set_exception(Unavailable(f"fetch of {cid} was cancelled"))
                else:
                    fut.set_exception(exc)
                fut.exception()  # retrieved: waiters re-raise it; nobody else must log it
            raise
        else:
            fut.set_result(got)
            return got
        finally:
            self._inflight.pop(cid, None)

    async def _fetch(self, cid: Cid, tee: Tee | None) -> tuple[Path, str]:
        give_up = self._clock() + self.retry_s
        pause = RETRY_BASE_S
        while True:
            failures: list[str] = []
            got = await self._round(cid, tee, failures)
            if got is not None:
                return got
            if not failures:
                raise NotFound(f"blob {cid} is not available from any source")
            left = give_up - self._clock()
            if left <= 0:
                self.m_unavailable.inc()
                log.info("blob not fetched", extra={"cid": cid, "failures": failures})
                # The reasons (peer ids, bucket errors) stay in the log, not in a viewer's body.
                raise Unavailable(f"blob {cid} cannot be fetched right now; try again")
            self.m_retries.inc()
            log.debug("blob fetch retried", extra={"cid": cid, "failures": failures})
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, RETRY_MAX_S)

    async def _round(
        self, cid: Cid, tee: Tee | None, failures: list[str]
    ) -> tuple[Path, str] | None:
        """Ask each source in turn; the stored blob and its source, or None (then ``failures``
        says which sources failed; empty: each said it does not have the blob, or sent bytes
        that are not it)."""
        spent: BudgetSpent | None = None
        for source in source_order(self.sources):
            started = self._clock()
            try:
                async with asyncio.timeout(source.timeout_s):
                    delivered = await self._try_source(source, cid, failures, tee)
            except TimeoutError:
                self.m_fetches.labels(source=source.name, outcome="timeout").inc()
                failures.append(f"{source.name}: timed out after {source.timeout_s}s")
                continue
            except StoreFull:
                raise
            except BudgetSpent as exc:
                # Asking again within this request cannot help (the month's R2 budget is used
                # up): 503 with its Retry-After once the other sources had their turn.
                self.m_fetches.labels(source=source.name, outcome="budget").inc()
                spent = exc
                continue
            except PeerdError as exc:
                self.m_fetches.labels(source=source.name, outcome="error").inc()
                failures.append(f"{source.name}: {exc.message}")
                continue
            if delivered is not None:
                self.m_latency.labels(source=source.name).observe(self._clock() - started)
                return delivered, source.name
        if spent is not None:
            raise spent
        return None

    async def _try_source(
        self, source: Source, cid: Cid, failures: list[str], tee: Tee | None
    ) -> Path | None:
        gen = source.offers(cid)
        try:
            async for offer in gen:
                try:
                    await self._take(offer, cid, tee)
                except IntegrityError as exc:
                    source.report(offer, False, "integrity")
                    self.m_fetches.labels(source=source.name, outcome="integrity").inc()
                    # Not a failure worth a retry: the source is refused (peers get banned),
                    # and what it sends is not this blob.
                    log.warning(
                        "peer sent wrong bytes",
                        extra={
                            "cid": cid,
                            "source": source.name,
                            "peer": offer.peer,
                            "error": exc.message,
                        },
                    )
                    continue
                except StoreFull:
                    raise
                except (PeerdError, OSError) as exc:
                    source.report(offer, False, type(exc).__name__)
                    self.m_fetches.labels(source=source.name, outcome="error").inc()
                    failures.append(f"{source.name}/{offer.peer}: {exc}")
                    continue
                finally:
                    await offer.close()
                source.report(offer, True)
                self.m_fetches.labels(source=source.name, outcome="ok").inc()
                path = await self.store.open_path(cid)
                self.m_bytes.labels(source=source.name).inc(path.stat().st_size)
                return path
        finally:
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()
        return None

    async def _take(self, offer: Offer, cid: Cid, tee: Tee | None) -> None:
        limit = offer.size if offer.size is not None else self.max_blob_bytes
        # The tee this offer's bytes stream to viewers through, if any: the first trusted one.
        live = tee if tee is not None and not tee.streaming else None
        if offer.meta.get("trusted") != "1" or offer.size is None:
            live = None
        if live is not None:
            live.begin(offer.size, offer.source)

        async def counted() -> AsyncGenerator[bytes, None]:
            n = 0
            async for chunk in offer.chunks:
                n += len(chunk)
                if n > limit:
                    raise IntegrityError(f"{offer.peer} sent more than {limit} bytes for {cid}")
                if live is not None:
                    live.push(chunk)
                yield chunk
            if offer.size is not None and n != offer.size:
                raise IntegrityError(f"{offer.peer} sent {n} of {offer.size} bytes for {cid}")

        # Streaming: read ahead in a task of its own, and let the viewers' first bytes out
        # before the store starts (its catalog lookup and temp file cost thread hops: ~1.5 ms
        # of first-byte latency). The tee keeps every chunk, so the store loses nothing.
        body = _ReadAhead(counted()) if live is not None else counted()
        try:
            if isinstance(body, _ReadAhead):
                await body.primed.wait()
                await asyncio.sleep(0)
            await self.store.put_stream(body, expected=cid, kind=offer.meta.get("kind", "segment"))
        except BaseException as exc:
            if live is not None:
                live.fail(exc if isinstance(exc, PeerdError) else UpstreamError(repr(exc)))
            raise
        finally:
            await body.aclose()


class _ReadAhead:
    """``chunks``, pulled at once by a task of its own as fast as they come, handed on in
    order. :meth:`aclose` stops the task. Memory is no concern: the tee this feeds keeps
    every chunk anyway."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()
        self._chunks = chunks
        self.primed = asyncio.Event()  # set once the first chunk (or the end, or an error) is in
        self._task = asyncio.get_running_loop().create_task(self._pump())
        self._ended = False

    async def _pump(self) -> None:
        try:
            async for chunk in self._chunks:
                self._queue.put_nowait(chunk)
                self.primed.set()
        except Exception as exc:  # handed to the consumer, which raises it
            self._queue.put_nowait(exc)
            return
        finally:
            self.primed.set()
        self._queue.put_nowait(None)

    def __aiter__(self) -> _ReadAhead:
        return self

    async def __anext__(self) -> bytes:
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, Exception):
            self._ended = True
            raise item
        return item

    async def aclose(self) -> None:
        """Stop reading ahead (waits for the task to end)."""
        self._ended = True
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
