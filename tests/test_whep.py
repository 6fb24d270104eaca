"""WHEP negotiation with the node in process (under the loop-blocking guard): the cap, bad
offers, CORS, who may watch (the viewer authorization HLS uses: tokens with the configured key,
read once, refused without one; Cloudflare Access mode); and the segment demuxer. Media flowing
to viewers is tested against a daemon process in ``test_whep_media.py`` and
``test_whep_chromium.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
from aiohttp import web

from peerd.config import Settings, load_settings
from peerd.core import tokens
from peerd.http.server import build_app
from peerd.runtime import Runtime, open_runtime
from peerd.webrtc import routes
from peerd.webrtc.session import WhepService
from tests.support.cf_access import FakeAccessTeam
from tests.support.poll import until
from tests.support.whep_media import HlsClip, add_media, make_hls
from tests.support.whep_viewer import make_offer


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HlsClip]:
    base = tmp_path_factory.mktemp("clips")
    return {
        "plain": make_hls(base / "plain", seconds=3, bframes=0, segment_seconds=1),
        "bframes": make_hls(base / "bframes", seconds=4, bframes=3),
        "ts": make_hls(base / "ts", seconds=2, bframes=0, container="ts"),
    }


KEY = b"w" * 32
SDP = {"Content-Type": "application/sdp"}
FORBIDDEN = {"error": "forbidden", "message": "forbidden"}


def bearer(media_id: str, key: bytes = KEY, scope: str = "whep") -> dict[str, str]:
    """An Authorization header with a live token."""
    return {"Authorization": f"Bearer {tokens.mint(key, media_id, scope, int(time.time()) + 600)}"}


def with_key(tmp_path: Path, name: str = "hls_signing_key", key: bytes = KEY) -> Path:
    """A secrets directory holding ``key`` under ``name``."""
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / name).write_bytes(key)
    return secrets


@dataclass
class Node:
    rt: Runtime
    svc: WhepService
    url: str
    media: dict[str, str] = field(default_factory=dict)

    def offer_headers(self, name: str) -> dict[str, str]:
        """Headers of an offer for one of the node's media, with a good token."""
        return {**SDP, **bearer(self.media[name])}


@contextlib.asynccontextmanager
async def start_node(settings: Settings, clips: dict[str, HlsClip]) -> AsyncIterator[Node]:
    rt = await open_runtime(settings)
    media = {name: await add_media(rt, clip, title=name) for name, clip in clips.items()}
    svc = WhepService(rt)
    ready = asyncio.Event()
    task = asyncio.create_task(svc.run(ready.set))
    await ready.wait()
    runner = web.AppRunner(build_app(rt, [partial(routes.install, whep=svc)]))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Node(rt, svc, f"http://127.0.0.1:{port}", media)
    finally:
        await runner.cleanup()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await rt.close()


@pytest.fixture
async def node(tmp_path: Path, clips: dict[str, HlsClip]) -> AsyncIterator[Node]:
    settings = load_settings(
        None,
        node={"state_dir": tmp_path / "state", "secrets_dir": with_key(tmp_path)},
        http={"port": 0},
        webrtc={"loop_playback": True, "max_sessions": 2, "connect_timeout_s": 3},
    )
    async with start_node(settings, clips) as n:
        yield n


def test_bframes_plan_transcode(clips: dict[str, HlsClip]) -> None:
    # The media path of a transcoded session is exercised by the Chromium test (a daemon
    # process): here only the probe that sends a B-frame stream that way.
    from peerd.webrtc.media import probe_reorders

    for name, reorders in (("bframes", True), ("plain", False), ("ts", False)):
        clip = clips[name]
        init = clip.init.read_bytes() if clip.init else None
        container = "fmp4" if clip.init else "ts"
        assert probe_reorders(container, init, clip.segments[0]) is reorders, name


