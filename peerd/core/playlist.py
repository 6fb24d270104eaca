"""HLS playlists (RFC 8216) rendered from a `Manifest`; pure functions, no I/O.

The caller decides every URI through `uri_for(kind, rendition_id, ref)`, so the HTTP layer can
insert signed, expiring URLs without this module knowing about keys or clocks:

* `("playlist", rendition_id, None)` - the media playlist of a rendition (used by the master).
* `("init", rendition_id, cid)` - the init segment (fMP4); `cid` is None for an on-demand
  rendition whose init segment has not been pinned by the manifest.
* `("segment", rendition_id, cid_or_seq)` - a media segment by blob content id, or by its
  sequence number (int) for an on-demand rendition whose blobs are produced when first requested.
* `("subtitle", rendition_id, cid)` - a WebVTT segment of a subtitles rendition.

RFC 8216 rules applied here:

* EXT-X-VERSION: 3 for MPEG-TS (decimal EXTINF), 6 for fMP4 (EXT-X-MAP in a playlist without
  EXT-X-I-FRAMES-ONLY, section 7).
* EXT-X-TARGETDURATION: the largest segment duration rounded to the nearest integer (4.3.3.1),
  at least 1.
* EXT-X-INDEPENDENT-SEGMENTS in master and media playlists: every segment starts with a keyframe.
* Every EXT-X-STREAM-INF has BANDWIDTH, AVERAGE-BANDWIDTH when known, CODECS, and RESOLUTION and
  FRAME-RATE for video.
* Alternate tracks (4.3.4.1): one EXT-X-MEDIA per alternate audio track (group ``aud``) and per
  subtitles track (group ``sub``),
  AUTOSELECT=YES on every one (DEFAULT=YES requires it); every variant names the groups, and
  its CODECS include the alternate audio codecs. A file with several audio tracks and no video
  has one variant: its first track, whose playlist is also that track's URI.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal

from peerd.core.manifest import Alternate, Manifest, ManifestError, Rendition

UriKind = Literal["playlist", "init", "segment", "subtitle"]
UriFor = Callable[[UriKind, str, str | int | None], str]

MIME_PLAYLIST = "application/vnd.apple.mpegurl"
AUDIO_GROUP = "aud"
SUBTITLES_GROUP = "sub"


def hls_version(manifest: Manifest) -> int:
    """The EXT-X-VERSION a manifest's playlists need (3 for MPEG-TS, 6 for fMP4)."""
    return 6 if manifest.container == "fmp4" else 3


