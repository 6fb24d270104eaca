"""WHEP policy without I/O: ICE server lists, their Link headers and cache life, codec choice.

* ICE servers arrive either from the configuration or from Cloudflare TURN's
  ``generate-ice-servers`` answer (``{"iceServers": [{"urls": [...], "username": ...,
  "credential": ...}, ...]}``). :func:`parse_ice_servers` checks that shape and keeps it as given
  (no URL is dropped or rewritten), so the viewer receives exactly what Cloudflare minted.
* WHEP (RFC 9725) hands them to the viewer as ``Link: <url>; rel="ice-server"`` headers, one per
  URL, with ``username``/``credential``/``credential-type`` parameters for TURN
  (:func:`link_headers`).
* Minted credentials expire after their TTL; :func:`credentials_fresh` says whether a cached list
  can still be handed out, keeping a margin so a viewer never receives credentials that die
  during its ICE negotiation.
* :func:`choose_video` decides, from the codecs a viewer offered and the profile of the stored
  H.264 stream (read from its SPS), whether the stream can be sent as it is (packet passthrough)
  and under which ``profile-level-id``, or must be transcoded: passthrough only under a profile
  the viewer offered and whose decoders decode the stream.

Everything here is pure: no clock (``now`` is passed in), no sockets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from peerd.errors import UpstreamError

_URL_RE = re.compile(r"^(stun|stuns|turn|turns):[^\s<>\"]+$")
# A Link header parameter value is a quoted-string: no raw quote, backslash or control characters.
_QUOTABLE_RE = re.compile(r'^[^"\\\x00-\x1f\x7f]*$')


@dataclass(frozen=True)
class IceServer:
    """One entry of an ICE server list, as WebRTC's ``RTCIceServer`` describes it."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``RTCIceServer`` dictionary a browser's ``RTCPeerConnection`` accepts."""
        out: dict[str, Any] = {"urls": list(self.urls)}
        if self.username is not None:
            out["username"] = self.username
        if self.credential is not None:
            out["credential"] = self.credential
        return out


def parse_ice_servers(obj: Any, *, where: str = "iceServers") -> tuple[IceServer, ...]:
    """Validate a list of ``RTCIceServer`` dictionaries; raise :class:`UpstreamError` if malformed.

    ``urls`` may be one string or a list of strings, as in WebRTC. Unknown keys are ignored
    (Cloudflare may add some); the URLs are kept in the order given.
    """
    if not isinstance(obj, list):
        raise UpstreamError(f"{where}: expected a list, got {type(obj).__name__}")
    servers: list[IceServer] = []
    for i, entry in enumerate(obj):
        path = f"{where}[{i}]"
        if not isinstance(entry, Mapping):
            raise UpstreamError(f"{path}: expected an object")
        urls = entry.get("urls")
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not urls:
            raise UpstreamError(f"{path}.urls: expected a URL or a non-empty list of URLs")
        for u in urls:
            if not isinstance(u, str) or not _URL_RE.match(u):
                raise UpstreamError(f"{path}.urls: not a STUN/TURN URL: {u!r}")
        user, cred = entry.get("username"), entry.get("credential")
        for name, value in (("username", user), ("credential", cred)):
            if value is not None and (not isinstance(value, str) or not _QUOTABLE_RE.match(value)):
                raise UpstreamError(f"{path}.{name}: expected a plain string")
        servers.append(IceServer(urls=tuple(urls), username=user, credential=cred))
    return tuple(servers)


def link_headers(servers: Sequence[IceServer]) -> list[str]:
    """``Link`` header values announcing ``servers`` to a WHEP client (RFC 9725 section 4.4)."""
    values: list[str] = []
    for s in servers:
        for url in s.urls:
            value = f'<{url}>; rel="ice-server"'
            if url.startswith("turn") and s.username is not None and s.credential is not None:
                value += (
                    f'; username="{s.username}"; credential="{s.credential}"'
                    '; credential-type="password"'
                )
            values.append(value)
    return values


def credentials_fresh(now: float, expires_at: float, margin_s: float) -> bool:
    """True while minted credentials outlive ``now`` by more than ``margin_s``."""
    return now < expires_at - margin_s


# -- codec choice ----------------------------------------------------------------------------------

# H.264 profiles by how much a decoder of that profile can decode: a viewer that accepts a profile
# accepts every stream of a lower rank. Constrained Baseline and Baseline decoders in browsers are
# the same decoder, and Constrained High is High without B-frames. (Chromium also offers High 4:4:4
# Predictive, "f4...", but receives nothing under that label: it is left out on purpose.)
_RANK_CB, _RANK_MAIN, _RANK_CHIGH, _RANK_HIGH = 0, 2, 3, 4


def h264_profile_rank(profile_level_id: str) -> int | None:
    """Rank of an H.264 ``profile-level-id`` (hex ``PPCCLL``); None if not a profile we send."""
    if not re.fullmatch(r"[0-9a-fA-F]{6}", profile_level_id):
        return None
    idc = int(profile_level_id[0:2], 16)
    constraints = int(profile_level_id[2:4], 16)
    if idc == 0x42 or (idc == 0x4D and constraints & 0x80):
        return _RANK_CB
    if idc == 0x4D:
        return _RANK_MAIN
    if idc == 0x64:
        return _RANK_CHIGH if constraints & 0x0C == 0x0C else _RANK_HIGH
    return None


def stream_profile(codecs: str) -> str | None:
    """The ``PPCCLL`` of the H.264 entry of an RFC 6381 CODECS string, e.g. ``avc1.64001f``."""
    for entry in codecs.split(","):
        m = re.fullmatch(r"(?:avc1|avc3)\.([0-9a-fA-F]{6})", entry.strip())
        if m:
            return m.group(1).lower()
    return None


@dataclass(frozen=True)
class OfferedCodec:
    """A codec from the viewer's offer: MIME type (``video/H264``) and its fmtp parameters."""

    mime: str
    parameters: Mapping[str, str]