async def test_cap_and_unconnected_sessions_expire(node: Node) -> None:
    sdp = await make_offer()
    async with aiohttp.ClientSession() as http:
        url = f"{node.url}/whep/{node.media['plain']}"
        headers = node.offer_headers("plain")

        async def post() -> int:
            async with http.post(url, data=sdp, headers=headers) as r:
                if r.status == 429:
                    assert (await r.json())["error"] == "too_many_requests"
                return r.status

        # Offers arriving together cannot overshoot the cap of 2.
        statuses = await asyncio.gather(*(post() for _ in range(4)))
        assert sorted(statuses) == [201, 201, 429, 429]
        assert len(node.svc.sessions) == 2
        # Nobody completes ICE: after connect_timeout_s both slots are free again.
        await until(lambda: not node.svc.sessions, 8, 0.05)
        async with http.post(url, data=sdp, headers=headers) as r:
            assert r.status == 201
            location = r.headers["Location"]
        async with http.delete(node.url + location, headers=headers) as r:
            assert r.status == 200


async def test_bad_requests(node: Node) -> None:
    sdp = await make_offer()
    async with aiohttp.ClientSession() as http:
        url = f"{node.url}/whep/{node.media['plain']}"
        auth = bearer(node.media["plain"])
        async with http.post(url, data=sdp, headers={**auth, "Content-Type": "text/plain"}) as r:
            assert r.status == 415
        headers = node.offer_headers("plain")
        async with http.post(url, data="hello", headers=headers) as r:
            assert r.status == 400
            assert "SDP" in (await r.json())["message"]
        missing_id = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
        missing = f"{node.url}/whep/{missing_id}"
        async with http.post(missing, data=sdp, headers={**SDP, **bearer(missing_id)}) as r:
            assert r.status == 404
        async with http.patch(f"{node.url}/whep/sessions/x", data="") as r:
            assert r.status == 405
        async with http.delete(f"{node.url}/whep/sessions/x", headers=auth) as r:
            assert r.status == 404
        no_dtls = "".join(
            line for line in sdp.splitlines(keepends=True) if not line.startswith("a=fingerprint")
        )
        async with http.post(url, data=no_dtls, headers=headers) as r:
            assert r.status == 400, await r.text()
        only_av1 = sdp.replace("VP8/90000", "AV1/90000").replace("H264/90000", "AV1/90000")
        async with http.post(url, data=only_av1, headers=headers) as r:
            assert r.status == 400
            assert "no codec" in (await r.json())["message"]
        big = "v=0\r\n" + "a=x\r\n" * 20000
        async with http.post(url, data=big, headers=headers) as r:
            assert r.status == 400
    assert node.svc.sessions == {}


