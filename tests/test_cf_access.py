"""Cloudflare Access JWT validation against a fake team certs endpoint with generated keys."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import pytest

from peerd.errors import Unavailable
from peerd.http.access import AccessDenied, AccessVerifier
from peerd.testing.cf_access import FakeAccessTeam, new_key


@pytest.fixture
async def team() -> AsyncIterator[FakeAccessTeam]:
    t = FakeAccessTeam()
    await t.start()
    try:
        yield t
    finally:
        await t.stop()


@pytest.fixture
async def verifier(team: FakeAccessTeam) -> AsyncIterator[AccessVerifier]:
    v = AccessVerifier(
        certs_url=team.certs_url, issuer=team.issuer, audience=team.audience, refetch_min_s=0
    )
    try:
        yield v
    finally:
        await v.close()


async def test_valid_token_and_key_cache(team: FakeAccessTeam, verifier: AccessVerifier) -> None:
    ident = await verifier.verify(team.token(email="a@b.c"))
    assert ident.email == "a@b.c"
    await verifier.verify(team.token(sub="other"))
    assert team.requests == 1  # keys fetched once, then cached


def _b64(d: bytes) -> str:
    return base64.urlsafe_b64encode(d).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "garbage",
        "wrong-aud",
        "wrong-iss",
        "expired",
        "not-yet",
        "alg-none",
        "alg-hs256",
        "tampered-payload",
        "foreign-key-known-kid",
        "foreign-key-unknown-kid",
        "aud-string-wrong",
    ],
)
async def test_refusals(team: FakeAccessTeam, verifier: AccessVerifier, case: str) -> None:
    stranger = await new_key()
    good = team.token()
    h, p, s = good.split(".")
    tokens: dict[str, str | None] = {
        "missing": None,
        "garbage": "a.b.c",
        "wrong-aud": team.token(aud=["someone-else"]),
        "wrong-iss": team.token(iss="https://evil.cloudflareaccess.com"),
        "expired": team.token(ttl_s=-3600),
        "not-yet": team.token(nbf=2_000_000_000_0),
        "alg-none": f"{_b64(json.dumps({'alg': 'none', 'kid': team.current}).encode())}.{p}.",
        "alg-hs256": f"{_b64(json.dumps({'alg': 'HS256', 'kid': team.current}).encode())}.{p}.{s}",
        "tampered-payload": f"{h}.{_b64(json.dumps({'aud': [team.audience]}).encode())}.{s}",
        "foreign-key-known-kid": team.token(key=stranger),
        "foreign-key-unknown-kid": team.token(kid="nope", key=stranger),
        "aud-string-wrong": team.token(aud="x"),
    }
    with pytest.raises(AccessDenied):
        await verifier.verify(tokens[case])


async def test_rotation_fetches_new_keys(team: FakeAccessTeam, verifier: AccessVerifier) -> None:
    old = team.current
    await verifier.verify(team.token())
    await team.rotate()
    await verifier.verify(team.token())  # unknown kid -> refetch
    assert team.requests == 2
    team.retire(old)
    # Cached verification of an old token stays valid until it expires; a new token by the
    # retired key is refused after the next refetch.
    with pytest.raises(AccessDenied):
        await verifier.verify(team.token(kid="gone", key=team.keys[team.current]))


async def test_unknown_kid_refetch_is_rate_limited(team: FakeAccessTeam) -> None:
    v = AccessVerifier(
        certs_url=team.certs_url, issuer=team.issuer, audience=team.audience, refetch_min_s=60
    )
    try:
        await v.verify(team.token())
        stranger = await new_key()
        for i in range(5):
            with pytest.raises(AccessDenied):
                await v.verify(team.token(kid=f"forged{i}", key=stranger))
        assert team.requests == 1
    finally:
        await v.close()


async def test_endpoint_down_is_unavailable(team: FakeAccessTeam) -> None:
    v = AccessVerifier(
        certs_url=team.certs_url + "/missing", issuer=team.issuer, audience=team.audience
    )
    try:
        with pytest.raises(Unavailable):
            await v.verify(team.token())
    finally:
        await v.close()
