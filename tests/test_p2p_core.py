"""Pure core of peer-to-peer delivery: peer ordering and bans, request signing, provide
schedule, blob protocol framing. Plain synchronous tests, clock passed in."""

from __future__ import annotations

import pytest

from peerd.core import blobwire
from peerd.core.blobwire import Status
from peerd.core.peers import BanPolicy, PeerTable
from peerd.core.provide import ProvideSchedule
from peerd.core.signing import check, sign_headers
from peerd.identity import Identity, peer_id_of, verify_signature


def test_order_by_rtt_then_failures() -> None:
    t = PeerTable(ttl_s=60)
    for pid in ("a", "b", "c"):
        t.seen(pid, 0.0, url=f"http://{pid}")
    t.rtt("a", 30.0)
    t.rtt("b", 5.0)
    # c never measured: after measured peers
    assert [p.peer_id for p in t.order(1.0)] == ["b", "a", "c"]
    t.report("b", False, "ClientError", 1.0)
    assert [p.peer_id for p in t.order(1.0)] == ["a", "c", "b"]
    t.report("b", True, "", 2.0)
    assert [p.peer_id for p in t.order(2.0)][0] == "b"


def test_rtt_is_a_moving_average() -> None:
    t = PeerTable()
    t.seen("a", 0.0)
    t.rtt("a", 10.0)
    t.rtt("a", 20.0)
    p = t.get("a")
    assert p is not None
    assert p.rtt_ms == pytest.approx(13.0)


def test_integrity_failure_bans_at_once() -> None:
    t = PeerTable(ttl_s=1000, policy=BanPolicy(max_failures=3, ban_integrity_s=100))
    t.seen("liar", 0.0)
    ban = t.report("liar", False, "integrity", 10.0)
    assert ban is not None
    assert ban.until == 110.0
    assert t.order(50.0) == []
    assert not t.known("liar", 50.0)
    assert [p.peer_id for p in t.order(111.0)] == ["liar"]


def test_repeated_failures_ban_then_reset() -> None:
    t = PeerTable(ttl_s=1000, policy=BanPolicy(max_failures=2, ban_failure_s=30))
    t.seen("flaky", 0.0)
    assert t.report("flaky", False, "timeout", 1.0) is None
    ban = t.report("flaky", False, "timeout", 2.0)
    assert ban is not None
    assert ban.until == 32.0
    assert t.order(10.0) == []
    p = t.get("flaky")
    assert p is not None
    assert p.failures == 0


def test_expiry_and_goodbye_keep_bans() -> None:
    t = PeerTable(ttl_s=10)
    t.seen("a", 0.0)
    t.seen("b", 0.0)
    t.report("b", False, "integrity", 1.0)
    assert t.expire(20.0) == ["a"]
    t.gone("b")
    assert t.get("b") is not None  # banned peers are remembered
    _, changed = t.seen("c", 0.0, url="http://1")
    assert changed
    t.rtt("c", 5.0)
    _, changed = t.seen("c", 1.0, url="http://2")
    assert changed
    p = t.get("c")
    assert p is not None
    assert p.rtt_ms is None


def test_gone_while_banned_is_not_live_when_the_ban_ends() -> None:
    """The LAN table has no timer (mDNS decides liveness): a banned peer that leaves keeps its
    ban but does not come back as live when the ban ends; it does once it is seen again."""
    t = PeerTable(ttl_s=float("inf"), policy=BanPolicy(ban_integrity_s=100))
    t.seen("b", 0.0)
    t.report("b", False, "integrity", 1.0)
    t.gone("b")
    assert t.get("b") is not None
    assert t.order(200.0) == []
    assert t.expire(200.0) == ["b"]
    t.seen("b", 300.0)
    assert [p.peer_id for p in t.order(1e9)] == ["b"]


def test_signed_request_round_trip() -> None:
    ident = Identity.generate()
    h = sign_headers(
        "GET", "/p2p/v1/blobs/x", 1000.0, ident.peer_id, ident.public_bytes, ident.sign
    )

    def verdict(headers: dict[str, str], now: float = 1010.0, path: str = "/p2p/v1/blobs/x"):  # type: ignore[no-untyped-def]
        return check(
            "GET",
            path,
            headers,
            now,
            skew_s=60,
            peer_id_of=peer_id_of,
            verify=verify_signature,
            known=lambda p: p == ident.peer_id,
        )

    assert verdict(h).peer_id == ident.peer_id
    assert verdict({}).reason == "unsigned request"
    assert verdict(h, now=2000.0).reason == "stale or future timestamp"
    assert verdict(h, path="/p2p/v1/blobs/y").reason == "bad signature"
    other = Identity.generate()
    forged = dict(h, **{"X-Peerd-Peer": other.peer_id})
    assert verdict(forged).reason == "key does not match peer id"
    h2 = sign_headers(
        "GET", "/p2p/v1/blobs/x", 1000.0, other.peer_id, other.public_bytes, other.sign
    )
    assert verdict(h2).reason == "unknown peer"
    assert verdict(dict(h, **{"X-Peerd-Sig": "!!"})).reason == "malformed signature headers"


def test_provide_schedule_batches_and_lag() -> None:
    s = ProvideSchedule(interval_s=100, batch=2)
    s.sync(["a", "b", "c"])
    first = s.due(0.0)
    assert len(first) == 2
    s.done(first, 0.0)
    rest = s.due(1.0)
    assert len(rest) == 1
    assert rest[0] not in first
    assert s.lag(5.0, started=0.0) == 5.0  # one id never announced since start
    s.done(rest, 5.0)
    assert s.due(50.0) == []
    assert s.lag(50.0, started=0.0) == 0.0
    assert sorted(s.due(101.0)) == sorted(first)
    assert s.lag(130.0, started=0.0) == 30.0
    s.sync(["c"])  # no longer held: forgotten
    assert len(s) == 1


def test_provide_schedule_backs_off_after_failed_announcements() -> None:
    """A failed announcement is not retried at once (a node with no DHT peers used to spin)."""
    s = ProvideSchedule(interval_s=100, batch=10, retry_s=60)
    s.sync(["a", "b"])
    due = s.due(0.0)
    s.done(["a"], 0.0)
    s.failed(set(due) - {"a"}, 0.0)
    assert s.due(1.0) == []  # "b" waits for its retry time
    assert s.lag(30.0, started=0.0) == 30.0  # and still counts as late
    assert s.due(60.0) == ["b"]
    s.done(["b"], 61.0)
    assert s.due(99.0) == []
    assert s.due(101.0 + 60) == ["a", "b"]


def test_blobwire_framing() -> None:
    req = blobwire.encode_request("bafkreiabc")
    assert blobwire.decode_request(req) == "bafkreiabc"
    assert blobwire.decode_request(b"../etc\n") is None
    assert blobwire.decode_request(b"x" * 200 + b"\n") is None
    assert blobwire.decode_request(b"noline") is None
    a = blobwire.decode_answer(blobwire.encode_answer(Status.OK, 12345))
    assert (a.status, a.size) == (Status.OK, 12345)
    assert blobwire.decode_answer(blobwire.encode_answer(Status.BUSY, 99)).size == 0
    with pytest.raises(ValueError, match="short"):
        blobwire.decode_answer(b"\0")
    with pytest.raises(ValueError):
        blobwire.decode_answer(bytes([9]) + bytes(8))
