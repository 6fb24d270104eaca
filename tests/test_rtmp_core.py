"""The sans-I/O RTMP server (peerd.core.rtmp) driven by bytes alone, as a publisher sends them."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.core import rtmp
from peerd.core.rtmp import (
    Failed,
    Frame,
    PublishRequested,
    RtmpConnection,
    TracksReady,
    Unpublished,
    decode_amf0,
    encode_amf0,
)

AVCC = bytes.fromhex("0164000bffe10004674d000a01000468ef3c80")  # 4-byte NAL lengths
ASC = bytes.fromhex("1190")  # AAC LC, 48 kHz, stereo

# -- a minimal client: chunks with a chosen format, and a reader of what the server sends --------


def chunk(
    csid: int,
    body: bytes,
    *,
    fmt: int = 0,
    ts: int = 0,
    type_id: int = 0,
    msid: int = 0,
    size: int = 128,
    length: int | None = None,
) -> bytes:
    """One message cut into chunks: a ``fmt`` header, then format 3 continuations."""
    length = len(body) if length is None else length
    field_value = min(ts, 0xFFFFFF)
    ext = ts.to_bytes(4, "big") if field_value == 0xFFFFFF else b""
    if fmt == 3:
        head = bytes((0xC0 | csid,)) + ext
    else:
        head = bytes(((fmt << 6) | csid,)) + field_value.to_bytes(3, "big")
        if fmt < 2:
            head += length.to_bytes(3, "big") + bytes((type_id,))
        if fmt == 0:
            head += msid.to_bytes(4, "little")
        head += ext
    out = head + body[:size]
    for off in range(size, len(body), size):
        out += bytes((0xC0 | csid,)) + ext + body[off : off + size]
    return out


def command(*values: Any, msid: int = 0, size: int = 128) -> bytes:
    """An AMF0 command message on chunk stream 3."""
    return chunk(3, encode_amf0(*values), type_id=20, msid=msid, size=size)


def media(type_id: int, body: bytes, ts: int, *, csid: int = 6, size: int = 128) -> bytes:
    """An audio or video message on stream 1."""
    return chunk(csid, body, ts=ts, type_id=type_id, msid=1, size=size)


def avc(packet_type: int, data: bytes, *, key: bool = True, cts: int = 0) -> bytes:
    """An FLV AVC video tag body."""
    head = bytes(((0x10 if key else 0x20) | 7, packet_type))
    return head + cts.to_bytes(3, "big", signed=True) + data


def aac(packet_type: int, data: bytes) -> bytes:
    """An FLV AAC audio tag body."""
    return bytes((0xAF, packet_type)) + data


def nal(*units: bytes, size: int = 4) -> bytes:
    """NAL units, length-prefixed."""
    return b"".join(len(u).to_bytes(size, "big") + u for u in units)


def handshake() -> bytes:
    """C0, C1 and C2 (C2 may come before S1 is read: the server does not check it)."""
    return b"\x03" + bytes(1536) + bytes(1536)


def messages(out: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream id, body) of everything the server sent after S0 S1 S2 (it sends format 0
    headers and format 3 continuations, and says its chunk size first)."""
    found: list[tuple[int, int, bytes]] = []
    pos, size = 0, 128
    while pos < len(out):
        assert out[pos] >> 6 == 0
        length = int.from_bytes(out[pos + 4 : pos + 7], "big")
        type_id = out[pos + 7]
        msid = int.from_bytes(out[pos + 8 : pos + 12], "little")
        pos += 12
        body = bytearray()
        take = min(size, length)
        body += out[pos : pos + take]
        pos += take
        while len(body) < length:
            assert out[pos] >> 6 == 3
            pos += 1
            take = min(size, length - len(body))
            body += out[pos : pos + take]
            pos += take
        if type_id == 1:
            size = int.from_bytes(body[:4], "big")
        found.append((type_id, msid, bytes(body)))
    return found


def commands(out: bytes) -> list[list[Any]]:
    """The AMF0 commands among the server's messages."""
    return [decode_amf0(body) for t, _, body in messages(out) if t == 20]


