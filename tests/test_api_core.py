"""Pure core of the coordinator contract: signed bodies (and the fake coordinator's check of
them), replay window, digest, cursor, jobs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerd.core.backoff import backoff_delay
from peerd.core.inventory import (
    EMPTY_DIGEST,
    RateMeter,
    digest_add,
    digest_of,
    digest_remove,
    page_of,
)
from peerd.core.jobs import Fail, Finish, Job, JobStateError, Progress, Start, transition
from peerd.core.signed import b64url, encode_body
from peerd.identity import Identity, verify_signature
from tests.support.signed import ReplayWindow, SignatureError, public_key_of, verify_body

NONCE = "0123456789abcdef0123456789abcdef"


def signed(ident: Identity, **extra: object) -> tuple[bytes, str, str]:
    payload = {"kind": "heartbeat", "peer_id": ident.peer_id, "timestamp": 1000.0, "nonce": NONCE}
    payload.update(extra)
    body = encode_body(payload)
    return body, ident.peer_id, b64url(ident.sign(body))


def test_public_key_is_recovered_from_peer_id() -> None:
    ident = Identity.generate()
    assert public_key_of(ident.peer_id) == ident.public_bytes


@pytest.mark.parametrize("bad", ["", "12D3KooW", "Qm" + "1" * 44, "12D3KooW" + "0" * 44])
def test_bad_peer_ids_are_refused(bad: str) -> None:
    with pytest.raises(SignatureError):
        public_key_of(bad)


def test_valid_body_verifies() -> None:
    ident = Identity.generate()
    body, peer, sig = signed(ident)
    got = verify_body(body, peer, sig, verify_signature)
    assert (got.peer_id, got.timestamp, got.nonce) == (peer, 1000.0, NONCE)


def test_tampered_body_is_refused() -> None:
    ident = Identity.generate()
    body, peer, sig = signed(ident)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_body(body.replace(b"1000.0", b"1001.0"), peer, sig, verify_signature)


def test_wrong_key_is_refused() -> None:
    ident, other = Identity.generate(), Identity.generate()
    body, _, _ = signed(ident)
    # Signed by another key but claiming ident's peer id.
    with pytest.raises(SignatureError, match="does not verify"):
        verify_body(body, ident.peer_id, b64url(other.sign(body)), verify_signature)


def test_header_and_body_peer_must_agree() -> None:
    ident, other = Identity.generate(), Identity.generate()
    body, _, _ = signed(ident)
    with pytest.raises(SignatureError, match="differs"):
        verify_body(body, other.peer_id, b64url(other.sign(body)), verify_signature)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"nonce": "xyz"}, "nonce"),
        ({"timestamp": "now"}, "timestamp"),
        ({"timestamp": True}, "timestamp"),
    ],
)
def test_malformed_bodies_are_refused(extra: dict[str, object], match: str) -> None:
    ident = Identity.generate()
    body, peer, sig = signed(ident, **extra)
    with pytest.raises(SignatureError, match=match):
        verify_body(body, peer, sig, verify_signature)


def test_missing_headers_are_refused() -> None:
    ident = Identity.generate()
    body, peer, sig = signed(ident)
    with pytest.raises(SignatureError, match="missing"):
        verify_body(body, None, sig, verify_signature)
    with pytest.raises(SignatureError, match="base64url"):
        verify_body(body, peer, "not base64!", verify_signature)


def test_replay_window() -> None:
    w = ReplayWindow(window_s=60)
    assert w.check("p", 1000, NONCE, now=1000).ok
    replay = w.check("p", 1000, NONCE, now=1001)
    assert not replay.ok
    assert "replay" in replay.reason
    assert w.check("q", 1000, NONCE, now=1001).ok  # nonces are per peer
    assert not w.check("p", 900, "a" * 32, now=1000).ok  # stale
    assert not w.check("p", 1100, "b" * 32, now=1000).ok  # future
    assert w.check("p", 1030, "c" * 32, now=1030).ok
    # After the window, the old nonce is forgotten and its body is refused as stale instead.
    stale = w.check("p", 1000, NONCE, now=1200)
    assert not stale.ok
    assert "old" in stale.reason
    assert len(w) == 0


def test_digest_is_order_independent_and_incremental() -> None:
    entries = [("blob", f"b{i}") for i in range(20)] + [("media", "m1")]
    d = digest_of(entries)
    assert d == digest_of(list(reversed(entries)))
    assert len(d) == 64
    assert digest_of([]) == EMPTY_DIGEST
    assert digest_remove(d, "media", "m1") == digest_of(entries[:-1])
    assert digest_add(digest_of(entries[:-1]), "media", "m1") == d
    assert digest_of([("blob", "x")]) != digest_of([("media", "x")])


@given(st.lists(st.tuples(st.sampled_from(["blob", "media"]), st.text(max_size=8)), max_size=30))
def test_digest_add_then_remove_round_trips(entries: list[tuple[str, str]]) -> None:
    d = EMPTY_DIGEST
    for kind, ident in entries:
        d = digest_add(d, kind, ident)
    assert d == digest_of(entries)
    for kind, ident in entries:
        d = digest_remove(d, kind, ident)
    assert d == EMPTY_DIGEST


def test_page_cursor() -> None:
    assert page_of(5, [], 10) == page_of(5, [], 10)
    assert page_of(5, [], 10).next_since == 5
    assert not page_of(5, [], 10).more
    p = page_of(0, [1, 2, 3], 2)
    assert (p.next_since, p.more) == (2, True)
    p = page_of(0, [1, 2], 2)
    assert (p.next_since, p.more) == (2, False)


def test_rate_meter() -> None:
    m = RateMeter(window_s=10)
    assert m.rate() == 0
    assert not m.measured
    m.add(0, 0)
    m.add(5, 500)
    assert m.measured
    assert m.rate() == 100
    m.add(20, 500)  # idle: the window slides, the rate falls
    assert m.rate() == 0
    m.add(21, 100)  # counter reset (restart): start over
    assert not m.measured


def test_job_state_machine() -> None:
    job = Job("j", "pin", "m", "queued", 0, 0)
    running = transition(job, Start(), 1)
    assert running.state == "running"
    advanced = transition(transition(running, Progress(0.5), 2), Progress(0.2), 3)
    assert advanced.progress == 0.5  # progress never goes back
    done = transition(advanced, Finish({"n": 1}), 4)
    assert (done.state, done.progress, done.result, done.final) == ("done", 1.0, {"n": 1}, True)
    with pytest.raises(JobStateError):
        transition(done, Fail("late"), 5)
    with pytest.raises(JobStateError):
        transition(job, Finish({}), 1)
    with pytest.raises(JobStateError):
        transition(running, Start(), 1)
    failed = transition(job, Fail("no"), 2)
    assert failed.state == "failed"
    assert failed.error == "no"


def test_backoff() -> None:
    assert backoff_delay(0, 1, 300, 0.5) == 0
    assert 0.5 <= backoff_delay(1, 1, 300, 0.0) <= 1
    assert backoff_delay(3, 1, 300, 0.999) <= 4
    assert backoff_delay(50, 1, 300, 0.999) <= 300
    assert backoff_delay(50, 1, 300, 0.0) == 150
