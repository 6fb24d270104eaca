"""The live ladder's pure rules: rungs that apply, their size, the master playlist, the CPU
budget's decision (synchronous, no clock: times are passed in)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from peerd.core.ladder import (
    DECODE,
    CpuBudget,
    LiveRung,
    Variant,
    applicable,
    master_playlist,
    peak_bandwidth,
    rung_size,
)


def test_only_rungs_below_the_source_apply_tallest_first() -> None:
    rungs = [LiveRung(360, 800), LiveRung(720, 2500), LiveRung(180, 250), LiveRung(1080, 5000)]
    assert applicable(rungs, 720) == (LiveRung(360, 800), LiveRung(180, 250))
    assert applicable(rungs, 180) == ()
    assert LiveRung(360, 800).name == "r360"


def test_rung_size_keeps_the_aspect_with_even_sides() -> None:
    assert rung_size(1920, 1080, 360) == (640, 360)
    assert rung_size(640, 360, 180) == (320, 180)
    assert rung_size(1280, 720, 241) == (426, 240)  # odd heights rounded down to even
    assert rung_size(1080, 1920, 360) == (202, 360)  # portrait
    with pytest.raises(ValueError, match="positive"):
        rung_size(0, 720, 360)


def test_master_playlist_lists_each_variant() -> None:
    text = master_playlist(
        [
            Variant("index.m3u8?token=t", 2_500_000, 1280, 720, ("avc1.64001f", "mp4a.40.2")),
            Variant("r360/index.m3u8?token=t", 900_000, 640, 360, ("avc1.64001e", "mp4a.40.2")),
        ]
    )
    assert text == (
        "#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-INDEPENDENT-SEGMENTS\n"
        '#EXT-X-STREAM-INF:BANDWIDTH=2500000,RESOLUTION=1280x720,CODECS="avc1.64001f,mp4a.40.2"\n'
        "index.m3u8?token=t\n"
        '#EXT-X-STREAM-INF:BANDWIDTH=900000,RESOLUTION=640x360,CODECS="avc1.64001e,mp4a.40.2"\n'
        "r360/index.m3u8?token=t\n"
    )
    with pytest.raises(ValueError, match="URI"):
        master_playlist([Variant("a\nb", 1, 0, 0, ())])


def test_peak_bandwidth_is_the_fastest_segment() -> None:
    assert peak_bandwidth([(100_000, Fraction(2)), (150_000, Fraction(1))]) == 1_200_000
    assert peak_bandwidth([]) == 0


def test_within_budget_nothing_is_dropped() -> None:
    b = CpuBudget(cores=0.5, window_s=5)
    for i in range(50):  # 0.04 s of CPU every 0.1 s: 0.4 of a core
        b.charge(("a", DECODE), 0.01, i * 0.1)
        b.charge(("a", "r360"), 0.03, i * 0.1)
        assert b.check(i * 0.1) is None
    assert b.check(5.0) is None
    assert b.last_ratio == pytest.approx(0.4)


def test_a_window_over_budget_drops_the_most_expensive_rung_of_any_input() -> None:
    b = CpuBudget(cores=0.5, window_s=5)
    for i in range(50):  # 0.07 s every 0.1 s: 0.7 of a core
        t = i * 0.1
        b.charge(("a", DECODE), 0.03, t)  # a decode is never "the rung" to drop
        b.charge(("a", "r360"), 0.01, t)
        b.charge(("b", "r180"), 0.005, t)
        b.charge(("b", "r360"), 0.025, t)
        assert b.check(t) is None  # a slow moment inside the window drops nothing
    assert b.check(5.0) == ("b", "r360")
    # the next window is judged afresh, after the drop
    b.forget("b", "r360")
    b.charge(("a", DECODE), 0.1, 5.1)
    assert b.check(9.0) is None
    b.charge(("a", "r360"), 3.0, 10.0)
    assert b.check(10.2) == ("a", "r360")


def test_forget_an_input() -> None:
    b = CpuBudget(cores=0.1, window_s=1)
    b.charge(("a", "r360"), 5.0, 0.0)
    b.forget("a")
    assert b.check(2.0) is None
    with pytest.raises(ValueError, match="positive"):
        CpuBudget(cores=0, window_s=1)