async def test_cors_preflight(node: Node) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"{node.url}/whep/{node.media['plain']}"
        async with http.options(url, headers={"Origin": "https://viewer.example"}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
            assert "Location" in r.headers["Access-Control-Expose-Headers"]
            assert r.headers["Accept-Post"] == "application/sdp"
        async with http.options(f"{node.url}/whep/sessions/abc") as r:
            assert r.status == 204
            assert "DELETE" in r.headers["Access-Control-Allow-Methods"]
        # Refusals carry CORS headers too, so a page on another origin can read them.
        async with http.post(url, data="x", headers=node.offer_headers("plain")) as r:
            assert r.status == 400
            assert r.headers["Access-Control-Allow-Origin"] == "*"
        async with http.post(url, data="x", headers=SDP) as r:
            assert r.status == 403
            assert r.headers["Access-Control-Allow-Origin"] == "*"


def denied(n: Node, reason: str) -> float:
    value = n.rt.metrics.registry.get_sample_value("peerd_http_denied_total", {"reason": reason})
    return value or 0.0


async def expect(
    http: aiohttp.ClientSession, n: Node, mid: str, headers: dict[str, str], status: int
) -> None:
    """An offer with ``headers`` gets ``status`` (the bare 403 body when refused); a session it
    opens is deleted with the same credentials."""
    sdp = await make_offer()
    async with http.post(f"{n.url}/whep/{mid}", data=sdp, headers={**SDP, **headers}) as r:
        assert r.status == status, (headers, await r.text())
        if status == 403:
            assert await r.json() == FORBIDDEN
        location = r.headers.get("Location")
    if location is not None:
        async with http.delete(n.url + location) as r:  # no credentials
            assert r.status == 403
            assert await r.json() == FORBIDDEN
        async with http.delete(n.url + location, headers=headers) as r:
            assert r.status == 200


async def test_tokens_follow_hls_rules(tmp_path: Path, clips: dict[str, HlsClip]) -> None:
    settings = load_settings(
        None,
        node={"state_dir": tmp_path / "state", "secrets_dir": with_key(tmp_path)},
        http={"port": 0},
        webrtc={"connect_timeout_s": 3},
    )
    async with start_node(settings, {"plain": clips["plain"]}) as n:
        mid = n.media["plain"]
        now = int(time.time())
        good = tokens.mint(KEY, mid, "whep", now + 60)
        cases = {
            None: 403,
            "garbage": 403,
            tokens.mint(KEY, mid, "whep", now - 1): 403,  # expired
            tokens.mint(KEY, mid, "hls", now + 60): 403,  # wrong scope
            tokens.mint(b"x" * 32, mid, "whep", now + 60): 403,  # wrong key
        }
        async with aiohttp.ClientSession() as http:
            for token, status in cases.items():
                headers = {} if token is None else {"Authorization": f"Bearer {token}"}
                await expect(http, n, mid, headers, status)
            async with http.get(f"{n.url}/whep/player/{mid}") as r:
                assert r.status == 403
                assert await r.json() == FORBIDDEN
            async with http.get(f"{n.url}/whep/player/{mid}", params={"token": good}) as r:
                assert r.status == 200
                page = await r.text()
                assert good in page
                assert "<script" in page
            await expect(http, n, mid, {"Authorization": f"Bearer {good}"}, 201)
            # ?token= works as well as Bearer.
            sdp = await make_offer()
            url = f"{n.url}/whep/{mid}"
            async with http.post(url, data=sdp, headers=SDP, params={"token": good}) as r:
                assert r.status == 201
                location = r.headers["Location"]
            async with http.delete(n.url + location, params={"token": good}) as r:
                assert r.status == 200
        assert denied(n, "missing") >= 2


async def test_no_signing_key_refuses_every_viewer(
    tmp_path: Path, clips: dict[str, HlsClip]
) -> None:
    """Fails closed: without the signing key WHEP refuses everyone, as HLS does."""
    settings = load_settings(
        None, node={"state_dir": tmp_path / "state"}, http={"port": 0}, webrtc={}
    )
    async with start_node(settings, {"plain": clips["plain"]}) as n:
        mid = n.media["plain"]
        async with aiohttp.ClientSession() as http:
            await expect(http, n, mid, {}, 403)
            await expect(http, n, mid, bearer(mid), 403)
            async with http.get(f"{n.url}/whep/player/{mid}") as r:
                assert r.status == 403
        assert n.svc.sessions == {}
        assert denied(n, "no-signing-key") == 3


async def test_configured_secret_name_is_the_key(tmp_path: Path, clips: dict[str, HlsClip]) -> None:
    """``http.signing_key_secret`` names the key, for WHEP as for HLS."""
    other = b"o" * 32
    secrets = with_key(tmp_path, "viewer_key", KEY)
    with_key(tmp_path, "hls_signing_key", other)
    settings = load_settings(
        None,
        node={"state_dir": tmp_path / "state", "secrets_dir": secrets},
        http={"port": 0, "signing_key_secret": "viewer_key"},
        webrtc={"connect_timeout_s": 3},
    )
    async with start_node(settings, {"plain": clips["plain"]}) as n:
        mid = n.media["plain"]
        async with aiohttp.ClientSession() as http:
            await expect(http, n, mid, bearer(mid, key=other), 403)
            await expect(http, n, mid, bearer(mid, key=KEY), 201)


async def test_signing_key_is_read_once(tmp_path: Path, clips: dict[str, HlsClip]) -> None:
    """The key is read when the routes are built, not per request: changing or deleting the
    file afterwards changes nothing until restart."""
    secrets = with_key(tmp_path)
    settings = load_settings(
        None,
        node={"state_dir": tmp_path / "state", "secrets_dir": secrets},
        http={"port": 0},
        webrtc={"connect_timeout_s": 3},
    )
    newer = b"n" * 32
    async with start_node(settings, {"plain": clips["plain"]}) as n:
        mid = n.media["plain"]
        async with aiohttp.ClientSession() as http:
            (secrets / "hls_signing_key").write_bytes(newer)
            await expect(http, n, mid, bearer(mid, key=newer), 403)
            await expect(http, n, mid, bearer(mid), 201)
            (secrets / "hls_signing_key").unlink()
            await expect(http, n, mid, bearer(mid), 201)


async def test_access_mode_decides_for_whep(tmp_path: Path, clips: dict[str, HlsClip]) -> None:
    """``[http] auth = "access"``: a valid Access JWT opens WHEP and a token does not."""
    team = FakeAccessTeam()
    await team.start()
    settings = load_settings(
        None,
        node={"state_dir": tmp_path / "state", "secrets_dir": with_key(tmp_path)},
        http={
            "port": 0,
            "auth": "access",
            "access_team_url": team.base_url,
            "access_aud": team.audience,
        },
        webrtc={"connect_timeout_s": 3},
    )
    try:
        async with start_node(settings, {"plain": clips["plain"]}) as n:
            mid = n.media["plain"]
            jwt = {"Cf-Access-Jwt-Assertion": team.token()}
            async with aiohttp.ClientSession() as http:
                await expect(http, n, mid, jwt, 201)
                await expect(http, n, mid, bearer(mid), 403)  # tokens do not count here
                await expect(http, n, mid, {}, 403)
                bad = {"Cf-Access-Jwt-Assertion": team.token(aud=["another-app"])}
                await expect(http, n, mid, bad, 403)
                async with http.get(f"{n.url}/whep/player/{mid}") as r:
                    assert r.status == 403
                async with http.get(f"{n.url}/whep/player/{mid}", headers=jwt) as r:
                    assert r.status == 200
                    assert '"token": null' in await r.text()
    finally:
        await team.stop()


def test_demuxer_keeps_audio_continuous_across_segments(clips: dict[str, HlsClip]) -> None:
    from peerd.webrtc.media import SegmentDemuxer

    clip = clips["plain"]
    assert clip.init is not None
    init = clip.init.read_bytes()
    d = SegmentDemuxer("fmp4", "passthrough", True)
    video: list[Any] = []
    audio: list[Any] = []
    for seg in clip.segments:
        v, a = d.demux(init, seg, 0.0)
        video += v
        audio += a
    assert len(video) == 3 * 25
    # Annex B with parameter sets in band before each IDR (one per second).
    assert all(bytes(it.payload)[:4] == b"\x00\x00\x00\x01" for it in video)
    assert sum(b"\x00\x00\x00\x01\x67" in bytes(it.payload) for it in video) == 3
    pts = [it.payload.pts for it in audio]
    assert pts == [i * 960 for i in range(len(pts))]
    assert all(isinstance(it.payload, av.AudioFrame) for it in audio)
    assert abs(len(audio) * 0.02 - 3.0) < 0.1
    dues = [it.due for it in video]
    assert dues == sorted(dues)


async def test_unpulled_track_queue_is_bounded() -> None:
    from peerd.webrtc.media import Item, PacedTrack, PlayoutClock

    track = PacedTrack("video", PlayoutClock())
    for i in range(PacedTrack.MAX_QUEUED + 10):
        track.offer(Item(i / 25, i))
    assert track.dropped == 10
    track.end()  # the end still gets in, in place of the oldest item
    assert track.queue.qsize() == PacedTrack.MAX_QUEUED
    assert await track.recv() == 1  # at once: the clock starts at the first item
