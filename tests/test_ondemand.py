"""On-demand ladder rungs, produced when a viewer first asks for them (peerd.media.ondemand).

From outside, as players do: ffmpeg with ``-xerror`` opens the master of a real daemon and decodes
the on-demand variant; hls.js in Chromium pinned to that level plays it to the end; concurrent
requests for one unproduced segment make one transcode and get the same bytes; a viewer playing
in order finds the next segments made before it asks. In process (to hold the transcode slot
instead of racing a clock): a production slower than the request timeout answers 503 with
``Retry-After`` and later 200; unknown segments 404, a missing source 503, a failing transcode
500 with its log line, none of them a hang.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from peerd.config import load_settings
from peerd.core import tokens
from peerd.core.ids import Cid
from peerd.delivery import Resolver
from peerd.http import hls
from peerd.http.server import Listener, build_app, listen, runner_for
from peerd.media import transcode
from peerd.media.ingest import Ingestor, node_ingestor
from peerd.media.ondemand import OnDemand
from peerd.media.source import TranscodeSource
from peerd.runtime import Runtime, open_runtime
from tests.support.browser import Browser, player_origin
from tests.support.media import ffmpeg_path, make_media
from tests.support.poll import until
from tests.support.process import PeerdProcess, run_cli

SECONDS = 6.0
RATE = 30
LADDER = [{"height": 120, "on_demand": True}]
RUNG = "v120"  # the on-demand rendition of a 320x240 source
SEGMENT_S = 1.0  # the daemon's: six segments


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_media(
        tmp_path_factory.mktemp("media") / "clip.mp4", seconds=SECONDS, size=(320, 240), rate=RATE
    )


@dataclass
class Daemon:
    """A real daemon holding the clip, with a signed URL maker for it."""

    proc: PeerdProcess
    media_id: str
    key: bytes

    def url(self, path: str) -> str:
        token = tokens.mint(self.key, self.media_id, "hls", int(time.time()) + 600)
        return f"{self.proc.base_url}/hls/{self.media_id}/{path}?token={token}"

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.proc.base_url + "/metrics", timeout=10) as r:  # noqa: S310
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("peerd_media_on_demand") and "_created" not in line:
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


@pytest.fixture
def daemon(tmp_path: Path, clip: Path) -> Iterator[Daemon]:
    config = {
        "webrtc": {"enabled": False},
        "media": {"segment_seconds": SEGMENT_S, "ladder": LADDER, "on_demand_ahead": 2},
    }
    proc = PeerdProcess(tmp_path / "node", config=config)
    proc.start()
    try:
        out = run_cli(
            "-c", str(proc.state_dir / "test.toml"), "ingest", "--no-progress", "--json", str(clip)
        )
        assert out.returncode == 0, out.stderr
        key = (proc.state_dir / "secrets" / "hls_signing_key").read_text().strip().encode()
        yield Daemon(proc, json.loads(out.stdout)["media_id"], key)
    finally:
        assert proc.stop() == 0, proc.logs()[-3000:]


def _get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_ffmpeg_decodes_the_on_demand_variant_of_the_master(daemon: Daemon) -> None:
    master = _get(daemon.url("master.m3u8"))[1].decode()
    assert f"{RUNG}.m3u8" in master
    out = subprocess.run(  # noqa: S603
        [ffmpeg_path(), "-hide_banner", "-nostdin", "-xerror", "-i", daemon.url("master.m3u8")]
        + ["-map", "0:p:1", "-f", "framecrc", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Program 1" in out.stderr
    frames = Counter(line.split(",")[0] for line in out.stdout.splitlines() if line[:1].isdigit())
    assert frames["0"] == SECONDS * RATE, frames  # every video frame of the on-demand variant
    assert frames["1"] > 0, frames  # and its audio
    assert daemon.metrics()["peerd_media_on_demand_segments_total"] >= 1


def test_one_transcode_for_concurrent_requests(daemon: Daemon) -> None:
    url = daemon.url(f"s/{RUNG}/0.m4s")

    async def fetch_all() -> list[tuple[int, bytes]]:
        async with aiohttp.ClientSession() as s:

            async def one() -> tuple[int, bytes]:
                async with s.get(url) as r:
                    return r.status, await r.read()

            return await asyncio.gather(*(one() for _ in range(8)))

    got = asyncio.run(fetch_all())
    assert {status for status, _ in got} == {200}
    assert len({body for _, body in got}) == 1
    m = daemon.metrics()
    assert m["peerd_media_on_demand_segments_total"] == 1
    assert daemon.proc.logs().count('"produced on-demand segment"') == 1
    # Stored as an ordinary blob: its id is the hash of the bytes every viewer got.
    assert _get(url)[1] == got[0][1]


@pytest.mark.timeout(180)
def test_segments_ahead_of_a_viewer_playing_in_order(daemon: Daemon) -> None:
    for seq in (0, 1):
        assert _get(daemon.url(f"s/{RUNG}/{seq}.m4s"))[0] == 200
    # Segments 2 and 3 (two ahead) are produced without anyone asking for them.
    asyncio.run(
        until(
            lambda: daemon.metrics().get('peerd_media_on_demand_ahead_total{outcome="ok"}') == 2,
            timeout_s=120,
            step_s=0.1,
        )
    )
    assert daemon.metrics()["peerd_media_on_demand_segments_total"] == 4
    for seq in (2, 3):
        assert _get(daemon.url(f"s/{RUNG}/{seq}.m4s"))[0] == 200
    assert daemon.metrics()['peerd_media_on_demand_requests_total{outcome="ok"}'] == 2
    assert _get(daemon.url(f"s/{RUNG}/99.m4s"))[0] == 404


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>on demand</title><link rel="icon" href="data:,">
<script src="/hls.min.js"></script></head>
<body><video id="v" muted playsinline></video>
<script>
window.hlsErrors = [];
window.mediaErrors = [];
window.fragLevels = [];
window.pinned = -1;
const v = document.getElementById("v");
v.addEventListener("error", () => window.mediaErrors.push(String(v.error && v.error.code)));
const hls = new Hls({enableWorker: false});
hls.on(Hls.Events.ERROR, (_e, d) => window.hlsErrors.push(`${d.type}:${d.details}:${d.fatal}`));
hls.on(Hls.Events.FRAG_LOADED, (_e, d) => window.fragLevels.push(d.frag.level));
hls.on(Hls.Events.MANIFEST_PARSED, (_e, d) => {
  window.pinned = d.levels.findIndex((l) => l.height === HEIGHT);
  hls.startLevel = window.pinned;
  hls.currentLevel = window.pinned;
  v.play();
});
hls.loadSource(SRC);
hls.attachMedia(v);
</script></body></html>
"""


