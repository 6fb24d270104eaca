"""H.264 bitstream shapes, pure: Annex B and length-prefixed NAL units, avcC, SPS dimensions.

WebRTC carries H.264 as Annex B (NAL units behind ``00 00 01`` / ``00 00 00 01`` start codes, the
parameter sets in band before keyframes); MP4 and the live contract (:mod:`peerd.core.live`)
carry NAL units behind 4-byte big-endian lengths with the SPS and PPS in an ``avcC`` record
(ISO/IEC 14496-15 5.3.3.1). The WHIP ingest converts the first into the second, the WHEP
fan-out the second into the first; both come here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

NAL_IDR = 5
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9
# Profiles whose SPS carries chroma format, bit depths and scaling lists (ITU-T H.264 7.3.2.1.1).
_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


def nal_type(nal: bytes) -> int:
    """The ``nal_unit_type`` of one NAL unit (0 for an empty one)."""
    return nal[0] & 0x1F if nal else 0


def split_annexb(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream, start codes (3 or 4 bytes) removed."""
    nals: list[bytes] = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        start = i + 3
        nxt = data.find(b"\x00\x00\x01", start)
        end = len(data) if nxt < 0 else nxt
        nal = data[start:end]
        if nxt >= 0:
            nal = nal.rstrip(b"\x00")  # the leading zero of a 4-byte start code, trailing zeros
        if nal:
            nals.append(nal)
        i = nxt
    return nals


def split_length_prefixed(data: bytes) -> list[bytes]:
    """The NAL units of 4-byte length-prefixed data; ValueError when a length overruns it."""
    nals: list[bytes] = []
    i = 0
    while i + 4 <= len(data):
        n = int.from_bytes(data[i : i + 4], "big")
        if i + 4 + n > len(data):
            raise ValueError("NAL unit length past the end of the frame")
        nals.append(data[i + 4 : i + 4 + n])
        i += 4 + n
    if i != len(data):
        raise ValueError("trailing bytes after the last NAL unit")
    return nals


def length_prefixed(nals: Iterable[bytes]) -> bytes:
    """NAL units behind 4-byte big-endian lengths (MP4 sample form)."""
    return b"".join(len(n).to_bytes(4, "big") + n for n in nals)


def annexb(nals: Iterable[bytes]) -> bytes:
    """NAL units behind 4-byte start codes (Annex B)."""
    return b"".join(b"\x00\x00\x00\x01" + n for n in nals)


def avcc(sps: Sequence[bytes], pps: Sequence[bytes]) -> bytes:
    """An ``AVCDecoderConfigurationRecord`` naming 4-byte NAL lengths, from parameter sets."""
    if not sps or not pps or len(sps[0]) < 4:
        raise ValueError("an avcC needs an SPS and a PPS")
    out = bytearray([1, sps[0][1], sps[0][2], sps[0][3], 0xFF, 0xE0 | len(sps)])
    for s in sps:
        out += len(s).to_bytes(2, "big") + s
    out.append(len(pps))
    for p in pps:
        out += len(p).to_bytes(2, "big") + p
    if sps[0][1] in (100, 110, 122, 144):
        # High profiles: chroma format and bit depths, no SPS extensions (14496-15 5.3.3.1.2).
        chroma, luma_depth, chroma_depth = _sps(sps[0])[2:]
        out += bytes([0xFC | chroma, 0xF8 | (luma_depth - 8), 0xF8 | (chroma_depth - 8), 0])
    return bytes(out)


def avcc_parameter_sets(record: bytes) -> tuple[list[bytes], list[bytes]]:
    """The SPS and PPS NAL units of an ``avcC``; ValueError when it is not one."""
    try:
        if record[0] != 1:
            raise ValueError("not an avcC (version is not 1)")
        i = 5
        sets: list[list[bytes]] = [[], []]
        for which in (0, 1):
            count = record[i] & (0x1F if which == 0 else 0xFF)
            i += 1
            for _ in range(count):
                n = int.from_bytes(record[i : i + 2], "big")
                sets[which].append(record[i + 2 : i + 2 + n])
                i += 2 + n
    except IndexError:
        raise ValueError("truncated avcC") from None
    return sets[0], sets[1]


def profile_level_id(record: bytes) -> str:
    """The ``PPCCLL`` of an ``avcC`` (profile, constraint flags, level), as SDP names it."""
    return record[1:4].hex()


class _Bits:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u(self, n: int) -> int:
        v = 0
        for _ in range(n):
            byte = self.data[self.pos >> 3]  # IndexError past the end: a truncated SPS
            v = (v << 1) | ((byte >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return v

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("bad Exp-Golomb code in SPS")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def _unescape(nal: bytes) -> bytes:
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


def sps_dimensions(sps: bytes) -> tuple[int, int]:
    """Width and height in pixels (cropping applied) from an SPS NAL unit."""
    return _sps(sps)[:2]


def _sps(sps: bytes) -> tuple[int, int, int, int, int]:
    """Width, height, chroma_format_idc, luma and chroma bit depths of an SPS NAL unit."""
    try:
        return _parse_sps(_Bits(_unescape(sps)[1:]))
    except IndexError:
        raise ValueError("truncated SPS") from None


def _parse_sps(b: _Bits) -> tuple[int, int, int, int, int]:
    profile = b.u(8)
    b.u(16)  # constraint flags, level
    b.ue()  # seq_parameter_set_id
    chroma = 1
    separate = 0
    luma_depth = chroma_depth = 8
    if profile in _HIGH_PROFILES:
        chroma = b.ue()
        if chroma == 3:
            separate = b.u(1)
        luma_depth = b.ue() + 8
        chroma_depth = b.ue() + 8
        b.u(1)  # qpprime_y_zero_transform_bypass_flag
        if b.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma != 3 else 12):
                if b.u(1):
                    last = nxt = 8
                    for _ in range(16 if i < 6 else 64):
                        if nxt:
                            nxt = (last + b.se() + 256) % 256
                        last = nxt or last
    b.ue()  # log2_max_frame_num_minus4
    poc = b.ue()
    if poc == 0:
        b.ue()
    elif poc == 1:
        b.u(1)
        b.se()
        b.se()
        for _ in range(b.ue()):
            b.se()
    b.ue()  # max_num_ref_frames
    b.u(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = b.ue() + 1
    height_units = b.ue() + 1
    frame_mbs_only = b.u(1)
    if not frame_mbs_only:
        b.u(1)  # mb_adaptive_frame_field_flag
    b.u(1)  # direct_8x8_inference_flag
    left = right = top = bottom = 0
    if b.u(1):  # frame_cropping_flag
        left, right, top, bottom = b.ue(), b.ue(), b.ue(), b.ue()
    array_type = 0 if separate else chroma
    sub_w, sub_h = {0: (1, 1), 1: (2, 2), 2: (2, 1), 3: (1, 1)}.get(array_type, (2, 2))
    crop_x = 1 if array_type == 0 else sub_w
    crop_y = (2 - frame_mbs_only) * (1 if array_type == 0 else sub_h)
    width = width_mbs * 16 - crop_x * (left + right)
    height = (2 - frame_mbs_only) * height_units * 16 - crop_y * (top + bottom)
    return width, height, chroma, luma_depth, chroma_depth