def connected(**kw: Any) -> RtmpConnection:
    """A connection past handshake, connect, createStream and publish, accepted."""
    c = RtmpConnection(**kw)
    c.receive(handshake())
    assert c.data_to_send()[:1] == b"\x03"
    c.receive(command("connect", 1.0, {"app": "live", "tcUrl": "rtmp://h/live"}))
    c.receive(command("createStream", 2.0, None))
    events = c.receive(command("publish", 3.0, None, "k?x=1", "live", msid=1))
    assert events == [PublishRequested(key="k", app="live")]
    c.accept()
    c.data_to_send()
    return c


def frames(events: list[rtmp.Event]) -> list[tuple[int, int, int, bool, bytes]]:
    """(track, dts, pts, keyframe, data) of the Frame events."""
    return [
        (e.frame.track, e.frame.dts, e.frame.pts, e.frame.keyframe, e.frame.data)
        for e in events
        if isinstance(e, Frame)
    ]


# -- handshake and commands ---------------------------------------------------------------------


def test_handshake_echoes_c1_and_waits_for_c2() -> None:
    c = RtmpConnection(nonce=b"\x07" * 1528)
    c1 = bytes(range(256)) * 6
    assert c.receive(b"\x03" + c1[:1000]) == []
    assert c.data_to_send() == b""
    c.receive(c1[1000:])
    out = c.data_to_send()
    assert len(out) == 1 + 2 * 1536
    assert out[0] == 3
    assert out[9:1537] == b"\x07" * 1528
    assert out[1537:] == c1
    assert c.state is rtmp.State.HANDSHAKE
    c.receive(bytes(1536))
    assert c.state is rtmp.State.CONNECTING


def test_other_versions_are_refused() -> None:
    c = RtmpConnection()
    (event,) = c.receive(b"\x06" + bytes(1536))
    assert isinstance(event, Failed)
    assert event.kind == "unsupported"
    assert "RTMPE" in event.reason
    assert c.closed


def test_connect_create_publish_accept() -> None:
    c = RtmpConnection()
    c.receive(handshake())
    c.data_to_send()
    assert c.receive(command("connect", 1.0, {"app": "live"})) == [rtmp.Connected("live")]
    out = c.data_to_send()
    kinds = [t for t, _, _ in messages(out)]
    assert kinds == [5, 6, 1, 20]  # Window Ack Size, Set Peer Bandwidth, Set Chunk Size, _result
    (result,) = commands(out)
    assert result[0] == "_result"
    assert result[1] == 1.0
    assert result[3]["code"] == "NetConnection.Connect.Success"
    c.receive(command("releaseStream", 2.0, None, "key", size=4096))
    c.receive(command("FCPublish", 3.0, None, "key", size=4096))
    c.receive(command("createStream", 4.0, None, size=4096))
    names = [(v[0], v[1]) for v in commands(c.data_to_send())]
    assert names == [("_result", 2.0), ("onFCPublish", 0.0), ("_result", 4.0)]
    # Server messages are cut at 4096 now; the client still sends at 128 until it says otherwise.
    events = c.receive(command("publish", 5.0, None, "sekrit?token=1", "live", msid=1))
    assert events == [PublishRequested(key="sekrit", app="live")]
    c.accept()
    (status,) = commands(c.data_to_send())
    assert status[0] == "onStatus"
    assert status[3]["code"] == "NetStream.Publish.Start"
    assert c.state is rtmp.State.PUBLISHING


def test_reject_sends_an_error_status_and_closes() -> None:
    c = RtmpConnection()
    c.receive(handshake())
    c.receive(command("connect", 1.0, {"app": "live"}))
    c.receive(command("createStream", 2.0, None))
    c.receive(command("publish", 3.0, None, "wrong", "live", msid=1))
    c.data_to_send()
    c.reject("NetStream.Publish.BadName", "stream key refused")
    # After connect the server cuts at 4096: one chunk per message here.
    out = c.data_to_send()
    (status,) = [decode_amf0(out[12:])]
    assert status[0] == "onStatus"
    assert status[3] == {
        "level": "error",
        "code": "NetStream.Publish.BadName",
        "description": "stream key refused",
    }
    assert c.closed
    assert c.receive(b"anything") == []


