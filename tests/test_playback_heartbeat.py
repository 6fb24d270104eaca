"""A burst of playback failures reaches the coordinator: a real daemon gets failing sessions
from players' beacons (the swarm player reports a fatal error before playing), raises one
anomaly, logs it once, and the next heartbeat carries it in its optional ``anomalies`` field,
validated against the OpenAPI document by the fake coordinator; reports without anomalies
leave the field out."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from peerd.core import tokens
from tests.support.coordinator import FakeCoordinator
from tests.support.process import PeerdProcess

MEDIA = "b" + "q" * 58


@pytest.fixture
async def coordinator() -> AsyncIterator[FakeCoordinator]:
    fake = FakeCoordinator()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


async def test_a_burst_of_failures_goes_out_with_the_heartbeat(
    tmp_path: Path, coordinator: FakeCoordinator
) -> None:
    fake = coordinator
    node = PeerdProcess(
        tmp_path / "node",
        config={
            "coordinator": {"url": fake.url, "heartbeat_interval_s": 1.0},
            "analytics": {"anomaly_window_s": 2.0, "anomaly_min_sessions": 3},
        },
    )
    await asyncio.to_thread(node.start)
    try:
        await fake.wait_for(lambda: len(fake.of_kind("heartbeat")) >= 1)
        assert all("anomalies" not in h.payload for h in fake.reports)
        key = (node.state_dir / "secrets" / "hls_signing_key").read_text().strip().encode()
        async with aiohttp.ClientSession() as s:
            for i in range(4):  # four viewers (tokens), each a session that gave up
                tok = tokens.mint(key, MEDIA, "hls", int(time.time()) + 600 + i)
                body = {
                    "peer": 0, "http": 0, "sid": f"s{i}", "codec": "hvc1.1.6.L93.B0",
                    "startup_ms": None, "stalls": 0, "failed": True,
                }  # fmt: skip
                url = f"{node.base_url}/swarm/{MEDIA}/report?token={tok}"
                async with s.post(url, data=json.dumps(body).encode()) as r:
                    assert r.status == 204
        await fake.wait_for(
            lambda: any(h.payload.get("anomalies") for h in fake.of_kind("heartbeat")), 30
        )
        (beat,) = [h for h in fake.of_kind("heartbeat") if h.payload.get("anomalies")]
        (anomaly,) = beat.payload["anomalies"]
        assert (anomaly["kind"], anomaly["codec"], anomaly["sessions"]) == ("failure", "hvc1", 4)
        assert anomaly["observed"] == 1.0
        assert anomaly["z"] >= 3
        assert "failure rate 1.00 over 4 sessions of codec hvc1" in anomaly["explained"]
        # Each anomaly goes out once: later heartbeats carry none.
        n = len(fake.of_kind("heartbeat"))
        await fake.wait_for(lambda: len(fake.of_kind("heartbeat")) >= n + 2)
        later = fake.of_kind("heartbeat")[n:]
        assert all("anomalies" not in h.payload for h in later)
    finally:
        assert await asyncio.to_thread(node.stop) == 0
    assert node.logs().count('"playback anomaly"') == 1
