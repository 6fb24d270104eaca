"""Signed bodies between a node and the coordinator, and the replay window that guards them.

Theory of operation
-------------------
A node proves who it is with its ed25519 key alone; there is no shared secret in this direction.
Every request the node sends to the coordinator (register, heartbeat, drain) is a JSON object whose
exact bytes are signed:

* body: UTF-8 JSON, produced by :func:`encode_body` (sorted keys, no spaces). The receiver never
  re-serialises it: it verifies the bytes it received, then parses them. The body always holds
  ``peer_id``, ``timestamp`` (Unix seconds, float) and ``nonce`` (32 lowercase hex characters,
  16 random bytes) besides its payload.
* headers: ``X-Peerd-Peer-Id: <peer id>`` and ``X-Peerd-Signature: <base64url, no padding, of
  ed25519(body bytes)>``.
* key: the peer id is the libp2p form of the public key (identity multihash of the protobuf
  ``{Type: Ed25519, Data: <32 bytes>}``), so the receiver recovers the key with
  :func:`public_key_of` and needs no key exchange. The header must equal the body's ``peer_id``.

A verified body is accepted once: the receiver refuses bodies whose timestamp is more than a
window (60 s) away from its clock and bodies whose nonce it has seen from the same peer inside the
window (nonces older than the window can be forgotten, because their timestamps are refused
anyway). The same scheme signs the answer to a possession challenge (the node's response body), so
the coordinator can tell a forged or wrong-key answer from the node's own.

This module is the sending side; the receiving side lives with the coordinator (not in this repo)
and, as the fake coordinator's, in ``tests/support/signed.py``. Pure: no I/O.
"""

from __future__ import annotations

import base64
import json
from typing import Any

PEER_HEADER = "X-Peerd-Peer-Id"
SIGNATURE_HEADER = "X-Peerd-Signature"


def encode_body(payload: dict[str, Any]) -> bytes:
    """The canonical bytes of a body: sorted keys, compact separators, UTF-8."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def b64url(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
