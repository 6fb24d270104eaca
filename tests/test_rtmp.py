"""RTMP/RTMPS ingest from outside: Debian's ffmpeg CLI publishes to peerd.live.rtmp.RtmpService.

The service runs in the test's event loop with a fake live service (keys configurable, every
publication's begin/frame/end recorded); what arrives is compared with the published file as
tests.support.livefeed reads it.
"""

from __future__ import annotations

import asyncio
import datetime
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from peerd import errors
from peerd.config import LiveInputSettings, LiveSettings
from peerd.core.live import LiveFrame, LiveTrack, Protocol_, Publication
from peerd.core.rtmp import Frame, PublishRequested, RtmpConnection, State, Unpublished
from peerd.live.rtmp import RtmpService
from tests.support.livefeed import read_file
from tests.support.media import ffmpeg_path, make_media
from tests.support.poll import until
from tests.test_rtmp_core import AVCC, avc, chunk, command, handshake, media, nal

KEY = "s3cret-key"


@dataclass
class Recorded:
    """One publication as the fake live service saw it."""

    input: str
    protocol: str
    remote: str
    tracks: list[LiveTrack] | None = None
    frames: list[LiveFrame] = field(default_factory=list)
    ended: str | None = None
    calls_after_end: int = 0

    def begin(self, tracks: Sequence[LiveTrack]) -> None:
        """Record the tracks (once, before frames)."""
        assert self.tracks is None
        assert not self.frames
        self.tracks = list(tracks)

    def frame(self, frame: LiveFrame) -> None:
        """Record a frame."""
        assert self.tracks is not None
        if self.ended is not None:
            self.calls_after_end += 1
        self.frames.append(frame)

    def end(self, reason: str) -> None:
        """Record the end (once)."""
        if self.ended is not None:
            self.calls_after_end += 1
        self.ended = reason


class FakeInputs:
    """A LiveInputs: ``keys`` maps a stream key to its input; one publisher per input."""

    def __init__(self, keys: dict[str, str]) -> None:
        self.keys = keys
        self.publications: list[Recorded] = []

    def open(self, key: str, *, input: str | None, protocol: Protocol_, remote: str) -> Publication:
        """Accept ``key`` or raise as the real live service does."""
        name = self.keys.get(key)
        if name is None:
            raise errors.Unauthorized("stream key refused")
        if any(p.input == name and p.ended is None for p in self.publications):
            raise errors.Conflict(f"live input {name} already has a publisher")
        rec = Recorded(name, protocol, remote)
        self.publications.append(rec)
        return Publication(name, protocol, rec)


@asynccontextmanager
async def serving(
    inputs: FakeInputs, **live: object
) -> AsyncIterator[tuple[RtmpService, CollectorRegistry]]:
    """An RtmpService on free loopback ports, run as the supervisor runs it."""
    registry = CollectorRegistry()
    # The fake decides who may publish; one configured input opens the listener.
    settings = LiveSettings.model_validate(
        {"rtmp_listen": "127.0.0.1:0", "inputs": [{"name": "cam"}], **live}
    )
    service = RtmpService(settings, inputs, registry=registry)
    ready = asyncio.Event()
    task = asyncio.create_task(service.run(ready.set))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield service, registry
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def publish(
    clip: Path, url: str, *codecs: str, realtime: bool = True
) -> asyncio.subprocess.Process:
    """ffmpeg publishing ``clip`` as FLV to ``url`` (started, not awaited); ``codecs`` are
    ffmpeg's codec options (default: copy)."""
    args = [ffmpeg_path(), "-hide_banner", "-loglevel", "error", "-nostdin"]
    if realtime:
        args.append("-re")
    args += ["-i", str(clip), *(codecs or ("-c", "copy")), "-f", "flv", url]
    return await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """ffmpeg's exit code and what it printed."""
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


def refusals(registry: CollectorRegistry, reason: str) -> float:
    """peerd_live_rtmp_refusals_total{reason}."""
    value = registry.get_sample_value("peerd_live_rtmp_refusals_total", {"reason": reason})
    return value or 0.0


def ms(ticks: int, timescale: int) -> int:
    """Ticks as whole milliseconds, rounded half away from zero as ffmpeg rescales."""
    q, r = divmod(abs(ticks) * 1000, timescale)
    v = q + (1 if 2 * r >= timescale else 0)
    return v if ticks >= 0 else -v


