"""The claim rule of bucket uploads (pure): one generation per node, takeover after expiry."""

from __future__ import annotations

import pytest

from peerd.config import load_settings
from peerd.core import uploads as up
from peerd.errors import ConfigError


def _claim(gen: int, until: float, peer: str = "12D3KooWA") -> up.Claim:
    return up.Claim(gen, peer, "node-a", until, "etag1")


def test_keys_sort_by_generation_and_name_the_upload() -> None:
    assert up.claim_key("uploads/a b.mkv", 2) == "claims/uploads/a b.mkv/00000002"
    keys = [up.claim_key("uploads/x", g) for g in (9, 10, 1)] + ["claims/uploads/x/junk"]
    assert sorted(keys)[-2] == up.claim_key("uploads/x", 10)
    assert up.latest_gen(keys, "uploads/x") == 10
    # A longer name sharing the prefix is another upload's claim, not a generation.
    assert up.latest_gen(["claims/uploads/x.mkv/00000003"], "uploads/x") == 0
    assert up.failed_key("uploads/x") == "failed/uploads/x.json"
    assert up.archive_key("uploads/d/x.mkv", "uploads/", "archive/") == "archive/d/x.mkv"


def test_unclaimed_is_taken_live_is_left_expired_is_taken_over() -> None:
    assert up.decide(None, 0, 100.0) == up.Decision(True, 1, "unclaimed")
    live = up.decide(_claim(3, 130.0), 3, 100.0)
    assert not live.take
    assert "node-a" in live.reason
    over = up.decide(_claim(3, 99.0), 3, 100.0)
    assert (over.take, over.gen) == (True, 4)
    assert "expired" in over.reason
    # An unreadable body is void: the next generation may be written (If-None-Match decides).
    assert up.decide(None, 3, 100.0).gen == 4


def test_claim_and_marker_bodies_round_trip() -> None:
    c = _claim(5, 123.4567)
    assert up.decode_claim(5, up.encode_claim(c)) == up.Claim(
        5, c.peer_id, "node-a", 123.457, "etag1"
    )
    assert up.decode_claim(5, b"{not json") is None
    marker = up.failure_marker("etag1", 10, "not media", "12D3KooWA", "node-a", 1.0)
    assert up.is_failed(marker, "etag1") == "not media"
    # A re-upload (another ETag) is a new upload: the marker does not hold it back.
    assert up.is_failed(marker, "etag2") is None
    assert up.is_failed(None, "etag1") is None


def test_an_archive_inside_the_watched_prefix_is_refused() -> None:
    with pytest.raises(ConfigError, match="archive_prefix and uploads_prefix"):
        load_settings(None, r2={"archive_prefix": "uploads/done/"})
    assert load_settings(None, r2={"archive_prefix": "done/"}).r2.archive_prefix == "done/"
