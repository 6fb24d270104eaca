"""The viewer swarm tracker's bookkeeping (peerd.core.swarm), driven with no socket and no clock:
announces, offers relayed to other peers, answers only back to their offerer, scrape counts,
the limits, idle expiry, and P2P Media Loader's info_hash."""

from __future__ import annotations

import json
import random
from typing import Any

from peerd.core import swarm
from peerd.core.swarm import Close, Failure, Limits, Reject, Send, Tracker

MEDIA = "b" + "a" * 58
OTHER = "b" + "c" * 58
IH = "i" * 19 + "\xe9"  # a binary string: code points up to 255
FAR = 10**12


def pid(n: int) -> str:
    return f"peer{n:016d}"


def announce(ih: str, peer: str, **extra: Any) -> str:
    return json.dumps({"action": "announce", "info_hash": ih, "peer_id": peer, **extra})


def offers(n: int, tag: str = "") -> list[dict[str, Any]]:
    return [
        {"offer": {"type": "offer", "sdp": f"sdp{tag}{i}"}, "offer_id": f"o{tag}{i}".ljust(20, "-")}
        for i in range(n)
    ]


def sends(actions: list[swarm.Action]) -> list[tuple[int, dict[str, Any]]]:
    return [(a.conn, json.loads(a.text)) for a in actions if isinstance(a, Send)]


def tracker(**limits: Any) -> Tracker:
    return Tracker(Limits(**limits), random.Random(1))


def test_offers_reach_other_peers_and_answers_return_to_the_offerer_only() -> None:
    t = tracker()
    for c in (1, 2, 3):
        t.open(c, MEDIA, FAR, 0)
    assert sends(t.receive(1, announce(IH, pid(1), event="started", offers=offers(2)), 0)) == [
        (1, {"action": "announce", "info_hash": IH, "interval": 60, "complete": 0, "incomplete": 1})
    ]
    t.receive(2, announce(IH, pid(2), event="started"), 0)
    out = sends(t.receive(3, announce(IH, pid(3), event="started", offers=offers(5, "x")), 1))
    assert out[0] == (
        3,
        {"action": "announce", "info_hash": IH, "interval": 60, "complete": 0, "incomplete": 3},
    )
    relayed = out[1:]
    # two other peers, five offers: one each, never to the sender
    assert sorted(c for c, _ in relayed) == [1, 2]
    for _, m in relayed:
        assert set(m) == {"action", "info_hash", "peer_id", "offer_id", "offer"}
        assert m["peer_id"] == pid(3)
    to1 = next(m for c, m in relayed if c == 1)
    answer = {"type": "answer", "sdp": "ans"}
    back = t.receive(
        1, announce(IH, pid(1), to_peer_id=pid(3), offer_id=to1["offer_id"], answer=answer), 2
    )
    assert [(a.conn, a.relayed) for a in back if isinstance(a, Send)] == [(3, "answer")]
    assert sends(back)[0][1] == {
        "action": "announce",
        "info_hash": IH,
        "peer_id": pid(1),
        "offer_id": to1["offer_id"],
        "answer": answer,
    }
    # the same answer again, or one for an offer never handed to this peer: not relayed
    again = t.receive(
        1, announce(IH, pid(1), to_peer_id=pid(3), offer_id=to1["offer_id"], answer=answer), 2
    )
    assert again == [Failure(Reject.UNKNOWN_ANSWER)]
    forged = t.receive(
        2, announce(IH, pid(2), to_peer_id=pid(1), offer_id="o" * 20, answer=answer), 2
    )
    assert forged == [Failure(Reject.UNKNOWN_ANSWER)]


def test_swarms_are_per_media_and_scrape_counts_completed_peers() -> None:
    t = tracker()
    t.open(1, MEDIA, FAR, 0)
    t.open(2, OTHER, FAR, 0)
    t.open(3, MEDIA, FAR, 0)
    t.receive(1, announce(IH, pid(1), event="started", left=0), 0)
    # the same info_hash under another media's token is another swarm: no offer crosses
    assert sends(t.receive(2, announce(IH, pid(2), event="started", offers=offers(3)), 0)) == [
        (2, {"action": "announce", "info_hash": IH, "interval": 60, "complete": 0, "incomplete": 1})
    ]
    t.receive(3, announce(IH, pid(3), event="started"), 0)
    scrape = sends(t.receive(3, json.dumps({"action": "scrape", "info_hash": [IH, "z" * 20]}), 0))
    assert scrape == [
        (
            3,
            {
                "action": "scrape",
                "files": {
                    IH: {"complete": 1, "incomplete": 1, "downloaded": 1},
                    "z" * 20: {"complete": 0, "incomplete": 0, "downloaded": 0},
                },
                "flags": {"min_request_interval": 60},
            },
        )
    ]
    assert (len(t.swarms), t.peers) == (2, 3)
    t.receive(1, announce(IH, pid(1), event="stopped"), 1)
    t.close(3)
    assert (len(t.swarms), t.peers) == (1, 1)


