"""peerd.core.validators: RFC 9110 conditions and byte ranges of immutable blobs."""

from __future__ import annotations

import pytest

from peerd.core.validators import Part, blob_etag, precondition, select_range

TAG = blob_etag("bafkreiexample")
SIZE = 1000


@pytest.mark.parametrize(
    ("range_", "if_range", "part"),
    [
        (None, None, Part(200, 0, SIZE)),
        ("bytes=0-9", None, Part(206, 0, 10)),
        ("bytes=990-", None, Part(206, 990, 10)),
        ("bytes=990-5000", None, Part(206, 990, 10)),
        ("bytes=-10", None, Part(206, 990, 10)),
        ("bytes=-5000", None, Part(206, 0, SIZE)),
        ("bytes=-0", None, Part(416, 0, 0)),
        ("bytes=1000-", None, Part(416, 0, 0)),
        ("bytes=9-5", None, Part(200, 0, SIZE)),  # invalid: ignored
        ("bytes=0-1,5-6", None, Part(200, 0, SIZE)),  # several: the whole body
        ("items=0-9", None, Part(200, 0, SIZE)),
        ("bytes=-", None, Part(200, 0, SIZE)),
        ("bytes=0-9", TAG, Part(206, 0, 10)),
        ("bytes=0-9", '"other"', Part(200, 0, SIZE)),
        ("bytes=0-9", f"W/{TAG}", Part(200, 0, SIZE)),
        ("bytes=0-9", "Tue, 01 Jan 2030 00:00:00 GMT", Part(200, 0, SIZE)),
        ("bytes=-0", '"other"', Part(200, 0, SIZE)),
    ],
)
def test_select_range(range_: str | None, if_range: str | None, part: Part) -> None:
    assert select_range(SIZE, TAG, range_, if_range) == part


def test_content_range() -> None:
    assert Part(206, 990, 10).content_range(SIZE) == "bytes 990-999/1000"
    assert Part(416, 0, 0).content_range(SIZE) == "bytes */1000"
    assert Part(200, 0, SIZE).content_range(SIZE) is None
    assert select_range(0, TAG, "bytes=0-", None).status == 416


@pytest.mark.parametrize(
    ("if_match", "if_none_match", "outcome"),
    [
        (None, None, None),
        (None, TAG, 304),
        (None, f"W/{TAG}", 304),
        (None, f'"a", {TAG}', 304),
        (None, "*", 304),
        (None, '"other"', None),
        (None, "garbage", None),
        (TAG, None, None),
        ("*", None, None),
        (f"W/{TAG}", None, 412),  # If-Match compares strongly
        ('"other"', TAG, 412),
    ],
)
def test_precondition(if_match: str | None, if_none_match: str | None, outcome: int | None) -> None:
    assert precondition(TAG, if_match, if_none_match) == outcome
