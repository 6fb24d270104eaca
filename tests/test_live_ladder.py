"""The live ABR ladder end to end on a real daemon, every party outside it.

ffmpeg publishes a 640x360 clip over RTMP to a node with a one-rung ladder (180 p): the master
playlist lists the source and the rung with their resolutions; ffprobe sees the rung's size;
``ffmpeg -xerror`` decodes the rung's live playlist; hls.js in Chromium plays the master
playlist, is forced onto the rung and loads its fragments with no fatal error. With a tiny CPU
budget the rung is dropped (the master playlist stops listing it, its playlist is 404) while the
source rendition's playlist keeps advancing and decodes.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.support.browser import Browser, hls_page, player_origin
from tests.support.live_media import make_live_clip
from tests.support.media import ffmpeg_path, ffprobe_json
from tests.support.poll import until
from tests.support.process import PeerdProcess
from tests.test_live import KEY, Node, finish, publish, stopping

pytestmark = pytest.mark.slow

FPS = 25


@asynccontextmanager
async def ladder_node(
    tmp_path: Path, cpu_percent: float, window_s: float = 5.0
) -> AsyncIterator[Node]:
    proc = PeerdProcess(
        tmp_path / "node",
        config={
            "live": {
                "inputs": [{"name": "studio"}],
                "rtmp_listen": "127.0.0.1:0",
                "idle_timeout_s": 3.0,
                "segment_s": 1.0,
                "part_s": 0.5,
                "ladder": [{"height": 180, "bitrate_kbps": 250}],
                "ladder_cpu_percent": cpu_percent,
                "ladder_window_s": window_s,
            },
        },
    )
    await asyncio.to_thread(proc.init)
    (proc.state_dir / "secrets" / "live-studio.key").write_text(KEY + "\n")
    await asyncio.to_thread(proc.start)
    try:
        yield Node(proc)
    finally:
        await asyncio.to_thread(proc.stop)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 s of 640x360 H.264 (a keyframe a second) + AAC."""
    path = tmp_path_factory.mktemp("ladder") / "clip.mp4"
    return make_live_clip(path, seconds=40.0, size=(640, 360), fps=FPS)


def url(node: Node, path: str) -> str:
    return f"{node.base}/live/studio/{path}?token={node.token('live:studio')}"


