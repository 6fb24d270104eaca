"""The pure SigV4 signer gives botocore's signature for the same request."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from unittest import mock

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from peerd.core.sigv4 import EMPTY_SHA256, SigningKey, amz_date, sign

KEY = SigningKey("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "auto")
NOW = 1_764_000_000.0


def botocore_auth(method: str, url: str, headers: dict[str, str], body: bytes) -> str:
    # Over http botocore's S3 signer hashes the body itself: the payload hash must agree.
    req = AWSRequest(method=method, url=url, headers=headers, data=body)
    auth = S3SigV4Auth(Credentials(KEY.access_key_id, KEY.secret_access_key), "s3", KEY.region)
    fixed = datetime.fromtimestamp(NOW, UTC).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=fixed):
        auth.add_auth(req)
    assert req.headers["X-Amz-Date"] == amz_date(NOW)
    return str(req.headers["Authorization"])


@pytest.mark.parametrize(
    ("method", "path", "query", "extra", "body"),
    [
        ("GET", "/bucket/blobs/bafkreiabc", [], {}, b""),
        ("HEAD", "/bucket/blobs/x", [], {"x-amz-checksum-mode": "ENABLED"}, b""),
        (
            "PUT",
            "/bucket/blobs/bafkrei",
            [],
            {
                "If-None-Match": "*",
                "Content-Type": "application/octet-stream",
                "Content-Length": "123",
                "x-amz-checksum-sha256": "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=",
                "x-amz-sdk-checksum-algorithm": "SHA256",
            },
            b"test",
        ),
        ("PUT", "/b/k y+z", [("partNumber", "2"), ("uploadId", "a/b=c")], {}, b""),
    ],
)
def test_signature_matches_botocore(
    method: str, path: str, query: list[tuple[str, str]], extra: dict[str, str], body: bytes
) -> None:
    payload = hashlib.sha256(body).hexdigest()
    from urllib.parse import quote, urlencode

    host = "127.0.0.1:9000"
    headers = {"host": host, **extra}
    ours = sign(KEY, method, path, query, headers, payload, NOW)
    qs = ("?" + urlencode(query, quote_via=quote, safe="")) if query else ""
    url = f"http://{host}{quote(path, safe='/~')}{qs}"
    assert ours["Authorization"] == botocore_auth(method, url, headers, body)
    assert ours["x-amz-content-sha256"] == payload


def test_empty_payload_constant() -> None:
    assert hashlib.sha256(b"").hexdigest() == EMPTY_SHA256


def test_repr_hides_secret() -> None:
    assert KEY.secret_access_key not in repr(KEY)
