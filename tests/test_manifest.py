"""Pure tests of the manifest model (canonical encoding, media id, validation) and playlists."""

from __future__ import annotations

import dataclasses
import json

import pytest

from peerd.core import manifest as mf
from peerd.core import playlist as pl
from peerd.core.ids import Cid, cid_of
from peerd.core.manifest import Manifest, ManifestError, PlayOrder, Recipe, Rendition, Segment


def _cid(n: int) -> str:
    return cid_of(f"blob-{n}".encode())


def make_manifest(container: mf.Container = "fmp4") -> Manifest:
    """A two-video + audio manifest: v480 is on demand, derived from v720."""
    init = _cid(0) if container == "fmp4" else None
    segs = (Segment(360000, _cid(1)), Segment(360000, _cid(2)), Segment(123456, _cid(3)))
    top = Rendition(
        id="v720",
        kind="video",
        codecs="avc1.64001f,mp4a.40.2",
        bandwidth=3_200_000,
        average_bandwidth=2_900_000,
        width=1280,
        height=720,
        frame_rate=(30000, 1001),
        timescale=90000,
        init=init,
        segments=segs,
    )
    low = Rendition(
        id="v480",
        kind="video",
        codecs="avc1.64001e,mp4a.40.2",
        bandwidth=1_400_000,
        width=854,
        height=480,
        frame_rate=(30000, 1001),
        timescale=90000,
        on_demand=True,
        recipe=Recipe(source="v720", width=854, height=480, crf=23),
        segments=tuple(Segment(s.duration) for s in segs),
    )
    audio = Rendition(
        id="audio",
        kind="audio",
        codecs="mp4a.40.2",
        bandwidth=130_000,
        timescale=90000,
        init=_cid(10) if container == "fmp4" else None,
        recipe=Recipe(source="v720"),
        segments=tuple(Segment(s.duration, _cid(11 + i)) for i, s in enumerate(segs)),
    )
    return Manifest(container=container, renditions=(top, low, audio))


def uri_for(kind: pl.UriKind, rid: str, ref: str | int | None) -> str:
    return f"/{kind}/{rid}/{ref}"


def test_canonical_encoding_is_stable_and_sorted() -> None:
    m = make_manifest()
    data = mf.encode(m)
    assert data == mf.encode(make_manifest())
    assert b" " not in data
    assert b"\n" not in data
    obj = json.loads(data)
    assert list(obj) == sorted(obj)
    assert obj["version"] == mf.MANIFEST_VERSION
    assert json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() == data


def test_round_trip_and_media_id() -> None:
    m = make_manifest()
    back = mf.decode(mf.encode(m))
    assert back == m
    assert mf.media_id_of(back) == mf.media_id_of(m)
    assert mf.media_id_of(m) == cid_of(mf.encode(m))
    assert mf.media_id_of(m).startswith("b")
    assert len(mf.media_id_of(m)) == 59


def test_media_id_changes_with_any_blob() -> None:
    m = make_manifest()
    top = m.renditions[0]
    changed = dataclasses.replace(
        m,
        renditions=(
            dataclasses.replace(top, segments=(Segment(360000, _cid(99)), *top.segments[1:])),
            *m.renditions[1:],
        ),
    )
    assert mf.media_id_of(changed) != mf.media_id_of(m)


def test_cid_format_known_vector() -> None:
    # sha256("") CIDv1 raw, as produced by `ipfs add --raw-leaves --cid-version 1` of an empty
    # file: bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku
    assert cid_of(b"") == "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"