async def get(u: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(u) as r:
        return r.status, await r.text()


def lists(node: Node, rendition: str) -> Callable[[], object]:
    async def check() -> bool:
        status, text = await get(url(node, "master.m3u8"))
        return status == 200 and f"{rendition}/index.m3u8" in text

    return check


def decoded(u: str, seconds: int = 4) -> Counter[str]:
    """Frames per stream ``ffmpeg -xerror`` decodes from the first ``seconds`` of ``u``."""
    out = subprocess.run(  # noqa: S603
        [ffmpeg_path(), "-hide_banner", "-nostdin", "-xerror", "-i", u, "-t", str(seconds)]
        + ["-map", "0", "-f", "framecrc", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return Counter(line.split(",")[0] for line in out.stdout.splitlines() if line[:1].isdigit())


async def test_a_one_rung_ladder_plays_in_ffmpeg_and_hlsjs(clip: Path, tmp_path: Path) -> None:
    """The master playlist lists the source and the 180 p rung; ffprobe and ffmpeg read the
    rung; hls.js plays the master playlist and, forced onto the rung, loads its fragments."""
    async with ladder_node(tmp_path, cpu_percent=800) as node:
        pub = await publish(node.rtmp(KEY), clip)
        async with stopping(pub):
            await until(lists(node, "r180"), timeout_s=45, step_s=0.3)
            _, metrics = await get(f"{node.base}/metrics")
            assert 'peerd_live_ladder_rungs{input="studio"} 1.0' in metrics, metrics
            status, master = await get(url(node, "master.m3u8"))
            assert status == 200, master
            infs = [ln for ln in master.splitlines() if ln.startswith("#EXT-X-STREAM-INF:")]
            assert len(infs) == 2, master
            assert "RESOLUTION=640x360" in infs[0], master
            assert "RESOLUTION=320x180" in infs[1], master
            assert all(re.search(r'CODECS="avc1\.[0-9a-f]{6},mp4a\.40\.2"', i) for i in infs)
            assert master.splitlines()[-1].startswith("r180/index.m3u8?token="), master
            rung = url(node, "r180/index.m3u8")
            await until(lambda: _ok(rung), timeout_s=30, step_s=0.3)
            probe = await asyncio.to_thread(ffprobe_json, rung, "-show_streams")  # type: ignore[arg-type]
            video = [s for s in probe["streams"] if s["codec_type"] == "video"]
            assert video, probe
            assert (video[0]["width"], video[0]["height"]) == (320, 180), probe
            assert [s["codec_name"] for s in probe["streams"]].count("aac") == 1, probe
            frames = await asyncio.to_thread(decoded, rung)
            assert frames["0"] >= FPS * 3, frames
            assert frames["1"] > 0, frames
            # every rendition cuts its segments at the same media times (keyframes aligned)
            _, source_pl = await get(url(node, "index.m3u8"))
            _, rung_pl = await get(rung)
            src, low = segments(source_pl), segments(rung_pl)
            common = sorted(set(src) & set(low))
            assert len(common) >= 3, (source_pl, rung_pl)
            assert [src[n][1] for n in common] == [low[n][1] for n in common], (source_pl, rung_pl)
            dated = [n for n in common if src[n][0] and low[n][0]]
            assert all(src[n][0] == low[n][0] for n in dated), (source_pl, rung_pl)
            async with (
                Browser.launch(tmp_path / "chromium") as browser,
                player_origin(lambda: hls_page(url(node, "master.m3u8"), "ladder")) as origin,
            ):
                page = await browser.new_page()
                await page.goto(f"{origin}/player.html")
                await page.wait_for("document.getElementById('v').currentTime > 1", timeout_s=30)
                heights = await page.evaluate("hls.levels.map(l => l.height)")
                assert sorted(heights) == [180, 360], heights
                await page.evaluate(
                    "hls.currentLevel = hls.levels.findIndex(l => l.height === 180)"
                )
                await page.wait_for(
                    "window.fragUrls.filter(u => u.includes('/r180/')).length >= 2",
                    timeout_s=30,
                )
                t = await page.evaluate("document.getElementById('v').currentTime")
                await page.wait_for(
                    f"document.getElementById('v').currentTime > {t + 1}", timeout_s=30
                )
                assert (
                    await page.evaluate("window.hlsErrors.filter(e => e.endsWith(':true'))") == []
                )
                assert await page.evaluate("window.mediaErrors") == []
                assert await page.evaluate("hls.levels[hls.currentLevel].height") == 180
            pub.kill()
            await pub.wait()
        # the source rendition stays what it was: index.m3u8, the publisher's own size
        status, text = await get(url(node, "index.m3u8"))
        assert status in (200, 503), text


async def _ok(u: str) -> bool:
    status, _ = await get(u)
    return status == 200


def segments(text: str) -> dict[int, tuple[str, str]]:
    """Media sequence number -> (program date time, duration) of each listed segment."""
    m = re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", text)
    assert m is not None, text
    msn, pdt, out = int(m.group(1)), "", {}
    for line in text.splitlines():
        if line.startswith("#EXT-X-PROGRAM-DATE-TIME:"):
            pdt = line.partition(":")[2]
        elif line.startswith("#EXTINF:"):
            out[msn] = (pdt, line.partition(":")[2])
            msn, pdt = msn + 1, ""
    return out


def _msn(text: str) -> int:
    m = re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", text)
    assert m is not None, text
    segments = sum(1 for ln in text.splitlines() if ln.startswith("#EXTINF"))
    return int(m.group(1)) + segments


async def test_over_the_cpu_budget_the_ladder_goes_and_the_source_plays_on(
    clip: Path, tmp_path: Path
) -> None:
    """A budget no transcode fits: after one budget window the rung is dropped (logged; the
    master playlist stops listing it; its playlist is 404). hls.js, playing the rung then,
    switches to the source rendition and plays on; the source's playlist keeps advancing and
    decodes."""
    async with ladder_node(tmp_path, cpu_percent=0.01, window_s=20) as node:
        pub = await publish(node.rtmp(KEY), clip)
        async with (
            stopping(pub),
            Browser.launch(tmp_path / "chromium") as browser,
            player_origin(lambda: hls_page(url(node, "master.m3u8"), "ladder")) as origin,
        ):
            await until(lists(node, "r180"), timeout_s=45, step_s=0.3)
            page = await browser.new_page()
            await page.goto(f"{origin}/player.html")
            await page.wait_for("document.getElementById('v').currentTime > 0.5", timeout_s=30)
            await page.evaluate("hls.currentLevel = hls.levels.findIndex(l => l.height === 180)")
            await page.wait_for("window.fragUrls.some(u => u.includes('/r180/'))", timeout_s=30)
            await until(
                lambda: "live ladder rung dropped" in node.proc.logs(), timeout_s=60, step_s=0.3
            )
            n = await page.evaluate("window.fragUrls.length")
            await page.wait_for(
                f"window.fragUrls.slice({n}).some(u => !u.includes('/r180/'))", timeout_s=30
            )
            t = await page.evaluate("document.getElementById('v').currentTime")
            await page.wait_for(f"document.getElementById('v').currentTime > {t + 2}", timeout_s=30)
            assert await page.evaluate("window.hlsErrors.filter(e => e.endsWith(':true'))") == []
            assert await page.evaluate("window.mediaErrors") == []
            status, master = await get(url(node, "master.m3u8"))
            assert status == 200, master
            assert "r180" not in master, master
            assert master.count("#EXT-X-STREAM-INF:") == 1, master
            status, _ = await get(url(node, "r180/index.m3u8"))
            assert status == 404
            status, metrics = await get(f"{node.base}/metrics")
            assert "peerd_live_ladder_dropped_total 1.0" in metrics, metrics
            assert 'peerd_live_ladder_rungs{input="studio"} 0.0' in metrics, metrics
            status, text = await get(url(node, "index.m3u8"))
            assert status == 200, text
            first = _msn(text)

            async def advanced() -> bool:
                status, text = await get(url(node, "index.m3u8"))
                return status == 200 and _msn(text) >= first + 2

            await until(advanced, timeout_s=30, step_s=0.3)
            frames = await asyncio.to_thread(decoded, url(node, "index.m3u8"), 3)
            assert frames["0"] >= FPS * 2, frames
            rc, err = await finish(pub, timeout_s=120)
            assert rc == 0, err
