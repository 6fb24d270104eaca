"""``make demo``: a node on embedded defaults with generated sample media.

Creates ``./.state/demo`` (node key, secrets, catalog), generates a 20 s sample clip with ffmpeg's
test sources (no download), ingests it, prints a signed playback URL, then runs the daemon in the
foreground until Ctrl-C. Re-running reuses the state (the repeated ingest stores nothing new).
``PEERD_DEMO_STATE`` moves the state directory; the usual ``PEERD_*`` variables apply (e.g.
``PEERD_HTTP__PORT=8800`` when 8737 is taken).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from peerd.catalog import Catalog
from peerd.catalog.media import latest_media_id
from peerd.cli import main as cli_main
from peerd.config import load_settings
from peerd.core import tokens

STATE = Path(".state/demo")


async def _media_id(catalog_path: Path, source: str) -> str:
    cat = await Catalog.open(catalog_path)  # before the daemon starts
    try:
        media_id = await latest_media_id(cat, source) or await latest_media_id(cat)
    finally:
        await cat.close()
    if media_id is None:
        raise SystemExit("demo: ingest stored no media")
    return media_id


def make_sample(path: Path, seconds: int = 20) -> None:
    """Write a synthetic 640x360 H.264/AAC clip (ffmpeg's lavfi test sources; no download)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise SystemExit("demo: ffmpeg is not installed (Debian package: ffmpeg)")
    src = f"testsrc2=size=640x360:rate=25:duration={seconds}"
    tone = f"sine=frequency=440:beep_factor=4:sample_rate=48000:duration={seconds}"
    args = [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
    args += ["-f", "lavfi", "-i", src, "-f", "lavfi", "-i", tone, "-map", "0:v", "-map", "1:a"]
    args += ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", "25"]
    args += ["-c:a", "aac", "-b:a", "64k", "-ac", "2", "-map_metadata", "-1"]
    # Written beside the target and renamed, so an interrupted demo never ingests half a file.
    part = path.with_name(path.name + ".part.mp4")
    subprocess.run([*args, str(part)], check=True)  # noqa: S603 - fixed argument list
    part.replace(path)


def main() -> int:
    """Set up, ingest, print the URL, run the daemon."""
    state = Path(os.environ.get("PEERD_DEMO_STATE", str(STATE))).resolve()
    base = ["--state-dir", str(state)]
    if cli_main([*base, "init"]) != 0:
        return 1
    sample = state / "media" / "sample.mp4"
    if not sample.exists():
        sample.parent.mkdir(parents=True, exist_ok=True)
        print("demo: generating a 20 s sample clip (ffmpeg test sources)...", flush=True)
        make_sample(sample)
    if cli_main([*base, "ingest", str(sample)]) != 0:
        return 1
    settings = load_settings(None, node={"state_dir": state})
    media_id = asyncio.run(_media_id(settings.catalog_path, str(sample.resolve())))
    secret = settings.secret("hls_signing_key")
    assert secret is not None
    token = tokens.mint(
        tokens.key_from_secret(secret), media_id, "hls", int(time.time()) + 24 * 3600
    )
    url = (
        f"http://{settings.http.host}:{settings.http.port}/hls/{media_id}/master.m3u8?token={token}"
    )
    print("\n" + "=" * 78)
    print("peerd demo node starting. Playback URL (valid 24 h):\n")
    print(f"  {url}\n")
    print(f"  try:  ffplay '{url}'")
    print(f"  or:   ffmpeg -i '{url}' -f null -")
    print(
        f"  dashboard: http://{settings.http.host}:{settings.http.port}/ui"
        f"  (token in {settings.secrets_path / 'admin_token'})"
    )
    print("Stop with Ctrl-C.")
    print("=" * 78 + "\n", flush=True)
    return cli_main([*base, "run"])


if __name__ == "__main__":
    sys.exit(main())