def test_blob_cids_lists_each_pinned_blob_once() -> None:
    m = make_manifest()
    cids = list(m.blob_cids())
    assert cids[0] == _cid(0)
    assert len(cids) == len(set(cids)) == 8  # init+3 for v720, none for v480, init+3 audio


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.update(version=2), "unsupported version"),
        (lambda o: o.update(container="mkv"), "container"),
        (lambda o: o["renditions"][0].update(codecs='avc1"x'), "codecs"),
        (lambda o: o["renditions"][0].update(width=None), "width and height"),
        (lambda o: o["renditions"][0]["segments"][1].__setitem__(1, None), "missing blob id"),
        (lambda o: o["renditions"][0]["segments"][1].__setitem__(0, 0), "must be >= 1"),
        (lambda o: o["renditions"][0].update(init=None), "init segment"),
        (lambda o: o["renditions"][0].update(bandwidth=True), "expected an integer"),
        (lambda o: o["renditions"][0].update(extra=1), "unknown field"),
        (lambda o: o["renditions"][1]["segments"][0].__setitem__(1, _cid(5)), "pins no blob"),
        (lambda o: o["renditions"][1]["recipe"].update(source="nope"), "no rendition"),
        (lambda o: o["renditions"][1]["recipe"].update(crf=None), "crf or video_bitrate"),
        (lambda o: o["renditions"][1]["segments"].pop(), "segment by segment"),
        (lambda o: o["renditions"][1].update(id="v720"), "duplicate"),
        (lambda o: o["renditions"][2].update(id="master"), "'master' is reserved"),
        (lambda o: o["renditions"][0].update(init="Qmfoo"), "invalid value"),
        (lambda o: o.update(renditions=[]), "at least one rendition"),
    ],
)
def test_decode_rejects_bad_manifests(mutate: object, message: str) -> None:
    obj = mf.to_obj(make_manifest())
    mutate(obj)  # type: ignore[operator]
    with pytest.raises(ManifestError, match=message):
        mf.decode(json.dumps(obj))


def test_decode_rejects_non_json() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        mf.decode(b"\xff{")
    with pytest.raises(ManifestError, match="expected an object"):
        mf.decode("[]")


def test_master_playlist() -> None:
    text = pl.render_master(make_manifest(), uri_for)
    lines = text.splitlines()
    assert lines[:3] == ["#EXTM3U", "#EXT-X-VERSION:6", "#EXT-X-INDEPENDENT-SEGMENTS"]
    infs = [ln for ln in lines if ln.startswith("#EXT-X-STREAM-INF:")]
    assert len(infs) == 3
    assert all('CODECS="' in ln for ln in infs)
    assert infs[0] == (
        "#EXT-X-STREAM-INF:BANDWIDTH=3200000,AVERAGE-BANDWIDTH=2900000,"
        'CODECS="avc1.64001f,mp4a.40.2",RESOLUTION=1280x720,FRAME-RATE=29.970'
    )
    assert "RESOLUTION" not in infs[2]
    assert lines[4] == "/playlist/v720/None"
    assert text.endswith("\n")


def test_master_playlist_lowest_first() -> None:
    """Players start with the first variant listed: the node lists the lowest video first
    when it takes a new viewer only at its lowest rendition (peerd.core.uplink)."""
    lines = pl.render_master(make_manifest(), uri_for, lowest_first=True).splitlines()
    order = [ln.split("/")[2] for ln in lines if ln.startswith("/playlist/")]
    assert order == ["v480", "v720", "audio"]
    assert pl.render_master(make_manifest(), uri_for).count("\n") == len(lines)


def test_media_playlist_fmp4() -> None:
    m = make_manifest()
    text = pl.render_media(m, "v720", uri_for)
    lines = text.splitlines()
    assert lines[:6] == [
        "#EXTM3U",
        "#EXT-X-VERSION:6",
        "#EXT-X-TARGETDURATION:4",
        "#EXT-X-MEDIA-SEQUENCE:0",
        "#EXT-X-PLAYLIST-TYPE:VOD",
        "#EXT-X-INDEPENDENT-SEGMENTS",
    ]
    assert lines[6] == f'#EXT-X-MAP:URI="/init/v720/{_cid(0)}"'
    assert lines[7:9] == ["#EXTINF:4.000000,", f"/segment/v720/{_cid(1)}"]
    assert lines[11] == "#EXTINF:1.371733,"
    assert lines[-1] == "#EXT-X-ENDLIST"