@dataclass(frozen=True)
class VideoPlan:
    """How video goes to a viewer.

    ``passthrough``: the stored H.264 packets, answered as ``profile_level_id`` in place of the
    viewer's ``offered`` entry (see :func:`answer_profile`).
    ``transcode``: decoded frames, re-encoded by the WebRTC stack in a codec the viewer offered.
    ``refuse``: neither is possible (no common codec, or transcoding disabled).
    """

    mode: Literal["passthrough", "transcode", "refuse"]
    profile_level_id: str | None = None
    reason: str = ""
    offered: str | None = None


def answer_profile(stored: str, offered: str) -> str:
    """The ``profile-level-id`` to answer for sending ``stored`` to a viewer that offered
    ``offered`` (a profile whose decoders decode ``stored``).

    An answer may only name a profile the viewer offered. When that is the stream's own profile,
    the answer names the stream exactly (profile, constraint flags and level from its SPS);
    otherwise (a Main stream to a viewer offering High but not Main) it names the offered profile
    at the stream's level. The level may differ from the offered one: WebRTC endpoints offer
    ``level-asymmetry-allowed=1``.
    """
    if h264_profile_rank(stored) == h264_profile_rank(offered):
        return stored.lower()
    return offered[:4].lower() + stored[4:6].lower()


def choose_video(
    offered: Sequence[OfferedCodec],
    stored_profile: str | None,
    *,
    reorders: bool,
    transcode_allowed: bool,
    transcodable: Sequence[str] = ("video/vp8", "video/h264"),
) -> VideoPlan:
    """Pass the stored H.264 through when the viewer accepts (packetization-mode 1) a profile
    that decodes it and the stream has no B-frames; otherwise transcode into a codec the viewer
    offered.

    ``reorders`` says the stream's decode order differs from presentation order (B-frames):
    browsers' WebRTC receivers decode only its keyframes (measured with Chromium: 1 frame in 12
    decoded, a PLI per GOP), so such a stream is never passed through.

    The answer names the lowest offered profile that decodes the stream, as
    :func:`answer_profile` words it. A viewer offering no such profile (Chromium without a
    hardware decoder offers Constrained Baseline, Baseline and Main, not High) is sent a
    transcoded stream: labelling a High stream as Main would be a lie a strict decoder rejects.
    """
    need = h264_profile_rank(stored_profile) if stored_profile else None
    why = "the stored video is not H.264"
    if stored_profile is not None and need is not None and reorders:
        why = "the stored H.264 has B-frames, which WebRTC receivers do not decode"
    elif stored_profile is not None and need is not None:
        enough: list[tuple[int, str]] = []
        for c in offered:
            if c.mime.lower() != "video/h264":
                continue
            if str(c.parameters.get("packetization-mode", "0")) != "1":
                continue
            pli = str(c.parameters.get("profile-level-id", "42e01f")).lower()
            rank = h264_profile_rank(pli)
            if rank is not None and rank >= need:
                enough.append((rank, pli))
        if enough:
            offer = min(enough)[1]
            pli = answer_profile(stored_profile, offer)
            return VideoPlan("passthrough", profile_level_id=pli, offered=offer)
        why = f"the viewer accepts no H.264 profile that decodes the stored {stored_profile}"
    if not transcode_allowed:
        return VideoPlan("refuse", reason=f"{why} and transcoding is disabled")
    if any(c.mime.lower() in transcodable for c in offered):
        return VideoPlan("transcode", reason=why)
    return VideoPlan("refuse", reason=f"{why} and the viewer offers no codec this node encodes")
