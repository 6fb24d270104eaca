"""Node identity: created once, 0600, stable, and the same peer id libp2p derives."""

import stat
from pathlib import Path

import pytest

from peerd.errors import ConfigError
from peerd.identity import load_or_create, verify_signature


def test_created_once_and_stable(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    a, created = load_or_create(key)
    assert created
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    b, created_again = load_or_create(key)
    assert not created_again
    assert a.peer_id == b.peer_id
    assert a.peer_id.startswith("12D3KooW")


def test_signatures(tmp_path: Path) -> None:
    ident, _ = load_or_create(tmp_path / "k")
    sig = ident.sign(b"msg")
    assert verify_signature(ident.public_bytes, sig, b"msg")
    assert not verify_signature(ident.public_bytes, sig, b"other")


def test_peer_id_matches_libp2p(tmp_path: Path) -> None:
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID

    ident, _ = load_or_create(tmp_path / "k")
    key = Ed25519PrivateKey.from_bytes(ident.private_bytes)
    assert ID.from_pubkey(key.get_public_key()).to_base58() == ident.peer_id


def test_garbage_key_is_a_clear_error(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("not a key")
    with pytest.raises(ConfigError, match="not a valid PEM"):
        load_or_create(key)
