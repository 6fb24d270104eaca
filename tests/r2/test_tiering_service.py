"""The tiering service against a real S3 server: access folding, promotion, demotion, eviction."""

from __future__ import annotations

import asyncio
import datetime
import os
import time
from collections.abc import Sequence

from peerd.core.ids import Cid
from peerd.core.tiering import CONFIRM_FRESH_S
from peerd.errors import UpstreamError
from peerd.replication.r2 import blob_key, manifest_key
from peerd.replication.service import Replicator
from peerd.replication.tiering import CopyFinder, TieringService
from peerd.runtime import Runtime
from tests.r2.test_replication import make_media, r2_state
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.s3server import MotoServer


def service(
    runtime: Runtime, replicator: Replicator, finders: Sequence[CopyFinder] = (), **r2: object
) -> TieringService:
    # One node's own policy unless a test asks for copies elsewhere (min_copies 1: the node's
    # copy is enough).
    r2.setdefault("min_copies", 1)
    runtime.settings.r2 = runtime.settings.r2.model_copy(update=r2)
    return TieringService(runtime, replicator, replicator.client, finders=finders)


class Finder:
    """A :class:`CopyFinder` with canned answers (None: the lookup fails)."""

    def __init__(self, holders: set[str] | None, answered: bool = True) -> None:
        self.holders = holders
        self.answered = answered
        self.asked: list[str] = []

    async def full_copies(self, media_id: str) -> tuple[set[str], bool]:
        self.asked.append(media_id)
        if self.holders is None:
            raise UpstreamError("peer unreachable")
        return set(self.holders), self.answered


async def test_cold_media_leave_r2_only_with_enough_copies_elsewhere(
    runtime: Runtime, replicator: Replicator, moto: MotoServer, bucket: str
) -> None:
    """min_copies 2: kept while no other full copy is known (no finder, none found, a lookup
    failing or incomplete, or only this node itself named); demoted once a peer holds one."""
    cold, cold_cids = await make_media(runtime, n=2, size=20_000)
    await replicator.promote_media(cold)
    await replicator.run_until_idle(max_wait_s=30)
    limits = {"cold_bytes_per_s": 10.0, "min_residence_s": 0.0, "min_copies": 2}
    now = time.time() + 10
    me = runtime.identity.peer_id
    for finders in ([], [Finder(set())], [Finder(None)], [Finder(set(), False)], [Finder({me})]):
        svc = service(runtime, replicator, finders, **limits)
        report = await svc.tick(now=now)
        assert report.demoted == (), finders
        assert all(cold in f.asked for f in finders)
    kept = replicator.metrics.demotions
    assert kept.labels(outcome="kept_copies")._value.get() == 3
    assert kept.labels(outcome="kept_unknown")._value.get() == 2
    objects = await asyncio.to_thread(moto.objects, bucket)
    assert manifest_key(cold) in objects
    # One peer holds it (another could not be asked: enough is known anyway).
    svc = service(runtime, replicator, [Finder({"peer-b"}), Finder(None)], **limits)
    report = await svc.tick(now=now)
    assert report.demoted == (cold,)
    await replicator.run_until_idle(max_wait_s=30)
    objects = await asyncio.to_thread(moto.objects, bucket)
    assert manifest_key(cold) not in objects
    assert not any(blob_key(c) in objects for c in cold_cids)


async def test_access_is_folded_into_scores(runtime: Runtime, replicator: Replicator) -> None:
    cid = await runtime.store.put(os.urandom(1000))
    for i in range(5):
        runtime.access.record(cid, 1000, 100.0 + i)
    svc = service(runtime, replicator, access_half_life_s=3600.0)
    report = await svc.tick(now=200.0)
    assert report.folded == 1
    row = await runtime.catalog.get_blob(cid)
    assert row is not None
    assert row.access_score == 5000
    assert row.last_access == 104.0
    runtime.access.record(cid, 1000, 3704.0)
    await svc.tick(now=3704.0)
    row = await runtime.catalog.get_blob(cid)
    assert row is not None
    assert abs(row.access_score - 3500) < 1e-6  # half decayed, plus the new access