def _round_half_up(ticks: int, timescale: int) -> int:
    return int((Decimal(ticks) / Decimal(timescale)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def target_duration(rendition: Rendition) -> int:
    """EXT-X-TARGETDURATION: max segment duration rounded half up to an integer, at least 1."""
    return max(1, max(_round_half_up(s.duration, rendition.timescale) for s in rendition.segments))


def _extinf(ticks: int, timescale: int) -> str:
    # Six decimals: below one tick of a 90 kHz clock, and stable across platforms (Decimal, no
    # binary floating point in the rendered text).
    return str((Decimal(ticks) / Decimal(timescale)).quantize(Decimal("0.000001")))


def _checked(uri: str) -> str:
    # A URI ends up on its own line or inside a quoted attribute: a line break or a quote would
    # let it inject tags.
    if not uri or any(c in uri for c in '\r\n"'):
        raise ValueError(f"uri_for returned an unusable URI: {uri!r}")
    return uri


def _stream_inf(r: Rendition, groups: list[str], alt_codecs: list[str]) -> str:
    attrs = [f"BANDWIDTH={r.bandwidth}"]
    if r.average_bandwidth is not None:
        attrs.append(f"AVERAGE-BANDWIDTH={r.average_bandwidth}")
    codecs = r.codecs.split(",")
    codecs += [c for c in alt_codecs if c not in codecs]
    attrs.append(f'CODECS="{",".join(codecs)}"')
    if r.resolution is not None:
        attrs.append(f"RESOLUTION={r.resolution}")
    if r.kind == "video" and r.frame_rate is not None:
        num, den = r.frame_rate
        rate = (Decimal(num) / Decimal(den)).quantize(Decimal("0.001"))
        attrs.append(f"FRAME-RATE={rate}")
    attrs += groups
    return "#EXT-X-STREAM-INF:" + ",".join(attrs)


def _media(kind: str, group: str, a: Alternate, uri: str) -> str:
    attrs = [f"TYPE={kind}", f'GROUP-ID="{group}"', f'NAME="{a.name}"']
    if a.language is not None:
        attrs.append(f'LANGUAGE="{a.language}"')
    attrs.append(f"DEFAULT={'YES' if a.default else 'NO'}")
    attrs.append("AUTOSELECT=YES")
    if kind == "SUBTITLES" and a.forced:
        attrs.append("FORCED=YES")
    attrs.append(f'URI="{_checked(uri)}"')
    return "#EXT-X-MEDIA:" + ",".join(attrs)


def render_master(manifest: Manifest, uri_for: UriFor, *, lowest_first: bool = False) -> str:
    """The master playlist: alternate tracks (EXT-X-MEDIA), then one EXT-X-STREAM-INF per
    variant rendition, in manifest order, or with ``lowest_first`` video variants by BANDWIDTH
    from the lowest, then the others (players start with the variant listed first: hls.js
    takes its bit rate as the first throughput estimate, Apple's players play it first)."""
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{hls_version(manifest)}", "#EXT-X-INDEPENDENT-SEGMENTS"]
    audio = [r for r in manifest.renditions if r.kind == "audio" and r.alternate is not None]
    subs = [r for r in manifest.renditions if r.kind == "subtitles" and r.alternate is not None]
    for r in audio:
        assert r.alternate is not None
        lines.append(_media("AUDIO", AUDIO_GROUP, r.alternate, uri_for("playlist", r.id, None)))
    for r in subs:
        assert r.alternate is not None
        lines.append(
            _media("SUBTITLES", SUBTITLES_GROUP, r.alternate, uri_for("playlist", r.id, None))
        )
    groups = [f'AUDIO="{AUDIO_GROUP}"'] if audio else []
    groups += [f'SUBTITLES="{SUBTITLES_GROUP}"'] if subs else []
    alt_codecs = list(dict.fromkeys(r.codecs for r in audio))
    variants = [r for r in manifest.renditions if r.alternate is None and r.kind != "subtitles"]
    if lowest_first:  # video first all the same: an audio-only variant is no place to start
        variants.sort(key=lambda r: (r.kind != "video", r.bandwidth))
    for r in variants or audio[:1]:
        lines.append(_stream_inf(r, groups, alt_codecs if r.kind == "video" else []))
        lines.append(_checked(uri_for("playlist", r.id, None)))
    return "\n".join(lines) + "\n"


def render_media(manifest: Manifest, rendition_id: str, uri_for: UriFor) -> str:
    """The VOD media playlist of one rendition; ManifestError if the rendition does not exist."""
    r = manifest.rendition(rendition_id)
    lines = [
        "#EXTM3U",
        f"#EXT-X-VERSION:{hls_version(manifest)}",
        f"#EXT-X-TARGETDURATION:{target_duration(r)}",
        "#EXT-X-MEDIA-SEQUENCE:0",
        "#EXT-X-PLAYLIST-TYPE:VOD",
        "#EXT-X-INDEPENDENT-SEGMENTS",
    ]
    if r.kind == "subtitles":
        for seg in r.segments:
            lines.append(f"#EXTINF:{_extinf(seg.duration, r.timescale)},")
            assert seg.cid is not None
            lines.append(_checked(uri_for("subtitle", r.id, seg.cid)))
        lines.append("#EXT-X-ENDLIST")
        return "\n".join(lines) + "\n"
    if manifest.container == "fmp4":
        if r.init is None and not r.on_demand:
            raise ManifestError(f"rendition {r.id!r} has no init segment")
        lines.append(f'#EXT-X-MAP:URI="{_checked(uri_for("init", r.id, r.init))}"')
    for seq, seg in enumerate(r.segments):
        lines.append(f"#EXTINF:{_extinf(seg.duration, r.timescale)},")
        ref: str | int = seg.cid if seg.cid is not None else seq
        lines.append(_checked(uri_for("segment", r.id, ref)))
    lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"
