"""WHEP under the uplink budget, end to end: real daemons, aiortc viewers in their own processes.

What WHEP sends is counted into the node's uplink meter; with a budget smaller than one session's
stream, the first viewer is admitted and keeps receiving frames while a second one is refused
with 503 and ``Retry-After``; with no budget both are admitted.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from peerd.config import load_settings
from peerd.runtime import open_runtime
from tests.support.poll import until
from tests.support.process import PeerdProcess
from tests.support.whep_media import add_media, make_hls, sign_viewers, whep_url
from tests.support.whep_viewer import ViewerProcess

# 50 kbit/s: one looping 320x240 stream with sound sends more than that.
BUDGET_MBPS = 0.05
BUDGET_BPS = BUDGET_MBPS * 1e6 / 8


def metric(node: PeerdProcess, name: str) -> float:
    with urllib.request.urlopen(node.base_url + "/metrics", timeout=5) as r:  # noqa: S310
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def start_node(tmp: Path, budget_mbps: float) -> tuple[PeerdProcess, str]:
    clip = await asyncio.to_thread(make_hls, tmp / "clip", seconds=3, bframes=0, segment_seconds=1)
    state = tmp / "node"
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        media = await add_media(rt, clip, title="uplink")
    finally:
        await rt.close()
    sign_viewers(state)
    config: dict[str, Any] = {
        "webrtc": {"loop_playback": True, "connect_timeout_s": 10},
        # stream_mbps 0: what a session costs is what the meter measured, so the second offer
        # is refused only if the first session's bytes were counted.
        "uplink": {"budget_mbps": budget_mbps, "stream_mbps": 0, "retry_after_s": 7},
    }
    node = PeerdProcess(state, config=config)
    await asyncio.to_thread(node.start)
    return node, whep_url(node.base_url, media)


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[PeerdProcess]]:
    started: list[PeerdProcess] = []
    try:
        yield started
    finally:
        for node in started:
            assert await asyncio.to_thread(node.stop) == 0, node.logs()[-3000:]


async def frames_grow(viewer: ViewerProcess, by: int = 25) -> None:
    """The viewer decodes ``by`` more video frames (about a second of the clip)."""
    start = (await viewer.stats())["video"]

    async def grew() -> bool:
        return bool((await viewer.stats())["video"] >= start + by)

    await until(grew, timeout_s=30, step_s=0.2)


async def test_whep_counts_its_bytes_and_is_refused_over_the_budget(
    tmp_path: Path, nodes: list[PeerdProcess]
) -> None:
    node, url = await start_node(tmp_path, BUDGET_MBPS)
    nodes.append(node)
    first = await ViewerProcess.start(url)
    second: ViewerProcess | None = None
    try:
        assert first.status == 201, first.sdp
        await frames_grow(first)
        # What the session sends is counted: the node's send rate passes the budget (no HLS,
        # no peers: WHEP is the only thing it sends).
        await until(
            lambda: asyncio.to_thread(
                lambda: metric(node, "peerd_uplink_send_bytes_per_second") > BUDGET_BPS
            ),
            timeout_s=30,
            step_s=0.2,
        )
        second = await ViewerProcess.start(url)
        assert second.status == 503, second.sdp
        assert second.retry_after == "7"
        assert metric(node, 'peerd_whep_rejected_total{reason="uplink"}') == 1
        assert metric(node, 'peerd_uplink_overflow_total{answer="refused"}') == 1
        assert metric(node, "peerd_whep_sessions") == 1
        # The admitted session is never cut, over budget as it is.
        await frames_grow(first)
        await frames_grow(first)
        assert (await first.stats())["state"] == "connected"
    finally:
        await first.close()
        if second is not None:
            await second.close()


async def test_without_a_budget_every_whep_session_is_admitted(
    tmp_path: Path, nodes: list[PeerdProcess]
) -> None:
    node, url = await start_node(tmp_path, 0)
    nodes.append(node)
    first = await ViewerProcess.start(url)
    second: ViewerProcess | None = None
    try:
        assert first.status == 201, first.sdp
        await frames_grow(first)
        second = await ViewerProcess.start(url)
        assert second.status == 201, second.sdp
        await frames_grow(second)
        await frames_grow(first)
        # Counted all the same (the meter runs with admission off).
        assert metric(node, "peerd_uplink_send_bytes_per_second") > 0
        assert metric(node, 'peerd_whep_rejected_total{reason="uplink"}') == 0
    finally:
        await first.close()
        if second is not None:
            await second.close()