async def test_hot_media_is_promoted_and_cold_media_demoted(
    runtime: Runtime, replicator: Replicator, moto: MotoServer, bucket: str
) -> None:
    hot, hot_cids = await make_media(runtime, n=3, size=20_000)
    cold, cold_cids = await make_media(runtime, n=2, size=20_000)
    svc = service(
        runtime,
        replicator,
        uplink_bytes_per_s=1000,
        uplink_headroom=1.0,
        cold_bytes_per_s=10.0,
        min_residence_s=0.0,
        access_half_life_s=3600.0,
        budget_bytes=10**9,
    )
    # The cold one was promoted long ago and nobody watches it any more.
    await replicator.promote_media(cold)
    await replicator.run_until_idle(max_wait_s=30)
    now = time.time() + 10
    for c in hot_cids:
        runtime.access.record(c, 5_000_000, now)  # ~1 MB/s of demand for a 1 kB/s uplink
    report = await svc.tick(now=now)
    assert report.promoted == (hot,)
    assert report.demoted == (cold,)
    await replicator.run_until_idle(max_wait_s=30)
    objects = await asyncio.to_thread(moto.objects, bucket)
    assert manifest_key(hot) in objects
    assert manifest_key(cold) not in objects
    assert all(blob_key(c) in objects for c in hot_cids)
    assert not any(blob_key(c) in objects for c in cold_cids)


async def test_the_uplink_budget_is_the_uplink_tiering_plans_for(
    runtime: Runtime, replicator: Replicator, moto: MotoServer, bucket: str
) -> None:
    """With ``[uplink] budget_mbps`` set, tiering plans for it, not ``r2.uplink_bytes_per_s``."""
    hot, hot_cids = await make_media(runtime, n=3, size=20_000)
    runtime.settings.uplink = runtime.settings.uplink.model_copy(update={"budget_mbps": 0.008})
    # As the older key alone, this uplink would carry the demand: nothing would be promoted.
    svc = service(runtime, replicator, uplink_bytes_per_s=10**12, uplink_headroom=1.0)
    assert svc.limits().uplink_bps == 1000
    now = time.time() + 10
    for c in hot_cids:
        runtime.access.record(c, 5_000_000, now)  # ~1 MB/s of demand for a 1 kB/s budget
    report = await svc.tick(now=now)
    assert report.promoted == (hot,)
    await replicator.run_until_idle(max_wait_s=30)
    objects = await asyncio.to_thread(moto.objects, bucket)
    assert manifest_key(hot) in objects
    runtime.settings.uplink = runtime.settings.uplink.model_copy(update={"budget_mbps": 0.0})
    assert svc.limits().uplink_bps == 10**12  # no budget: the older key is the uplink


async def test_eviction_removes_only_blobs_r2_confirms(
    runtime: Runtime,
    replicator: Replicator,
    moto: MotoServer,
    bucket: str,
    proxy: FaultProxy,
) -> None:
    blobs = [await runtime.store.put(os.urandom(10_000)) for _ in range(6)]
    for c in blobs[:5]:
        await replicator.push_blob(c)
    await replicator.run_until_idle(max_wait_s=30)
    lost, pinned, head_fails = blobs[0], blobs[1], blobs[2]
    # R2 lost one object behind our back; one blob is pinned; blobs[5] was never pushed.
    await asyncio.to_thread(moto.client().delete_object, Bucket=bucket, Key=blob_key(lost))
    async with runtime.catalog.transaction() as tx:
        await tx.execute("UPDATE blobs SET pinned=1 WHERE cid=?", (pinned,))
        # Colder blobs are evicted first: make the order deterministic.
        for i, c in enumerate(blobs):
            await tx.execute("UPDATE blobs SET access_score=? WHERE cid=?", (float(i), c))
    proxy.add(lambda r: r.method == "HEAD" and head_fails in r.path, Fault("status", status=500), 5)
    runtime.store.quota_bytes = 20_000  # 60 kB held: far over quota
    svc = service(runtime, replicator)
    # Long after the uploads confirmed them: every eviction is checked with a HEAD again.
    evicted, refused = await svc.evict(now=time.time() + CONFIRM_FRESH_S + 60)
    assert evicted == 2  # blobs[3], blobs[4]
    assert refused == 2  # lost (404) and head_fails (500)
    states = {c: (await runtime.catalog.get_blob(c)) for c in blobs}
    for c, row in states.items():
        assert row is not None
        if row.local_state == "absent":
            assert c in (blobs[3], blobs[4])
            data = (await asyncio.to_thread(moto.objects, bucket)).get(blob_key(c))
            assert data is not None
            assert len(data) == row.size
    assert await r2_state(runtime, lost) == "none"  # and re-queued for upload
    await replicator.run_until_idle(max_wait_s=30)
    assert await r2_state(runtime, lost) == "present"
    assert await runtime.store.has(Cid(pinned))
    assert await runtime.store.has(Cid(blobs[5]))
    assert (await runtime.store.verify()).ok


