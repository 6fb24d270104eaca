"""SIGKILL at random moments during push, pull and eviction (real ``peerd replicate`` processes
against a moto server); after restarts everything converges and nothing is lost."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peerd.config import load_settings
from peerd.core.ids import cid_of
from peerd.replication.r2 import blob_key, manifest_key
from peerd.runtime import open_runtime
from tests.r2.test_replication import make_media
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.process import peerd_env, run_cli
from tests.support.s3server import ACCESS_KEY, SECRET_KEY, MotoServer

MIB = 1024 * 1024


def node_env(url: str, bucket: str, state: Path, **extra: str) -> dict[str, str]:
    secrets = state / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    (secrets / "r2_access_key_id").write_text(ACCESS_KEY)
    (secrets / "r2_secret_access_key").write_text(SECRET_KEY)
    env = {
        "PEERD_NODE__STATE_DIR": str(state),
        "PEERD_R2__ENDPOINT": url,
        "PEERD_R2__BUCKET": bucket,
        "PEERD_R2__JOB_LEASE_S": "1.0",
        "PEERD_R2__RETRY_BASE_S": "0.05",
        "PEERD_R2__RETRY_MAX_S": "0.2",
        "PEERD_R2__PART_SIZE_BYTES": str(5 * MIB),
        "PEERD_R2__MULTIPART_THRESHOLD_BYTES": str(5 * MIB),
        "PEERD_R2__MAX_CONCURRENCY": "4",
    }
    env.update(extra)
    return env


def kill_loop(args: list[str], env: dict[str, str], rng: random.Random, kills: int) -> int:
    """Run ``peerd ARGS`` ``kills`` times, SIGKILLing each at a random moment; then to the end.

    The moments are aimed past the interpreter's start-up (measured with ``replicate status``,
    which imports the same modules), so they land while the work is under way.
    """
    started = time.monotonic()
    run_cli("replicate", "status", env=env, timeout=60)
    startup = time.monotonic() - started
    killed = 0
    for _ in range(kills):
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "peerd", *args],
            env=peerd_env(env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=startup + rng.uniform(0.0, 1.2))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += 1
    done = run_cli(*args, env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return killed


async def seed(state: Path) -> list[str]:
    settings = load_settings(None, node={"state_dir": state})
    rt = await open_runtime(settings)
    try:
        media = []
        for _ in range(3):
            mid, _ = await make_media(rt, n=6, size=150_000)
            media.append(mid)
        await rt.store.put(os.urandom(6 * MIB + 5))  # one multipart blob
        return media
    finally:
        await rt.close()


async def rows(state: Path, sql: str) -> list[tuple[object, ...]]:
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        async with rt.catalog.conn.execute(sql) as cur:
            return [tuple(r) for r in await cur.fetchall()]
    finally:
        await rt.close()


# Tens of seconds on a quiet machine; CI machines may be several times slower.
@pytest.mark.timeout(400)
async def test_sigkill_during_push_pull_and_eviction(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    rng = random.Random(int(os.environ.get("PEERD_CRASH_SEED", str(time.time_ns()))))
    a, b = tmp_path / "a", tmp_path / "b"
    media = await seed(a)
    # Every request takes 150 ms more, so the work spans the moments the kills are aimed at.
    proxy.add(lambda r: True, Fault("delay", seconds=0.15), times=10**9)
    env_a = node_env(proxy.url, bucket, a)

    # -- push ------------------------------------------------------------------------------------
    killed = await asyncio.to_thread(
        kill_loop, ["replicate", "push", "--no-progress"], env_a, rng, 5
    )
    assert killed >= 1
    objects = await asyncio.to_thread(moto.objects, bucket)
    blobs = await rows(a, "SELECT cid, r2_state, local_state FROM blobs")
    assert blobs
    for cid, r2, local in blobs:
        assert (r2, local) == ("present", "present")
        assert cid_of(objects[blob_key(str(cid))]) == cid
    for mid in media:
        assert cid_of(objects[manifest_key(mid)]) == mid
    assert await rows(a, "SELECT id FROM replication_jobs WHERE state != 'done'") == []

    # -- pull into another node --------------------------------------------------------------------
    env_b = node_env(proxy.url, bucket, b)
    killed_pull = await asyncio.to_thread(
        kill_loop, ["replicate", "pull", "--no-progress", *media], env_b, rng, 4
    )
    repaired = await asyncio.to_thread(run_cli, "verify", "--repair", env=env_b)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    got = {str(c) for (c,) in await rows(b, "SELECT cid FROM blobs WHERE local_state='present'")}
    big = {str(c) for c, _, _ in blobs if len(objects[blob_key(str(c))]) > 5 * MIB}
    assert got == {str(c) for c, _, _ in blobs} - big  # every blob of the three media
    assert {str(m) for (m,) in await rows(b, "SELECT media_id FROM media")} == set(media)

    # -- eviction under a small quota --------------------------------------------------------------
    used = sum(len(objects[blob_key(str(c))]) for c, _, _ in blobs)
    env_evict = dict(env_a, PEERD_STORE__QUOTA_BYTES=str(used // 3))
    killed_evict = await asyncio.to_thread(kill_loop, ["replicate", "evict"], env_evict, rng, 4)
    print(f"SIGKILLs: push {killed}, pull {killed_pull}, evict {killed_evict}")
    repaired = await asyncio.to_thread(run_cli, "verify", "--repair", env=env_evict)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    final = await rows(a, "SELECT cid, size, local_state, r2_state FROM blobs")
    held = sum(int(size) for _, size, local, _ in final if local == "present")  # type: ignore[call-overload]
    assert held <= used // 3
    objects = await asyncio.to_thread(moto.objects, bucket)
    for cid, _size, local, r2 in final:
        if local != "present":
            # Nothing lost: every evicted blob is whole in R2.
            assert r2 == "present"
            assert cid_of(objects[blob_key(str(cid))]) == cid