def test_full_swarm_too_many_swarms_and_a_taken_peer_id_fail_without_closing() -> None:
    t = tracker(max_peers_per_swarm=2, max_swarms_per_connection=2)
    for c in (1, 2, 3):
        t.open(c, MEDIA, FAR, 0)
    t.receive(1, announce(IH, pid(1)), 0)
    out = t.receive(2, announce(IH, pid(1)), 0)
    assert out[0] == Failure(Reject.PEER_ID_TAKEN)
    assert sends(out)[0][1]["failure reason"] == "peer_id in use"
    t.receive(2, announce(IH, pid(2)), 0)
    assert t.receive(3, announce(IH, pid(3)), 0)[0] == Failure(Reject.SWARM_FULL)
    t.receive(1, announce("j" * 20, pid(1)), 0)
    assert t.receive(1, announce("k" * 20, pid(1)), 0)[0] == Failure(Reject.TOO_MANY_SWARMS)
    assert set(t.conns) == {1, 2, 3}


def close_of(actions: list[swarm.Action]) -> tuple[int, Reject]:
    assert len(actions) == 1
    a = actions[0]
    assert isinstance(a, Close)
    return a.code, a.why


def test_rule_breaking_frames_close_the_connection_with_a_reason() -> None:
    bad = [
        b"binary",
        "not json",
        "[1]",
        '{"action": "connect"}',
        announce("short", pid(1)),
        announce(IH, "\u0100" * 20),  # not a binary string
        announce(IH, pid(1), event="bogus"),
        announce(IH, pid(1), offers=offers(11)),
        announce(
            IH, pid(1), offers=[{"offer": {"type": "answer", "sdp": "x"}, "offer_id": "o" * 20}]
        ),
        announce(IH, pid(1), offers=[{"offer": "v=0", "offer_id": "o" * 20}]),
        announce(IH, pid(1), answer={"type": "answer", "sdp": "x"}),  # no to_peer_id
        "[" * 50_000,
    ]
    for i, frame in enumerate(bad):
        t = tracker()
        t.open(i, MEDIA, FAR, 0)
        assert close_of(t.receive(i, frame, 0)) == (swarm.POLICY, Reject.MALFORMED), frame
        assert i not in t.conns
    t = tracker(max_message_bytes=1024)
    t.open(1, MEDIA, FAR, 0)
    assert close_of(t.receive(1, announce(IH, pid(1), pad="x" * 1024), 0)) == (
        swarm.TOO_BIG,
        Reject.OVERSIZED,
    )


def test_rate_limit_token_expiry_and_idle_expiry() -> None:
    t = tracker(messages_per_s=2.0, idle_s=30.0)
    t.open(1, MEDIA, FAR, 0)
    n = int(swarm.burst(t.limits))
    for _ in range(n):
        assert not any(isinstance(a, Close) for a in t.receive(1, announce(IH, pid(1)), 0))
    assert close_of(t.receive(1, announce(IH, pid(1)), 0)) == (swarm.POLICY, Reject.RATE)
    # refilled at messages_per_s
    t.open(2, MEDIA, FAR, 0)
    for k in range(3 * n):
        assert not any(isinstance(a, Close) for a in t.receive(2, announce(IH, pid(2)), k * 0.5))
    t.open(3, MEDIA, 100, 0)
    t.receive(3, announce("e" * 20, pid(3)), 99)
    assert close_of(t.receive(3, announce("e" * 20, pid(3)), 100)) == (swarm.POLICY, Reject.EXPIRED)
    # idle: a silent connection is closed; a membership not announced again is dropped
    t = tracker(idle_s=30.0)
    t.open(1, MEDIA, FAR, 0)
    t.open(2, MEDIA, FAR, 0)
    t.receive(1, announce(IH, pid(1)), 0)
    t.receive(1, announce("j" * 20, pid(1)), 0)
    t.receive(2, announce(IH, pid(2)), 0)
    t.receive(1, announce("j" * 20, pid(1)), 20)
    closes = t.expire(31)
    assert [(c.conn, c.why) for c in closes] == [(2, Reject.IDLE)]
    assert t.receive(2, announce(IH, pid(2)), 31) == []  # read before the edge closed it
    assert list(t.conns[1].joined) == ["j" * 20]
    assert (len(t.swarms), t.peers) == (1, 1)


def test_pml_info_hash_matches_p2p_media_loader() -> None:
    # Node: crypto.createHash("sha1").update("v2-bafy-main-abc=").digest().subarray(0, 15)
    #       .toString("base64"), which is P2P Media Loader 2.3's getStreamHash(getStreamSwarmId())
    assert swarm.pml_info_hash("bafy", "main", "abc=") == "h6WhEu2R02R9n6Hz0uHE"
    assert len(swarm.pml_info_hash(MEDIA, "secondary", "x")) == swarm.ID_CHARS