@pytest.mark.timeout(180)
async def test_hlsjs_pinned_to_the_on_demand_level_plays_to_the_end(
    tmp_path: Path, daemon: Daemon
) -> None:
    html = PAGE.replace("SRC", json.dumps(daemon.url("master.m3u8"))).replace("HEIGHT", "120")
    async with player_origin(lambda: html) as base:  # another origin than the node's
        async with Browser.launch(tmp_path / "profile") as browser:
            tab = await browser.new_page()
            await tab.goto(base + "/player.html")
            fatal = "window.hlsErrors.filter(e => !e.endsWith(':false'))"
            await tab.wait_for(
                f"document.getElementById('v').ended || {fatal}.length > 0"
                " || window.mediaErrors.length > 0",
                timeout_s=120,
            )
            errors = await tab.evaluate("window.hlsErrors")
            # Non-fatal: the packager's timeline starts at the first decode time (see
            # test_hls_browser); anything fatal or a media error fails.
            assert set(errors) <= {"mediaError:bufferSeekOverHole:false"}, errors
            assert await tab.evaluate("window.mediaErrors") == []
            assert await tab.evaluate("document.getElementById('v').ended") is True
            pinned = await tab.evaluate("window.pinned")
            levels = await tab.evaluate("window.fragLevels")
            assert pinned >= 0
            assert set(levels) == {pinned}, levels
            assert tab.console_errors == []
    produced = daemon.metrics()["peerd_media_on_demand_segments_total"]
    assert produced == SECONDS / SEGMENT_S  # every segment of the rung, each once


# -- in process: the slot held by the test --------------------------------------------------------


@dataclass
class Node:
    rt: Runtime
    ingestor: Ingestor
    ondemand: OnDemand
    base: str
    media_id: str
    key: bytes

    def url(self, path: str) -> str:
        token = tokens.mint(self.key, self.media_id, "hls", int(time.time()) + 600)
        return f"{self.base}/hls/{self.media_id}/{path}?token={token}"

    def counted(self, name: str, **labels: str) -> float:
        value = self.rt.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