def test_unpublish_once_then_republish() -> None:
    c = connected()
    events = c.receive(command("FCUnpublish", 6.0, None, "k") + command("deleteStream", 7.0, None))
    assert events == [Unpublished()]
    assert c.state is rtmp.State.CONNECTED
    c.receive(command("createStream", 8.0, None))
    assert c.receive(command("publish", 9.0, None, "k2", "live", msid=2)) == [
        PublishRequested("k2", "live")
    ]


def test_play_is_refused() -> None:
    c = RtmpConnection()
    c.receive(handshake())
    c.receive(command("connect", 1.0, {"app": "live"}))
    (event,) = c.receive(command("play", 2.0, None, "k"))
    assert isinstance(event, Failed)
    assert event.kind == "unsupported"


def test_ping_answered_and_acknowledgements_sent() -> None:
    c = connected()
    c.receive(chunk(2, struct.pack(">HI", 6, 1234), type_id=4))
    (pong,) = messages(c.data_to_send())
    assert pong == (4, 0, struct.pack(">HI", 7, 1234))
    c.receive(chunk(2, (2000).to_bytes(4, "big"), type_id=5))
    c.receive(command("whatever", 0.0, None, "x" * 3000))
    acks = [int.from_bytes(m[2], "big") for m in messages(c.data_to_send()) if m[0] == 3]
    assert acks  # every 2000 bytes received (the handshake counts too)
    assert acks == sorted(acks)


# -- media --------------------------------------------------------------------------------------


def test_metadata_headers_frames() -> None:
    c = connected()
    meta = encode_amf0("@setDataFrame", "onMetaData")
    meta += b"\x08\x00\x00\x00\x04" + encode_amf0({"width": 160.0, "height": 120.0})[1:-3]
    meta += encode_amf0({"videocodecid": 7.0, "audiocodecid": 10.0})[1:]
    events = c.receive(chunk(4, meta, type_id=18, msid=1))
    events += c.receive(media(9, avc(0, AVCC), 1000))
    assert events == []  # audio is expected too
    events = c.receive(media(8, aac(0, ASC), 1000, csid=4))
    (ready,) = events
    assert isinstance(ready, TracksReady)
    video, audio = ready.tracks
    assert (video.index, video.codec, video.config, video.width, video.height) == (
        0,
        "h264",
        AVCC,
        160,
        120,
    )
    assert (audio.index, audio.codec, audio.config, audio.sample_rate, audio.channels) == (
        1,
        "aac",
        ASC,
        48000,
        2,
    )
    assert video.timescale == audio.timescale == 1000
    events = c.receive(media(9, avc(1, nal(b"\x65abc"), cts=66), 1000))
    events += c.receive(media(8, aac(1, b"raw"), 1021, csid=4))
    events += c.receive(media(9, avc(1, nal(b"\x41b"), key=False, cts=-33), 1033))
    assert frames(events) == [
        (0, 0, 66, True, nal(b"\x65abc")),
        (1, 21, 21, True, b"raw"),
        (0, 33, 0, False, nal(b"\x41b")),
    ]


def test_without_metadata_the_first_frame_decides_the_tracks() -> None:
    c = connected()
    assert c.receive(media(9, avc(0, AVCC), 0)) == []
    events = c.receive(media(9, avc(1, nal(b"\x65k")), 40))
    assert isinstance(events[0], TracksReady)
    assert [t.kind for t in events[0].tracks] == ["video"]
    assert frames(events) == [(0, 0, 0, True, nal(b"\x65k"))]
    # Audio that starts later has no track: dropped, not an error.
    assert c.receive(media(8, aac(0, ASC), 50, csid=4) + media(8, aac(1, b"x"), 50, csid=4)) == []
    # A repeated, unchanged sequence header is fine; a changed one ends the publication.
    assert c.receive(media(9, avc(0, AVCC), 60)) == []
    (event,) = c.receive(media(9, avc(0, AVCC[:-1] + b"\x81"), 70))
    assert isinstance(event, Failed)
    assert "changed" in event.reason


def test_media_before_any_header_is_a_violation() -> None:
    c = connected()
    (event,) = c.receive(media(9, avc(1, nal(b"\x65")), 0))
    assert isinstance(event, Failed)
    assert event.kind == "protocol"


