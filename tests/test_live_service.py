"""The live service without sockets: keys, one publisher per input, the tee, idle timeout, status.

Plain synchronous tests: the service's clock is passed in, publications are driven by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from peerd.config import LiveInputSettings, LiveSettings
from peerd.core.live import LiveFrame, LiveSink, LiveTrack
from peerd.errors import Conflict, NotFound, Unauthorized, Unavailable
from peerd.live.service import IDLE_REASON, LiveService, address_of

KEYS = {"live-cam.key": "cam-key-0123456789", "stage-secret": "stage-key-abcdefgh"}
AVCC = bytes.fromhex("01640028ffe1")  # avcC: High profile, level 4.0 (enough for the codec string)
ASC = bytes([0x11, 0x90])  # AudioSpecificConfig: AAC LC, 48 kHz, stereo
TRACKS = (
    LiveTrack(0, "video", "h264", 90000, AVCC, width=640, height=360),
    LiveTrack(1, "audio", "aac", 48000, ASC, sample_rate=48000, channels=2),
)


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sink:
    """A consumer's sink that remembers what it got, and can be told to fail."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.calls: list[str] = []
        self.frames = 0
        self.ends: list[str] = []

    def begin(self, tracks: Sequence[LiveTrack]) -> None:
        self.calls.append("begin")
        if self.fail_on == "begin":
            raise RuntimeError("consumer broke in begin")

    def frame(self, frame: LiveFrame) -> None:
        self.calls.append("frame")
        if self.fail_on == "frame":
            raise RuntimeError("consumer broke in frame")
        self.frames += 1

    def end(self, reason: str) -> None:
        self.calls.append("end")
        self.ends.append(reason)


