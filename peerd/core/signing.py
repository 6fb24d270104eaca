"""Node-to-node request signing for LAN transfers.

A node asking a LAN peer for a blob signs the request with its ed25519 node key. Headers::

    X-Peerd-Peer: <libp2p peer id of the sender>
    X-Peerd-Key:  <base64 raw 32-byte ed25519 public key>
    X-Peerd-Time: <unix seconds, integer>
    X-Peerd-Sig:  <base64 signature over the canonical string below>

Canonical string (UTF-8, ``\\n``-separated, no trailing newline)::

    peerd-lan-v1
    <METHOD>
    <path, without query>
    <time>
    <peer id>

The receiver rejects a request that is unsigned, whose key does not derive the peer id, whose
time is more than ``skew_s`` from its clock (replay window), whose signature fails, or whose
peer is not one it knows (seen on the LAN or configured). Pure: the clock and the verifier are
passed in.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass

PEER_HEADER = "X-Peerd-Peer"
KEY_HEADER = "X-Peerd-Key"
TIME_HEADER = "X-Peerd-Time"
SIG_HEADER = "X-Peerd-Sig"
DOMAIN = "peerd-lan-v1"


def canonical(method: str, path: str, timestamp: int, peer_id: str) -> bytes:
    """The bytes that are signed."""
    return "\n".join([DOMAIN, method.upper(), path, str(timestamp), peer_id]).encode("utf-8")


def sign_headers(
    method: str,
    path: str,
    now: float,
    peer_id: str,
    public_key: bytes,
    sign: Callable[[bytes], bytes],
) -> dict[str, str]:
    """Headers that authenticate one request."""
    ts = int(now)
    sig = sign(canonical(method, path, ts, peer_id))
    return {
        PEER_HEADER: peer_id,
        KEY_HEADER: base64.b64encode(public_key).decode("ascii"),
        TIME_HEADER: str(ts),
        SIG_HEADER: base64.b64encode(sig).decode("ascii"),
    }


@dataclass(frozen=True)
class Verdict:
    """Result of checking a request: ``peer_id`` when accepted, else ``reason``."""

    peer_id: str | None
    reason: str = ""

    @property
    def ok(self) -> bool:
        """True when the request is authentic."""
        return self.peer_id is not None


def check(
    method: str,
    path: str,
    headers: Mapping[str, str],
    now: float,
    *,
    skew_s: float,
    peer_id_of: Callable[[bytes], str],
    verify: Callable[[bytes, bytes, bytes], bool],
    known: Callable[[str], bool],
) -> Verdict:
    """Check the signature headers of a request (see the module doc for the rules)."""
    peer = headers.get(PEER_HEADER)
    key_b64 = headers.get(KEY_HEADER)
    ts_text = headers.get(TIME_HEADER)
    sig_b64 = headers.get(SIG_HEADER)
    if not (peer and key_b64 and ts_text and sig_b64):
        return Verdict(None, "unsigned request")
    try:
        key = base64.b64decode(key_b64, validate=True)
        sig = base64.b64decode(sig_b64, validate=True)
        ts = int(ts_text)
    except (binascii.Error, ValueError):
        return Verdict(None, "malformed signature headers")
    if len(key) != 32 or peer_id_of(key) != peer:
        return Verdict(None, "key does not match peer id")
    if abs(now - ts) > skew_s:
        return Verdict(None, "stale or future timestamp")
    if not verify(key, sig, canonical(method, path, ts, peer)):
        return Verdict(None, "bad signature")
    if not known(peer):
        return Verdict(None, "unknown peer")
    return Verdict(peer)