def test_two_byte_nal_lengths_become_four() -> None:
    c = connected()
    short = AVCC[:4] + bytes((0xFD,)) + AVCC[5:]  # lengthSizeMinusOne = 1
    c.receive(media(9, avc(0, short), 0))
    events = c.receive(media(9, avc(1, nal(b"\x65ab", b"\x06c", size=2)), 0))
    assert isinstance(events[0], TracksReady)
    assert events[0].tracks[0].config == AVCC
    assert frames(events)[0][4] == nal(b"\x65ab", b"\x06c")


@pytest.mark.parametrize(
    ("type_id", "body", "named"),
    [
        (9, bytes((0x90,)) + b"hvc1" + bytes(8), "hvc1"),
        (9, bytes((0x80,)) + b"av01" + bytes(8), "av01"),
        (9, bytes((0x14, 0)) + bytes(8), "VP6"),
        (8, bytes((0x2F, 0)) + bytes(8), "MP3"),
        (8, bytes((0xB6, 0)) + bytes(8), "Speex"),
        (8, bytes((0x90,)) + b"Opus" + bytes(8), "Opus"),
    ],
)
def test_unsupported_codecs_are_refused_by_name(type_id: int, body: bytes, named: str) -> None:
    c = connected()
    (event,) = c.receive(media(type_id, body, 0))
    assert isinstance(event, Failed)
    assert event.kind == "unsupported"
    assert named in event.reason
    assert c.closed


# -- chunk stream details -----------------------------------------------------------------------


def test_header_formats_deltas_and_extended_timestamps() -> None:
    c = connected()
    c.receive(media(9, avc(0, AVCC), 0))
    big = nal(b"\x65" + bytes(300))  # three chunks at 128
    base = 0xFFFFFF + 10  # extended from the start, also on format 3 continuations
    data = media(9, avc(1, big), base)
    # format 1: delta 40 with a new length; format 2: delta 40 again, same length;
    # format 3 starting a message: the previous delta once more.
    small = avc(1, nal(b"\x41x"), key=False)
    data += chunk(6, small, fmt=1, ts=40, type_id=9)
    data += chunk(6, small, fmt=2, ts=40)
    data += chunk(6, small, fmt=3)
    data += chunk(6, small, fmt=2, ts=0xFFFFFF + 1)  # an extended delta
    data += chunk(6, small, fmt=3, ts=0xFFFFFF + 1)  # repeated: the extended field again
    events = c.receive(data)
    dts = [f[1] for f in frames(events)]
    step = 0xFFFFFF + 1
    assert dts == [0, 40, 80, 120, 120 + step, 120 + 2 * step]
    assert frames(events)[0][4] == big


def test_timestamps_wrap_past_32_bits() -> None:
    c = connected()
    c.receive(media(9, avc(0, AVCC), 0))
    near = 2**32 - 50
    events = c.receive(
        media(9, avc(1, nal(b"\x65")), near)
        + media(9, avc(1, nal(b"\x41"), key=False), near + 40)
        + media(9, avc(1, nal(b"\x41"), key=False), 30)
        + media(9, avc(1, nal(b"\x41"), key=False), 70)
    )
    assert [f[1] for f in frames(events)] == [0, 40, 80, 120]


def test_set_chunk_size_and_abort() -> None:
    c = connected()
    c.receive(chunk(2, (4096).to_bytes(4, "big"), type_id=1))
    c.receive(media(9, avc(0, AVCC), 0, size=4096))
    # An aborted message is dropped; the next one on that chunk stream starts afresh.
    partial = media(9, avc(1, nal(bytes(5000))), 10, size=4096)[: 12 + 4096]  # first chunk
    c.receive(partial)
    c.receive(chunk(2, (6).to_bytes(4, "big"), type_id=2))
    events = c.receive(media(9, avc(1, nal(b"\x65z")), 20, size=4096))
    assert frames(events) == [(0, 0, 0, True, nal(b"\x65z"))]


