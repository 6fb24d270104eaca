"""The receiving side of :mod:`peerd.core.signed`: what the coordinator checks of a node's signed
body (the fake coordinator's verifier; the real one is the Cloudflare Worker, not in this repo).

Pure: no I/O; ``now`` comes from the caller.
"""

from __future__ import annotations

import base64
import json
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peerd.core.signed import PEER_HEADER, SIGNATURE_HEADER
from peerd.errors import Unauthorized

Verify = Callable[[bytes, bytes, bytes], bool]
"""``(public key, signature, message) -> valid`` (``peerd.identity.verify_signature``)."""
NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_WINDOW_S = 60.0

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
# identity multihash (0x00, len 36) + protobuf PublicKey{Type=Ed25519(1), Data=32 bytes}
_ED25519_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


class SignatureError(Unauthorized):
    """A signed body that must be refused; the message says why."""


def b64url_decode(text: str) -> bytes:
    """Inverse of :func:`b64url`; raises :class:`SignatureError` on bad input."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise SignatureError("signature is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise SignatureError("signature is not base64url") from exc


def b58decode(text: str) -> bytes:
    """Bitcoin-alphabet base58 decoding; raises :class:`SignatureError` on a bad character."""
    n = 0
    for ch in text:
        try:
            n = n * 58 + _B58_INDEX[ch]
        except KeyError:
            raise SignatureError(f"peer id has a non-base58 character {ch!r}") from None
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\0" * pad + raw


def public_key_of(peer_id: str) -> bytes:
    """The raw ed25519 public key embedded in a ``12D3KooW...`` peer id."""
    if not 40 <= len(peer_id) <= 60:
        raise SignatureError("peer id has the wrong length for an ed25519 key")
    raw = b58decode(peer_id)
    if len(raw) != len(_ED25519_PREFIX) + 32 or not raw.startswith(_ED25519_PREFIX):
        raise SignatureError("peer id does not embed an ed25519 public key")
    return raw[len(_ED25519_PREFIX) :]


@dataclass(frozen=True)
class SignedBody:
    """A verified body: who sent it and what it says."""

    peer_id: str
    timestamp: float
    nonce: str
    payload: dict[str, Any]


def check_signature(
    body: bytes, peer_header: str | None, signature_header: str | None, verify: Verify
) -> None:
    """Raise :class:`SignatureError` unless ``body`` is signed by the key of ``peer_header``."""
    if not peer_header or not signature_header:
        raise SignatureError(f"missing {PEER_HEADER} or {SIGNATURE_HEADER} header")
    key = public_key_of(peer_header)
    sig = b64url_decode(signature_header)
    if len(sig) != 64 or not verify(key, sig, body):
        raise SignatureError("signature does not verify with the key of the peer id")


def verify_body(
    body: bytes, peer_header: str | None, signature_header: str | None, verify: Verify
) -> SignedBody:
    """Check the signature and shape of a received body (not its freshness: see ReplayWindow)."""
    check_signature(body, peer_header, signature_header, verify)
    assert peer_header is not None
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError("signed body is not JSON") from exc
    if not isinstance(payload, dict):
        raise SignatureError("signed body is not a JSON object")
    if payload.get("peer_id") != peer_header:
        raise SignatureError("body peer_id differs from the peer id header")
    ts = payload.get("timestamp")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise SignatureError("body has no numeric timestamp")
    nonce = payload.get("nonce")
    if not isinstance(nonce, str) or not NONCE_RE.match(nonce):
        raise SignatureError("body nonce must be 32 lowercase hex characters")
    return SignedBody(peer_header, float(ts), nonce, payload)


@dataclass(frozen=True)
class Verdict:
    """Whether a body is fresh; ``reason`` says why not."""

    ok: bool
    reason: str = ""


@dataclass
class ReplayWindow:
    """Refuses stale, future and repeated bodies, per peer. Memory: nonces inside the window."""

    window_s: float = DEFAULT_WINDOW_S
    _seen: dict[str, set[str]] = field(default_factory=dict)
    _order: deque[tuple[float, str, str]] = field(default_factory=deque)

    def check(self, peer_id: str, timestamp: float, nonce: str, now: float) -> Verdict:
        """Accept (and remember) a body, or say why it is refused."""
        self._expire(now)
        if timestamp < now - self.window_s:
            return Verdict(False, f"timestamp is more than {self.window_s:g} s old")
        if timestamp > now + self.window_s:
            return Verdict(False, f"timestamp is more than {self.window_s:g} s in the future")
        seen = self._seen.setdefault(peer_id, set())
        if nonce in seen:
            return Verdict(False, "nonce already used (replay)")
        seen.add(nonce)
        # Forget a nonce once its body could no longer pass the timestamp test.
        self._order.append((max(timestamp, now) + self.window_s, peer_id, nonce))
        return Verdict(True)

    def _expire(self, now: float) -> None:
        while self._order and self._order[0][0] < now:
            _, peer, nonce = self._order.popleft()
            peer_seen = self._seen.get(peer)
            if peer_seen is not None:
                peer_seen.discard(nonce)
                if not peer_seen:
                    del self._seen[peer]

    def __len__(self) -> int:
        return len(self._order)
