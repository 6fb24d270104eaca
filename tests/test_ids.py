"""Content ids: known vectors, round trips, rejection of malformed ids."""

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerd.core.ids import Hasher, cid_from_digest, cid_of, digest_of, is_cid, parse_cid, shard_of
from peerd.errors import BadRequest


def test_known_vector() -> None:
    # The CID of b"hello" as produced by IPFS/kubo (`ipfs add --raw-leaves --cid-version 1`).
    assert cid_of(b"hello") == "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"


@given(st.binary(max_size=512))
def test_round_trip(data: bytes) -> None:
    cid = cid_of(data)
    assert digest_of(cid) == hashlib.sha256(data).digest()
    assert parse_cid(cid) == cid
    assert shard_of(cid) == hashlib.sha256(data).hexdigest()[:2]


def test_hasher_matches_one_shot() -> None:
    h = Hasher()
    for part in (b"he", b"", b"llo"):
        h.update(part)
    assert h.cid() == cid_of(b"hello")
    assert h.size == 5


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "bafkrei",
        "Bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq",
        "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4ye1",
        "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",
        "bafybeibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq",
        "../../etc/passwd",
    ],
)
def test_rejects_malformed(bad: str) -> None:
    assert not is_cid(bad)
    with pytest.raises(BadRequest):
        parse_cid(bad)


def test_digest_length_checked() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        cid_from_digest(b"short")