def assert_same_media(rec: Recorded, clip: Path) -> None:
    """What arrived is the file: configs, payloads per track in order, keyframes, timestamps."""
    tracks, frames = read_file(clip)
    assert rec.tracks is not None
    assert [(t.kind, t.codec, t.config) for t in rec.tracks] == [
        (t.kind, t.codec, t.config) for t in tracks
    ]
    for got_track, want_track in zip(rec.tracks, tracks, strict=True):
        assert got_track.timescale == 1000
        assert got_track.sample_rate == want_track.sample_rate
        assert got_track.channels == want_track.channels
        got = [f for f in rec.frames if f.track == got_track.index]
        want = [f for f in frames if f.track == want_track.index]
        assert [f.data for f in got] == [f.data for f in want]
        assert [f.keyframe for f in got] == [f.keyframe for f in want]
        ts = want_track.timescale
        assert [f.pts - f.dts for f in got] == [ms(f.pts, ts) - ms(f.dts, ts) for f in want]
        # Rebased: one offset, the same on every frame of every track.
        offsets = {ms(w.dts, ts) - g.dts for g, w in zip(got, want, strict=True)}
        assert len(offsets) == 1
    assert rec.frames[0].dts == 0


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """H.264+AAC, video-only and audio-only clips."""
    d = tmp_path_factory.mktemp("rtmp")
    return {
        "av": make_media(d / "av.mp4", seconds=3),
        "video": make_media(d / "video.mp4", seconds=2, acodec=None),
        "long": make_media(d / "long.mp4", seconds=8),
    }


@pytest.fixture(scope="module")
def audio_clip(clips: dict[str, Path]) -> Path:
    """An audio-only MP4 (AAC), cut from the H.264+AAC clip."""
    out = clips["av"].with_name("audio.mp4")
    cmd = [ffmpeg_path(), "-loglevel", "error", "-y", "-i", str(clips["av"]), "-vn", "-c", "copy"]
    subprocess.run([*cmd, str(out)], check=True)  # noqa: S603
    return out


async def test_ffmpeg_publishes_the_file_frame_for_frame(clips: dict[str, Path]) -> None:
    inputs = FakeInputs({KEY: "cam"})
    async with serving(inputs) as (service, registry):
        port = service.addresses["rtmp"][1]
        proc = await publish(clips["av"], f"rtmp://127.0.0.1:{port}/live/{KEY}")
        code, err = await finish(proc)
        assert code == 0, err
        (rec,) = inputs.publications
        await until(lambda: rec.ended is not None, 10)
        assert rec.ended == "unpublished"
        assert (rec.input, rec.protocol) == ("cam", "rtmp")
        assert rec.remote.startswith("127.0.0.1:")
        await asyncio.to_thread(assert_same_media, rec, clips["av"])
        assert rec.calls_after_end == 0
        assert registry.get_sample_value("peerd_live_rtmp_connections", {"scheme": "rtmp"}) == 0


@pytest.mark.parametrize("kind", ["video", "audio"])
async def test_video_only_and_audio_only(
    kind: str, clips: dict[str, Path], audio_clip: Path
) -> None:
    clip = clips["video"] if kind == "video" else audio_clip
    inputs = FakeInputs({KEY: "cam"})
    async with serving(inputs) as (service, _):
        port = service.addresses["rtmp"][1]
        code, err = await finish(await publish(clip, f"rtmp://127.0.0.1:{port}/live/{KEY}"))
        assert code == 0, err
        (rec,) = inputs.publications
        await until(lambda: rec.ended == "unpublished", 10)
        assert rec.tracks is not None
        assert [t.kind for t in rec.tracks] == [kind]
        await asyncio.to_thread(assert_same_media, rec, clip)


async def test_wrong_key_is_refused(clips: dict[str, Path]) -> None:
    inputs = FakeInputs({KEY: "cam"})
    async with serving(inputs) as (service, registry):
        port = service.addresses["rtmp"][1]
        proc = await publish(clips["av"], f"rtmp://127.0.0.1:{port}/live/wrong-key")
        code, err = await finish(proc)
        assert code != 0
        assert "stream key refused" in err
        assert inputs.publications == []
        assert refusals(registry, "bad_key") == 1


