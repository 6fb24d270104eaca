"""MPEG-TS continuity across segments (pure byte handling, no libav).

Every MPEG-TS packet carries a 4-bit continuity counter per PID that grows by one for each packet
with a payload. A player reads an HLS rendition as one stream, segment after segment, and checks
the counter across the joins. libavformat's mpegts muxer, opened afresh for each segment (see
`peerd.media.mux`), starts every PID at 0; the segment before ended anywhere, so strict demuxers
(ffmpeg ``-xerror``) saw a counter jump at every join and dropped the frame in flight as corrupt.

`pad_continuity` makes each PID's payload packets in a segment a whole number of counter cycles
(a multiple of 16): every segment then starts each counter at 0 and ends it at 15, and any
segment follows any other as a continuous stream would. It depends on nothing but the segment's
own bytes, so a segment produced on demand, out of order or on another node joins its neighbours
just the same, and the bytes stay deterministic. The elementary streams are untouched:

* PES PIDs (video, audio): some packets are cut into several, each carrying part of the same
  payload bytes behind adaptation-field stuffing (the muxer does the same for the last packet of
  every PES). The last packets are cut first; the first piece keeps the packet's adaptation
  fields (PCR, random access) and, in the packet that starts a PES, the whole PES header.
* PSI PIDs (PAT, PMT, SDT): the last table packet is sent again (tables are repeated anyway).

The cost is at most 15 packets (2,820 bytes) per PID and segment.

The alternative, the ``discontinuity_indicator`` on each PID's first packet (libavformat's
``mpegts_flags=initial_discontinuity``), would be stateless too, but on the PCR PID it declares a
new system time base at every segment, which is not true of one continuous rendition.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from peerd.errors import MediaError

PACKET = 188
CYCLE = 16
NULL_PID = 0x1FFF


def _pid(p: bytes) -> int:
    return ((p[1] & 0x1F) << 8) | p[2]


def _split(p: bytes) -> tuple[bytes, bytes]:
    """A packet's adaptation fields (stuffing dropped; b"" if none) and its payload."""
    afc = (p[3] >> 4) & 3
    if not afc & 2:
        return b"", p[4:]
    n = p[4]
    if n == 0:
        return b"", p[5:] if afc & 1 else b""
    flags = p[5]
    end = 6
    if flags & 0x10:  # PCR
        end += 6
    if flags & 0x08:  # OPCR
        end += 6
    if flags & 0x04:  # splice countdown
        end += 1
    if flags & 0x02:  # transport private data
        end += 1 + p[end]
    if flags & 0x01:  # adaptation field extension
        end += 1 + p[end]
    if end > 5 + n:
        raise MediaError("internal: malformed MPEG-TS adaptation field")
    fields = p[5:end] if flags else b""
    return fields, p[5 + n :] if afc & 1 else b""


def _packet(head: bytes, pusi: bool, fields: bytes, payload: bytes) -> bytes:
    """One packet: `head` (the original's first 4 bytes) with `pusi`, `fields` and `payload`."""
    b1 = (head[1] & 0xBF) | (0x40 if pusi else 0)
    room = PACKET - 4 - len(payload)
    if room == 0 and not fields:
        return bytes((0x47, b1, head[2], (head[3] & 0xC0) | 0x10)) + payload
    af_len = room - 1
    if fields:
        af = fields + b"\xff" * (af_len - len(fields))
    else:
        af = (b"\x00" + b"\xff" * (af_len - 1)) if af_len else b""
    return bytes((0x47, b1, head[2], (head[3] & 0xC0) | 0x30, af_len)) + af + payload