def test_limits() -> None:
    c = connected(max_message=1000)
    (event,) = c.receive(media(9, bytes(2000), 0))
    assert isinstance(event, Failed)
    assert event.kind == "limit"
    c = connected(max_chunk_streams=4)
    data = b"".join(chunk(10 + i, encode_amf0("x"), type_id=18) for i in range(8))
    events = c.receive(data)
    assert [e.kind for e in events if isinstance(e, Failed)] == ["limit"]
    c = connected()
    deep = b"\x0a\x00\x00\x00\x01" * 40 + b"\x05"
    (event,) = c.receive(chunk(4, encode_amf0("@setDataFrame") + deep, type_id=18))
    assert isinstance(event, Failed)
    assert event.kind == "limit"


def test_garbage_is_a_violation_not_an_exception() -> None:
    c = RtmpConnection()
    c.receive(handshake())
    (event,) = c.receive(bytes((0x43,)) + b"\xff" * 200)  # format 1 on a fresh chunk stream
    assert isinstance(event, Failed)
    assert event.kind == "protocol"
    c = RtmpConnection()
    c.receive(handshake())
    (event,) = c.receive(command("connect", 1.0, {"app": "live"})[:-2] + b"\x09\x09")
    assert isinstance(event, Failed)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_never_raise(data: bytes) -> None:
    c = connected()
    for e in c.receive(data):
        assert isinstance(e, rtmp.Event)


# -- AMF0 ---------------------------------------------------------------------------------------


def test_amf0_round_trip_and_types() -> None:
    values = [1.5, True, "héllo", {"a": 1.0, "b": [None, "x"]}, None, "L" * 70000]
    assert decode_amf0(encode_amf0(*values)) == values
    ecma = b"\x08\x00\x00\x00\x01\x00\x01k\x02\x00\x01v\x00\x00\x09"
    undefined_date = b"\x06\x0b" + struct.pack(">d", 5.0) + b"\x00\x00"
    assert decode_amf0(ecma + undefined_date) == [{"k": "v"}, None, 5.0]
    for bad in (b"\x02\x00\x05ab", b"\x11", b"\x0a\xff\xff\xff\xff\x05", b"\x03\x00\x01k"):
        with pytest.raises(Exception, match=r"AMF0"):
            decode_amf0(bad)


# -- chunk boundaries ---------------------------------------------------------------------------


def session() -> tuple[bytes, bytes]:
    """A whole publishing session as a client sends it (many chunks, all header formats): up to
    and including publish, then the rest (sent once the publish is accepted)."""
    head = handshake()
    head += command("connect", 1.0, {"app": "live"})
    head += chunk(2, (300).to_bytes(4, "big"), type_id=1)
    head += command("createStream", 2.0, None, size=300)
    head += command("publish", 3.0, None, "k", "live", msid=1, size=300)
    tail = media(9, avc(0, AVCC), 0, size=300)
    tail += media(8, aac(0, ASC), 0, csid=4, size=300)
    for i in range(20):
        tail += media(9, avc(1, nal(bytes([i]) * (50 + 40 * i)), key=i % 5 == 0), 33 * i, size=300)
        tail += chunk(4, aac(1, bytes([i]) * 30), fmt=2 if i else 0, ts=21, type_id=8, msid=1)
    tail += command("deleteStream", 4.0, None, 1.0, size=300)
    return head, tail


def run(cuts: list[int]) -> list[rtmp.Event]:
    """The session's events, fed in pieces cut at ``cuts`` (and after publish, to accept it)."""
    head, tail = session()
    data = head + tail
    c = RtmpConnection()
    events: list[rtmp.Event] = []
    last = 0
    for cut in [*sorted({*cuts, len(head)}), len(data)]:
        events += c.receive(data[last:cut])
        if events and isinstance(events[-1], PublishRequested):
            c.accept()
        last = cut
    return events


def test_session_events() -> None:
    events = run([])
    assert events[:2] == [rtmp.Connected("live"), PublishRequested("k", "live")]
    assert isinstance(events[2], TracksReady)
    assert len(frames(events)) == 40
    assert [f[1] for f in frames(events)][:4] == [0, 21, 33, 42]
    assert events[-1] == Unpublished()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=sum(map(len, session()))), max_size=40))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    assert run(cuts) == run([])
