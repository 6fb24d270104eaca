"""Any node serves any media: the manifest of a media item the catalog lacks, from the network.

A media id is the CID of its canonical manifest, so a manifest is a blob like any other: its
bytes say whether they are the media item asked for. On a viewer's request (HLS, WHEP) or a
prefetch for a media id the catalog does not know, :meth:`MediaResolver.ensure_media` asks the
sources in delivery order -- LAN peers and libp2p providers through their ordinary blob
protocol (a node answers a blob request for a media id it catalogs with the manifest bytes,
and announces its media ids on the DHT beside its blob ids), then the bucket's
``media/<id>.json`` -- takes the first answer that hashes to the id and decodes, and records it
(:func:`peerd.catalog.media.record_media`) with no blob fetched: segments then come through the
:class:`~peerd.delivery.resolver.Resolver` on demand, as for an evicted item.

Bounded as the blob resolver is: one lookup per id at a time (single flight), a short negative
cache (``miss_ttl_s``) when every source said it lacks the id (:class:`NotFound`, 404), and
failing sources retried for up to ``retry_s`` before :class:`Unavailable` (503 with
``Retry-After``, itself remembered for ``fail_ttl_s``). A bucket past this month's class B
budget (:class:`~peerd.errors.BudgetSpent`) is not retried: once the other sources had their
turn the answer is 503 with the budget's longer ``Retry-After``. Wrong bytes are refused,
reported to the source (its peer gets banned) and never recorded. Lookups are counted as
``peerd_manifest_lookups_total{source, outcome}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter

from peerd.catalog import Catalog
from peerd.catalog.media import media_manifest, record_media
from peerd.core.ids import Cid, cid_of, is_cid
from peerd.core.manifest import decode
from peerd.delivery.resolver import RETRY_BASE_S, RETRY_MAX_S, source_order
from peerd.delivery.source import Offer, Source
from peerd.errors import BudgetSpent, IntegrityError, NotFound, PeerdError, Unavailable

log = logging.getLogger("peerd.delivery")

MAX_MANIFEST = 16 * 1024 * 1024
MAX_MISSES = 4096  # remembered misses before expired ones are dropped


class MediaResolver:
    """Makes a media item known to the catalog, from the first source with its manifest."""

    def __init__(
        self,
        catalog: Catalog,
        sources: Sequence[Source],
        *,
        registry: CollectorRegistry | None = None,
        miss_ttl_s: float = 5.0,
        fail_ttl_s: float = 2.0,
        retry_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.sources = list(sources)
        self.miss_ttl_s = miss_ttl_s
        self.fail_ttl_s = fail_ttl_s
        self.retry_s = retry_s
        self._clock = clock
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        # media id -> (until, kind): a recent NotFound, Unavailable or BudgetSpent
        self._misses: dict[str, tuple[float, type[PeerdError]]] = {}
        self.m_lookups = Counter(
            "peerd_manifest_lookups",
            "Manifest lookups of media the catalog lacked, by source and outcome "
            "(source 'all' with outcome not_found/unavailable: the lookup's answer)",
            ["source", "outcome"],
            registry=registry or CollectorRegistry(),
        )

    async def ensure_media(self, media_id: str) -> bytes:
        """The manifest bytes of ``media_id``, recorded in the catalog first if it lacked them.

        NotFound if no source has it (remembered for ``miss_ttl_s``); Unavailable if a source
        failed and none delivered within ``retry_s`` (remembered for ``fail_ttl_s``, about a
        player's ``Retry-After``, so a storm of requests does not start a lookup each).
        """
        held = await media_manifest(self.catalog, media_id)
        if held is not None:
            return held
        if not is_cid(media_id):
            raise NotFound("no such media")  # no manifest hashes to it: nothing to ask
        fut = self._inflight.get(media_id)
        if fut is not None:
            return await asyncio.shield(fut)
        recent = self._misses.get(media_id)
        if recent is not None:
            until, kind = recent
            if until > self._clock():
                if kind is NotFound:
                    raise NotFound("no such media")
                raise kind(f"media {media_id} cannot be looked up right now; try again")
            del self._misses[media_id]
        fut = asyncio.get_running_loop().create_future()
        self._inflight[media_id] = fut
        try:
            data = await self._lookup(Cid(media_id))
        except BaseException as exc:
            if isinstance(exc, NotFound | Unavailable):
                now = self._clock()
                if len(self._misses) >= MAX_MISSES:
                    # Ids asked for once and never again must not pile up.
                    self._misses = {k: v for k, v in self._misses.items() if v[0] > now}
                ttl = self.miss_ttl_s if isinstance(exc, NotFound) else self.fail_ttl_s
                self._misses[media_id] = (now + ttl, type(exc))
            if isinstance(exc, asyncio.CancelledError):
                fut.set_exception(Unavailable(f"lookup of media {media_id} was cancelled"))
            else:
                fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it; nobody else must log it
            raise
        else:
            fut.set_result(data)
            return data
        finally:
            self._inflight.pop(media_id, None)

    async def _lookup(self, media_id: Cid) -> bytes:
        give_up = self._clock() + self.retry_s
        pause = RETRY_BASE_S
        while True:
            failures: list[str] = []
            spent: BudgetSpent | None = None
            for source in source_order(self.sources):
                try:
                    async with asyncio.timeout(source.timeout_s):
                        data = await self._ask(source, media_id, failures)
                except TimeoutError:
                    self.m_lookups.labels(source=source.name, outcome="timeout").inc()
                    failures.append(f"{source.name}: timed out after {source.timeout_s}s")
                    continue
                except BudgetSpent as exc:
                    # Asking the bucket again cannot help this month: once the other sources
                    # had their turn, 503 with the budget's Retry-After, not a wait of retry_s
                    # that outlasts the player's own timeout.
                    self.m_lookups.labels(source=source.name, outcome="budget").inc()
                    spent = exc
                    continue
                except PeerdError as exc:
                    self.m_lookups.labels(source=source.name, outcome="error").inc()
                    failures.append(f"{source.name}: {exc.message}")
                    continue
                if data is not None:
                    return data
            if spent is not None:
                raise spent
            if not failures:
                self.m_lookups.labels(source="all", outcome="not_found").inc()
                raise NotFound("no such media")
            left = give_up - self._clock()
            if left <= 0:
                self.m_lookups.labels(source="all", outcome="unavailable").inc()
                log.info("manifest not fetched", extra={"media": media_id, "failures": failures})
                raise Unavailable(f"media {media_id} cannot be looked up right now; try again")
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, RETRY_MAX_S)

    async def _ask(self, source: Source, media_id: Cid, failures: list[str]) -> bytes | None:
        """The recorded manifest from the first good offer of ``source``, or None."""
        gen = source.offers(media_id)
        try:
            async for offer in gen:
                try:
                    data = await _read(offer)
                    if cid_of(data) != media_id:
                        raise IntegrityError(f"{offer.peer} sent bytes that are not {media_id}")
                    manifest = decode(data)
                except (IntegrityError, ValueError) as exc:
                    # ManifestError is a ValueError: bytes that hash to the id but do not decode
                    # are as useless as wrong bytes (and the source is reported the same way).
                    source.report(offer, False, "integrity")
                    self.m_lookups.labels(source=source.name, outcome="integrity").inc()
                    log.warning(
                        "manifest refused",
                        extra={
                            "media": media_id,
                            "source": source.name,
                            "peer": offer.peer,
                            "error": str(exc),
                        },
                    )
                    continue
                except BudgetSpent:
                    raise
                except (PeerdError, OSError) as exc:
                    source.report(offer, False, type(exc).__name__)
                    self.m_lookups.labels(source=source.name, outcome="error").inc()
                    failures.append(f"{source.name}/{offer.peer}: {exc}")
                    continue
                finally:
                    await offer.close()
                source.report(offer, True)
                async with self.catalog.transaction() as tx:
                    await record_media(tx, media_id, data, manifest, time.time())
                self.m_lookups.labels(source=source.name, outcome="ok").inc()
                log.info(
                    "media found in the network",
                    extra={"media": media_id, "source": source.name, "peer": offer.peer},
                )
                return data
        finally:
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()
        return None


async def _read(offer: Offer) -> bytes:
    """The offer's bytes, refused past :data:`MAX_MANIFEST` (or its announced size)."""
    limit = min(offer.size, MAX_MANIFEST) if offer.size is not None else MAX_MANIFEST
    parts: list[bytes] = []
    n = 0
    async for chunk in offer.chunks:
        n += len(chunk)
        if n > limit:
            raise IntegrityError(f"{offer.peer} sent more than {limit} bytes for a manifest")
        parts.append(chunk)
    return b"".join(parts)