class Consumer:
    """A LiveConsumer handing out one Sink per publication."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.sinks: list[Sink] = []

    def publication(self, input: str) -> LiveSink:
        if self.fail_on == "publication":
            raise RuntimeError("consumer refused")
        sink = Sink(self.fail_on)
        self.sinks.append(sink)
        return sink


def service(*consumers: Consumer, clock: Clock | None = None, keys: bool = True) -> LiveService:
    settings = LiveSettings(
        inputs=[
            LiveInputSettings(name="cam"),
            LiveInputSettings(name="stage", key_secret="stage-secret", record=False),
            LiveInputSettings(name="nokey"),
        ],
        idle_timeout_s=10,
    )
    svc = LiveService(
        settings,
        secret=(KEYS.get if keys else lambda name: None),
        consumers=consumers,
        registry=CollectorRegistry(),
        clock=clock or Clock(),
        wall=lambda: 1_700_000_000.0,
    )
    svc.load_keys()
    return svc


def frame(dts: int, size: int = 1000, key: bool = False, track: int = 0) -> LiveFrame:
    return LiveFrame(track=track, dts=dts, pts=dts, keyframe=key, data=b"\0" * size)


def metric(svc: LiveService, name: str, labels: dict[str, str] | None = None) -> float:
    registry = svc.metrics.registry
    assert registry is not None
    return float(registry.get_sample_value(name, labels or {}) or 0)


# -- keys ------------------------------------------------------------------------------------------


def test_a_key_opens_its_input_and_no_other() -> None:
    svc = service()
    pub = svc.open(KEYS["live-cam.key"], input=None, protocol="rtmp", remote="192.0.2.7:50000")
    assert pub.input == "cam"
    assert pub.protocol == "rtmp"
    pub2 = svc.open(KEYS["stage-secret"], input="stage", protocol="whip", remote="[2001:db8::5]:9")
    assert pub2.input == "stage"
    with pytest.raises(Unauthorized):
        svc.open("wrong", input=None, protocol="rtmp", remote="192.0.2.7:1")
    with pytest.raises(Unauthorized):  # cam's key names cam, not stage
        svc.open(KEYS["live-cam.key"], input="stage", protocol="whip", remote="192.0.2.7:1")
    with pytest.raises(NotFound):
        svc.open(KEYS["live-cam.key"], input="nosuch", protocol="whip", remote="192.0.2.7:1")
    with pytest.raises(Unauthorized):
        svc.open("", input=None, protocol="rtmp", remote="192.0.2.7:1")
    assert metric(svc, "peerd_live_refusals_total", {"reason": "key"}) == 3
    assert metric(svc, "peerd_live_refusals_total", {"reason": "unknown_input"}) == 1


def test_an_input_without_its_key_file_refuses_everyone_and_says_which_file(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="peerd.live"):
        svc = service(keys=False)
    named = [r for r in caplog.records if getattr(r, "key_file", None) == "live-cam.key"]
    assert len(named) == 1
    assert getattr(named[0], "input", None) == "cam"
    for key in ("", "anything", KEYS["live-cam.key"]):
        with pytest.raises(Unauthorized):
            svc.open(key, input="cam", protocol="whip", remote="192.0.2.7:1")


def test_keys_never_reach_the_log(caplog: pytest.LogCaptureFixture) -> None:
    svc = service()
    with caplog.at_level(logging.DEBUG):
        pub = svc.open(KEYS["live-cam.key"], input=None, protocol="rtmp", remote="192.0.2.7:5")
        with pytest.raises(Unauthorized):
            svc.open("guess-" + KEYS["stage-secret"], input=None, protocol="rtmp", remote="x:1")
        pub.sink.end("unpublished")
    text = " ".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert "live input connected" in text
    assert KEYS["live-cam.key"] not in text
    assert KEYS["stage-secret"] not in text


# -- one publisher -------------------------------------------------------------------------------


def test_one_publisher_per_input_until_it_ends() -> None:
    svc = service()
    first = svc.open(KEYS["live-cam.key"], input="cam", protocol="rtmp", remote="192.0.2.7:1")
    with pytest.raises(Conflict):
        svc.open(KEYS["live-cam.key"], input=None, protocol="whip", remote="192.0.2.8:1")
    assert metric(svc, "peerd_live_refusals_total", {"reason": "busy"}) == 1
    first.sink.end("unpublished")
    again = svc.open(KEYS["live-cam.key"], input=None, protocol="whip", remote="192.0.2.8:1")
    assert again.protocol == "whip"


def test_a_stopping_service_refuses_publishers() -> None:
    svc = service()
    svc.stopping = True
    with pytest.raises(Unavailable):
        svc.open(KEYS["live-cam.key"], input=None, protocol="rtmp", remote="192.0.2.7:1")


# -- the tee ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_on", ["publication", "begin", "frame"])
def test_a_failing_consumer_is_dropped_and_the_others_get_everything(
    fail_on: str, caplog: pytest.LogCaptureFixture
) -> None:
    good, bad = Consumer(), Consumer(fail_on)
    svc = service(bad, good)
    pub = svc.open(KEYS["live-cam.key"], input=None, protocol="rtmp", remote="192.0.2.7:1")
    with caplog.at_level(logging.ERROR, logger="peerd.live"):
        pub.sink.begin(TRACKS)
        for i in range(5):
            pub.sink.frame(frame(i * 3000, key=i == 0))
        pub.sink.end("unpublished")
    assert good.sinks[0].calls == ["begin"] + ["frame"] * 5 + ["end"]
    assert good.sinks[0].ends == ["unpublished"]
    failures = [r for r in caplog.records if "consumer" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    if bad.sinks:
        # Called up to its failure, never again (not even for the end).
        assert bad.sinks[0].calls[-1] == fail_on
        assert "end" not in bad.sinks[0].calls


# -- idle timeout and end ------------------------------------------------------------------------


def test_a_silent_publisher_vanishes_and_end_is_idempotent() -> None:
    clock = Clock()
    consumer = Consumer()
    svc = service(consumer, clock=clock)
    seen: list[str] = []
    svc.add_listener(lambda: seen.append("report"))
    pub = svc.open(KEYS["live-cam.key"], input=None, protocol="rtmp", remote="192.0.2.7:1")
    assert seen == ["report"]
    pub.sink.begin(TRACKS)
    clock.now += 9
    pub.sink.frame(frame(0, key=True))
    clock.now += 9.9
    assert svc.check_idle() == []
    clock.now += 0.1
    assert svc.check_idle() == ["cam"]
    assert consumer.sinks[0].ends == [IDLE_REASON]
    assert [s.connected for s in svc.status()] == [False, False, False]
    # The adapter learns later and ends it too; frames after the end go nowhere.
    pub.sink.frame(frame(3000))
    pub.sink.end("connection reset")
    assert consumer.sinks[0].ends == [IDLE_REASON]
    assert consumer.sinks[0].frames == 1
    assert seen == ["report", "report"]
    labels = {"protocol": "rtmp", "outcome": "vanished"}
    assert metric(svc, "peerd_live_publications_total", labels) == 1
    # The input is free again, and the idle end of the old publication does not touch the new.
    new = svc.open(KEYS["live-cam.key"], input=None, protocol="rtmp", remote="192.0.2.7:2")
    pub.sink.end("late")
    assert svc.status()[0].connected
    new.sink.end("unpublished")
    labels = {"protocol": "rtmp", "outcome": "unpublished"}
    assert metric(svc, "peerd_live_publications_total", labels) == 1


# -- status ----------------------------------------------------------------------------------------


def test_status_of_a_connected_input() -> None:
    clock = Clock()
    svc = service(clock=clock)
    svc.add_viewer_counter(lambda name: 3 if name == "cam" else 0)
    svc.add_viewer_counter(lambda name: 2)
    svc.add_viewer_counter(lambda name: 1 // 0)  # a broken counter counts nothing
    pub = svc.open(KEYS["live-cam.key"], input=None, protocol="whip", remote="[2001:db8::5]:4000")
    pub.sink.begin(TRACKS)
    # 10 s at 125,000 bytes a second: 1 Mbit/s over the window.
    for i in range(100):
        clock.now += 0.1
        pub.sink.frame(frame(i * 9000, size=12_500, key=i % 20 == 0))
    cam, stage, nokey = svc.status()
    assert [cam.connected, stage.connected, nokey.connected] == [True, False, False]
    assert cam.since == 1_700_000_000.0
    assert cam.protocol == "whip"
    assert cam.remote == "2001:db8::5"
    assert cam.codecs == ("avc1.640028", "mp4a.40.2")
    assert cam.bitrate_bps == pytest.approx(1_000_000, rel=0.05)
    assert cam.viewers == 5
    assert [cam.record, stage.record] == [True, False]
    assert (stage.viewers, stage.codecs, stage.bitrate_bps) == (2, (), 0)
    assert metric(svc, "peerd_live_inputs_connected") == 1
    assert metric(svc, "peerd_live_ingest_bytes_total", {"input": "cam"}) == 100 * 12_500
    pub.sink.end("unpublished")
    assert metric(svc, "peerd_live_inputs_connected") == 0


@pytest.mark.parametrize(
    ("remote", "address"),
    [
        ("192.0.2.7:50000", "192.0.2.7"),
        ("[2001:db8::5]:443", "2001:db8::5"),
        ("2001:db8::5", "2001:db8::5"),
        ("192.0.2.7", "192.0.2.7"),
    ],
)
def test_the_publisher_address_loses_its_port(remote: str, address: str) -> None:
    assert address_of(remote) == address
