"""A live publication cut by a crash: ``python -m tests.support.livecrash STATE CLIP FRAMES``.

Opens the node's runtime on STATE (its ``[live]`` inputs given as JSON in ``PEERD_TEST_INPUTS``,
default one input ``cam``), accepts a publisher on the first input with its key, and publishes
the first FRAMES video frames of CLIP (with the audio between them) in real time into the
:class:`~peerd.live.service.LiveService` and its recorder, as an ingest adapter would. Then it
prints one JSON line (``fed_video``: video frames fed, ``gop``: video frames per keyframe
interval) and kills itself with SIGKILL: the daemon dying mid-stream, its recording left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from peerd.config import load_settings
from peerd.live.record import Recorder
from peerd.live.service import LiveService
from peerd.media.ingest import node_ingestor
from peerd.runtime import open_runtime
from tests.support.livefeed import read_file


async def main(state: Path, clip: Path, video_frames: int) -> None:
    """Publish, then die."""
    inputs = json.loads(os.environ.get("PEERD_TEST_INPUTS", '[{"name": "cam"}]'))
    settings = load_settings(None, node={"state_dir": state}, live={"inputs": inputs})
    rt = await open_runtime(settings)
    live = settings.live
    recorder = Recorder(state / "live", node_ingestor(rt), live.inputs, segment_s=live.segment_s)
    svc = LiveService(live, secret=settings.secret, recorder=recorder)
    await asyncio.to_thread(svc.load_keys)
    first = live.inputs[0]
    key = await asyncio.to_thread(settings.secret, first.secret_name)
    pub = svc.open(key or "", input=first.name, protocol="rtmp", remote="127.0.0.1:40000")
    tracks, frames = await asyncio.to_thread(read_file, clip)
    video = {t.index for t in tracks if t.kind == "video"}
    keys = [i for i, f in enumerate(x for x in frames if x.track in video) if f.keyframe]
    pub.sink.begin(tracks)
    loop = asyncio.get_running_loop()
    start = loop.time()
    fed = 0
    for f in frames:
        if f.track in video:
            if fed == video_frames:
                break
            fed += 1
        delay = start + f.dts / tracks[f.track].timescale - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        pub.sink.frame(f)
    gop = keys[1] - keys[0] if len(keys) > 1 else fed
    sys.stdout.write(json.dumps({"fed_video": fed, "gop": gop}) + "\n")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])))
