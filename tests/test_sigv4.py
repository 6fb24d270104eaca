"""Request signing of the R2 client (botocore's signer, peerd's URLs) against independent
references: the signatures AWS publishes in its SigV4 documentation for S3, and the URLs and
signatures boto3's own client makes for the same operations at the same time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from unittest import mock

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from peerd.replication.s3http import EMPTY_SHA256, S3Http

# AWS, "Signature Calculations for the Authorization Header: Transferring Payload in a Single
# Chunk (AWS Signature Version 4)", its examples' credentials and time.
AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # noqa: S105 -- AWS's published example
AWS_TIME = datetime(2013, 5, 24)  # noqa: DTZ001 -- botocore's clock is naive UTC
HOST = "examplebucket.s3.amazonaws.com"


def http(endpoint: str, region: str, key_id: str = AWS_KEY_ID, secret: str = AWS_SECRET) -> S3Http:
    return S3Http(
        endpoint,
        "bucket",
        access_key_id=key_id,
        secret_access_key=secret,
        region=region,
        max_concurrency=1,
        connect_timeout_s=1.0,
        read_timeout_s=1.0,
    )


@pytest.fixture
async def aws() -> AsyncIterator[S3Http]:
    h = http(f"https://{HOST}", "us-east-1")
    try:
        yield h
    finally:
        await h.close()


@pytest.mark.parametrize(
    ("target", "extra", "signed", "signature"),
    [
        (
            "/test.txt",
            {"Range": "bytes=0-9"},
            "host;range;x-amz-content-sha256;x-amz-date",
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        ),
        (
            "/?lifecycle",
            {},
            "host;x-amz-content-sha256;x-amz-date",
            "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
        ),
        (
            "/?max-keys=2&prefix=J",
            {},
            "host;x-amz-content-sha256;x-amz-date",
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
        ),
    ],
    ids=["get-object", "get-lifecycle", "list-objects"],
)
async def test_signature_is_the_one_aws_documents(
    aws: S3Http, target: str, extra: dict[str, str], signed: str, signature: str
) -> None:
    with mock.patch("botocore.auth.get_current_datetime", return_value=AWS_TIME):
        out = aws.sign("GET", f"https://{HOST}{target}", {"Host": HOST, **extra}, EMPTY_SHA256)
    assert out["Authorization"] == (
        f"AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/20130524/us-east-1/s3/aws4_request, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    assert out["X-Amz-Date"] == "20130524T000000Z"
    assert out["X-Amz-Content-SHA256"] == EMPTY_SHA256


def boto3_request(endpoint: str, op: str, **params: Any) -> Any:
    """The request boto3's own client makes for ``op`` (captured before it is sent)."""
    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=AWS_KEY_ID,
        aws_secret_access_key=AWS_SECRET,
        config=Config(
            region_name="auto",
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    seen: list[Any] = []

    def capture(request: Any, **_: Any) -> AWSResponse:
        seen.append(request)
        return AWSResponse(request.url, 500, {}, None)  # never sent

    s3.meta.events.register("before-send.s3", capture)
    with (
        mock.patch("botocore.auth.get_current_datetime", return_value=AWS_TIME),
        pytest.raises(Exception),  # noqa: B017,PT011 -- the fake 500 answer
    ):
        getattr(s3, op)(**params)
    return seen[0]


@pytest.mark.parametrize(
    ("op", "params", "key", "query"),
    [
        ("get_object", {"Key": "blobs/bafkreiabc"}, "blobs/bafkreiabc", ()),
        (
            "upload_part",
            {"Key": "blobs/k y+z~", "PartNumber": 2, "UploadId": "a/b=c+d", "Body": b""},
            "blobs/k y+z~",
            (("partNumber", "2"), ("uploadId", "a/b=c+d")),
        ),
        (
            "abort_multipart_upload",
            {"Key": "a b", "UploadId": "x y"},
            "a b",
            (("uploadId", "x y"),),
        ),
    ],
    ids=["get", "part", "abort"],
)
async def test_url_and_signature_match_boto3s_client(
    op: str, params: dict[str, Any], key: str, query: tuple[tuple[str, str], ...]
) -> None:
    endpoint = "http://127.0.0.1:9000"
    theirs = await asyncio.to_thread(boto3_request, endpoint, op, Bucket="bucket", **params)
    ours = http(endpoint, "auto")
    try:
        url = ours.url(key, query)
        assert url == theirs.url
        # The headers boto3 signed, signed by us at the same time: the same signature.
        auth = theirs.headers["Authorization"].decode()
        names = auth.split("SignedHeaders=", 1)[1].split(",", 1)[0].split(";")
        sent = {
            n: str(theirs.headers[n].decode())
            for n in names
            if n != "host" and n not in ("x-amz-date", "x-amz-content-sha256")
        }
        payload = theirs.headers["X-Amz-Content-SHA256"].decode()
        with mock.patch("botocore.auth.get_current_datetime", return_value=AWS_TIME):
            signed = ours.sign(theirs.method, url, sent, payload)
    finally:
        await ours.close()
    assert signed["Authorization"] == auth
