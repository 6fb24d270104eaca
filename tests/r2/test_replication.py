"""Replication against a real S3 server (moto over HTTP), with faults injected in between."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from peerd.catalog.media import record_media
from peerd.catalog.outbox import Outbox
from peerd.catalog.usage import add_usage
from peerd.config import load_settings
from peerd.core.ids import Cid, cid_of
from peerd.core.manifest import Manifest, Rendition, Segment, encode, media_id_of
from peerd.delivery import Resolver
from peerd.errors import IntegrityError, NotFound, Unavailable
from peerd.replication.metrics import r2_metrics
from peerd.replication.r2 import READ_ATTEMPTS, R2Client, R2Error, blob_key, manifest_key
from peerd.replication.service import Replicator
from peerd.replication.source import R2Source
from peerd.runtime import Runtime, open_runtime
from tests.r2.conftest import FAST, make_config
from tests.support.faultproxy import Fault, FaultProxy, ProxyRequest, method_is
from tests.support.s3server import MotoServer
from tests.support.source_suite import SourceConformance, SourceFactory

MIB = 1024 * 1024


def bucket_objects(moto: MotoServer, bucket: str) -> dict[str, bytes]:
    return moto.objects(bucket)


async def put_direct(moto: MotoServer, bucket: str, key: str, body: bytes) -> None:
    await asyncio.to_thread(moto.put, bucket, key, body)


async def assert_replicated_are_whole(rt: Runtime, moto: MotoServer, bucket: str) -> int:
    """Every blob marked present in R2 is in the bucket, whole, with the right bytes."""
    objects = await asyncio.to_thread(bucket_objects, moto, bucket)
    async with rt.catalog.conn.execute("SELECT cid FROM blobs WHERE r2_state='present'") as cur:
        present = [str(r[0]) for r in await cur.fetchall()]
    for cid in present:
        data = objects.get(blob_key(cid))
        assert data is not None, f"{cid} marked present but missing in bucket"
        assert cid_of(data) == cid, f"{cid} marked present but bucket bytes differ"
    return len(present)


async def r2_state(rt: Runtime, cid: str) -> str:
    row = await rt.catalog.get_blob(cid)
    assert row is not None
    return row.r2_state


async def test_push_single_and_multipart(
    runtime: Runtime, replicator: Replicator, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    small = await runtime.store.put(os.urandom(100_000))
    big = await runtime.store.put(os.urandom(11 * MIB + 123))
    for c in (small, big):
        await replicator.push_blob(c)
    await replicator.run_until_idle(max_wait_s=60)
    assert await r2_state(runtime, small) == "present"
    assert await r2_state(runtime, big) == "present"
    assert await assert_replicated_are_whole(runtime, moto, bucket) == 2
    # 11 MiB with 5 MiB parts: three parts (5, 5, 1 MiB), all carrying SHA-256 checksums.
    assert proxy.count("PUT", "partNumber=") == 3
    assert proxy.count("HEAD") == 2
    # Done jobs are not redone: pushing again makes no request.
    before = len(proxy.log)
    await replicator.push_blob(small)
    await replicator.run_until_idle(max_wait_s=10)
    assert len(proxy.log) == before


@pytest.mark.parametrize(
    ("method", "fault"),
    [
        ("PUT", Fault("status", status=500)),
        ("PUT", Fault("slowdown")),
        ("PUT", Fault("cut_request")),
        ("PUT", Fault("stall", seconds=2.0)),
        ("PUT", Fault("drop")),
        ("HEAD", Fault("status", status=503)),
        ("HEAD", Fault("stall", seconds=2.0)),
        ("POST", Fault("drop")),  # multipart create / complete answer lost
    ],
)
async def test_faults_never_mark_partial_uploads(
    runtime: Runtime,
    replicator: Replicator,
    proxy: FaultProxy,
    moto: MotoServer,
    bucket: str,
    method: str,
    fault: Fault,
) -> None:
    blobs = [await runtime.store.put(os.urandom(n)) for n in (50_000, 6 * MIB)]
    proxy.add(method_is(method), fault, times=2)
    for c in blobs:
        await replicator.push_blob(c)
    await replicator.run_until_idle(max_wait_s=60)
    for c in blobs:
        assert await r2_state(runtime, c) == "present"
    assert await assert_replicated_are_whole(runtime, moto, bucket) == 2
    async with runtime.catalog.conn.execute(
        "SELECT SUM(attempts) FROM replication_jobs WHERE kind='push_blob'"
    ) as cur:
        row = await cur.fetchone()
    assert row is not None
    assert row[0] >= 1  # the faults were seen and counted as failed attempts


async def test_partial_object_in_bucket_is_replaced(
    runtime: Runtime, replicator: Replicator, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    data = os.urandom(80_000)
    cid = await runtime.store.put(data)
    await put_direct(moto, bucket, blob_key(cid), data[:1000])
    await replicator.push_blob(cid)
    await replicator.run_until_idle(max_wait_s=30)
    assert await r2_state(runtime, cid) == "present"
    assert await assert_replicated_are_whole(runtime, moto, bucket) == 1
    assert proxy.count("DELETE") == 1


async def test_a_whole_object_written_by_another_tool_is_kept(
    runtime: Runtime, replicator: Replicator, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    """An object put without a SHA-256 checksum (rclone, a bucket copy, another node's tool) is
    read and hashed, not taken for a wrong one and deleted; one of the wrong bytes still is."""
    data = os.urandom(80_000)
    cid = await runtime.store.put(data)
    await put_direct(moto, bucket, blob_key(cid), data)
    await replicator.push_blob(cid)
    await replicator.run_until_idle(max_wait_s=30)
    assert await r2_state(runtime, cid) == "present"
    assert proxy.count("DELETE") == 0
    assert proxy.count("GET", "/blobs/") == 1  # the whole object, hashed
    wrong = await runtime.store.put(os.urandom(80_000))
    await put_direct(moto, bucket, blob_key(wrong), os.urandom(80_000))  # same size, other bytes
    await replicator.push_blob(wrong)
    await replicator.run_until_idle(max_wait_s=30)
    assert await r2_state(runtime, wrong) == "present"
    assert proxy.count("DELETE") == 1
    assert await assert_replicated_are_whole(runtime, moto, bucket) == 2


async def test_restart_does_no_duplicate_work(
    runtime: Runtime, client: R2Client, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    cids = [await runtime.store.put(os.urandom(20_000)) for _ in range(4)]
    first = Replicator(runtime, client, outbox=Outbox(runtime.catalog, FAST), concurrency=2)
    for c in cids[:2]:
        await first.push_blob(c)
    await first.run_until_idle(max_wait_s=30)
    puts = proxy.count("PUT")
    # A worker that claimed a job and died: its lease expires and another one takes over.
    for c in cids[2:]:
        await first.push_blob(c)
    short = Outbox(runtime.catalog, FAST.__class__(lease_s=0.2, base_s=0.01, max_s=0.05))
    lost = await short.claim(1)
    assert len(lost) == 1
    second = Replicator(runtime, client, outbox=Outbox(runtime.catalog, FAST), concurrency=2)
    for c in cids[:2]:
        await second.push_blob(c)  # already replicated: completes without any request
    await asyncio.sleep(0.3)
    await second.run_until_idle(max_wait_s=30)
    assert proxy.count("PUT") == puts + 2
    for c in cids:
        assert await r2_state(runtime, c) == "present"
    # The dead worker cannot finish the job it lost.
    assert not await short.complete(lost[0])
    assert await assert_replicated_are_whole(runtime, moto, bucket) == 4


def _manifest(cids: list[str], init: str) -> Manifest:
    return Manifest(
        container="fmp4",
        renditions=(
            Rendition(
                id="v0",
                kind="video",
                codecs="avc1.64001f",
                bandwidth=1_000_000,
                timescale=1000,
                segments=tuple(Segment(2000, c) for c in cids),
                width=320,
                height=240,
                init=init,
            ),
        ),
    )


async def make_media(rt: Runtime, n: int = 4, size: int = 300_000) -> tuple[str, list[Cid]]:
    init = await rt.store.put(os.urandom(1000), kind="init")
    segs = [await rt.store.put(os.urandom(size)) for _ in range(n)]
    m = _manifest(list(segs), init)
    media_id = media_id_of(m)
    async with rt.catalog.transaction() as tx:
        await record_media(tx, media_id, encode(m), m, 0.0)
    return media_id, [init, *segs]


async def test_promote_then_pull_into_another_node_resumes_after_faults(
    runtime: Runtime,
    replicator: Replicator,
    proxy: FaultProxy,
    client: R2Client,
    tmp_path: Any,
    settings: Any,
) -> None:
    media_id, cids = await make_media(runtime)
    batch = await replicator.promote_media(media_id)
    await replicator.run_until_idle(max_wait_s=60)
    status = await replicator.job_status(batch)
    assert status["state"] == "done", status
    async with runtime.catalog.conn.execute(
        "SELECT r2_state FROM media WHERE media_id=?", (media_id,)
    ) as cur:
        assert (await cur.fetchone())[0] == "present"  # type: ignore[index]

    other = await open_runtime(
        settings.model_copy(
            update={"node": settings.node.model_copy(update={"state_dir": tmp_path / "b"})}
        )
    )
    try:
        rep_b = Replicator(other, client, outbox=Outbox(other.catalog, FAST), concurrency=2)
        # One blob arrives truncated (consistent headers: only the hash notices), one is cut.
        proxy.add(method_is("GET", "/blobs/"), Fault("truncate", fraction=0.5))
        proxy.add(method_is("GET", "/blobs/"), Fault("cut", fraction=0.3))
        held_before: set[str] = set()
        mark = 0
        failures = 0
        for _ in range(4):
            try:
                report = await rep_b.pull_media(media_id)
                break
            except (IntegrityError, R2Error):
                failures += 1
                held_before |= {c for c in cids if await other.store.has(c)}
                mark = len(proxy.log)
        assert failures >= 1
        assert report.recorded
        # Resumed: blobs stored before a failure were not fetched again.
        later = {p.rsplit("/", 1)[-1] for m, p, _ in proxy.log[mark:] if m == "GET"}
        assert not later & held_before
        for c in cids:
            assert await other.store.read(c) == await runtime.store.read(c)
            row = await other.catalog.get_blob(c)
            assert row is not None
            assert row.r2_state == "present"
        assert (await other.store.verify()).ok
    finally:
        await other.close()


async def test_pull_refuses_manifest_that_does_not_hash(
    runtime: Runtime, replicator: Replicator, moto: MotoServer, bucket: str
) -> None:
    fake = cid_of(b"some other manifest")
    await put_direct(moto, bucket, manifest_key(fake), b"{}")
    with pytest.raises(IntegrityError):
        await replicator.pull_media(fake)
    with pytest.raises(NotFound):
        await replicator.pull_media(cid_of(b"absent"))


async def test_demote_keeps_blobs_the_node_lacks(
    runtime: Runtime, replicator: Replicator, moto: MotoServer, bucket: str
) -> None:
    media_id, cids = await make_media(runtime, n=3, size=10_000)
    await replicator.promote_media(media_id)
    await replicator.run_until_idle(max_wait_s=30)
    await runtime.store.evict_local(cids[1])  # R2 now holds the last copy of this one
    batch = await replicator.demote_media(media_id)
    await replicator.run_until_idle(max_wait_s=30)
    objects = await asyncio.to_thread(bucket_objects, moto, bucket)
    assert manifest_key(media_id) not in objects
    assert set(objects) == {blob_key(cids[1])}
    status = await replicator.job_status(batch)
    assert status["states"].get("failed") == 1
    assert await r2_state(runtime, cids[1]) == "present"
    assert await r2_state(runtime, cids[0]) == "none"


async def test_upload_last_copies(
    runtime: Runtime, replicator: Replicator, moto: MotoServer, bucket: str
) -> None:
    cids = [await runtime.store.put(os.urandom(30_000)) for _ in range(5)]
    assert await replicator.upload_last_copies(30) == 5
    assert await replicator.upload_last_copies(30) == 0
    assert await assert_replicated_are_whole(runtime, moto, bucket) == len(cids)


async def test_upload_last_copies_stays_within_the_class_a_budget(
    tmp_path: Any, proxy: FaultProxy, bucket: str
) -> None:
    # A node leaving with 5 blobs only it holds, whose month allows 4 class A requests, of
    # which it made 1 already (recorded by tiering): 3 PUTs, then its copies stay local.
    settings = load_settings(
        None, node={"state_dir": tmp_path / "state"}, r2={"budget_class_a_per_month": 4}
    )
    rt = await open_runtime(settings)
    client = R2Client(
        make_config(proxy.url, bucket), on_request=r2_metrics(rt.metrics.registry).on_request
    )
    try:
        replicator = Replicator(rt, client, outbox=Outbox(rt.catalog, FAST), concurrency=2)
        day = time.strftime("%Y-%m-%d", time.gmtime())
        await add_usage(rt.catalog, day, "r2_requests", {"class_a": 1, "class_b": 0})
        for _ in range(5):
            await rt.store.put(os.urandom(30_000))
        assert await replicator.upload_last_copies(30) == 3
        assert proxy.count("PUT") == 3
        assert await replicator.class_a_left() == 0
        assert await replicator.upload_last_copies(30) == 0
        assert proxy.count("PUT") == 3
    finally:
        await client.close()
        await rt.close()


# -- read-through -------------------------------------------------------------------------------


class TestR2Source(SourceConformance):
    @pytest.fixture
    def source_factory(self, moto: MotoServer, bucket: str, client: R2Client) -> SourceFactory:
        async def make(blobs: dict[Cid, bytes], lies: dict[Cid, bytes]) -> R2Source:
            for cid, data in {**blobs, **lies}.items():
                await put_direct(moto, bucket, blob_key(cid), data)
            return R2Source(client, timeout_s=10)

        return make


async def test_hundred_concurrent_misses_make_one_get(
    runtime: Runtime, client: R2Client, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    data = os.urandom(2 * MIB)
    cid = cid_of(data)
    await put_direct(moto, bucket, blob_key(cid), data)
    resolver = Resolver(runtime.store, [R2Source(client, catalog=runtime.catalog)])
    tasks = []
    for _ in range(10):  # spawned in groups: debug mode makes creating 100 tasks at once slow
        tasks += [asyncio.create_task(resolver.ensure_local(cid)) for _ in range(10)]
        await asyncio.sleep(0)
    paths = await asyncio.gather(*tasks)
    assert len(set(paths)) == 1
    assert proxy.count("GET", "/blobs/") == 1
    assert cid_of(await asyncio.to_thread(paths[0].read_bytes)) == cid
    await asyncio.sleep(0.05)
    assert await r2_state(runtime, cid) == "present"


@pytest.mark.parametrize(
    ("fault", "times", "error"),
    [
        (Fault("cut", fraction=0.4), READ_ATTEMPTS, Unavailable),  # every resume cut too
        # self-consistent: only the hash can tell, and wrong bytes are refused, not retried
        (Fault("truncate", fraction=0.9), 1, NotFound),
        (Fault("stall", seconds=2.0), 1, Unavailable),  # a timeout is not retried by the client
        (Fault("slowdown"), READ_ATTEMPTS, Unavailable),
    ],
    ids=["cut", "truncate", "stall", "slowdown"],
)
async def test_read_through_faults_store_nothing(
    runtime: Runtime,
    client: R2Client,
    proxy: FaultProxy,
    moto: MotoServer,
    bucket: str,
    fault: Fault,
    times: int,
    error: type[Exception],
) -> None:
    data = os.urandom(500_000)
    cid = cid_of(data)
    await put_direct(moto, bucket, blob_key(cid), data)
    # retry_s=0: one round, so the failure itself is seen (a failing source is "unavailable",
    # never "missing"); the resolver's retries within a deadline are tested elsewhere
    resolver = Resolver(runtime.store, [R2Source(client, timeout_s=5)], miss_ttl_s=0, retry_s=0)
    proxy.add(method_is("GET", "/blobs/"), fault, times)
    with pytest.raises(error):
        await resolver.ensure_local(cid)
    assert not await runtime.store.has(cid)
    assert (await runtime.store.verify()).ok
    assert proxy.count("GET", "/blobs/") == times
    path = await resolver.ensure_local(cid)  # the fault is gone: the next miss succeeds
    assert await asyncio.to_thread(path.read_bytes) == data


@pytest.mark.parametrize(
    ("fault", "whole"),
    [
        (Fault("slowdown"), True),
        (Fault("status", status=500), True),
        (Fault("drop"), True),  # the connection reset before any answer
        (Fault("cut", fraction=0.4), False),  # resumed with a Range GET
    ],
    ids=["slowdown", "500", "reset", "cut"],
)
async def test_read_through_retries_a_transient_failure_then_streams(
    runtime: Runtime,
    client: R2Client,
    proxy: FaultProxy,
    moto: MotoServer,
    bucket: str,
    fault: Fault,
    whole: bool,
) -> None:
    data = os.urandom(700_000)
    cid = cid_of(data)
    await put_direct(moto, bucket, blob_key(cid), data)
    resolver = Resolver(runtime.store, [R2Source(client, timeout_s=5)], miss_ttl_s=0)
    seen: list[str] = []

    def record(r: ProxyRequest) -> bool:
        seen.append(r.headers.get("range", ""))
        return False

    proxy.add(record, Fault("status"), times=10**6)
    proxy.rules.insert(0, proxy.rules.pop())  # records every request, faults none
    proxy.add(method_is("GET", "/blobs/"), fault)
    s = await resolver.open_stream(cid)
    assert s.chunks is not None
    assert b"".join([c async for c in s.chunks]) == data
    assert await runtime.store.has(cid)
    assert seen[0] == ""
    # Retried whole after a failure before the body; resumed where a cut body stopped.
    assert len(seen) == 2
    if whole:
        assert seen[1] == ""
    else:  # from the last byte handed on (aiohttp drops what it buffered when the cut came)
        assert seen[1] == "" or 0 < int(seen[1].removeprefix("bytes=").rstrip("-")) <= 280_000
