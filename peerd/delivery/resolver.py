"""The resolver: single-flight, verified, ordered fetching of missing blobs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram

from peerd.core.ids import Cid
from peerd.delivery.source import Offer, Source
from peerd.errors import IntegrityError, NotFound, PeerdError, StoreFull, UpstreamError
from peerd.store import BlobStore

log = logging.getLogger("peerd.delivery")


class Resolver:
    """Makes a blob local, from the first source that delivers it whole and correct."""

    def __init__(
        self,
        store: BlobStore,
        sources: Sequence[Source],
        *,
        registry: CollectorRegistry | None = None,
        miss_ttl_s: float = 5.0,
        max_blob_bytes: int = 256 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.sources = list(sources)
        self.miss_ttl_s = miss_ttl_s
        self.max_blob_bytes = max_blob_bytes
        self._clock = clock
        self._inflight: dict[Cid, asyncio.Future[Path]] = {}
        self._misses: dict[Cid, float] = {}
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

    def add_source(self, source: Source) -> None:
        """Append a source (sources are tried in the order they were added)."""
        self.sources.append(source)

    async def ensure_local(self, cid: Cid) -> Path:
        """The local file of ``cid``, fetching it first if needed. NotFound if no source has it."""
        try:
            return await self.store.open_path(cid)
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
            path = await self._fetch(cid)
        except BaseException as exc:
            if isinstance(exc, NotFound):
                self._misses[cid] = self._clock() + self.miss_ttl_s
            if not fut.done():
                if isinstance(exc, asyncio.CancelledError):
                    fut.set_exception(UpstreamError(f"fetch of {cid} was cancelled"))
                else:
                    fut.set_exception(exc)
                fut.exception()  # retrieved: waiters re-raise it; nobody else must log it
            raise
        else:
            fut.set_result(path)
            return path
        finally:
            self._inflight.pop(cid, None)

    async def _fetch(self, cid: Cid) -> Path:
        failures: list[str] = []
        for source in self.sources:
            started = self._clock()
            try:
                async with asyncio.timeout(source.timeout_s):
                    delivered = await self._try_source(source, cid, failures)
            except TimeoutError:
                self.m_fetches.labels(source=source.name, outcome="timeout").inc()
                failures.append(f"{source.name}: timed out after {source.timeout_s}s")
                continue
            except StoreFull:
                raise
            except PeerdError as exc:
                self.m_fetches.labels(source=source.name, outcome="error").inc()
                failures.append(f"{source.name}: {exc.message}")
                continue
            if delivered is not None:
                self.m_latency.labels(source=source.name).observe(self._clock() - started)
                return delivered
        if failures:
            log.info("blob not fetched", extra={"cid": cid, "failures": failures})
        raise NotFound(f"blob {cid} is not available from any source")

    async def _try_source(self, source: Source, cid: Cid, failures: list[str]) -> Path | None:
        gen = source.offers(cid)
        try:
            async for offer in gen:
                try:
                    await self._take(offer, cid)
                except IntegrityError as exc:
                    source.report(offer, False, "integrity")
                    self.m_fetches.labels(source=source.name, outcome="integrity").inc()
                    failures.append(f"{source.name}/{offer.peer}: {exc.message}")
                    log.warning(
                        "peer sent wrong bytes",
                        extra={"cid": cid, "source": source.name, "peer": offer.peer},
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

    async def _take(self, offer: Offer, cid: Cid) -> None:
        limit = offer.size if offer.size is not None else self.max_blob_bytes

        async def counted() -> AsyncIterator[bytes]:
            n = 0
            async for chunk in offer.chunks:
                n += len(chunk)
                if n > limit:
                    raise IntegrityError(f"{offer.peer} sent more than {limit} bytes for {cid}")
                yield chunk
            if offer.size is not None and n != offer.size:
                raise IntegrityError(f"{offer.peer} sent {n} of {offer.size} bytes for {cid}")

        await self.store.put_stream(counted(), expected=cid, kind=offer.meta.get("kind", "segment"))
