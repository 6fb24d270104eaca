"""Media manifests: the immutable, content-addressed description of one packaged media item.

A manifest lists the renditions of one media item (codecs, bandwidth, resolution, frame rate), and
for each rendition its segment list (durations in the rendition's timescale) and the content ids of
the blobs that hold the init segment (fMP4) and each media segment. Playlists are rendered from it
(`peerd.core.playlist`); they are never stored.

Theory of operation
-------------------
* The manifest is encoded canonically (`encode`): JSON with sorted keys, no whitespace, ASCII only,
  no floats (durations are integer ticks of `timescale`, frame rates are `[num, den]`), and a
  `version` field. The media id is the content id of those bytes (`media_id_of`), so two nodes
  that package the same input with the same settings agree on the id.
* A rendition is either *ready* (every segment and the init segment have a blob id) or
  *on demand*: it is listed with its `Recipe` and its segment timeline (aligned one to one with the
  recipe's source rendition), but its blobs are produced only when first requested. The blob ids
  of on-demand segments are not part of the manifest, so producing them never changes the media id;
  the catalog records them once produced.
* `packager` names how the pinned blobs were made: the packager's format version and the path
  that made the top rendition (`Packager`). Blob bytes are a function of (input bytes, packaging
  options, packager version) only, and the manifest says which version and path, so a change of
  either changes the media id instead of hiding behind the same settings. Manifests made before
  the field existed have none (and keep their ids).
* Alternate renditions (HLS ``EXT-X-MEDIA``): an audio or subtitles rendition with an
  `Alternate` (name, language, default and forced flags from the source's stream metadata) is a
  track of a group the video variants refer to, not a variant of its own. A ``subtitles``
  rendition is segmented WebVTT: no init segment, one segment per segment of the top rendition.
  Manifests without these fields keep their bytes.
* `decode` parses and validates untrusted JSON and raises `ManifestError` with the offending path.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast

from peerd.core.ids import Cid, cid_of
from peerd.errors import MediaError

MANIFEST_VERSION = 1

Container = Literal["fmp4", "ts"]
RenditionKind = Literal["video", "audio", "subtitles"]
PackagerPath = Literal["isobmff", "libav"]

_CONTAINERS: frozenset[str] = frozenset({"fmp4", "ts"})
_KINDS: frozenset[str] = frozenset({"video", "audio", "subtitles"})
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
RESERVED_IDS: frozenset[str] = frozenset({"master"})
# RFC 6381 codec strings: letters, digits, dots, commas (a list); never quotes or spaces, so they
# can be written inside a quoted attribute of an HLS tag as they are.
_CODECS_RE = re.compile(r"^[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*$")
_CID_RE = re.compile(r"^b[a-z2-7]{58}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._+:-]{1,64}$")
# Written inside a quoted attribute (NAME="..."): no quote, no control character.
_NAME_RE = re.compile(r'^[^"\x00-\x1f\x7f]{1,64}$')
LANGUAGE_RE = re.compile(r"^[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*$")
"""A language tag as `Alternate.language` takes it (BCP 47 / ISO 639 shape)."""


class ManifestError(MediaError, ValueError):
    """A manifest is malformed or inconsistent; the message names the offending field."""


@dataclass(frozen=True)
class Segment:
    """One media segment: its duration in ticks of the rendition's timescale and its blob id.

    `cid` is None only for segments of an on-demand rendition that the manifest does not pin.
    """

    duration: int
    cid: str | None = None


@dataclass(frozen=True)
class Recipe:
    """How a rendition is derived from another rendition of the same media, segment by segment.

    Every field that changes the produced bytes is here, so any node can produce the same blobs.
    `width`/`height`/`crf`/`video_bitrate` are None for an audio-only rendition (audio is copied).
    Video is encoded at constant quality `crf` (deterministic, unlike x264's bit-rate modes with
    threads) or, when `crf` is None, at the average bit rate `video_bitrate`.
    `bframes` caps x264's B-frames (None: the preset's); 0 makes a stream whose decode order is
    its presentation order, which WebRTC players need for packet passthrough.
    """

    source: str
    width: int | None = None
    height: int | None = None
    video_bitrate: int | None = None
    crf: int | None = None
    encoder: str = "libx264"
    preset: str = "veryfast"
    threads: int = 4
    audio: bool = True
    bframes: int | None = None


@dataclass(frozen=True)
class Alternate:
    """How a track is listed in the master playlist (``EXT-X-MEDIA``).

    `name` is unique among the tracks of its kind; `language` a BCP 47 / ISO 639 tag (None if
    the source does not say); at most one track of a kind is the `default`. `forced` marks
    subtitles shown even when the viewer did not ask for subtitles.
    """

    name: str
    language: str | None = None
    default: bool = False
    forced: bool = False


@dataclass(frozen=True)
class Packager:
    """Which packager made a media item's blobs (see ``peerd.media.package.PACKAGER_VERSION``).

    `version` is the packager format version: the same input and options under the same version
    give the same bytes on every node. `top` is the path that made the top rendition, decided by
    that version's rule from the input bytes and options alone: ``isobmff`` (the native MP4/MOV
    remux) or ``libav`` (the PyAV remux or transcode).
    """

    version: int
    top: PackagerPath


@dataclass(frozen=True)
class Rendition:
    """One variant stream: its HLS attributes, its timeline and its blobs.

    `bandwidth` is the peak segment bit rate (bits/s), `average_bandwidth` the mean; `start` is
    the presentation time of the first segment in `timescale` ticks. `init` is the init segment's
    blob id (fMP4 only). `frame_rate` is a `(num, den)` pair.
    """

    id: str
    kind: RenditionKind
    codecs: str
    bandwidth: int
    timescale: int
    segments: tuple[Segment, ...]
    average_bandwidth: int | None = None
    width: int | None = None
    height: int | None = None
    frame_rate: tuple[int, int] | None = None
    start: int = 0
    init: str | None = None
    on_demand: bool = False
    recipe: Recipe | None = None
    alternate: Alternate | None = None
    """Set on a track listed with ``EXT-X-MEDIA`` (alternate audio, subtitles)."""

    def segment_seconds(self, seq: int) -> float:
        """Duration of segment `seq` in seconds."""
        return self.segments[seq].duration / self.timescale

    @property
    def duration_seconds(self) -> float:
        """Total duration of the rendition in seconds."""
        return sum(s.duration for s in self.segments) / self.timescale

    @property
    def resolution(self) -> str | None:
        """`WIDTHxHEIGHT` for video renditions, None for audio-only ones."""
        if self.width is None or self.height is None:
            return None
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class Manifest:
    """A packaged media item: container format and renditions (first = default variant)."""

    container: Container
    renditions: tuple[Rendition, ...]
    version: int = field(default=MANIFEST_VERSION)
    packager: Packager | None = None

    def rendition(self, rendition_id: str) -> Rendition:
        """The rendition named `rendition_id`; ManifestError if there is none."""
        for r in self.renditions:
            if r.id == rendition_id:
                return r
        raise ManifestError(f"no rendition {rendition_id!r}")

    def blob_cids(self) -> Iterator[str]:
        """Every blob id the manifest pins (init and media segments), each once, in order."""
        seen: set[str] = set()
        for r in self.renditions:
            cids = [r.init] + [s.cid for s in r.segments]
            for c in cids:
                if c is not None and c not in seen:
                    seen.add(c)
                    yield c


@dataclass(frozen=True)
class PlayOrder:
    """Which media segments a player asks for after each blob of a manifest.

    An init segment is followed by its rendition's segments, a segment by the ones after it in
    the same rendition (players read a rendition front to back). A blob shared by renditions
    keeps the first rendition's order. The HLS route uses it to fetch ahead of a viewer.
    """

    # blob id -> (its rendition's segment ids, index of the first one that follows it)
    at: Mapping[str, tuple[tuple[str, ...], int]]

    @classmethod
    def of(cls, m: Manifest) -> PlayOrder:
        """The play order of ``m``."""
        at: dict[str, tuple[tuple[str, ...], int]] = {}
        for r in m.renditions:
            cids = tuple(s.cid for s in r.segments if s.cid is not None)
            if r.init is not None:
                at.setdefault(r.init, (cids, 0))
            for i, c in enumerate(cids):
                at.setdefault(c, (cids, i + 1))
        return cls(at)

    def after(self, cid: str, n: int) -> tuple[str, ...]:
        """Up to ``n`` segment ids that follow ``cid`` (none for a blob not in the manifest)."""
        got = self.at.get(cid)
        if got is None or n <= 0:
            return ()
        cids, i = got
        return cids[i : i + n]


def _recipe_obj(r: Recipe) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "source": r.source,
        "width": r.width,
        "height": r.height,
        "video_bitrate": r.video_bitrate,
        "crf": r.crf,
        "encoder": r.encoder,
        "preset": r.preset,
        "threads": r.threads,
        "audio": r.audio,
    }
    # Written only when set, so manifests made before the field existed keep their bytes (and
    # so their media ids).
    if r.bframes is not None:
        obj["bframes"] = r.bframes
    return obj


def _alternate_obj(a: Alternate) -> dict[str, Any]:
    return {"name": a.name, "language": a.language, "default": a.default, "forced": a.forced}


def _rendition_obj(r: Rendition) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": r.id,
        "kind": r.kind,
        "codecs": r.codecs,
        "bandwidth": r.bandwidth,
        "average_bandwidth": r.average_bandwidth,
        "width": r.width,
        "height": r.height,
        "frame_rate": list(r.frame_rate) if r.frame_rate is not None else None,
        "timescale": r.timescale,
        "start": r.start,
        "init": r.init,
        "on_demand": r.on_demand,
        "recipe": _recipe_obj(r.recipe) if r.recipe is not None else None,
        "segments": [[s.duration, s.cid] for s in r.segments],
    }
    if r.alternate is not None:  # absent in older manifests: their bytes (and ids) stay
        obj["alternate"] = _alternate_obj(r.alternate)
    return obj


def to_obj(m: Manifest) -> dict[str, Any]:
    """The manifest as plain JSON-able data (the shape `encode` writes)."""
    obj: dict[str, Any] = {
        "version": m.version,
        "container": m.container,
        "renditions": [_rendition_obj(r) for r in m.renditions],
    }
    if m.packager is not None:  # absent in older manifests: their bytes (and ids) stay
        obj["packager"] = {"version": m.packager.version, "top": m.packager.top}
    return obj


def encode(m: Manifest) -> bytes:
    """Canonical bytes of a manifest: validated, sorted keys, no whitespace, ASCII."""
    validate(m)
    return json.dumps(
        to_obj(m), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def media_id_of(m: Manifest) -> Cid:
    """The media id: content id of the manifest's canonical encoding."""
    return cid_of(encode(m))


