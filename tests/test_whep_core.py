"""Pure WHEP policy: ICE server lists, Link headers, credential life, codec choice."""

import pytest

from peerd.core.whep import (
    IceServer,
    OfferedCodec,
    answer_profile,
    choose_video,
    credentials_fresh,
    h264_profile_rank,
    link_headers,
    parse_ice_servers,
    stream_profile,
)
from peerd.errors import UpstreamError

CLOUDFLARE_SHAPE = [
    {"urls": ["stun:stun.cloudflare.com:3478", "stun:stun.cloudflare.com:53"]},
    {
        "urls": [
            "turn:turn.cloudflare.com:3478?transport=udp",
            "turns:turn.cloudflare.com:5349?transport=tcp",
        ],
        "username": "u1",
        "credential": "c1",
    },
]


def test_parse_keeps_cloudflare_list_as_given() -> None:
    servers = parse_ice_servers(CLOUDFLARE_SHAPE)
    assert [s.to_json() for s in servers] == CLOUDFLARE_SHAPE
    assert parse_ice_servers([{"urls": "stun:a.example:3478"}]) == (
        IceServer(urls=("stun:a.example:3478",)),
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"iceServers": []},
        [{"urls": []}],
        [{"urls": ["http://evil.example"]}],
        [{"urls": ["stun:a b"]}],
        [{"urls": ["turn:x"], "username": 'a"b', "credential": "c"}],
        [{"urls": ["turn:x"], "username": 5, "credential": "c"}],
        ["stun:x"],
    ],
)
def test_parse_rejects_malformed(bad: object) -> None:
    with pytest.raises(UpstreamError):
        parse_ice_servers(bad)


def test_link_headers_one_per_url_with_turn_credentials() -> None:
    values = link_headers(parse_ice_servers(CLOUDFLARE_SHAPE))
    assert values == [
        '<stun:stun.cloudflare.com:3478>; rel="ice-server"',
        '<stun:stun.cloudflare.com:53>; rel="ice-server"',
        '<turn:turn.cloudflare.com:3478?transport=udp>; rel="ice-server"; username="u1"; '
        'credential="c1"; credential-type="password"',
        '<turns:turn.cloudflare.com:5349?transport=tcp>; rel="ice-server"; username="u1"; '
        'credential="c1"; credential-type="password"',
    ]
    assert link_headers([]) == []


def test_credentials_fresh_keeps_a_margin() -> None:
    assert credentials_fresh(now=100.0, expires_at=1000.0, margin_s=300.0)
    assert not credentials_fresh(now=700.0, expires_at=1000.0, margin_s=300.0)
    assert not credentials_fresh(now=0.0, expires_at=0.0, margin_s=0.0)


def test_profiles() -> None:
    assert stream_profile("avc1.64001f,mp4a.40.2") == "64001f"
    assert stream_profile("mp4a.40.2,avc1.4D401E") == "4d401e"
    assert stream_profile("hvc1.1.6.L93.B0,mp4a.40.2") is None
    ranks = [h264_profile_rank(p) for p in ("42e01f", "42001f", "4d001f", "640c1f", "64001f")]
    assert ranks == sorted(ranks)
    assert h264_profile_rank("f4001f") is None
    assert h264_profile_rank("zz") is None


def h264(pli: str, mode: str = "1") -> OfferedCodec:
    return OfferedCodec("video/H264", {"packetization-mode": mode, "profile-level-id": pli})


VP8 = OfferedCodec("video/VP8", {})
CHROMIUM = [
    VP8,
    h264("42001f"),
    h264("42001f", "0"),
    h264("42e01f"),
    h264("4d001f"),
    h264("f4001f"),
]


def test_passthrough_names_the_profile_sent() -> None:
    # The answer names the stream's own profile-level-id (its SPS), under the lowest offered
    # profile that decodes it; the level may differ from the offered one.
    plan = choose_video(CHROMIUM, "4d401e", reorders=False, transcode_allowed=True)
    assert (plan.mode, plan.profile_level_id, plan.offered) == ("passthrough", "4d401e", "4d001f")
    plan = choose_video(CHROMIUM, "42c01e", reorders=False, transcode_allowed=True)
    assert (plan.mode, plan.profile_level_id) == ("passthrough", "42c01e")
    offered = [*CHROMIUM, h264("640c1f"), h264("64001f")]
    plan = choose_video(offered, "640028", reorders=False, transcode_allowed=True)
    assert (plan.mode, plan.profile_level_id, plan.offered) == ("passthrough", "640028", "64001f")
    plan = choose_video(offered, "640c15", reorders=False, transcode_allowed=True)
    assert (plan.profile_level_id, plan.offered) == ("640c15", "640c1f")
    # Main offered only under High: the High label, at the stream's level.
    plan = choose_video([h264("64001f")], "4d401e", reorders=False, transcode_allowed=True)
    assert (plan.mode, plan.profile_level_id) == ("passthrough", "64001e")
    assert answer_profile("64000d", "64001f") == "64000d"


def test_high_stream_to_a_viewer_without_high_is_transcoded() -> None:
    # Chromium without a hardware decoder offers no High (f4 is never used): naming Main for a
    # High stream would lie, so the node transcodes.
    plan = choose_video(CHROMIUM, "64001f", reorders=False, transcode_allowed=True)
    assert plan.mode == "transcode"
    assert "64001f" in plan.reason
    plan = choose_video(CHROMIUM, "64001f", reorders=False, transcode_allowed=False)
    assert plan.mode == "refuse"


def test_transcode_or_refuse() -> None:
    plan = choose_video(CHROMIUM, "64001f", reorders=True, transcode_allowed=True)
    assert plan.mode == "transcode"
    assert "B-frames" in plan.reason
    plan = choose_video(
        [VP8, h264("42e01f", "0")], "64001f", reorders=False, transcode_allowed=True
    )
    assert plan.mode == "transcode"
    plan = choose_video([VP8], None, reorders=False, transcode_allowed=True)
    assert plan.mode == "transcode"
    assert "not H.264" in plan.reason
    plan = choose_video([VP8], "64001f", reorders=False, transcode_allowed=False)
    assert plan.mode == "refuse"
    assert "disabled" in plan.reason
    av1 = OfferedCodec("video/AV1", {})
    plan = choose_video([av1], "64001f", reorders=False, transcode_allowed=True)
    assert plan.mode == "refuse"