def test_media_playlist_on_demand_uses_sequence_numbers() -> None:
    text = pl.render_media(make_manifest(), "v480", uri_for)
    assert '#EXT-X-MAP:URI="/init/v480/None"' in text
    assert "/segment/v480/0\n" in text
    assert "/segment/v480/2\n" in text


def test_media_playlist_ts_has_no_map_and_version_3() -> None:
    m = make_manifest("ts")
    text = pl.render_media(m, "v720", uri_for)
    assert "#EXT-X-VERSION:3" in text
    assert "EXT-X-MAP" not in text


def test_target_duration_rounds_half_up() -> None:
    r = make_manifest().renditions[0]
    r2 = dataclasses.replace(r, segments=(Segment(4 * 90000 + 45000, _cid(1)),))
    assert pl.target_duration(r2) == 5  # 4.5 s -> 5
    r3 = dataclasses.replace(r, segments=(Segment(4 * 90000 + 44999, _cid(1)),))
    assert pl.target_duration(r3) == 4
    r4 = dataclasses.replace(r, segments=(Segment(10, _cid(1)),))
    assert pl.target_duration(r4) == 1


def test_bad_uri_from_callback_is_refused() -> None:
    with pytest.raises(ValueError, match="unusable URI"):
        pl.render_master(make_manifest(), lambda k, r, c: "a\n#EXT-X-ENDLIST")


def test_unknown_rendition() -> None:
    with pytest.raises(ManifestError, match="no rendition"):
        pl.render_media(make_manifest(), "nope", uri_for)


def test_recipe_bframes_written_only_when_set() -> None:
    """Manifests made before ``bframes`` existed encode to the same bytes (same media ids)."""
    import dataclasses

    m = make_manifest()
    assert b"bframes" not in mf.encode(m)
    r1 = m.renditions[1]
    assert r1.recipe is not None
    nobf = dataclasses.replace(r1, recipe=dataclasses.replace(r1.recipe, bframes=0))
    m2 = dataclasses.replace(m, renditions=(m.renditions[0], nobf, *m.renditions[2:]))
    data = mf.encode(m2)
    assert b'"bframes":0' in data
    assert mf.decode(data) == m2
    assert mf.media_id_of(m2) != mf.media_id_of(m)
    obj = mf.to_obj(m2)
    obj["renditions"][1]["recipe"]["bframes"] = -1
    with pytest.raises(ManifestError, match="bframes"):
        mf.decode(json.dumps(obj))


def test_play_order_follows_each_rendition_front_to_back() -> None:
    seg = [cid_of(bytes([i])) for i in range(6)]
    init = cid_of(b"init")

    def rendition(rid: str, cids: list[Cid]) -> Rendition:
        return Rendition(
            id=rid,
            kind="video",
            codecs="avc1.64001f",
            bandwidth=1_000_000,
            timescale=1000,
            segments=tuple(Segment(duration=4000, cid=c) for c in cids),
            width=640,
            height=360,
            init=init,
        )

    # The second rendition shares the init segment and one segment with the first.
    m = Manifest("fmp4", (rendition("v0", seg[:4]), rendition("v1", [seg[3], seg[4], seg[5]])))
    order = PlayOrder.of(m)
    assert order.after(init, 2) == (seg[0], seg[1])
    assert order.after(seg[0], 2) == (seg[1], seg[2])
    assert order.after(seg[2], 5) == (seg[3],)
    assert order.after(seg[3], 2) == ()  # the first rendition's answer: its last segment
    assert order.after(seg[4], 2) == (seg[5],)
    assert order.after(seg[1], 0) == ()
    assert order.after(cid_of(b"stranger"), 2) == ()


