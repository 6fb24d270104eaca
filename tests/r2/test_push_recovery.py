"""``peerd replicate push`` and a draining daemon recover from kills, outages and faults, driven
as a user would: real ``peerd`` processes against a moto server behind the fault proxy, the bucket
checked directly with boto3.

- a SIGKILLed push does not block the next one for ``job_lease_s`` (left at its 300 s default);
  a push that waits for a live process says which one;
- a fault run (dropped, failed and cut multipart requests, a SIGKILL mid multipart) followed by a
  push leaves no open multipart upload;
- jobs that gave up under an outage are retried by the next push, whose exit code and byte count
  tell the current state;
- SIGTERM hands off blobs and then the manifest, so a fresh node pulls the media from the bucket.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from peerd.config import load_settings
from peerd.core.ids import cid_of
from peerd.replication.r2 import blob_key, manifest_key
from peerd.runtime import open_runtime
from tests.r2.test_r2_crash import node_env, rows, seed
from tests.r2.test_replication import make_media
from tests.support.faultproxy import Fault, FaultProxy, ProxyRequest
from tests.support.poll import until
from tests.support.process import PeerdProcess, peerd_env, run_cli
from tests.support.s3server import MotoServer

MIB = 1024 * 1024
PUSH = ("replicate", "push", "--no-progress")


def default_lease_env(url: str, bucket: str, state: Path, **extra: str) -> dict[str, str]:
    """:func:`node_env` with ``job_lease_s`` at its default (300 s)."""
    env = node_env(url, bucket, state, **extra)
    del env["PEERD_R2__JOB_LEASE_S"]
    return env


def start_push(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "peerd", *PUSH],
        env=peerd_env(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


async def assert_all_in_bucket(state: Path, moto: MotoServer, bucket: str) -> None:
    """Every blob and manifest of the node is in the bucket, its bytes hashing to its id."""
    objects = await asyncio.to_thread(moto.objects, bucket)
    blobs = await rows(state, "SELECT cid, r2_state FROM blobs")
    assert blobs
    for cid, r2 in blobs:
        assert r2 == "present"
        assert cid_of(objects[blob_key(str(cid))]) == cid
    media = await rows(state, "SELECT media_id, r2_state FROM media")
    assert media
    for mid, r2 in media:
        assert r2 == "present"
        assert cid_of(objects[manifest_key(str(mid))]) == mid


def open_uploads(moto: MotoServer, bucket: str) -> list[dict[str, Any]]:
    answer = moto.client().list_multipart_uploads(Bucket=bucket)
    return list(answer.get("Uploads", []))


@pytest.mark.timeout(300)
async def test_killed_push_does_not_block_the_next(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    state = tmp_path / "a"
    await seed(state)
    proxy.latency_s = 0.3  # a slow bucket: the push is well under way when it is killed
    env = default_lease_env(proxy.url, bucket, state)
    proc = await asyncio.to_thread(start_push, env)
    try:
        await until(lambda: proxy.count("PUT", "/blobs/") >= 3, timeout_s=90, step_s=0.02)
    finally:
        await asyncio.to_thread(kill, proc)
    held = await rows(state, "SELECT COUNT(*) FROM replication_jobs WHERE state='running'")
    assert held[0][0], "the kill should leave leased jobs behind"

    # Before the fix this waited out the 300 s leases (the timeout is an upper bound for that
    # hang, not a speed figure).
    started = time.monotonic()
    done = await asyncio.to_thread(run_cli, *PUSH, env=env, timeout=150)
    print(f"push after a SIGKILLed push: {time.monotonic() - started:.1f} s (job_lease_s 300)")
    assert done.returncode == 0, done.stdout + done.stderr
    await assert_all_in_bucket(state, moto, bucket)


@pytest.mark.timeout(300)
async def test_waiting_push_names_the_process_holding_jobs(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    state = tmp_path / "a"
    settings = load_settings(None, node={"state_dir": state})
    rt = await open_runtime(settings)
    try:
        for _ in range(3):
            await make_media(rt, n=4, size=100_000)
    finally:
        await rt.close()
    # The first push reaches the bucket through a link where its uploads hang: it lives, and
    # holds its jobs, but gets nowhere.
    stuck = await FaultProxy("127.0.0.1", moto.port).start()
    stuck.add(lambda r: r.method == "PUT", Fault("stall", seconds=600), times=10**9)
    first = await asyncio.to_thread(
        start_push,
        default_lease_env(stuck.url, bucket, state, PEERD_R2__READ_TIMEOUT_S="600"),
    )
    second: asyncio.subprocess.Process | None = None
    try:
        await until(lambda: stuck.count("PUT", "/blobs/") >= 1, timeout_s=90, step_s=0.01)
        second = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "peerd",
            *PUSH,
            env=peerd_env(default_lease_env(proxy.url, bucket, state)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert second.stderr is not None
        seen = []
        async with asyncio.timeout(120):
            while True:
                line = (await second.stderr.readline()).decode()
                assert line, "the second push ended without saying what it waited for:\n" + (
                    "".join(seen)
                )
                seen.append(line)
                if f"held by process {first.pid}" in line:
                    break
        assert "waiting for" in line, line
        assert "leased until" in line, line
        status = await asyncio.to_thread(
            run_cli,
            "replicate",
            "status",
            "--json",
            env=default_lease_env(proxy.url, bucket, state),
        )
        assert first.pid in [lease["pid"] for lease in json.loads(status.stdout)["leases"]]
        # Once the holder is gone, its jobs are taken over at once.
        await asyncio.to_thread(kill, first)
        async with asyncio.timeout(120):
            out, err = await second.communicate()
        assert second.returncode == 0, (out + err).decode()
    finally:
        if first.poll() is None:
            await asyncio.to_thread(kill, first)
        if second is not None and second.returncode is None:
            second.kill()
            await second.wait()
        await stuck.stop()
    await assert_all_in_bucket(state, moto, bucket)


def multipart_create(r: ProxyRequest) -> bool:
    return r.method == "POST" and "uploads" in r.path and "uploadId" not in r.path


def part_put(r: ProxyRequest) -> bool:
    return r.method == "PUT" and "partNumber" in r.path


def abort(r: ProxyRequest) -> bool:
    return r.method == "DELETE" and "uploadId" in r.path


async def add_big_blobs(state: Path, n: int) -> None:
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        for _ in range(n):
            await rt.store.put(os.urandom(6 * MIB + 7))
    finally:
        await rt.close()


@pytest.mark.timeout(400)
async def test_fault_run_leaves_no_open_multipart_upload(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    state = tmp_path / "a"
    await seed(state)
    await add_big_blobs(state, 2)
    env = node_env(proxy.url, bucket, state, PEERD_R2__MAX_ATTEMPTS="3")
    # Lost CreateMultipartUpload answers (the upload exists, its id is unknown), failed and cut
    # parts, and aborts that fail.
    proxy.add(multipart_create, Fault("drop"), times=2)
    proxy.add(part_put, Fault("status", status=503), times=3)
    proxy.add(part_put, Fault("cut_request"), times=1)
    proxy.add(abort, Fault("status", status=503), times=4)
    await asyncio.to_thread(run_cli, *PUSH, env=env, timeout=150)
    assert proxy.count("POST", "uploads") >= 3

    # A push killed in the middle of a multipart upload.
    proxy.rules.clear()
    await add_big_blobs(state, 2)
    proxy.latency_s = 0.2
    parts_before = proxy.count("PUT", "partNumber")
    proc = await asyncio.to_thread(start_push, env)
    try:
        await until(
            lambda: proxy.count("PUT", "partNumber") > parts_before, timeout_s=90, step_s=0.01
        )
    finally:
        await asyncio.to_thread(kill, proc)

    proxy.latency_s = 0.0
    done = await asyncio.to_thread(run_cli, *PUSH, env=env, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    assert await asyncio.to_thread(open_uploads, moto, bucket) == []
    await assert_all_in_bucket(state, moto, bucket)


@pytest.mark.timeout(300)
async def test_push_after_an_outage_retries_failed_jobs(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    state = tmp_path / "a"
    await seed(state)
    env = node_env(proxy.url, bucket, state, PEERD_R2__MAX_ATTEMPTS="2")
    proxy.add(lambda r: r.method == "PUT", Fault("status", status=503), times=10**9)
    outage = await asyncio.to_thread(run_cli, *PUSH, env=env, timeout=150)
    assert outage.returncode == 1, outage.stdout + outage.stderr
    failed = await rows(state, "SELECT COUNT(*) FROM replication_jobs WHERE state='failed'")
    assert failed[0][0]

    proxy.rules.clear()
    done = await asyncio.to_thread(run_cli, *PUSH, env=env, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    total = (await rows(state, "SELECT SUM(size) FROM blobs"))[0][0]
    assert f"pushed {total} bytes" in done.stdout, done.stdout
    await assert_all_in_bucket(state, moto, bucket)

    again = await asyncio.to_thread(run_cli, *PUSH, env=env, timeout=150)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "pushed 0 bytes" in again.stdout, again.stdout


@pytest.mark.timeout(300)
async def test_push_exit_code_and_bytes_tell_the_current_state(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    state = tmp_path / "a"
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        sizes = [
            len(await rt.store.read(await rt.store.put(os.urandom(n)))) for n in (1000, 70_000)
        ]
    finally:
        await rt.close()
    env = node_env(proxy.url, bucket, state, PEERD_R2__MAX_ATTEMPTS="1")
    proxy.add(lambda r: r.method == "PUT", Fault("status", status=503), times=10**9)
    outage = await asyncio.to_thread(run_cli, *PUSH, env=env, timeout=150)
    assert outage.returncode == 1, outage.stdout + outage.stderr
    assert "pushed 0 bytes" in outage.stdout, outage.stdout

    proxy.rules.clear()
    done = await asyncio.to_thread(run_cli, *PUSH, env=env, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"pushed {sum(sizes)} bytes" in done.stdout, done.stdout
    objects = await asyncio.to_thread(moto.objects, bucket)
    assert sorted(len(v) for v in objects.values()) == sorted(sizes)


@pytest.mark.timeout(300)
async def test_sigterm_hands_off_blobs_then_manifest(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    state = tmp_path / "a"
    settings = load_settings(None, node={"state_dir": state})
    rt = await open_runtime(settings)
    try:
        media_id, cids = await make_media(rt, n=5, size=200_000)
    finally:
        await rt.close()
    env = node_env(moto.url, bucket, state)
    node = PeerdProcess(
        state,
        config={"r2": {"tiering_interval_s": 3600.0}, "coordinator": {"drain_budget_s": 30.0}},
        env=env,
    )
    await asyncio.to_thread(node.start)
    try:
        # Nothing is pushed while the node runs: only the drain hands the media off.
        assert await asyncio.to_thread(moto.objects, bucket) == {}
    finally:
        code = await asyncio.to_thread(node.stop, signal.SIGTERM, 60)
    assert code == 0, node.logs()[-3000:]
    objects = await asyncio.to_thread(moto.objects, bucket)
    for cid in cids:
        assert cid_of(objects[blob_key(cid)]) == cid
    assert cid_of(objects[manifest_key(media_id)]) == media_id

    fresh = tmp_path / "b"
    env_b = node_env(moto.url, bucket, fresh)
    pulled = await asyncio.to_thread(
        run_cli, "replicate", "pull", "--no-progress", media_id, env=env_b, timeout=120
    )
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    held = await rows(fresh, "SELECT cid FROM blobs WHERE local_state='present'")
    assert {str(c) for (c,) in held} >= set(cids)
    verified = await asyncio.to_thread(run_cli, "verify", env=env_b, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_list_and_abort_uploads_under_a_prefix(
    client: Any, moto: MotoServer, bucket: str
) -> None:
    s3 = moto.client()

    def create(key: str) -> str:
        return str(s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"])

    ours = [await asyncio.to_thread(create, f"blobs/k{i}") for i in range(3)]
    other = await asyncio.to_thread(create, "elsewhere/k")
    listed = await client.list_uploads("blobs/")
    assert sorted(u.upload_id for u in listed) == sorted(ours)
    assert all(u.key.startswith("blobs/") and u.initiated > 0 for u in listed)
    client._live.add(ours[0])  # in progress in this process: never swept
    assert await client.abort_uploads(listed) == 2
    left = {u["UploadId"] for u in await asyncio.to_thread(open_uploads, moto, bucket)}
    assert left == {ours[0], other}