# ---- decoding untrusted JSON -------------------------------------------------------------------


def _get(obj: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in obj:
        raise ManifestError(f"{path}.{key}: missing")
    return obj[key]


def _int(v: Any, path: str, *, minimum: int = 0, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    # bool is an int subclass; a manifest never means True by 1.
    if not isinstance(v, int) or isinstance(v, bool):
        raise ManifestError(f"{path}: expected an integer, got {type(v).__name__}")
    if v < minimum:
        raise ManifestError(f"{path}: must be >= {minimum}, got {v}")
    return v


def _req_int(v: Any, path: str, *, minimum: int = 0) -> int:
    out = _int(v, path, minimum=minimum)
    assert out is not None
    return out


def _str(v: Any, path: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(v, str):
        raise ManifestError(f"{path}: expected a string, got {type(v).__name__}")
    if pattern is not None and not pattern.match(v):
        raise ManifestError(f"{path}: invalid value {v!r}")
    return v


def _bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise ManifestError(f"{path}: expected a boolean, got {type(v).__name__}")
    return v


def _obj(v: Any, path: str, keys: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(v, dict):
        raise ManifestError(f"{path}: expected an object, got {type(v).__name__}")
    extra = set(v) - keys
    if extra:
        raise ManifestError(f"{path}: unknown field(s) {sorted(extra)}")
    return cast(Mapping[str, Any], v)


# The JSON keys of each object are its dataclass's field names.
_RECIPE_KEYS = frozenset(f.name for f in fields(Recipe))
_RENDITION_KEYS = frozenset(f.name for f in fields(Rendition))
_MANIFEST_KEYS = frozenset(f.name for f in fields(Manifest))
_PACKAGER_KEYS = frozenset(f.name for f in fields(Packager))
_PACKAGER_PATHS = frozenset({"isobmff", "libav"})
_ALTERNATE_KEYS = frozenset(f.name for f in fields(Alternate))


def _recipe_from(v: Any, path: str) -> Recipe:
    o = _obj(v, path, _RECIPE_KEYS)
    return Recipe(
        source=_str(_get(o, "source", path), f"{path}.source", _ID_RE),
        width=_int(_get(o, "width", path), f"{path}.width", minimum=1, optional=True),
        height=_int(_get(o, "height", path), f"{path}.height", minimum=1, optional=True),
        video_bitrate=_int(
            _get(o, "video_bitrate", path), f"{path}.video_bitrate", minimum=1, optional=True
        ),
        crf=_int(_get(o, "crf", path), f"{path}.crf", minimum=0, optional=True),
        encoder=_str(_get(o, "encoder", path), f"{path}.encoder", _TOKEN_RE),
        preset=_str(_get(o, "preset", path), f"{path}.preset", _TOKEN_RE),
        threads=_req_int(_get(o, "threads", path), f"{path}.threads", minimum=1),
        audio=_bool(_get(o, "audio", path), f"{path}.audio"),
        bframes=_int(o.get("bframes"), f"{path}.bframes", minimum=0, optional=True),
    )


def _packager_from(v: Any, path: str) -> Packager:
    o = _obj(v, path, _PACKAGER_KEYS)
    top = _str(_get(o, "top", path), f"{path}.top")
    if top not in _PACKAGER_PATHS:
        raise ManifestError(f"{path}.top: must be one of {sorted(_PACKAGER_PATHS)}, got {top!r}")
    return Packager(
        version=_req_int(_get(o, "version", path), f"{path}.version", minimum=1),
        top=cast(PackagerPath, top),
    )


def _alternate_from(v: Any, path: str) -> Alternate | None:
    if v is None:
        return None
    o = _obj(v, path, _ALTERNATE_KEYS)
    lang = _get(o, "language", path)
    return Alternate(
        name=_str(_get(o, "name", path), f"{path}.name", _NAME_RE),
        language=None if lang is None else _str(lang, f"{path}.language", LANGUAGE_RE),
        default=_bool(_get(o, "default", path), f"{path}.default"),
        forced=_bool(_get(o, "forced", path), f"{path}.forced"),
    )


def _cid_or_none(v: Any, path: str) -> str | None:
    if v is None:
        return None
    return _str(v, path, _CID_RE)


def _segment_from(v: Any, path: str) -> Segment:
    if not isinstance(v, list) or len(v) != 2:
        raise ManifestError(f"{path}: expected [duration, cid]")
    return Segment(
        duration=_req_int(v[0], f"{path}[0]", minimum=1), cid=_cid_or_none(v[1], f"{path}[1]")
    )


def _rendition_from(v: Any, path: str) -> Rendition:
    o = _obj(v, path, _RENDITION_KEYS)
    fr = _get(o, "frame_rate", path)
    frame_rate: tuple[int, int] | None = None
    if fr is not None:
        if not isinstance(fr, list) or len(fr) != 2:
            raise ManifestError(f"{path}.frame_rate: expected [num, den] or null")
        frame_rate = (
            _req_int(fr[0], f"{path}.frame_rate[0]", minimum=1),
            _req_int(fr[1], f"{path}.frame_rate[1]", minimum=1),
        )
    segs = _get(o, "segments", path)
    if not isinstance(segs, list):
        raise ManifestError(f"{path}.segments: expected a list")
    rec = _get(o, "recipe", path)
    kind = _str(_get(o, "kind", path), f"{path}.kind")
    if kind not in _KINDS:
        raise ManifestError(f"{path}.kind: must be one of {sorted(_KINDS)}, got {kind!r}")
    return Rendition(
        id=_str(_get(o, "id", path), f"{path}.id", _ID_RE),
        kind=cast(RenditionKind, kind),
        codecs=_str(_get(o, "codecs", path), f"{path}.codecs", _CODECS_RE),
        bandwidth=_req_int(_get(o, "bandwidth", path), f"{path}.bandwidth", minimum=1),
        average_bandwidth=_int(
            _get(o, "average_bandwidth", path),
            f"{path}.average_bandwidth",
            minimum=1,
            optional=True,
        ),
        width=_int(_get(o, "width", path), f"{path}.width", minimum=1, optional=True),
        height=_int(_get(o, "height", path), f"{path}.height", minimum=1, optional=True),
        frame_rate=frame_rate,
        timescale=_req_int(_get(o, "timescale", path), f"{path}.timescale", minimum=1),
        start=_req_int(_get(o, "start", path), f"{path}.start", minimum=0),
        init=_cid_or_none(_get(o, "init", path), f"{path}.init"),
        on_demand=_bool(_get(o, "on_demand", path), f"{path}.on_demand"),
        recipe=_recipe_from(rec, f"{path}.recipe") if rec is not None else None,
        segments=tuple(_segment_from(s, f"{path}.segments[{i}]") for i, s in enumerate(segs)),
        alternate=_alternate_from(o.get("alternate"), f"{path}.alternate"),
    )


def decode(data: bytes | str) -> Manifest:
    """Parse and validate a manifest from JSON; ManifestError says what is wrong and where."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest is not valid JSON: {e}") from e
    return from_obj(obj)


def from_obj(obj: Any) -> Manifest:
    """Build and validate a manifest from plain data (as produced by `to_obj`)."""
    o = _obj(obj, "manifest", _MANIFEST_KEYS)
    version = _req_int(_get(o, "version", "manifest"), "manifest.version")
    if version != MANIFEST_VERSION:
        raise ManifestError(
            f"manifest.version: unsupported version {version} (this node reads {MANIFEST_VERSION})"
        )
    container = _str(_get(o, "container", "manifest"), "manifest.container")
    if container not in _CONTAINERS:
        raise ManifestError(f"manifest.container: must be fmp4 or ts, got {container!r}")
    rends = _get(o, "renditions", "manifest")
    if not isinstance(rends, list):
        raise ManifestError("manifest.renditions: expected a list")
    pk = o.get("packager")
    m = Manifest(
        version=version,
        packager=_packager_from(pk, "manifest.packager") if pk is not None else None,
        container=cast(Container, container),
        renditions=tuple(
            _rendition_from(r, f"manifest.renditions[{i}]") for i, r in enumerate(rends)
        ),
    )
    validate(m)
    return m


# ---- consistency rules -------------------------------------------------------------------------


def _validate_rendition(m: Manifest, r: Rendition, path: str) -> None:
    if not _ID_RE.match(r.id):
        raise ManifestError(f"{path}.id: invalid id {r.id!r}")
    if r.id in RESERVED_IDS:
        # A rendition's playlist is <id>.m3u8 next to master.m3u8: the names must not collide.
        raise ManifestError(f"{path}.id: {r.id!r} is reserved")
    if not _CODECS_RE.match(r.codecs):
        raise ManifestError(f"{path}.codecs: invalid codecs {r.codecs!r}")
    if r.bandwidth < 1 or r.timescale < 1 or r.start < 0:
        raise ManifestError(f"{path}: bandwidth and timescale must be positive, start >= 0")
    if r.average_bandwidth is not None and not 1 <= r.average_bandwidth <= r.bandwidth:
        raise ManifestError(f"{path}.average_bandwidth: must be in 1..bandwidth")
    if r.kind == "video":
        if r.width is None or r.height is None or r.width < 1 or r.height < 1:
            raise ManifestError(f"{path}: a video rendition needs width and height")
    elif r.width is not None or r.height is not None:
        raise ManifestError(f"{path}: an {r.kind} rendition has no width/height")
    if r.alternate is not None:
        _validate_alternate(r.alternate, f"{path}.alternate")
        if r.kind == "video":
            raise ManifestError(f"{path}.alternate: a video rendition is a variant, not a track")
    if r.kind == "subtitles" and (
        r.alternate is None or r.on_demand or r.recipe is not None or r.init is not None
    ):
        raise ManifestError(f"{path}: a subtitles rendition is a ready track without init")
    if r.frame_rate is not None and (r.frame_rate[0] < 1 or r.frame_rate[1] < 1):
        raise ManifestError(f"{path}.frame_rate: must be positive")
    if not r.segments:
        raise ManifestError(f"{path}.segments: a rendition needs at least one segment")
    for i, s in enumerate(r.segments):
        if s.duration < 1:
            raise ManifestError(f"{path}.segments[{i}]: duration must be positive")
        for c, where in ((s.cid, f"segments[{i}]"), (r.init, "init")):
            if c is not None and not _CID_RE.match(c):
                raise ManifestError(f"{path}.{where}: invalid content id {c!r}")
    if r.on_demand:
        if r.recipe is None:
            raise ManifestError(f"{path}: an on-demand rendition needs a recipe")
        if r.init is not None or any(s.cid is not None for s in r.segments):
            raise ManifestError(f"{path}: an on-demand rendition pins no blob ids")
    else:
        missing = [i for i, s in enumerate(r.segments) if s.cid is None]
        if missing:
            raise ManifestError(f"{path}.segments[{missing[0]}]: missing blob id")
        if m.container == "fmp4" and r.init is None and r.kind != "subtitles":
            raise ManifestError(f"{path}.init: an fMP4 rendition needs an init segment")
    if m.container == "ts" and r.init is not None:
        raise ManifestError(f"{path}.init: MPEG-TS renditions have no init segment")
    if r.recipe is not None:
        rec = r.recipe
        if rec.source == r.id:
            raise ManifestError(f"{path}.recipe.source: a rendition cannot derive from itself")
        src = next((x for x in m.renditions if x.id == rec.source), None)
        if src is None:
            raise ManifestError(f"{path}.recipe.source: no rendition {rec.source!r}")
        if src.on_demand:
            raise ManifestError(f"{path}.recipe.source: source {src.id!r} is itself on demand")
        if (src.timescale, src.start) != (r.timescale, r.start) or [
            s.duration for s in src.segments
        ] != [s.duration for s in r.segments]:
            raise ManifestError(
                f"{path}: timeline must match its source {src.id!r} segment by segment"
            )
        is_video = rec.width is not None
        if is_video != (r.kind == "video") or (rec.width, rec.height) != (r.width, r.height):
            raise ManifestError(f"{path}.recipe: size must match the rendition's")
        if is_video and (rec.height is None or (rec.video_bitrate is None and rec.crf is None)):
            raise ManifestError(
                f"{path}.recipe: a video recipe needs height and crf or video_bitrate"
            )


def validate(m: Manifest) -> None:
    """Check every consistency rule of a manifest; raise ManifestError on the first violation."""
    if m.version != MANIFEST_VERSION:
        raise ManifestError(f"manifest.version: unsupported version {m.version}")
    if m.container not in _CONTAINERS:
        raise ManifestError(f"manifest.container: must be fmp4 or ts, got {m.container!r}")
    if not m.renditions:
        raise ManifestError("manifest.renditions: a manifest needs at least one rendition")
    ids = [r.id for r in m.renditions]
    if len(set(ids)) != len(ids):
        raise ManifestError(f"manifest.renditions: duplicate rendition ids in {ids}")
    if all(r.on_demand for r in m.renditions):
        raise ManifestError("manifest.renditions: at least one rendition must be ready")
    for i, r in enumerate(m.renditions):
        _validate_rendition(m, r, f"manifest.renditions[{i}]")
    for kind in ("audio", "subtitles"):
        alts = [r.alternate for r in m.renditions if r.kind == kind and r.alternate is not None]
        names = [a.name for a in alts]
        if len(set(names)) != len(names):
            raise ManifestError(f"manifest.renditions: duplicate {kind} track names in {names}")
        if sum(a.default for a in alts) > 1:
            raise ManifestError(f"manifest.renditions: more than one default {kind} track")


def _validate_alternate(a: Alternate, path: str) -> None:
    if not _NAME_RE.match(a.name):
        raise ManifestError(f"{path}.name: invalid name {a.name!r}")
    if a.language is not None and not LANGUAGE_RE.match(a.language):
        raise ManifestError(f"{path}.language: invalid language {a.language!r}")
