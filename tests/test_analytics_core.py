"""The playback analytics state machine (peerd.core.analytics), synchronous with a fake clock:
startup, stalls, failures, rollup deltas, and the anomaly detector (a steady run raises none,
a burst of failures raises one, once)."""

from __future__ import annotations

from peerd.core.analytics import (
    Analytics,
    Anomaly,
    Bounded,
    Dims,
    Failed,
    Hit,
    Stalled,
    Started,
    Thresholds,
    codec_family,
    hour_of,
    quantile,
)
from peerd.core.cmcd import Cmcd

AVC = Dims("m1", "v0", "avc1.64001f,mp4a.40.2", "http", "DE")
HEVC = Dims("m2", "v0", "hvc1.1.6.L93.B0", "http", "DE")
T0 = 1_800_000_000.0


def _play(a: Analytics, sid: str, at: float, dims: Dims = AVC, stalls: int = 0) -> float:
    """A session as hls.js makes it: playlists, a first segment with an empty buffer, then
    segments with media buffered; ``stalls`` of them report starvation. Returns its end."""
    a.observe(Hit(sid, Dims(dims.media, path=dims.path), True, Cmcd(sid=sid, su=True)), at)
    a.observe(Hit(sid, dims, True, Cmcd(sid=sid, su=True)), at + 0.1)
    a.observe(Hit(sid, dims, False, Cmcd(sid=sid, su=True, bl=0, ot="v")), at + 0.2)
    a.observe(Hit(sid, dims, False, Cmcd(sid=sid, su=True, bl=2000, ot="v")), at + 0.9)
    t = at + 0.9
    for i in range(stalls):
        t += 4
        a.observe(Hit(sid, dims, False, Cmcd(sid=sid, bs=True, su=True, bl=0, ot="v")), t)
        t += 4
        a.observe(Hit(sid, dims, False, Cmcd(sid=sid, bl=3000 + i, ot="v")), t)
    return t


def test_startup_stalls_and_the_rollup() -> None:
    a = Analytics(T0)
    events = []
    sid = "s1"
    events += a.observe(Hit(sid, Dims("m1"), True, Cmcd(sid=sid, su=True)), T0)
    events += a.observe(Hit(sid, AVC, False, Cmcd(sid=sid, su=True, bl=0)), T0 + 0.4)
    assert events == []
    events += a.observe(Hit(sid, AVC, False, Cmcd(sid=sid, su=True, bl=100)), T0 + 1.25)
    assert events == [Started(sid, AVC, 1.25)]
    events += a.observe(Hit(sid, AVC, False, Cmcd(sid=sid, bs=True, bl=0)), T0 + 9)
    events += a.observe(Hit(sid, AVC, False, Cmcd(sid=sid, bs=True, bl=0)), T0 + 12)
    assert events[1:] == [Stalled(sid, AVC), Stalled(sid, AVC)]
    rollup = a.drain()
    assert list(rollup) == [(hour_of(T0), AVC)]
    b = rollup[(hour_of(T0), AVC)]
    assert (b.sessions, b.started, b.failures, b.stalls, b.stalled_sessions) == (1, 1, 0, 2, 1)
    assert b.startup_sum == 1.25
    assert quantile(b.startup_hist, 0.5) == 2.0
    assert a.drain() == {}  # deltas: drained once


def test_a_session_that_never_starts_fails_once_and_idle_ones_are_forgotten() -> None:
    a = Analytics(T0, startup_timeout_s=20, idle_s=60)
    a.observe(Hit("bad", Dims("m2", codec="hvc1.1.6.L93.B0"), True, Cmcd(su=True)), T0)
    _play(a, "good", T0)
    assert a.tick(T0 + 19) == []
    assert a.tick(T0 + 20) == [Failed("bad", Dims("m2", codec="hvc1.1.6.L93.B0"))]
    assert a.tick(T0 + 21) == []
    assert set(a.sessions) == {"good"}
    a.tick(T0 + 61)
    assert a.sessions == {}
    failed = [b for (_, d), b in a.drain().items() if d.media == "m2"]
    assert [(b.sessions, b.failures) for b in failed] == [(1, 1)]


def _windows(a: Analytics, start: float, n: int, fail_every: int) -> list[Anomaly]:
    """``n`` five-minute windows of 20 sessions each; every ``fail_every``-th one fails."""
    found: list[Anomaly] = []
    t = start
    for _w in range(n):
        for i in range(20):
            sid = f"{t}-{i}"
            if fail_every and i % fail_every == 0:
                a.observe(Hit(sid, Dims("m2", "v0", "hvc1.1", "http", "DE"), True, Cmcd()), t)
            else:
                _play(a, sid, t, stalls=1 if i % 10 == 3 else 0)
            t += 1
        t += 300 - 20
        found += [e for e in a.tick(t) if isinstance(e, Anomaly)]
        found += [e for e in a.tick(t + 30) if isinstance(e, Anomaly)]
    return found


def test_a_steady_run_raises_none() -> None:
    a = Analytics(T0, thresholds=Thresholds(window_s=300, min_sessions=10))
    assert _windows(a, T0, 12, fail_every=0) == []


def test_a_burst_of_failures_raises_one_anomaly_once() -> None:
    a = Analytics(T0, startup_timeout_s=20, thresholds=Thresholds(window_s=300, min_sessions=10))
    assert _windows(a, T0, 6, fail_every=0) == []
    # A burst: every HEVC session of two windows fails (20 of them a window, in its own group).
    burst = _windows(a, T0 + 6 * 300, 2, fail_every=1)
    assert len(burst) == 1
    (x,) = burst
    assert (x.kind, x.codec, x.region, x.observed, x.sessions) == ("failure", "hvc1", "DE", 1, 20)
    assert x.z >= 3
    assert "failure rate 1.00 over 20 sessions of codec hvc1 in DE" in x.explain()
    assert a.recent == [x]


def test_bounded_labels() -> None:
    regions = Bounded(2)
    assert [regions(r) for r in ("DE", "FR", "DE", "US")] == ["DE", "FR", "DE", "other"]
    assert codec_family("avc1.64001f,mp4a.40.2") == "avc1"
    assert codec_family("xyz1.2") == "other"
    assert codec_family("") == ""
    assert quantile([0] * 7, 0.5) is None
    assert quantile([0, 0, 0, 0, 0, 0, 5], 0.95) == 16.0


def test_bounded_sessions() -> None:
    a = Analytics(T0, max_sessions=2)
    for i in range(3):
        a.observe(Hit(f"s{i}", AVC, True, Cmcd(su=True)), T0)
    assert len(a.sessions) == 2
    assert a.dropped == 1


def test_a_reporting_player() -> None:
    a = Analytics(T0)
    d = Dims("m1", "", "avc1.64001f", "swarm", "")
    assert a.reported("p1", d, startup_s=None, stalls=0, failed=False, now=T0) == []
    assert a.reported("p1", d, startup_s=1.5, stalls=0, failed=False, now=T0 + 9) == [
        Started("p1", d, 1.5)
    ]
    assert a.reported("p1", d, startup_s=1.5, stalls=2, failed=False, now=T0 + 19) == [
        Stalled("p1", d),
        Stalled("p1", d),
    ]
    assert a.reported("p2", d, startup_s=None, stalls=0, failed=True, now=T0 + 1) == [
        Failed("p2", d)
    ]
    assert "p2" not in a.sessions
