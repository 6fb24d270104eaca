"""The node's identity: one ed25519 key, created once and kept 0600 in the state directory.

The libp2p peer id is derived here without importing libp2p (which costs ~1.3 s): it is the
identity multihash of the protobuf-encoded public key (``KeyType.Ed25519 = 1``), in base58btc,
which gives the familiar ``12D3KooW...`` form.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from peerd.errors import ConfigError

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def b58encode(data: bytes) -> str:
    """Bitcoin-alphabet base58 (multibase base58btc without the ``z`` prefix)."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def peer_id_of(public_key: bytes) -> str:
    """libp2p peer id for a raw 32-byte ed25519 public key."""
    proto = bytes([0x08, 0x01, 0x12, len(public_key)]) + public_key
    return b58encode(bytes([0x00, len(proto)]) + proto)


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Check an ed25519 signature by a raw public key."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """The node key and what derives from it."""

    private_key: Ed25519PrivateKey

    @property
    def public_bytes(self) -> bytes:
        """Raw 32-byte public key."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def private_bytes(self) -> bytes:
        """Raw 32-byte private seed (for building the libp2p key pair)."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def peer_id(self) -> str:
        """libp2p peer id (``12D3KooW...``)."""
        return peer_id_of(self.public_bytes)

    def sign(self, message: bytes) -> bytes:
        """ed25519 signature of ``message``."""
        return self.private_key.sign(message)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (tests, ``peerd init``)."""
        return cls(Ed25519PrivateKey.generate())


def load_or_create(path: Path) -> tuple[Identity, bool]:
    """Load the node key from ``path``, creating it (0600, atomically) if absent.

    Returns the identity and whether it was created now.
    """
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        pass
    else:
        return load_pem(pem, path), False
    path.parent.mkdir(parents=True, exist_ok=True)
    ident = Identity.generate()
    pem = ident.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created the key meanwhile
    except FileExistsError:
        tmp.unlink()
        return load_pem(path.read_bytes(), path), False
    tmp.unlink()
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return ident, True


def load_pem(pem: bytes, path: Path) -> Identity:
    """Parse a PEM ed25519 private key, with a clear error on anything else."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError as exc:
        raise ConfigError(f"node key {path} is not a valid PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"node key {path} is not an ed25519 key")
    return Identity(key)