async def test_second_publisher_is_refused_and_the_first_goes_on(clips: dict[str, Path]) -> None:
    inputs = FakeInputs({KEY: "cam", "other-key": "cam"})
    async with serving(inputs) as (service, registry):
        url = f"rtmp://127.0.0.1:{service.addresses['rtmp'][1]}/live/"
        first = await publish(clips["long"], url + KEY)
        await until(lambda: inputs.publications and len(inputs.publications[0].frames) > 20, 30)
        code, err = await finish(await publish(clips["av"], url + "other-key"))
        assert code != 0
        assert "already has a publisher" in err
        assert refusals(registry, "busy") == 1
        code, err = await finish(first)
        assert code == 0, err
        (rec,) = inputs.publications
        await until(lambda: rec.ended is not None, 10)
        assert rec.ended == "unpublished"
        await asyncio.to_thread(assert_same_media, rec, clips["long"])


async def test_a_killed_publisher_vanishes(clips: dict[str, Path]) -> None:
    inputs = FakeInputs({KEY: "cam"})
    async with serving(inputs, idle_timeout_s=3) as (service, _):
        port = service.addresses["rtmp"][1]
        proc = await publish(clips["long"], f"rtmp://127.0.0.1:{port}/live/{KEY}")
        await until(lambda: inputs.publications and len(inputs.publications[0].frames) > 20, 30)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        (rec,) = inputs.publications
        await until(lambda: rec.ended is not None, 3 + 5)
        assert rec.ended is not None
        assert rec.ended.startswith("vanished: ")
        # The input is free again: the same key publishes at once.
        code, err = await finish(await publish(clips["video"], f"rtmp://127.0.0.1:{port}/l/{KEY}"))
        assert code == 0, err
        assert len(inputs.publications) == 2