async def test_class_b_budget_stops_promotion_and_eviction_heads(
    runtime: Runtime, replicator: Replicator, proxy: FaultProxy
) -> None:
    """Past the class B budget: no promotion, no HEAD before eviction; blobs the bucket was
    seen to hold a short while ago are still evicted (they need no HEAD)."""
    hot, hot_cids = await make_media(runtime, n=2, size=10_000)
    svc = service(
        runtime,
        replicator,
        uplink_bytes_per_s=1000,
        uplink_headroom=1.0,
        access_half_life_s=3600.0,
        budget_bytes=10**9,
        budget_class_b_per_month=3,
    )
    blobs = [await runtime.store.put(os.urandom(10_000)) for _ in range(3)]
    for c in blobs:
        await replicator.push_blob(c)
    await replicator.run_until_idle(max_wait_s=30)
    heads = proxy.count("HEAD")
    runtime.store.quota_bytes = 10_000  # far over quota
    now = time.time()
    day = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%d")
    async with runtime.catalog.transaction() as tx:  # this month's reads so far
        await tx.execute(
            "INSERT INTO usage(day, metric, label, value) VALUES(?, 'r2_requests', 'class_b', 3)",
            (day,),
        )
        # confirmed long ago: each eviction would need a HEAD
        await tx.execute("UPDATE blobs SET r2_checked_at=? WHERE r2_state='present'", (1.0,))
    for c in hot_cids:
        runtime.access.record(c, 5_000_000, now)
    for c in blobs:  # viewers had them (a blob stored and not asked for yet is spared)
        runtime.access.record(c, 1, now)
    report = await svc.tick(now=now)
    assert (report.promoted, report.evicted, report.refused) == ((), 0, 0)
    assert proxy.count("HEAD") == heads  # no eviction HEADs were spent
    assert all([await runtime.store.has(c) for c in blobs])
    async with runtime.catalog.transaction() as tx:  # the node read blobs[0] from the bucket
        await tx.execute("UPDATE blobs SET r2_checked_at=? WHERE cid=?", (now, blobs[0]))
    report = await svc.tick(now=now)
    assert (report.promoted, report.evicted, report.refused) == ((), 1, 0)
    assert proxy.count("HEAD") == heads
    assert not await runtime.store.has(blobs[0])
    # A new month starts with a fresh budget: eviction and promotion resume.
    later = now + 32 * 86400
    for c in hot_cids:
        runtime.access.record(c, 5_000_000, later)
    report = await svc.tick(now=later)
    assert report.promoted == (hot,)
    assert report.evicted > 0


