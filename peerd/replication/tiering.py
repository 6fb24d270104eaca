"""The tiering service: folds access counts into scores, applies the policy, evicts locally.

Every ``r2.tiering_interval_s`` it

1. drains ``rt.access`` (the hot path only bumps an in-memory counter) and folds the counts into
   ``blobs.access_score``/``last_access`` in one transaction;
2. adds the R2 requests made since the last round to the ``usage`` table (``r2_requests``,
   labels ``class_a``/``class_b``) and to the node's
   :class:`~peerd.replication.budget.RequestLedger`, and asks
   :func:`peerd.core.tiering.request_budget` what this month's counts allow against
   ``r2.budget_class_a_per_month``/``budget_class_b_per_month``: no promotions once either is
   used up;
3. asks :func:`peerd.core.tiering.plan_tiering` what to promote or demote and queues it through
   the :class:`~peerd.replication.service.Replicator`. The bucket is shared by every node, so
   with ``r2.min_copies`` above 1 the media items it would demote are first looked up in the
   network (:meth:`TieringService.count_copies`: which peers hold a full copy, asked through
   each :class:`CopyFinder` -- LAN peers, libp2p providers -- at most
   :data:`MAX_LOOKUPS` items a round, each within :data:`LOOKUP_TIMEOUT_S`), and an item
   leaves R2 only if enough copies were found; what could not be learnt counts as no copy
   (counted in ``peerd_tiering_demotions_total{outcome}``);
4. when the store passes ``evict_high_watermark`` of its quota (checked in the round, and as
   soon as the store grows past it between rounds), evicts blobs chosen by
   :func:`peerd.core.tiering.plan_eviction` -- each one after a HEAD confirms its R2 copy (size
   and checksum), unless the bucket was seen to hold it a short while ago (read from it and
   verified, uploaded, or HEAD-confirmed: see :mod:`peerd.core.tiering` for why that is safe);
   HEADs only as far as the class B budget allows for eviction; never a blob stored in the last
   :data:`~peerd.core.tiering.SPARE_STORED_S` that nobody has asked for yet (a prefetch on its
   way to a viewer: evicted, it would be fetched again). Always with a conditional
   update (``r2_state='present'``, not pinned) in the same transaction that marks it absent, so
   a concurrent demotion can never leave a blob in neither place. A blob fetched from a peer
   (LAN or libp2p) is stored with ``r2_state='none'``: this node never saw it in the bucket,
   so the last-copy rule kept it for good, and such blobs filled a LAN node's quota while the
   rest of its store churned (every blob read again from R2). The service remembers those
   (:meth:`TieringService.fetched`, in memory: after a restart they are kept, the safe side)
   and offers them to eviction as candidates that always need a HEAD: a bucket that confirms
   the blob makes it ``present`` like any other (then evicted); one that lacks it leaves it
   held, and not uploaded (the peer holds it). They go first: while the peer holds one,
   reading it again costs a LAN transfer, not a bucket read. Eviction never stops
   altogether for want of budget: a full store keeps no blob it fetches, and every later viewer
   of it costs another GET.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from peerd.catalog import BlobRow, Catalog
from peerd.catalog.media import media_blob_rows, rendition_blob_rows
from peerd.catalog.usage import add_usage
from peerd.core.ids import Cid
from peerd.core.tiering import (
    SPARE_STORED_S,
    BlobStat,
    BudgetVerdict,
    Demote,
    Keep,
    MediaStat,
    Promote,
    TieringLimits,
    decayed,
    demand_bps,
    fold,
    plan_eviction,
    plan_tiering,
    request_budget,
)
from peerd.errors import BudgetSpent, PeerdError
from peerd.replication.budget import month_of
from peerd.replication.r2 import R2Client, R2Error
from peerd.replication.service import Replicator
from peerd.runtime import Runtime

log = logging.getLogger("peerd.replication")

MAX_LOOKUPS = 16  # demotion candidates whose copies are looked up per round
LOOKUP_TIMEOUT_S = 5.0  # per candidate; a finder that has not answered by then knows nothing
EVICT_PAUSE_S = 0.25  # least time between evictions started by a store passing its mark
PEER_SOURCES = frozenset({"lan", "libp2p"})  # resolver sources that are other nodes


class CopyFinder(Protocol):
    """Who else holds a full copy of a media item (LAN peers, libp2p providers)."""

    async def full_copies(self, media_id: str) -> tuple[set[str], bool]:
        """The peer ids that said they hold every blob of ``media_id``, and whether every
        peer asked answered (False: some could not be asked, so there may be more)."""
        ...


@dataclass(frozen=True)
class TickReport:
    """What one round did."""

    folded: int
    promoted: tuple[str, ...]
    demoted: tuple[str, ...]
    evicted: int
    refused: int


class TieringService:
    """Periodic tiering and eviction (see the module doc)."""

    name = "r2-tiering"

    def __init__(
        self,
        rt: Runtime,
        replicator: Replicator,
        client: R2Client,
        *,
        finders: Sequence[CopyFinder] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rt = rt
        self.replicator = replicator
        self.client = client
        self.finders = list(finders)
        self.cfg = rt.settings.r2
        self._clock = clock
        self._looked_up: dict[str, float] = {}  # media id -> when its copies were last asked
        self.ledger = replicator.ledger
        self._told_spent: str | None = None  # the month "budget used up" was last logged
        # Set when the store passes its high watermark between rounds: evict at once.
        self._full = asyncio.Event()
        self._stored: dict[str, float] = {}  # blob -> when stored, for SPARE_STORED_S
        self._from_peers: set[str] = set()  # held blobs a peer sent (see the module doc)
        rt.store.on_grow = self._grown

    def fetched(self, cid: Cid, source: str) -> None:
        """The resolver stored ``cid`` from ``source``: one a peer sent may be evicted once the
        bucket confirms it holds it too (see the module doc)."""
        if source in PEER_SOURCES and self.rt.store.quota_bytes:
            self._from_peers.add(cid)

    def _grown(self, cid: Cid, used: int) -> None:
        quota = self.rt.store.quota_bytes
        if not quota:
            return  # nothing is ever evicted
        self._stored[cid] = self._clock()
        if used > self.cfg.evict_high_watermark * quota:
            self._full.set()

    async def run(self, ready: Callable[[], None]) -> None:
        """Run a round every interval until cancelled; between rounds, evict as soon as the
        store passes its high watermark."""
        ready()
        loop = asyncio.get_running_loop()
        due = loop.time() + self.cfg.tiering_interval_s
        while True:
            try:
                async with asyncio.timeout_at(due):
                    await self._full.wait()
            except TimeoutError:
                pass
            self._full.clear()
            try:
                if loop.time() >= due:
                    due = loop.time() + self.cfg.tiering_interval_s
                    await self.tick()
                else:
                    now = self._clock()
                    await self.fold_access(now)
                    await self.evict(now)
                    # A store that cannot get below the mark (nothing evictable) would wake this
                    # on every blob stored: at most a few such rounds a second.
                    await asyncio.sleep(EVICT_PAUSE_S)
            except PeerdError as exc:
                log.warning("tiering round failed", extra={"error": exc.message})

    async def tick(self, now: float | None = None) -> TickReport:
        """One round: fold, account, plan, evict."""
        now = self._clock() if now is None else now
        folded = await self.fold_access(now)
        budget = await self.account_requests(now)
        promoted: list[str] = []
        demoted: list[str] = []
        kept: list[str] = []
        limits = self.limits(budget.promote)
        stats = await self.media_stats(now)
        if limits.min_copies > 1:
            # Only items the plan would demote are worth a lookup in the network.
            candidates = [
                a.media_id
                for a in plan_tiering(stats, replace(limits, min_copies=1), now)
                if isinstance(a, Demote)
            ]
            if candidates:
                copies = await self.count_copies(candidates, limits.min_copies, now)
                stats = [replace(m, copies=copies.get(m.media_id)) for m in stats]
        demotions = self.replicator.metrics.demotions
        for act in plan_tiering(stats, limits, now):
            if isinstance(act, Promote):
                await self.replicator.promote_media(act.media_id)
                promoted.append(act.media_id)
            elif isinstance(act, Demote):
                await self.replicator.demote_media(act.media_id)
                demoted.append(act.media_id)
                demotions.labels(outcome="queued").inc()
            elif isinstance(act, Keep):
                kept.append(act.media_id)
                demotions.labels(outcome=f"kept_{act.reason}").inc()
        if promoted or demoted or kept:
            # Items kept for want of copies come up again every round: not news on their own.
            log.log(
                logging.INFO if promoted or demoted else logging.DEBUG,
                "tiering",
                extra={"promoted": promoted, "demoted": demoted, "kept_for_copies": kept},
            )
        if not budget.promote and self._told_spent != month_of(now):
            self._told_spent = month_of(now)  # once a month, not every round
            log.warning(
                "R2 request budget used up this month; no promotions",
                extra={"class_a_left": budget.class_a_left, "class_b_left": budget.class_b_left},
            )
        evicted, refused = await self.evict(now)
        return TickReport(folded, tuple(promoted), tuple(demoted), evicted, refused)

    async def count_copies(
        self, candidates: Collection[str], min_copies: int, now: float
    ) -> dict[str, int]:
        """Full copies other nodes hold of each of ``candidates``, for those known well enough
        to decide (enough found, or every peer answered). Those asked least recently go
        first, :data:`MAX_LOOKUPS` of them; the rest stay unknown until a later round."""
        wanted = set(candidates)
        order = sorted(wanted, key=lambda m: self._looked_up.get(m, 0.0))[:MAX_LOOKUPS]
        self._looked_up = {m: t for m, t in self._looked_up.items() if m in wanted}
        gate = asyncio.Semaphore(4)

        async def one(media_id: str) -> int | None:
            async with gate:
                self._looked_up[media_id] = now
                holders: set[str] = set()
                complete = True
                for finder in self.finders:
                    try:
                        async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                            found, answered = await finder.full_copies(media_id)
                    except (TimeoutError, PeerdError, OSError) as exc:
                        log.info(
                            "copy lookup failed", extra={"media": media_id, "error": repr(exc)}
                        )
                        complete = False
                        continue
                    holders |= found
                    complete = complete and answered
                holders.discard(self.rt.identity.peer_id)
                if complete or len(holders) + 1 >= min_copies:
                    return len(holders)
                return None

        counts = await asyncio.gather(*(one(m) for m in order))
        return {m: n for m, n in zip(order, counts, strict=True) if n is not None}

    def limits(self, promotions_allowed: bool = True) -> TieringLimits:
        """The policy limits from ``[r2]``; the uplink is ``[uplink] budget_mbps`` when set."""
        return TieringLimits(
            uplink_bps=self.rt.settings.uplink.budget_bps or self.cfg.uplink_bytes_per_s,
            r2_budget_bytes=self.cfg.budget_bytes,
            headroom=self.cfg.uplink_headroom,
            cold_bps=self.cfg.cold_bytes_per_s,
            min_residence_s=self.cfg.min_residence_s,
            promotions_allowed=promotions_allowed,
            min_copies=self.cfg.min_copies,
        )

    async def fold_access(self, now: float) -> int:
        """Fold drained access counts into the catalog (one transaction)."""
        stats = self.rt.access.drain()
        if not stats:
            return 0
        rows = await self.rt.catalog.get_blobs(stats)
        hl = self.cfg.access_half_life_s
        updates = []
        for cid, st in stats.items():
            row = rows.get(Cid(cid))
            if row is None:
                continue
            score = fold(row.access_score, row.last_access, float(st.bytes), st.last, hl)
            updates.append((score, st.last, cid))
        await self.rt.catalog.set_access(updates)
        return len(updates)

    async def account_requests(self, now: float) -> BudgetVerdict:
        """Persist request counts; what this month's counts allow (see the module doc)."""
        ledger = self.ledger
        await ledger.load()  # before taking: a first load reads what is recorded so far
        a, b = self.replicator.metrics.take_pending()
        ledger.recorded(a, b, now)  # no await in between: the ledger never misses them
        day = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%d")
        await add_usage(self.rt.catalog, day, "r2_requests", {"class_a": a, "class_b": b})
        return request_budget(
            ledger.budget_a - ledger.left_a(),
            ledger.budget_b - ledger.left_b(),
            ledger.budget_a,
            ledger.budget_b,
        )

    async def media_stats(self, now: float) -> list[MediaStat]:
        """Per-media size, demand and R2 state (media being deleted from R2 are left out)."""
        hl = self.cfg.access_half_life_s
        acc: dict[str, list[float]] = {}
        info: dict[str, tuple[str, float | None]] = {}
        complete: dict[str, bool] = {}
        for mid, state, since, nbytes, score, last, local in await media_blob_rows(self.rt.catalog):
            a = acc.setdefault(mid, [0.0, 0.0])
            a[0] += nbytes
            a[1] += decayed(score, last, now, hl)
            info[mid] = (state, since)
            complete[mid] = complete.get(mid, True) and local == "present"
        out = []
        for mid, (size, score) in acc.items():
            state, since = info[mid]
            if state == "deleting":
                continue
            out.append(
                MediaStat(
                    mid,
                    int(size),
                    demand_bps(score, hl),
                    state in ("queued", "present"),
                    since if since is not None else (now if state == "queued" else None),
                    complete[mid],
                )
            )
        return out

    def _unseen(self, blobs: list[BlobStat]) -> set[str]:
        """Of ``blobs``, those stored less than :data:`SPARE_STORED_S` ago that nobody has
        asked for since (prefetches on their way to a viewer)."""
        return {
            b.cid
            for b in blobs
            if (t := self._stored.get(b.cid)) is not None
            and (b.last_access is None or b.last_access < t)
        }

    async def rendition_rates(self, now: float) -> dict[str, float]:
        """Per blob, the reads per stored byte of the rendition it belongs to (the highest, for
        an init several media share): the decayed scores of the rendition's catalogued blobs,
        held or evicted, over their bytes (:attr:`BlobStat.prior`)."""
        hl = self.cfg.access_half_life_s
        groups: dict[tuple[str, str], list[float]] = {}
        members: list[tuple[str, tuple[str, str]]] = []
        for mid, rid, cid, size, score, last in await rendition_blob_rows(self.rt.catalog):
            acc = groups.setdefault((mid, rid), [0.0, 0.0])
            acc[0] += decayed(score, last, now, hl)
            acc[1] += size
            members.append((cid, (mid, rid)))
        rates: dict[str, float] = {}
        for cid, key in members:
            served, nbytes = groups[key]
            rates[cid] = max(rates.get(cid, 0.0), served / max(nbytes, 1.0))
        return rates

    async def _peer_copies(self) -> dict[Cid, BlobRow]:
        """The rows of held blobs a peer sent that the catalog still does not know in the
        bucket; the others (evicted, read from the bucket or uploaded since) are forgotten."""
        if not self._from_peers:
            return {}
        rows = await self.rt.catalog.get_blobs(self._from_peers)
        found = {
            c: r for c, r in rows.items() if r.local_state == "present" and r.r2_state == "none"
        }
        self._from_peers = set(found)
        return found

    async def evict(self, now: float) -> tuple[int, int]:
        """Evict under the quota; returns (evicted, refused because R2 did not confirm)."""
        store = self.rt.store
        quota = store.quota_bytes
        high, low = self.cfg.evict_high_watermark, self.cfg.evict_low_watermark
        self._stored = {c: t for c, t in self._stored.items() if now - t < SPARE_STORED_S}
        if not quota or store.used_bytes <= high * quota:
            return 0, 0
        hl = self.cfg.access_half_life_s
        prior = await self.rendition_rates(now)
        blobs = [
            BlobStat(c, s, decayed(sc, la, now, hl), la, True, False, ck, prior.get(c, 0.0))
            for c, s, sc, la, ck in await self.rt.catalog.evictable(20_000)
        ]
        unconfirmed = await self._peer_copies()
        # Scored as unwanted: while the peer that sent one holds it, reading it again costs no
        # bucket read, so it is the cheapest room there is.
        blobs += [
            BlobStat(r.cid, r.size, 0.0, r.last_access, True, r.pinned)
            for r in unconfirmed.values()
        ]
        plan = plan_eviction(
            blobs,
            store.used_bytes,
            quota,
            high=high,
            low=low,
            order=self.cfg.eviction,
            now=now,
            heads=self.ledger.spendable("evict"),
            spare=self._unseen(blobs),
        )
        evicted = refused = 0
        for ev in plan:
            cid = Cid(ev.cid)
            if not ev.head:
                if await store.evict_local(cid, replicated=True):
                    evicted += 1
                continue
            try:
                confirmed = await self.client.verify_blob(cid, ev.size, store.path_for(cid))
            except (R2Error, BudgetSpent) as exc:
                # R2 did not answer: nothing is known, so nothing is evicted or changed.
                refused += 1
                log.info("cannot confirm R2 copy", extra={"cid": cid, "error": exc.message})
                continue
            if cid in unconfirmed:
                self._from_peers.discard(cid)
                if not confirmed:
                    refused += 1  # the peer's copy is not ours to upload: it stays held
                    continue
                async with self.rt.catalog.transaction() as tx:
                    await Catalog.set_blob_r2(tx, cid, "present", now, only_from=("none",))
            if confirmed:
                if await store.evict_local(cid, replicated=True):
                    evicted += 1
                continue
            refused += 1
            log.warning("R2 copy did not verify; not evicting", extra={"cid": cid})
            async with self.rt.catalog.transaction() as tx:
                await Catalog.set_blob_r2(tx, cid, "none", now, only_from=("present",))
            await self.replicator.push_blob(cid)
        return evicted, refused
