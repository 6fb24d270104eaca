"""Packaging on media the tests make themselves (ffmpeg lavfi): codecs, sizes, frame rates, audio
or none, odd durations; every rendition read back by Debian's ffprobe; determinism; bad input."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Literal

import pytest

from peerd.catalog import Catalog
from peerd.core import manifest as mf
from peerd.core.ids import Cid
from peerd.errors import MediaError
from peerd.media import codecs, fmp4
from peerd.media.ingest import Ingestor
from peerd.media.options import PackagingOptions, Rung
from peerd.media.package import package
from peerd.store import BlobStore
from tests.support.media import (
    MemorySink,
    export_hls,
    ffprobe_json,
    make_bad,
    make_media,
    make_truncated_faststart,
)
from tests.support.process import run_cli

SOURCES: dict[str, dict[str, Any]] = {
    "h264_aac.mp4": {"seconds": 5.0, "size": (160, 120)},
    "hevc_opus.mkv": {"vcodec": "hevc", "acodec": "opus", "seconds": 3.0},
    "mpeg4_mp3.avi": {"vcodec": "mpeg4", "acodec": "mp3", "size": (176, 144), "seconds": 2.5},
    "vp9_opus.webm": {"vcodec": "vp9", "acodec": "opus", "seconds": 2.5, "size": (128, 96)},
    "mjpeg_pcm.mkv": {"vcodec": "mjpeg", "acodec": "pcm", "size": (128, 96), "seconds": 2.0},
    "vfr.mp4": {"vfr": True, "seconds": 4.3},
    "noaudio_odd.mp4": {"acodec": None, "seconds": 5.1, "size": (150, 90), "rate": 25},
    "odd_44k.mp4": {"seconds": 3.37, "size": (200, 112), "rate": 24, "sample_rate": 44100},
}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("media")
    for name, kw in SOURCES.items():
        make_media(d / name, **kw)
    return d


def _span(info: dict[str, Any]) -> float:
    """Presentation span of a segment's packets (earliest pts to latest pts + duration)."""
    pkts = [p for p in info["packets"] if "pts_time" in p]
    start = min(float(p["pts_time"]) for p in pkts)
    end = max(float(p["pts_time"]) + float(p.get("duration_time", 0) or 0) for p in pkts)
    return end - start


def _check_with_ffprobe(m: mf.Manifest, blobs: dict[str, bytes], out: Path, fps: float) -> None:
    master = export_hls(m, blobs.__getitem__, out)
    text = master.read_text()
    infs = [ln for ln in text.splitlines() if ln.startswith("#EXT-X-STREAM-INF")]
    assert len(infs) == len([r for r in m.renditions if not r.on_demand])
    assert all('CODECS="' in ln for ln in infs)
    frame = 1 / fps
    for r in m.renditions:
        if r.on_demand:
            continue
        media_pl = (out / f"{r.id}.m3u8").read_text()
        assert f"#EXT-X-VERSION:{6 if m.container == 'fmp4' else 3}" in media_pl
        extinf = [float(x.split(":")[1].rstrip(",")) for x in media_pl.split() if "EXTINF" in x]
        target = int(media_pl.split("#EXT-X-TARGETDURATION:")[1].split()[0])
        assert all(int(d + 0.5) <= target for d in extinf)
        whole = ffprobe_json(out / f"{r.id}.m3u8", "-show_entries", "format=duration")
        assert abs(float(whole["format"]["duration"]) - r.duration_seconds) <= 2 * frame
        for seq, seg in enumerate(r.segments):
            assert seg.cid is not None
            data = (blobs[r.init] if r.init else b"") + blobs[seg.cid]
            one = out / f"one.{'mp4' if m.container == 'fmp4' else 'ts'}"
            one.write_bytes(data)
            info = ffprobe_json(one, "-show_entries", "packet=codec_type,pts_time,duration_time")
            span = _span(info)
            want = r.segment_seconds(seq)
            # Audio frames (1024 samples) do not end on video frame boundaries: allow one
            # video frame plus one audio frame.
            slack = frame + 1024 / 44100 + 1e-3
            assert abs(span - want) <= slack, (r.id, seq, span, want)


