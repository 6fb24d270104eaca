"""Playback analytics over plain HTTP, as a player or curl sends it, against a real daemon: CMCD
in the query (both HLS paths) and in ``CMCD-*`` headers count; a malformed value is ignored
(the request is served, ``peerd_cmcd_invalid_total`` counts it); ``CF-IPCountry`` names the
region only when the request came through a trusted proxy."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from peerd.config import AnalyticsSettings, load_settings
from peerd.core import tokens
from peerd.core.analytics import Dims, Hit
from peerd.core.cmcd import Cmcd
from peerd.http.playback import PlaybackAnalytics
from peerd.runtime import open_runtime
from tests.support.hlsmedia import import_hls, make_hls, read_hls
from tests.support.process import PeerdProcess


async def _node(tmp: Path, playlist: Path, http: dict[str, Any]) -> tuple[PeerdProcess, str]:
    proc = PeerdProcess(tmp, config={"http": http, "analytics": {"flush_interval_s": 1.0}})
    await asyncio.to_thread(proc.init)
    rt = await open_runtime(load_settings(None, node={"state_dir": proc.state_dir}))
    try:
        media, _ = await import_hls(rt, read_hls(playlist))
    finally:
        await rt.close()
    await asyncio.to_thread(proc.start)
    return proc, media


def _q(data: str) -> str:
    return urllib.parse.quote_plus(data, safe="")


async def _play(s: aiohttp.ClientSession, proc: PeerdProcess, media: str, sid: str) -> None:
    """Master, media playlist, then two segments (the second with media buffered), with CMCD in
    the query, a header set on the last one; CF-IPCountry on every request."""
    key = (proc.state_dir / "secrets" / "hls_signing_key").read_text().strip().encode()
    tok = tokens.mint(key, media, "hls", int(time.time()) + 600)
    base = f"{proc.base_url}/hls/{media}"
    cc = {"CF-IPCountry": "de"}
    session = f'sid="{sid}"'
    async with s.get(
        f"{base}/master.m3u8?token={tok}&CMCD={_q(f'ot=m,sf=h,{session},su')}", headers=cc
    ) as r:
        assert r.status == 200
    async with s.get(
        f"{base}/v0.m3u8?token={tok}&CMCD={_q(f'ot=m,{session},su')}", headers=cc
    ) as r:
        assert r.status == 200
        body = await r.text()
    segments = re.findall(r"^(b/b[a-z2-7]{58}\.ts)", body, re.M)
    async with s.get(
        f"{base}/{segments[0]}?token={tok}&CMCD={_q(f'bl=0,ot=av,{session},su')}", headers=cc
    ) as r:
        assert r.status == 200
        await r.read()
    headers = {**cc, "CMCD-Request": "bl=2000", "CMCD-Session": session, "CMCD-Object": "ot=av"}
    async with s.get(f"{base}/{segments[1]}?token={tok}", headers=headers) as r:
        assert r.status == 200
        await r.read()
    # Malformed: ignored, the segment still served.
    async with s.get(f"{base}/{segments[1]}?token={tok}&CMCD={_q('bl=-1,' + session)}") as r:
        assert r.status == 200
        await r.read()


async def _report(s: aiohttp.ClientSession, proc: PeerdProcess) -> dict[str, Any]:
    token = (proc.state_dir / "secrets" / "api_token").read_text().strip()
    deadline = time.monotonic() + 20
    while True:
        url = f"{proc.base_url}/api/v1/analytics?group_by=region,path"
        async with s.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
            report: dict[str, Any] = json.loads(await r.read())
        if report["rows"] or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.25)


@pytest.mark.timeout(120)
async def test_cmcd_over_plain_http_and_the_region_rule(tmp_path: Path) -> None:
    playlist = await asyncio.to_thread(make_hls, tmp_path / "media", "ts", seconds=6)
    results = {}
    for name, http in (("trusted", {}), ("untrusted", {"trusted_proxies": ["10.9.9.0/24"]})):
        proc, media = await _node(tmp_path / name, playlist, http)
        try:
            async with aiohttp.ClientSession() as s:
                await _play(s, proc, media, f"viewer-{name}")
                results[name] = await _report(s, proc)
                async with s.get(f"{proc.base_url}/metrics") as r:
                    metrics = await r.text()
        finally:
            assert await asyncio.to_thread(proc.stop) == 0
        assert "peerd_cmcd_invalid_total 1.0" in metrics
    (trusted,) = results["trusted"]["rows"]
    (untrusted,) = results["untrusted"]["rows"]
    assert (trusted["region"], trusted["path"], trusted["started"]) == ("DE", "http", 1)
    assert (untrusted["region"], untrusted["started"]) == ("", 1)


async def test_the_rollup_keeps_retention_days(tmp_path: Path) -> None:
    """Counts land in the catalog by hour and go once older than ``retention_days``."""
    rt = await open_runtime(load_settings(None, node={"state_dir": tmp_path / "state"}))
    try:
        now = [1_800_000_000.0]
        pa = PlaybackAnalytics(
            rt.catalog,
            AnalyticsSettings(retention_days=2),
            CollectorRegistry(),
            (),
            clock=lambda: now[0],
        )
        dims = Dims("b" + "c" * 58)
        for day in range(4):  # one session a day, started
            now[0] = 1_800_000_000.0 + day * 86400
            sid = f"s{day}"
            pa.core.observe(Hit(sid, dims, True, Cmcd(sid=sid, su=True)), now[0])
            pa.core.observe(Hit(sid, dims, False, Cmcd(sid=sid, bl=1000)), now[0] + 1)
            await pa.flush()
        report = await pa.report(0, int(now[0]), ["hour"], {}, 100)
        assert [r["started"] for r in report["rows"]] == [1, 1, 1, 1]
        await pa.prune()
        report = await pa.report(0, int(now[0]), ["hour"], {}, 100)
        # The first day's hour is more than two days old now: gone; the others stay.
        hours = sorted(r["hour"] for r in report["rows"])
        assert hours == [1_800_000_000 + d * 86400 for d in (1, 2, 3)]
    finally:
        await rt.close()