KEY_TEXT = "test-signing-key-0123456789abcdef-0123456789"


@pytest.fixture
async def node(tmp_path: Path, clip: Path) -> AsyncIterator[Node]:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "hls_signing_key").write_text(KEY_TEXT + "\n")
    settings = load_settings(
        None,
        node={"state_dir": tmp_path / "state", "secrets_dir": secrets},
        http={"port": 0, "request_timeout_s": 0.5, "fast_path": False},
        media={"segment_seconds": 2.0, "ladder": LADDER, "on_demand_ahead": 0},
    )
    rt = await open_runtime(settings)
    listener: Listener | None = None
    runner: web.AppRunner | None = None
    task: asyncio.Task[None] | None = None
    try:
        ingestor = node_ingestor(rt)
        res = await ingestor.ingest(clip)
        assert res.media_id is not None
        resolver = Resolver(rt.store, [TranscodeSource(ingestor)], registry=rt.metrics.registry)
        ondemand = OnDemand(
            ingestor, resolver, timeout_s=0.5, ahead=0, registry=rt.metrics.registry
        )
        ready = asyncio.Event()
        task = asyncio.create_task(ondemand.run(ready.set))
        await ready.wait()
        app = build_app(rt, [partial(hls.install, resolver=resolver, ondemand=ondemand)])
        runner = runner_for(app, settings.http)
        await runner.setup()
        listener = await listen(runner, settings.http)
        yield Node(
            rt,
            ingestor,
            ondemand,
            f"http://127.0.0.1:{listener.port}",
            res.media_id,
            KEY_TEXT.encode(),
        )
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if listener is not None:
            await listener.stop(1.0)
        if runner is not None:
            await runner.cleanup()
        await rt.close()


async def _fetch(url: str) -> tuple[int, bytes, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.read(), r.headers


async def test_a_production_slower_than_the_timeout_answers_503_then_200(node: Node) -> None:
    produced = "peerd_media_on_demand_segments_total"
    async with node.ingestor.transcodes:  # the only slot: no transcode can finish meanwhile
        status, body, headers = await _fetch(node.url(f"s/{RUNG}/1.m4s"))
        assert status == 503, body
        assert int(headers["Retry-After"]) >= 1
        assert headers["Access-Control-Allow-Origin"] == "*"
        assert node.counted("peerd_media_on_demand_requests_total", outcome="timeout") == 1
        assert node.counted(produced) == 0
    # The production went on without the viewer; the next request gets the segment.
    await until(lambda: node.counted(produced) == 1, timeout_s=60, step_s=0.05)
    status, body, _ = await _fetch(node.url(f"s/{RUNG}/1.m4s"))
    assert status == 200
    assert len(body) > 0
    assert node.counted(produced) == 1


async def test_init_unknown_segment_missing_source_and_failing_transcode(
    node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    status, body, _ = await _fetch(node.url(f"s/{RUNG}/init.mp4"))
    assert status == 200
    assert body[4:8] == b"ftyp"
    assert (await _fetch(node.url(f"s/{RUNG}/3.m4s")))[0] == 404  # 3 segments: 0..2
    assert (await _fetch(node.url("s/nope/0.m4s")))[0] == 404
    assert (await _fetch(node.url(f"s/{RUNG}/0.ts")))[0] == 404

    # The source segment is gone and no source has it: 503, not a hang, not 404.
    m = await node.ingestor.load_manifest(node.media_id)
    src = m.rendition("v240")
    await node.rt.store.delete(Cid(str(src.segments[1].cid)))
    status, _, headers = await _fetch(node.url(f"s/{RUNG}/1.m4s"))
    assert status == 503
    assert "Retry-After" in headers

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(transcode, "derive_segment", broken)
    with caplog.at_level("ERROR", logger="peerd.media.ondemand"):
        status, body, _ = await _fetch(node.url(f"s/{RUNG}/2.m4s"))
    assert status == 500
    assert b"transcoding the segment failed" in body
    assert "on-demand transcode failed" in caplog.text
    assert node.counted("peerd_media_on_demand_requests_total", outcome="failed") == 1