@pytest.mark.parametrize("container", ["fmp4", "ts"])
@pytest.mark.parametrize("name", list(SOURCES))
def test_package_and_ffprobe_every_rendition(
    media_dir: Path, tmp_path: Path, name: str, container: str
) -> None:
    sink = MemorySink()
    kw = SOURCES[name]
    opts = PackagingOptions(
        container=container,  # type: ignore[arg-type]
        segment_seconds=2.0,
        ladder=(Rung(72), Rung(64, on_demand=True), Rung(720)),
        audio_only=True,
    )
    m, info = package(media_dir / name, opts, sink)
    ids = [r.id for r in m.renditions]
    top = m.renditions[0]
    assert top.height == kw.get("size", (160, 120))[1]
    assert "v720" not in ids  # never above the source's size
    assert ids[1:3] == ["v72", "v64"]
    assert m.rendition("v64").on_demand
    assert ("audio" in ids) == (kw.get("acodec", "aac") is not None)
    for r in m.renditions[1:]:
        assert r.bandwidth <= top.bandwidth * 1.05, (r.id, r.bandwidth, top.bandwidth)
        assert r.segments == top.segments or [s.duration for s in r.segments] == [
            s.duration for s in top.segments
        ]
    remuxable = kw.get("vcodec", "h264") in ("h264", "hevc")
    assert top.codecs.startswith(("avc1.", "hvc1.") if remuxable else ("avc1.",))
    assert abs(top.duration_seconds - kw["seconds"]) < 0.2
    _check_with_ffprobe(m, sink.blobs, tmp_path / "hls", kw.get("rate", 30))


def test_transcoded_segments_start_on_keyframes(media_dir: Path, tmp_path: Path) -> None:
    sink = MemorySink()
    opts = PackagingOptions(transcode="always", segment_seconds=1.0, ladder=(Rung(64),))
    m, _ = package(media_dir / "vfr.mp4", opts, sink)
    top = m.renditions[0]
    assert len(top.segments) >= 4
    for r in m.renditions:
        assert r.init is not None
        for seq, seg in enumerate(r.segments):
            assert seg.cid is not None
            data = sink.blobs[seg.cid]
            assert fmp4.fragment_count(data) == 1
            assert data[4:8] == b"moof"
            one = tmp_path / f"{r.id}-{seq}.mp4"
            one.write_bytes(sink.blobs[r.init] + data)
            info = ffprobe_json(one, "-select_streams", "v", "-show_entries", "packet=flags")
            assert info["packets"][0]["flags"].startswith("K"), (r.id, seq)


async def open_node(root: Path, quota: int = 0) -> tuple[Catalog, BlobStore]:
    cat = await Catalog.open(root / "catalog.sqlite3")
    store = BlobStore(root / "blobs", cat, quota_bytes=quota)
    await store.open()
    return cat, store


async def _counts(cat: Catalog) -> dict[str, int]:
    out = {}
    for table in ("media", "renditions", "segments", "blobs"):
        async with cat.conn.execute(f"SELECT COUNT(*) FROM {table}") as cur:  # noqa: S608
            row = await cur.fetchone()
        out[table] = int(row[0]) if row else 0
    return out


async def test_deterministic_across_nodes_and_repeat(media_dir: Path, tmp_path: Path) -> None:
    opts = PackagingOptions(
        transcode="always", segment_seconds=2.0, ladder=(Rung(72), Rung(64, on_demand=True))
    )
    results = []
    nodes = []
    for n in ("a", "b"):
        cat, store = await open_node(tmp_path / n)
        nodes.append((cat, store))
        ing = Ingestor(cat, store, opts)
        results.append(await ing.ingest(media_dir / "h264_aac.mp4"))
    a, b = results
    assert a.ok
    assert a.media_id == b.media_id
    assert a.new_blobs == b.new_blobs > 0
    files_a = sorted(p.name for p in (tmp_path / "a" / "blobs").rglob("b*"))
    files_b = sorted(p.name for p in (tmp_path / "b" / "blobs").rglob("b*"))
    assert files_a == files_b
    # Same node again, re-packaging on purpose: nothing new is stored.
    cat, store = nodes[0]
    before = await _counts(cat)
    again = await Ingestor(cat, store, opts).ingest(media_dir / "h264_aac.mp4", force=True)
    assert again.media_id == a.media_id
    assert again.new_blobs == 0
    assert again.reused_blobs == a.new_blobs
    assert await _counts(cat) == before
    # Without force an unchanged file is recognised and skipped.
    skipped = await Ingestor(cat, store, opts).ingest(media_dir / "h264_aac.mp4")
    assert skipped.skipped
    assert skipped.media_id == a.media_id
    for c, _ in nodes:
        await c.close()


