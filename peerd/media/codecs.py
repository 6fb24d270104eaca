"""RFC 6381 codec strings (HLS ``CODECS``) from codec configuration bytes; pure functions.

H.264 (``avc1.PPCCLL``) and HEVC (``hvc1.…``) strings are read from the decoder configuration
record (``avcC``/``hvcC``) or, when a stream carries Annex B parameter sets instead (MPEG-TS
sources, encoders with a global header), from the SPS NAL unit. AAC is ``mp4a.40.<object type>``.
"""

from __future__ import annotations

_AAC_PROFILES = {"LC": 2, "HE-AAC": 5, "HE-AACv2": 29, "Main": 1, "LTP": 4, "SSR": 3}


def _nal_units(data: bytes) -> list[bytes]:
    """NAL units of an Annex B byte stream (start codes 00 00 01 / 00 00 00 01)."""
    out = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        start = i + 3
        j = data.find(b"\x00\x00\x01", start)
        end = len(data) if j < 0 else j
        nal = data[start:end]
        out.append(nal.rstrip(b"\x00") if j >= 0 else nal)
        i = j
    return out


def _unescape(nal: bytes) -> bytes:
    """Remove emulation prevention bytes (00 00 03 -> 00 00)."""
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


def avc_codec(extradata: bytes | None) -> str:
    """``avc1.PPCCLL`` from an avcC record or Annex B SPS; ``avc1.640028`` if unreadable."""
    if extradata:
        if extradata[0] == 1 and len(extradata) >= 4:
            return f"avc1.{extradata[1]:02x}{extradata[2]:02x}{extradata[3]:02x}"
        for nal in _nal_units(extradata):
            if nal and nal[0] & 0x1F == 7 and len(nal) >= 4:
                sps = _unescape(nal)
                return f"avc1.{sps[1]:02x}{sps[2]:02x}{sps[3]:02x}"
    return "avc1.640028"


def _hevc_string(ptl: bytes) -> str:
    """hvc1 string from the 12 bytes of general profile_tier_level."""
    space = ptl[0] >> 6
    tier = "H" if ptl[0] & 0x20 else "L"
    profile = ptl[0] & 0x1F
    compat = int.from_bytes(ptl[1:5], "big")
    reversed_compat = int(f"{compat:032b}"[::-1], 2)
    constraints = bytearray(ptl[5:11])
    while constraints and constraints[-1] == 0:
        constraints.pop()
    level = ptl[11]
    parts = [
        "hvc1",
        ("", "A", "B", "C")[space] + str(profile),
        f"{reversed_compat:X}",
        f"{tier}{level}",
    ]
    parts += [f"{b:X}" for b in constraints]
    return ".".join(parts)


def hevc_codec(extradata: bytes | None) -> str:
    """``hvc1.…`` from an hvcC record or an Annex B SPS; ``hvc1.1.6.L120.90`` if unreadable."""
    if extradata:
        if extradata[0] == 1 and len(extradata) >= 13:
            return _hevc_string(extradata[1:13])
        for nal in _nal_units(extradata):
            if len(nal) >= 15 and (nal[0] >> 1) & 0x3F == 33:  # SPS
                sps = _unescape(nal)
                return _hevc_string(sps[3:15])
    return "hvc1.1.6.L120.90"


def aac_codec(profile: str | None) -> str:
    """``mp4a.40.<audio object type>`` for a libavcodec AAC profile name (LC by default)."""
    return f"mp4a.40.{_AAC_PROFILES.get(profile or 'LC', 2)}"


def audio_codec(name: str, profile: str | None) -> str:
    """CODECS entry for an audio codec peerd packages (aac or opus)."""
    if name == "opus":
        return "Opus"
    return aac_codec(profile)


def video_codec(name: str, extradata: bytes | None) -> str:
    """CODECS entry for a video codec peerd packages (h264 or hevc)."""
    if name == "hevc":
        return hevc_codec(extradata)
    return avc_codec(extradata)
