"""A real daemon against the fake coordinator on loopback: registration, signed heartbeats,
replays refused, backoff while the coordinator is down, re-registration, drain notice on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from peerd.config import load_settings
from peerd.core import tokens
from peerd.core.inventory import digest_of
from peerd.core.signed import PEER_HEADER, SIGNATURE_HEADER, b64url, encode_body
from peerd.identity import load_pem
from peerd.runtime import open_runtime
from tests.support.coordinator import FakeCoordinator, NodeApiClient
from tests.support.inventory import seed_media
from tests.support.process import PeerdProcess


@pytest.fixture(autouse=True)
def _quiet_gc() -> None:
    """Keep full collections of import-time objects out of the test's event loop."""
    gc.collect()
    gc.freeze()


@pytest.fixture
async def coordinator() -> AsyncIterator[FakeCoordinator]:
    fake = FakeCoordinator()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


async def _seed(state_dir: Path) -> set[tuple[str, str]]:
    rt = await open_runtime(load_settings(None, node={"state_dir": state_dir}))
    try:
        m = await seed_media(rt, "x", segments=2)
    finally:
        await rt.close()
    return {("blob", c) for c in m.blobs} | {("media", m.media_id)}


async def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/v1/nodes/heartbeat", data=body, headers=headers) as r,
    ):
        return r.status


async def test_node_registers_heartbeats_backs_off_and_drains(
    tmp_path: Path, coordinator: FakeCoordinator
) -> None:
    fake = coordinator
    node = PeerdProcess(
        tmp_path / "node",
        config={
            "node": {"public_url": "https://media.example.net"},
            "coordinator": {
                "url": fake.url,
                "heartbeat_interval_s": 1.0,
                "backoff_initial_s": 0.2,
                "backoff_max_s": 0.8,
            },
            "api": {"uplink_bps": 2_000_000},
        },
    )
    await asyncio.to_thread(node.init)
    entries = await _seed(node.state_dir)
    await asyncio.to_thread(node.start)
    token = (node.state_dir / "secrets" / "api_token").read_text().strip()
    api = NodeApiClient(node.base_url, token)
    try:
        # Registration, then heartbeats, each with a valid signature (the fake verified it).
        await fake.wait_for(lambda: len(fake.of_kind("heartbeat")) >= 2)
        info = (await api.call("GET", "/api/v1/node")).body
        reg = fake.of_kind("register")[0].payload
        assert reg["peer_id"] == info["peer_id"]
        assert reg["public_url"] == "https://media.example.net"
        assert reg["capacity"]["uplink_bps"] == 2_000_000
        assert reg["inventory"]["digest"] == digest_of(entries)
        inv = (await api.call("GET", "/api/v1/inventory")).body
        assert inv["summary"] == reg["inventory"]
        assert not fake.refused

        # Replays and forgeries are refused by the coordinator.
        body, headers = fake.raw[-1]
        sig_headers = {k: headers[k] for k in (PEER_HEADER, SIGNATURE_HEADER)}
        assert await _post(fake.url, body, sig_headers) == 401
        assert "replay" in fake.refused[-1].reason
        tampered = body.replace(b'"draining":false', b'"draining":true')
        assert tampered != body
        assert await _post(fake.url, tampered, sig_headers) == 401
        assert "does not verify" in fake.refused[-1].reason
        key = load_pem((node.state_dir / "node.key").read_bytes(), node.state_dir / "node.key")
        stale = json.loads(body)
        stale.update(timestamp=time.time() - 300, nonce="ab" * 16)
        stale_body = encode_body(stale)
        stale_headers = {PEER_HEADER: key.peer_id, SIGNATURE_HEADER: b64url(key.sign(stale_body))}
        assert await _post(fake.url, stale_body, stale_headers) == 401
        assert "old" in fake.refused[-1].reason
        fake.refused.clear()

        # Coordinator down: the node backs off and keeps serving.
        fake.down = True
        t0 = time.monotonic()
        await fake.wait_for(lambda: len(fake.refused) >= 3)
        for _ in range(5):
            assert (await api.call("GET", "/api/v1/health")).status == 200
        await asyncio.sleep(1.0)
        elapsed = time.monotonic() - t0
        # Without backoff a failing client would retry in a tight loop; with 0.2..0.8 s
        # delays (half to full) it makes at most about elapsed/0.1 attempts.
        assert len(fake.refused) <= elapsed / 0.1 + 2
        fake.down = False
        beats = len(fake.of_kind("heartbeat"))
        await fake.wait_for(lambda: len(fake.of_kind("heartbeat")) > beats)

        # A coordinator that lost the node gets a new registration.
        fake.forget(info["peer_id"])
        registrations = len(fake.of_kind("register"))
        await fake.wait_for(lambda: len(fake.of_kind("register")) > registrations)
    finally:
        await api.close()
        code = await asyncio.to_thread(node.stop)
    assert code == 0
    drain = fake.of_kind("drain")
    assert len(drain) == 1
    assert drain[0].payload["draining"] is True
    assert drain[0].payload["drain_deadline_s"] > 0
    # Only refusals the test provoked: 503 while down, one 404 after the coordinator forgot us.
    assert [r.status for r in fake.refused if r.status != 503] == [404]


async def test_a_reply_not_understood_is_logged_once(
    tmp_path: Path, coordinator: FakeCoordinator
) -> None:
    """A coordinator that answers every heartbeat in a shape the node cannot read (here an
    interval below the contract's 5 s) gets one warning naming the problem, not one a beat."""
    coordinator.heartbeat_interval_s = 1.0
    node = PeerdProcess(
        tmp_path / "node",
        config={"coordinator": {"url": coordinator.url, "heartbeat_interval_s": 1.0}},
    )
    await asyncio.to_thread(node.start)
    try:
        await coordinator.wait_for(lambda: len(coordinator.of_kind("heartbeat")) >= 4)
    finally:
        assert await asyncio.to_thread(node.stop) == 0
    lines = [json.loads(x) for x in node.logs().splitlines() if "not understood" in x]
    warned = [x for x in lines if x["level"] == "warning"]
    assert [x["kind"] for x in warned] == ["register", "heartbeat", "drain"]  # once per kind
    assert "heartbeat_interval_s" in warned[-1]["problems"]
    assert len(lines) >= 4  # the later ones at debug


async def test_heartbeat_carries_viewer_swarm_bytes(
    tmp_path: Path, coordinator: FakeCoordinator
) -> None:
    """Bytes the players report (the swarm beacon) reach the coordinator in the heartbeat."""
    fake = coordinator
    node = PeerdProcess(
        tmp_path / "node",
        config={"coordinator": {"url": fake.url, "heartbeat_interval_s": 1.0}},
    )
    await asyncio.to_thread(node.start)
    try:
        media = "b" + "m" * 58
        key = (node.state_dir / "secrets" / "hls_signing_key").read_text().strip().encode()
        tok = tokens.mint(key, media, "hls", int(time.time()) + 600)
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{node.base_url}/swarm/{media}/report?token={tok}",
                data=b'{"peer": 700000, "http": 300000}',
            ) as r,
        ):
            assert r.status == 204
        await fake.wait_for(
            lambda: any(
                h.payload["load"]["swarm_peer_bytes"] == 700000 for h in fake.of_kind("heartbeat")
            )
        )
        beat = [h for h in fake.of_kind("heartbeat") if h.payload["load"]["swarm_peer_bytes"]]
        assert beat[-1].payload["load"]["swarm_http_bytes"] == 300000
    finally:
        assert await asyncio.to_thread(node.stop) == 0
