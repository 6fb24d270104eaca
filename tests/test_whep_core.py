"""Pure WHEP policy: ICE server lists, Link headers, credential life, codec choice."""

import pytest

from peerd.core.whep import (
    IceServer,
    OfferedCodec,
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


def test_passthrough_names_the_closest_profile() -> None:
    plan = choose_video(CHROMIUM, "4d401e", reorders=False, transcode_allowed=True)
    assert (plan.mode, plan.profile_level_id) == ("passthrough", "4d001f")
    plan = choose_video(CHROMIUM, "42c01e", reorders=False, transcode_allowed=True)
    assert (plan.mode, plan.profile_level_id) == ("passthrough", "42001f")
    # High is not offered (and f4 is never used): the highest offered profile is named.
    plan = choose_video(CHROMIUM, "64001f", reorders=False, transcode_allowed=True)
    assert (plan.mode, plan.profile_level_id) == ("passthrough", "4d001f")
    offered = [*CHROMIUM, h264("64001f")]
    plan = choose_video(offered, "64001f", reorders=False, transcode_allowed=True)
    assert plan.profile_level_id == "64001f"


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