def _pieces(p: bytes, extra: int, keep: int) -> list[bytes]:
    """Packet `p` cut into 1 + `extra` packets carrying its payload (the first >= `keep` bytes)."""
    fields, payload = _split(p)
    n = extra + 1
    sizes = [len(payload) // n + (1 if i < len(payload) % n else 0) for i in range(n)]
    if sizes[0] < keep:
        rest = len(payload) - keep
        sizes = [keep] + [rest // extra + (1 if i < rest % extra else 0) for i in range(extra)]
    out = []
    off = 0
    for i, size in enumerate(sizes):
        chunk = payload[off : off + size]
        off += size
        out.append(_packet(p, bool(p[1] & 0x40) and i == 0, fields if i == 0 else b"", chunk))
    return out


def _keep(p: bytes) -> int:
    """Payload bytes the first piece of `p` must keep: the PES header if `p` starts a PES."""
    if not p[1] & 0x40:
        return 1
    payload = _split(p)[1]
    return 9 + payload[8] if len(payload) >= 9 else len(payload)


def _is_pes(first: bytes) -> bool:
    return _pid(first) != 0 and bool(first[1] & 0x40) and _split(first)[1][:3] == b"\x00\x00\x01"


def _whole_table(p: bytes) -> bool:
    """`p` starts a PSI section right away and holds all of it (so it can be sent again)."""
    payload = _split(p)[1]
    if not p[1] & 0x40 or len(payload) < 4 or payload[0] != 0:
        return False
    return 4 + (((payload[2] & 0x0F) << 8) | payload[3]) <= len(payload)


def _records(data: bytes, n: int) -> bytearray:
    """Three bytes per packet: PID high bits | 0x40, PID low byte, payload flag | 0x60.

    The first and last byte of a record take values no other position can hold, so a search for
    a whole record (or its first two bytes, checked for alignment) finds whole records only, and
    the counting and searching below run in C instead of a Python loop over every packet.
    """
    rec = bytearray(3 * n)
    rec[0::3] = data[1::PACKET].translate(_HIGH)
    rec[1::3] = data[2::PACKET]
    rec[2::3] = data[3::PACKET].translate(_PAYLOAD)
    return rec


_HIGH = bytes(0x40 | (b & 0x1F) for b in range(256))
_PAYLOAD = bytes(0x60 | ((b >> 4) & 1) for b in range(256))


def _indices(rec: bytearray, key: bytes, backwards: bool) -> Iterator[int]:
    """Indices of the packets whose record starts with `key` (a PID, or a whole record), in
    order or from the last."""
    lo, hi = 0, len(rec)
    while True:
        pos = rec.rfind(key, 0, hi) if backwards else rec.find(key, lo)
        if pos < 0:
            return
        if backwards:
            hi = pos + 1
        else:
            lo = pos + 1
        if pos % 3 == 0:
            yield pos // 3


def _pad_pid(data: bytes, rec: bytearray, key: bytes, need: int) -> dict[int, list[bytes]]:
    """The packets that replace some of one PID's last ones, `need` more with payload."""

    def packet(i: int) -> bytes:
        return data[i * PACKET : (i + 1) * PACKET]

    pid = _pid(b"\x47" + key)
    # What the PID carries, from its first packet with a payload (one with only a PCR says
    # nothing); the caller found payload packets, so there is one.
    pes = _is_pes(packet(next(_indices(rec, key + b"\x61", backwards=False))))
    plan: dict[int, int] = {}  # packet index -> packets to add after it
    walked: list[int] = []
    for i in _indices(rec, key, backwards=True):
        walked.append(i)
        p = packet(i)
        if not p[3] & 0x10:
            continue
        if pes:
            take = min(need, len(_split(p)[1]) - _keep(p))
        elif _whole_table(p):
            take = need  # tables are repeated anyway: send this one `need` more times
        else:
            raise MediaError(f"internal: MPEG-TS PID {pid} ends without a whole table")
        if take > 0:
            plan[i] = take
            need -= take
        if not need:
            break
    if need:
        raise MediaError(f"internal: MPEG-TS PID {pid} too small to pad to whole cycles")
    out: dict[int, list[bytes]] = {}
    cc = ((data[walked[-1] * PACKET + 3] & 0x0F) - 1) % CYCLE  # the counter before the first change
    for i in reversed(walked):
        p = packet(i)
        if i not in plan:
            group = [p]
        elif pes:
            group = _pieces(p, plan[i], _keep(p))
        else:
            group = [p] * (1 + plan[i])
        renumbered = []
        for q in group:
            if q[3] & 0x10:
                cc = (cc + 1) % CYCLE
            renumbered.append(q[:3] + bytes(((q[3] & 0xF0) | cc,)) + q[4:])
        out[i] = renumbered
    if cc != CYCLE - 1:
        raise MediaError(f"internal: MPEG-TS PID {pid} counters did not start at 0")
    return out


def pad_continuity(data: bytes) -> bytes:
    """The segment with each PID's payload packets padded to whole counter cycles (module doc).

    `data` is a segment as libavformat writes it: every PID's counter starts at 0 and grows by
    one per packet with a payload. Raises MediaError if it is not whole MPEG-TS packets, if its
    counters did not start at 0, or if a PES PID carries too few payload bytes to be padded
    (fewer than 16 past its PES headers, never seen from a real segment).
    """
    n, rest = divmod(len(data), PACKET)
    if rest or data[0::PACKET] != b"\x47" * n:
        raise MediaError(f"internal: a {len(data)}-byte MPEG-TS segment is not whole packets")
    rec = _records(data, n)
    keys = bytearray(2 * n)
    keys[0::2] = rec[0::3]
    keys[1::2] = rec[1::3]
    changes: dict[int, list[bytes]] = {}
    for k in sorted(set(memoryview(keys).cast("H"))):
        key = k.to_bytes(2, sys.byteorder)
        need = -rec.count(key + b"\x61") % CYCLE
        if need and _pid(b"\x47" + key) != NULL_PID:
            changes.update(_pad_pid(data, rec, key, need))
    if not changes:
        return data
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    done = 0
    for i in sorted(changes):
        parts.append(view[done * PACKET : i * PACKET])
        parts += changes[i]
        done = i + 1
    parts.append(view[done * PACKET :])
    return b"".join(parts)  # the segment copied once