async def test_a_silent_publisher_vanishes_after_the_idle_timeout() -> None:
    inputs = FakeInputs({KEY: "cam"})
    async with serving(inputs, idle_timeout_s=1) as (service, _):
        port = service.addresses["rtmp"][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(handshake() + command("connect", 1.0, {"app": "live"}))
        writer.write(command("createStream", 2.0, None))
        writer.write(command("publish", 3.0, None, KEY, "live", msid=1))
        await until(lambda: inputs.publications, 10)
        writer.write(media(9, avc(0, AVCC), 0, size=128) + media(9, avc(1, nal(b"\x65")), 0))
        (rec,) = inputs.publications
        await until(lambda: rec.frames, 10)
        # Silent but connected: no FIN, nothing. The idle timeout ends it.
        await until(lambda: rec.ended is not None, 1 + 10)
        assert rec.ended == "vanished: nothing received for 1 s"
        await asyncio.wait_for(reader.read(), 10)  # and the connection is closed
        writer.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not RTMP at all
        handshake() + bytes((0x43,)) + b"\xff" * 64,  # format 1 on a fresh chunk stream
        handshake() + chunk(3, b"\x02\x00\xffab", type_id=20),  # truncated AMF0 command
        handshake() + chunk(3, bytes(64), type_id=20, length=2**24 - 1),  # a message over 8 MiB
    ],
)
async def test_garbage_closes_the_connection_and_serving_goes_on(
    garbage: bytes, clips: dict[str, Path]
) -> None:
    inputs = FakeInputs({KEY: "cam"})
    async with serving(inputs) as (service, registry):
        port = service.addresses["rtmp"][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(garbage)
        rest = await asyncio.wait_for(reader.read(), 10)  # the server closes: EOF
        assert len(rest) <= 1 + 2 * 1536 + 600
        writer.close()
        assert sum(refusals(registry, r) for r in ("protocol", "unsupported", "limit")) == 1
        code, err = await finish(
            await publish(clips["video"], f"rtmp://127.0.0.1:{port}/live/{KEY}")
        )
        assert code == 0, err
        (rec,) = inputs.publications
        await until(lambda: rec.ended == "unpublished", 10)


async def test_handshake_deadline() -> None:
    inputs = FakeInputs({KEY: "cam"})
    async with serving(inputs) as (service, registry):
        service.handshake_timeout_s = 0.5
        port = service.addresses["rtmp"][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x03")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert refusals(registry, "handshake_timeout") == 1


async def test_unsupported_codecs_are_refused(clips: dict[str, Path]) -> None:
    inputs = FakeInputs({KEY: "cam"})
    async with serving(inputs) as (service, registry):
        url = f"rtmp://127.0.0.1:{service.addresses['rtmp'][1]}/live/{KEY}"
        mp3 = ("-c:v", "copy", "-c:a", "libmp3lame", "-b:a", "64k")
        code, _ = await finish(await publish(clips["long"], url, *mp3))
        assert code != 0
        (rec,) = inputs.publications
        await until(lambda: rec.ended is not None, 10)
        assert rec.ended == ("vanished: unsupported: audio codec MP3 is not supported; publish AAC")
        assert refusals(registry, "unsupported") == 1


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM)."""
    d = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_rtmps_with_a_self_signed_certificate(
    clips: dict[str, Path], tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    inputs = FakeInputs({KEY: "cam"})
    live = {"rtmps_listen": "127.0.0.1:0", "rtmps_cert": cert, "rtmps_key": key}
    async with serving(inputs, **live) as (service, _):
        port = service.addresses["rtmps"][1]
        # Plain RTMP bytes on the TLS port go nowhere.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(handshake())
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        code, err = await finish(await publish(clips["av"], f"rtmps://127.0.0.1:{port}/live/{KEY}"))
        assert code == 0, err
        (rec,) = inputs.publications
        await until(lambda: rec.ended is not None, 10)
        assert (rec.protocol, rec.ended) == ("rtmps", "unpublished")
        await asyncio.to_thread(assert_same_media, rec, clips["av"])
        # The certificate is the one configured.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert der == x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
        writer.close()


# -- a real session, split anywhere ------------------------------------------------------------


@pytest.fixture(scope="module")
def captured(clips: dict[str, Path]) -> bytes:
    """Every byte ffmpeg sent publishing the H.264+AAC clip, recorded by a proxy in between."""

    async def record() -> bytes:
        recorded = bytearray()
        inputs = FakeInputs({KEY: "cam"})
        async with serving(inputs) as (service, _):
            port = service.addresses["rtmp"][1]

            async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, keep: bool) -> None:
                while data := await r.read(65536):
                    if keep:
                        recorded.extend(data)
                    w.write(data)
                    await w.drain()
                w.close()

            async def relay(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
                sr, sw = await asyncio.open_connection("127.0.0.1", port)
                await asyncio.gather(pipe(cr, sw, True), pipe(sr, cw, False))

            proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
            proxy_port = proxy.sockets[0].getsockname()[1]
            url = f"rtmp://127.0.0.1:{proxy_port}/live/{KEY}"
            code, err = await finish(await publish(clips["av"], url, realtime=False))
            assert code == 0, err
            await until(lambda: inputs.publications and inputs.publications[0].ended, 10)
            proxy.close()
            await proxy.wait_closed()
        return bytes(recorded)

    return asyncio.run(record())


def replay(data: bytes, cuts: Sequence[int]) -> list[object]:
    """The state machine's events for ``data`` fed in pieces (accepting the publish at once)."""
    conn = RtmpConnection()
    events: list[object] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        got = conn.receive(data[last:cut])
        events += got
        if any(isinstance(e, PublishRequested) for e in got):
            conn.accept()
        last = cut
    return events


def publish_boundary(data: bytes) -> int:
    """Where the publish command ends (ffmpeg sends nothing more before its answer)."""
    conn = RtmpConnection()
    for i in range(len(data)):
        conn.receive(data[i : i + 1])
        if conn.state is State.PUBLISH_PENDING:
            return i + 1
    raise AssertionError("no publish in the captured session")


def test_a_captured_session_gives_the_same_events_however_it_is_split(
    captured: bytes, clips: dict[str, Path]
) -> None:
    boundary = publish_boundary(captured)
    whole = replay(captured, [boundary])
    frames = [e for e in whole if isinstance(e, Frame)]
    assert len(frames) == len(read_file(clips["av"])[1])
    assert isinstance(whole[-1], Unpublished)

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=len(captured)), max_size=200))
    def splits(cuts: list[int]) -> None:
        assert replay(captured, [boundary, *cuts]) == whole

    splits()


async def test_connection_cap() -> None:
    inputs = FakeInputs({KEY: "cam"})
    async with serving(inputs) as (service, registry):
        service.max_connections = 1
        port = service.addresses["rtmp"][1]
        _, first = await asyncio.open_connection("127.0.0.1", port)
        first.write(b"\x03")
        await until(
            lambda: (
                registry.get_sample_value("peerd_live_rtmp_connections", {"scheme": "rtmp"}) == 1
            ),
            10,
        )
        reader, second = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert refusals(registry, "capacity") == 1
        first.close()
        second.close()


async def test_rtmps_without_a_certificate_is_a_config_error() -> None:
    settings = LiveSettings(
        rtmp_listen="", rtmps_listen="127.0.0.1:0", inputs=[LiveInputSettings(name="cam")]
    )
    service = RtmpService(settings, FakeInputs({}))
    with pytest.raises(errors.ConfigError, match="rtmps_cert"):
        await service.run(lambda: None)