def _with_tracks() -> Manifest:
    """The test manifest with its audio as two alternate tracks and one subtitles track."""
    m = make_manifest()
    top = dataclasses.replace(m.renditions[0], codecs="avc1.64001f")
    segs = top.segments
    eng = Rendition(
        id="a1",
        kind="audio",
        codecs="mp4a.40.2",
        bandwidth=130_000,
        timescale=90000,
        init=_cid(20),
        segments=tuple(Segment(s.duration, _cid(21 + i)) for i, s in enumerate(segs)),
        alternate=mf.Alternate("English", "en", default=True),
    )
    fra = dataclasses.replace(eng, id="a2", init=_cid(30), alternate=mf.Alternate("Français", "fr"))
    subs = Rendition(
        id="t3",
        kind="subtitles",
        codecs="wvtt",
        bandwidth=1_000,
        timescale=90000,
        segments=tuple(Segment(s.duration, _cid(40 + i)) for i, s in enumerate(segs)),
        alternate=mf.Alternate("English (forced)", "en", forced=True),
    )
    return Manifest(container="fmp4", renditions=(top, eng, fra, subs))


def test_alternate_tracks_round_trip_and_old_manifests_keep_their_bytes() -> None:
    m = _with_tracks()
    assert mf.decode(mf.encode(m)) == m
    assert b'"alternate"' not in mf.encode(make_manifest())  # absent unless set: same ids


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda rs: (rs[0], rs[1], dataclasses.replace(rs[2], alternate=rs[1].alternate), rs[3]),
            "duplicate audio track names",
        ),
        (
            lambda rs: (
                rs[0],
                rs[1],
                dataclasses.replace(rs[2], alternate=mf.Alternate("x", default=True)),
                rs[3],
            ),
            "more than one default",
        ),
        (
            lambda rs: (rs[0], rs[1], rs[2], dataclasses.replace(rs[3], init=_cid(50))),
            "without init",
        ),
        (
            lambda rs: (dataclasses.replace(rs[0], alternate=mf.Alternate("v")), *rs[1:]),
            "a video rendition is a variant",
        ),
        (
            lambda rs: (
                rs[0],
                rs[1],
                rs[2],
                dataclasses.replace(rs[3], alternate=mf.Alternate('say "hi"')),
            ),
            "invalid name",
        ),
    ],
)
def test_bad_alternate_tracks_are_refused(change: object, message: str) -> None:
    m = _with_tracks()
    bad = dataclasses.replace(m, renditions=change(m.renditions))  # type: ignore[operator]
    with pytest.raises(ManifestError, match=message):
        mf.encode(bad)


def test_master_lists_alternate_tracks_and_variants_name_their_groups() -> None:
    text = pl.render_master(_with_tracks(), uri_for)
    assert text.splitlines()[3:] == [
        '#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="aud",NAME="English",LANGUAGE="en",DEFAULT=YES,'
        'AUTOSELECT=YES,URI="/playlist/a1/None"',
        '#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="aud",NAME="Français",LANGUAGE="fr",DEFAULT=NO,'
        'AUTOSELECT=YES,URI="/playlist/a2/None"',
        '#EXT-X-MEDIA:TYPE=SUBTITLES,GROUP-ID="sub",NAME="English (forced)",LANGUAGE="en",'
        'DEFAULT=NO,AUTOSELECT=YES,FORCED=YES,URI="/playlist/t3/None"',
        "#EXT-X-STREAM-INF:BANDWIDTH=3200000,AVERAGE-BANDWIDTH=2900000,"
        'CODECS="avc1.64001f,mp4a.40.2",RESOLUTION=1280x720,FRAME-RATE=29.970,AUDIO="aud",'
        'SUBTITLES="sub"',
        "/playlist/v720/None",
    ]
    subs = pl.render_media(_with_tracks(), "t3", uri_for)
    assert "#EXT-X-MAP" not in subs
    assert f"/subtitle/t3/{_cid(40)}" in subs


def test_audio_only_tracks_play_through_their_first_track() -> None:
    m = _with_tracks()
    audio_only = dataclasses.replace(m, renditions=m.renditions[1:3])
    lines = pl.render_master(audio_only, uri_for).splitlines()
    assert lines[-2:] == [
        '#EXT-X-STREAM-INF:BANDWIDTH=130000,CODECS="mp4a.40.2",AUDIO="aud"',
        "/playlist/a1/None",
    ]