async def test_a_blob_a_peer_sent_is_evicted_once_the_bucket_confirms_it(
    runtime: Runtime, replicator: Replicator, moto: MotoServer, bucket: str
) -> None:
    """A blob fetched from a LAN peer is stored with ``r2_state='none'`` (this node never saw it
    in the bucket), so the last-copy rule kept it for good and such blobs filled the quota.
    Remembered as a peer's, it is evicted after a HEAD confirms the bucket's copy; one the
    bucket lacks stays held and is not uploaded (the peer holds it); one stored from the
    bucket or made here is no peer copy."""
    in_bucket, only_here, own = [await runtime.store.put(os.urandom(10_000)) for _ in range(3)]
    await replicator.push_blob(in_bucket)
    await replicator.run_until_idle(max_wait_s=30)
    async with runtime.catalog.transaction() as tx:  # as a LAN fetch leaves it: not known there
        await tx.execute("UPDATE blobs SET r2_state='none', r2_checked_at=NULL")
    runtime.store.quota_bytes = 10_000  # 30 kB held: far over quota
    svc = service(runtime, replicator)
    svc.fetched(in_bucket, "lan")
    svc.fetched(only_here, "libp2p")
    svc.fetched(own, "transcode")
    evicted, refused = await svc.evict(now=time.time())
    assert (evicted, refused) == (1, 1)
    row = await runtime.catalog.get_blob(in_bucket)
    assert row is not None
    assert (row.local_state, row.r2_state) == ("absent", "present")
    for c in (only_here, own):
        assert await runtime.store.has(c)
        assert await r2_state(runtime, c) == "none"
    await replicator.run_until_idle(max_wait_s=30)
    objects = await asyncio.to_thread(moto.objects, bucket)
    assert blob_key(only_here) not in objects
    # Asked once: the next round does not HEAD the one the bucket lacks again.
    assert await svc.evict(now=time.time()) == (0, 0)


async def test_eviction_keeps_the_rendition_being_watched(
    runtime: Runtime, replicator: Replicator
) -> None:
    """Two items held whole (placed on the node), both in the bucket: a viewer has read the
    first segment of one. Its other segments, unread, stay; the item nobody watches goes
    (before, every unread blob scored 0 and the older ones went first: the watched item's,
    read again from the bucket a moment later)."""
    watched = (await make_media(runtime, n=3, size=10_000))[1]
    cold = (await make_media(runtime, n=3, size=10_000))[1]
    now = time.time()
    async with runtime.catalog.transaction() as tx:
        await tx.execute("UPDATE blobs SET r2_state='present', r2_checked_at=?", (now,))
        await tx.execute(
            "UPDATE blobs SET access_score=10000, last_access=? WHERE cid=?", (now, watched[1])
        )
    runtime.store.quota_bytes = 40_000  # 62 kB held: down to 34 kB
    evicted, _ = await service(runtime, replicator).evict(now=now)
    assert evicted >= 3
    for c in watched:
        assert await runtime.store.has(c)
    assert sum([await runtime.store.has(c) for c in cold]) <= 1


async def test_a_blob_a_peer_sent_goes_before_one_only_the_bucket_has_again(
    runtime: Runtime, replicator: Replicator
) -> None:
    """Read again, a blob the LAN peer holds costs a LAN transfer; one read from the bucket
    costs another bucket read: the peer's goes first, however often it was read."""
    peer, own = [await runtime.store.put(os.urandom(10_000)) for _ in range(2)]
    await replicator.push_blob(peer)
    await replicator.run_until_idle(max_wait_s=30)
    now = time.time()
    async with runtime.catalog.transaction() as tx:
        await tx.execute(
            "UPDATE blobs SET r2_state='none', r2_checked_at=NULL, access_score=50000, "
            "last_access=? WHERE cid=?",
            (now, peer),
        )
        await tx.execute(
            "UPDATE blobs SET r2_state='present', r2_checked_at=?, access_score=10000, "
            "last_access=? WHERE cid=?",
            (now, now, own),
        )
    runtime.store.quota_bytes = 15_000  # 20 kB held: one must go
    svc = service(runtime, replicator)
    svc.fetched(peer, "lan")
    assert await svc.evict(now=now) == (1, 0)
    assert not await runtime.store.has(peer)
    assert await runtime.store.has(own)