# Every source kind with the path the packager's rule (PACKAGER_VERSION) gives its top
# rendition under the default options: a change of rule fails here, not silently on some node.
CANONICAL: dict[str, tuple[dict[str, Any], str]] = {
    "h264_aac.mp4": ({}, "isobmff"),
    "h264_aac.mov": ({}, "isobmff"),
    "hevc_aac.mp4": ({"vcodec": "hevc"}, "isobmff"),
    "h264_opus.mp4": ({"acodec": "opus"}, "isobmff"),
    "h264_mp3.mp4": ({"acodec": "mp3"}, "libav"),
    "h264_aac.mkv": ({}, "libav"),
    "h264_aac.ts": ({}, "libav"),
    "vp9_opus.webm": ({"vcodec": "vp9", "acodec": "opus"}, "libav"),
    "mpeg4_mp3.avi": ({"vcodec": "mpeg4", "acodec": "mp3"}, "libav"),
}


@pytest.mark.parametrize("name", list(CANONICAL))
async def test_one_canonical_output_per_source_kind(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same bytes ingested on two fresh nodes (under other names and times) give the same
    blob ids and media id, the manifest names the packager version and the path its rule
    chose, and the other path (forced) gives another id that says so in the manifest."""
    from peerd.media import package as pkg
    from peerd.media import remux

    kw, path = CANONICAL[name]
    src = await asyncio.to_thread(make_media, tmp_path / name, seconds=2.0, **kw)
    copy = tmp_path / "elsewhere" / f"copy{src.suffix}"
    copy.parent.mkdir()
    copy.write_bytes(src.read_bytes())
    opts = PackagingOptions(segment_seconds=1.0)
    got = []
    for node, file in (("a", src), ("b", copy)):
        cat, store = await open_node(tmp_path / node)
        try:
            ing = Ingestor(cat, store, opts)
            res = await ing.ingest(file)
            assert res.ok, res.error
            assert res.media_id is not None
            m = await ing.load_manifest(res.media_id)
        finally:
            await cat.close()
        files = sorted(p.name for p in (tmp_path / node / "blobs").rglob("b*") if p.is_file())
        got.append((res.media_id, files, m))
    (id_a, files_a, m), (id_b, files_b, _) = got
    assert id_a == id_b
    assert files_a == files_b == sorted(m.blob_cids())
    assert m.packager == mf.Packager(pkg.PACKAGER_VERSION, path)  # type: ignore[arg-type]
    if path == "isobmff":
        with monkeypatch.context() as patch:
            patch.setattr(remux, "open_native", lambda src, opts: None)
            other, _ = await asyncio.to_thread(package, src, opts, MemorySink())
        assert other.packager == mf.Packager(pkg.PACKAGER_VERSION, "libav")
        assert mf.media_id_of(other) != id_a
        # The rule, not the options' wording, decides: MPEG-TS output is always libav's.
        ts, _ = await asyncio.to_thread(
            package, src, PackagingOptions(container="ts"), MemorySink()
        )
        assert ts.packager == mf.Packager(pkg.PACKAGER_VERSION, "libav")


async def test_remux_ingest_stores_exactly_the_packaged_bytes(tmp_path: Path) -> None:
    """The daemon's ingest of a native remux stores byte for byte what the packager makes with
    a plain in-memory sink, and the store's deep verify agrees."""
    src = await asyncio.to_thread(
        make_media, tmp_path / "clip.mp4", seconds=6.0, size=(320, 240), gop=15
    )
    opts = PackagingOptions(segment_seconds=0.5)
    plain = MemorySink()
    want, _ = await asyncio.to_thread(package, src, opts, plain)
    cat, store = await open_node(tmp_path / "node")
    res = await Ingestor(cat, store, opts).ingest(src)
    assert res.ok
    assert res.media_id == mf.media_id_of(want)
    assert res.new_blobs == len(plain.blobs)
    for cid, data in plain.blobs.items():
        assert (await store.open_path(Cid(cid))).read_bytes() == data
    assert (await store.verify(deep=True)).ok
    assert len(want.renditions[0].segments) >= 10
    await cat.close()


async def test_on_demand_segments_equal_eager_ones(media_dir: Path, tmp_path: Path) -> None:
    eager = PackagingOptions(segment_seconds=2.0, ladder=(Rung(72),))
    lazy = PackagingOptions(segment_seconds=2.0, ladder=(Rung(72, on_demand=True),))
    cat_e, store_e = await open_node(tmp_path / "eager")
    cat_l, store_l = await open_node(tmp_path / "lazy")
    src = media_dir / "h264_aac.mp4"
    res_e = await Ingestor(cat_e, store_e, eager).ingest(src)
    ing_l = Ingestor(cat_l, store_l, lazy)
    res_l = await ing_l.ingest(src)
    assert res_e.media_id is not None
    assert res_l.media_id is not None
    m_e = await Ingestor(cat_e, store_e, eager).load_manifest(res_e.media_id)
    m_l = await ing_l.load_manifest(res_l.media_id)
    r_e, r_l = m_e.rendition("v72"), m_l.rendition("v72")
    assert r_l.on_demand
    assert not r_e.on_demand
    # Two concurrent requests for one segment make one blob; every segment equals the eager one.
    first = await asyncio.gather(*(ing_l.produce_segment(res_l.media_id, "v72", 0) for _ in "ab"))
    assert first[0] == first[1]
    for seq, seg in enumerate(r_e.segments):
        assert await ing_l.produce_segment(res_l.media_id, "v72", seq) == seg.cid
    assert await ing_l.produce_init(res_l.media_id, "v72") == r_e.init
    async with cat_l.conn.execute(
        "SELECT COUNT(*) FROM segments WHERE media_id=? AND rendition_id='v72' AND cid IS NULL",
        (res_l.media_id,),
    ) as cur:
        row = await cur.fetchone()
    assert row is not None
    assert row[0] == 0
    await cat_e.close()
    await cat_l.close()


BAD = ["empty", "text", "truncated", "subtitles_only", "unknown_codec"]
REASONS = {
    "empty": "empty file",
    "text": "not a media file",
    "truncated": "truncated",
    "subtitles_only": "no video or audio stream",
    "unknown_codec": "unsupported video codec",
    "truncated_faststart": "truncated: video ends",
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("bad")
    bad = [make_bad(d / f"bad_{k}.mp4", k) for k in BAD]  # type: ignore[arg-type]
    bad.append(make_truncated_faststart(d / "bad_truncated_faststart.mp4"))
    return bad


@pytest.mark.parametrize("transcode", ["auto", "always"])
async def test_bad_inputs_fail_cleanly_and_the_batch_continues(
    media_dir: Path, bad_files: list[Path], tmp_path: Path, transcode: Literal["auto", "always"]
) -> None:
    # "always": the decoding errors are raised by the transcode.
    bad = bad_files
    good = media_dir / "odd_44k.mp4"
    cat, store = await open_node(tmp_path / "node")
    ing = Ingestor(cat, store, PackagingOptions(segment_seconds=2.0, transcode=transcode))
    missing = bad[0].with_name("never_existed.mp4")
    results = await ing.ingest_many([*bad[:3], good, *bad[3:], missing])
    assert results[-1].error == f"{missing}: no such file"
    by_path = {r.path.name: r for r in results}
    assert by_path[good.name].ok
    for p in bad:
        res = by_path[p.name]
        assert not res.ok
        assert res.error_code == "bad_media"
        assert res.error is not None
        assert str(p) in res.error
        assert REASONS[p.stem.removeprefix("bad_")] in res.error
    counts = await _counts(cat)
    assert counts["media"] == 1
    assert counts["blobs"] == by_path[good.name].new_blobs
    assert store.count == counts["blobs"]
    await cat.close()


async def test_file_removed_mid_ingest_leaves_nothing(tmp_path: Path) -> None:
    src = await asyncio.to_thread(make_media, tmp_path / "long.mp4", seconds=8.0, size=(128, 96))
    cat, store = await open_node(tmp_path / "node")
    ing = Ingestor(cat, store, PackagingOptions(segment_seconds=1.0))
    removed: list[bool] = []

    def progress(done: float, total: float) -> None:
        if done > 2.5 and not removed:
            src.unlink()
            removed.append(True)

    with pytest.raises(MediaError, match=r"long\.mp4: file was removed"):
        await ing.ingest(src, progress=progress)
    assert removed
    counts = await _counts(cat)
    assert counts == {"media": 0, "renditions": 0, "segments": 0, "blobs": 0}
    assert store.count == 0
    assert not [p for p in (tmp_path / "node" / "blobs").rglob("*") if p.is_file()]
    await cat.close()


@pytest.mark.parametrize("transcode", ["auto", "always"])
async def test_full_disk_leaves_no_orphans(
    media_dir: Path, tmp_path: Path, transcode: Literal["auto", "always"]
) -> None:
    # "always": the store error stops a transcode (the leaked-thread check of conftest fails
    # the test if a codec or packaging thread is left behind).
    cat, store = await open_node(tmp_path / "node", quota=30_000)
    ing = Ingestor(cat, store, PackagingOptions(segment_seconds=1.0, transcode=transcode))
    res = await ing.ingest_result(media_dir / "h264_aac.mp4")
    assert not res.ok
    assert res.error_code == "store_full"
    assert await _counts(cat) == {"media": 0, "renditions": 0, "segments": 0, "blobs": 0}
    assert store.used_bytes == 0
    # The rest of a batch continues after a full disk too (here: nothing fits either).
    more = await ing.ingest_many([media_dir / "vfr.mp4"])
    assert more[0].error_code == "store_full"
    await cat.close()


async def test_cancelled_ingest_cleans_up(media_dir: Path, tmp_path: Path) -> None:
    cat, store = await open_node(tmp_path / "node")
    ing = Ingestor(cat, store, PackagingOptions(segment_seconds=1.0, transcode="always"))
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def progress(done: float, total: float) -> None:
        if done > 1.5:
            loop.call_soon_threadsafe(started.set)

    task = asyncio.create_task(ing.ingest(media_dir / "h264_aac.mp4", progress=progress))
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _counts(cat) == {"media": 0, "renditions": 0, "segments": 0, "blobs": 0}
    await cat.close()


async def test_watch_ingests_a_file_once_it_stops_growing(media_dir: Path, tmp_path: Path) -> None:
    lib = tmp_path / "library"
    lib.mkdir()
    cat, store = await open_node(tmp_path / "node")
    ing = Ingestor(cat, store, PackagingOptions(segment_seconds=2.0))
    got: asyncio.Queue[Any] = asyncio.Queue()
    task = asyncio.create_task(
        ing.watch([lib], settle_s=0.3, interval_s=0.05, on_result=got.put_nowait)
    )
    data = (media_dir / "vfr.mp4").read_bytes()
    target = lib / "incoming.mp4"
    with target.open("wb") as f:  # written in two steps: a file still growing
        f.write(data[: len(data) // 2])
        f.flush()
        await asyncio.sleep(0.15)
        f.write(data[len(data) // 2 :])
    res = await asyncio.wait_for(got.get(), 30)
    assert res.ok
    assert res.path == target
    assert got.empty()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await _counts(cat))["media"] == 1
    await cat.close()


def test_cli_ingest_json_and_exit_code(media_dir: Path, tmp_path: Path) -> None:
    bad = make_bad(tmp_path / "notes.mp4", "text")
    res = run_cli(
        "ingest",
        "--json",
        "--container",
        "ts",
        str(media_dir / "odd_44k.mp4"),
        str(bad),
        state_dir=tmp_path / "state",
        timeout=120,
    )
    assert res.returncode == 1, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["ok"] for x in lines] == [True, False]
    assert lines[0]["media_id"].startswith("b")
    assert "not a media file" in lines[1]["error"]
    res2 = run_cli(
        "ingest", str(media_dir / "odd_44k.mp4"), "--container", "ts", state_dir=tmp_path / "state"
    )
    assert res2.returncode == 0
    assert "unchanged" in res2.stdout


def test_codec_strings() -> None:
    avcc = bytes([1, 0x64, 0x00, 0x1F, 0xFF])
    assert codecs.avc_codec(avcc) == "avc1.64001f"
    annexb = b"\x00\x00\x00\x01\x67\x4d\x40\x1e\xaa\x00\x00\x00\x01\x68\xee"
    assert codecs.avc_codec(annexb) == "avc1.4d401e"
    # hvcC of a Main profile, level 3.1 stream (profile_space 0, tier L, compat 0x60000000).
    hvcc = bytes([1, 0x01, 0x60, 0, 0, 0, 0x90, 0, 0, 0, 0, 0, 93])
    assert codecs.hevc_codec(hvcc) == "hvc1.1.6.L93.90"
    assert codecs.audio_codec("aac", "HE-AAC") == "mp4a.40.5"
    assert codecs.audio_codec("opus", None) == "Opus"


def test_fmp4_patch_rewrites_sequence_and_decode_time() -> None:
    def box(t: bytes, payload: bytes) -> bytes:
        return (8 + len(payload)).to_bytes(4, "big") + t + payload

    mfhd = box(b"mfhd", bytes(4) + (1).to_bytes(4, "big"))
    tfhd = box(b"tfhd", bytes(4) + (7).to_bytes(4, "big"))
    tfdt = box(b"tfdt", bytes([1, 0, 0, 0]) + (100).to_bytes(8, "big"))
    moof = box(b"moof", mfhd + box(b"traf", tfhd + tfdt))
    seg = moof + box(b"mdat", b"xx")
    out = fmp4.patch_fragments(seg, 42, {7: 9000})
    assert len(out) == len(seg)
    assert out.find((42).to_bytes(4, "big")) > 0
    assert (9000).to_bytes(8, "big") in out
    with pytest.raises(fmp4.BoxError):
        fmp4.split_init(seg)


async def test_daemon_media_service_watches_library(media_dir: Path, tmp_path: Path) -> None:
    from peerd.config import load_settings
    from peerd.media.ingest import MediaService, node_ingestor
    from peerd.runtime import open_runtime

    lib = tmp_path / "lib"
    lib.mkdir()
    settings = load_settings(
        None,
        node={"state_dir": tmp_path / "state"},
        media={"watch_dirs": [lib], "watch_settle_s": 0.1, "watch_interval_s": 0.05},
    )
    rt = await open_runtime(settings)
    svc = MediaService(rt, node_ingestor(rt))
    ready = asyncio.Event()
    task = asyncio.create_task(svc.run(ready.set))
    await asyncio.wait_for(ready.wait(), 5)
    (lib / "clip.mp4").write_bytes((media_dir / "odd_44k.mp4").read_bytes())
    for _ in range(600):
        if (await _counts(rt.catalog))["media"] == 1:
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await _counts(rt.catalog))["media"] == 1
    text = rt.metrics.render().decode()
    assert 'peerd_media_ingests_total{result="ok"} 1.0' in text
    assert "peerd_media_packaged_seconds_total 3.3" in text
    await rt.close()


def test_media_settings_from_toml_reach_the_packager(tmp_path: Path) -> None:
    from peerd.config import load_settings

    cfg = tmp_path / "p.toml"
    cfg.write_text(
        "[media]\n"
        'container = "ts"\n'
        "segment_seconds = 6\n"
        "crf = 26\n"
        "encoder_threads = 2\n"
        "audio_only = true\n"
        "ladder = [{ height = 480 }, { height = 240, on_demand = true, crf = 30 }]\n"
    )
    opts = load_settings(cfg).media.packaging_options()
    assert opts.container == "ts"
    assert opts.segment_seconds == 6
    assert opts.crf == 26
    assert opts.encoder_threads == 2
    assert opts.audio_only
    assert opts.ladder == (Rung(480), Rung(240, on_demand=True, crf=30))


def test_hevc_is_remuxed_with_the_hvc1_tag(media_dir: Path) -> None:
    sink = MemorySink()
    m, _ = package(media_dir / "hevc_opus.mkv", PackagingOptions(), sink)
    top = m.renditions[0]
    assert top.codecs.startswith("hvc1.")
    assert top.codecs.endswith(",Opus")
    assert top.init is not None
    init = sink.blobs[top.init]
    assert b"hvc1" in init
    assert b"hev1" not in init


async def test_transcode_source_regenerates_evicted_derived_blobs(
    media_dir: Path, tmp_path: Path
) -> None:
    from peerd.delivery import Resolver
    from peerd.media.source import TranscodeSource

    cat, store = await open_node(tmp_path / "node")
    ing = Ingestor(cat, store, PackagingOptions(segment_seconds=2.0, ladder=(Rung(72),)))
    res = await ing.ingest(media_dir / "h264_aac.mp4")
    assert res.media_id is not None
    m = await ing.load_manifest(res.media_id)
    low, top = m.rendition("v72"), m.renditions[0]
    assert low.init is not None
    wanted = [Cid(low.init)] + [Cid(s.cid) for s in low.segments if s.cid]
    before = {c: await store.read(c) for c in wanted}
    for c in wanted:
        await store.evict_local(c)
    source = TranscodeSource(ing)
    resolver = Resolver(store, [source])
    for c in wanted:
        path = await resolver.ensure_local(c)
        assert await asyncio.to_thread(path.read_bytes) == before[c]
    assert source.failures == 0
    # The top rendition came from a file: it cannot be made again, so no offer.
    top_cid = top.segments[0].cid
    assert top_cid is not None
    assert [o async for o in source.offers(Cid(top_cid))] == []
    await cat.close()


@pytest.mark.parametrize("container", ["fmp4", "ts"])
def test_bframe_free_rung_for_webrtc_passthrough(
    media_dir: Path, tmp_path: Path, container: str
) -> None:
    """A ``bframes = 0`` rung (also at the top's height) has no reordered frames, where the top
    rendition does; it is deterministic, ffprobe reads it, and WHEP picks it."""
    from peerd.webrtc.media import pick_rendition, probe_reorders

    opts = PackagingOptions(
        container=container,  # type: ignore[arg-type]
        segment_seconds=2.0,
        transcode="always",
        ladder=(Rung(120, bframes=0), Rung(72, bframes=0), Rung(72)),
    )
    src = media_dir / "h264_aac.mp4"
    sink = MemorySink()
    m, _ = package(src, opts, sink)
    ids = [r.id for r in m.renditions]
    assert ids == ["v120", "v120-nobf", "v72-nobf", "v72"]
    by_id = {r.id: r for r in m.renditions}

    def reorders(r: mf.Rendition) -> bool:
        seg = tmp_path / f"{r.id}.seg"
        assert r.segments[0].cid is not None
        seg.write_bytes(sink.blobs[r.segments[0].cid])
        return probe_reorders(m.container, sink.blobs[r.init] if r.init else None, seg)

    assert reorders(by_id["v120"])  # x264's preset uses B-frames: the test can tell
    assert reorders(by_id["v72"])
    assert not reorders(by_id["v120-nobf"])
    assert not reorders(by_id["v72-nobf"])
    for rid in ("v120-nobf", "v72-nobf"):
        rec = by_id[rid].recipe
        assert rec is not None
        assert rec.bframes == 0
    assert mf.decode(mf.encode(m)) == m
    _check_with_ffprobe(m, sink.blobs, tmp_path / "hls", fps=30)
    # The same input and options give the same bytes (the x264 "bf" option is deterministic).
    again = MemorySink()
    m2, _ = package(src, opts, again)
    assert mf.media_id_of(m2) == mf.media_id_of(m)
    # WebRTC takes the tallest B-frame-free rendition that fits.
    assert pick_rendition(m, 1080).id == "v120-nobf"
    assert pick_rendition(m, 100).id == "v72-nobf"
