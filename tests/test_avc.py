"""H.264 bitstream shapes (``peerd.core.avc``), pure and synchronous, against what x264 writes."""

from __future__ import annotations

import av
import pytest

from peerd.core import avc
from tests.support.live_media import make_live_clip


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, tuple[int, int]]]:
    """avcC and picture size of x264 clips: odd sizes (cropping) in three profiles."""
    out: dict[str, tuple[bytes, tuple[int, int]]] = {}
    d = tmp_path_factory.mktemp("avc")
    for profile, size in (("baseline", (176, 144)), ("main", (322, 182)), ("high", (640, 360))):
        path = make_live_clip(d / f"{profile}.mp4", seconds=1, size=size, profile=profile)
        with av.open(str(path)) as c:
            out[profile] = (bytes(c.streams.video[0].codec_context.extradata or b""), size)
    return out


def test_sps_dimensions_and_avcc_round_trip(
    clips: dict[str, tuple[bytes, tuple[int, int]]],
) -> None:
    for profile, (record, size) in clips.items():
        sps, pps = avc.avcc_parameter_sets(record)
        assert avc.sps_dimensions(sps[0]) == size, profile
        assert avc.avcc(sps, pps) == record[:4] + bytes([0xFF, 0xE1]) + record[6:], profile
        assert avc.profile_level_id(record) == record[1:4].hex()


def test_annexb_and_length_prefixed() -> None:
    nals = [b"\x67\x42\x1f", b"\x68\xce", b"\x65\x88\x84\x00\x00\x03\x01"]
    stream = b"\x00\x00\x01" + nals[0] + b"\x00\x00\x00\x01" + nals[1] + avc.annexb(nals[2:])
    assert avc.split_annexb(stream) == nals
    assert avc.split_length_prefixed(avc.length_prefixed(nals)) == nals
    assert [avc.nal_type(n) for n in nals] == [avc.NAL_SPS, avc.NAL_PPS, avc.NAL_IDR]
    with pytest.raises(ValueError, match="past the end"):
        avc.split_length_prefixed(b"\x00\x00\x00\x09abc")
    with pytest.raises(ValueError, match="truncated"):
        avc.sps_dimensions(b"\x67\x64")
    with pytest.raises(ValueError, match="avcC"):
        avc.avcc([], [b"\x68"])
