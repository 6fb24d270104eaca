"""``peerd ingest`` with other packaging options packages the file again; same options skip.

The real CLI (``python -m peerd ingest``, in its own process, no daemon): a file ingested as
fMP4, then with ``--container ts``, then with ``--segment-seconds 2``, gets three media ids, each
ingest of an option set already seen is skipped with that set's id, and both the fMP4 and the
MPEG-TS items play (ffprobe reads their master playlists from a daemon over HTTP).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest

from tests.support.media import make_media
from tests.support.process import PeerdProcess, run_cli
from tests.support.r2media import hls_url

pytestmark = pytest.mark.timeout(240)


def ingest(state: Path, clip: Path, *options: str) -> dict[str, Any]:
    out = run_cli(
        "ingest", "--no-progress", "--json", *options, str(clip), state_dir=state, timeout=120
    )
    assert out.returncode == 0, out.stderr
    res: dict[str, Any] = json.loads(out.stdout)
    return res


def ffprobe(url: str) -> dict[str, Any]:
    exe = shutil.which("ffprobe")
    assert exe is not None, "ffprobe is not installed (Debian package: ffmpeg)"
    args = ["-v", "error", "-of", "json", "-show_entries", "stream=codec_type:format=format_name"]
    res = subprocess.run(  # noqa: S603 - fixed argument list
        [exe, *args, url], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr
    info: dict[str, Any] = json.loads(res.stdout)
    return info


def test_other_packaging_options_make_another_media_item(tmp_path: Path) -> None:
    clip = make_media(tmp_path / "clip.mp4", seconds=5.0)
    state = tmp_path / "node"

    fmp4 = ingest(state, clip)
    assert fmp4["skipped"] is False
    ts = ingest(state, clip, "--container", "ts")
    assert ts["skipped"] is False, ts
    assert ts["media_id"] != fmp4["media_id"]
    again = ingest(state, clip, "--container", "ts")
    assert (again["skipped"], again["media_id"]) == (True, ts["media_id"])
    short = ingest(state, clip, "--segment-seconds", "2")
    assert short["skipped"] is False, short
    assert short["media_id"] not in (fmp4["media_id"], ts["media_id"])
    first = ingest(state, clip)
    assert (first["skipped"], first["media_id"]) == (True, fmp4["media_id"])

    node = PeerdProcess(state, config={"webrtc": {"enabled": False}})
    node.start()
    try:
        for media_id, fmp4_segments in ((fmp4["media_id"], True), (ts["media_id"], False)):
            master = hls_url(node.base_url, state, media_id)
            info = ffprobe(master)
            kinds = sorted(s["codec_type"] for s in info["streams"])
            assert kinds == ["audio", "video"], info
            assert info["format"]["format_name"] == "hls", info
            # The TS item's media playlists name MPEG-TS segments (no fMP4 init segment).
            with urllib.request.urlopen(master, timeout=10) as r:  # noqa: S310
                variant = next(x for x in r.read().decode().splitlines() if x and x[0] != "#")
            with urllib.request.urlopen(urljoin(master, variant), timeout=10) as r:  # noqa: S310
                assert ("#EXT-X-MAP" in r.read().decode()) is fmp4_segments
    finally:
        assert node.stop() == 0, node.logs()[-3000:]


def test_rows_from_before_options_were_recorded_count_as_the_nodes_options(
    tmp_path: Path,
) -> None:
    """A catalog row written before the options were part of the source signature is taken as
    packaged with the node's options: not packaged again by an upgrade, but other options still
    make another item."""
    clip = make_media(tmp_path / "clip.mp4", seconds=3.0)
    state = tmp_path / "node"
    first = ingest(state, clip)
    db = sqlite3.connect(state / "catalog.sqlite3")
    try:
        # What the previous version recorded: size:mtime only.
        sig = "substr(source_sig, 1, instr(source_sig, '/') - 1)"
        db.execute(f"UPDATE media SET source_sig = {sig}")  # noqa: S608
        db.commit()
    finally:
        db.close()
    again = ingest(state, clip)
    assert (again["skipped"], again["media_id"]) == (True, first["media_id"])
    ts = ingest(state, clip, "--container", "ts")
    assert ts["skipped"] is False
    assert ts["media_id"] != first["media_id"]
