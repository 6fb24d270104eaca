"""A real S3 server for tests: ``moto_server`` as a subprocess on a free loopback port.

moto speaks S3 over HTTP like R2 does, but it checks neither checksums on single PUTs nor R2's
equal-part rule; peerd enforces those itself (``peerd.core.multipart``) and tests them directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import boto3

ACCESS_KEY = "peerd-test-key"
SECRET_KEY = "peerd-test-secret"  # noqa: S105 -- a throwaway credential moto accepts


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def moto_binary() -> str:
    """The moto_server executable next to this interpreter (or on PATH); fails if absent."""
    here = Path(sys.executable).parent / "moto_server"
    if here.exists():
        return str(here)
    found = shutil.which("moto_server")
    if found is None:
        raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
    return found


class MotoServer:
    """One moto_server process."""

    def __init__(self, *, env: dict[str, str] | None = None) -> None:
        """``env``: extra environment for the process (e.g. moto's
        ``INITIAL_NO_AUTH_ACTION_COUNT``, after which it checks every signature)."""
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    def start(self, timeout_s: float = 20.0) -> MotoServer:
        """Start and wait until it answers."""
        self.proc = subprocess.Popen(  # noqa: S603
            [moto_binary(), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **self.env} if self.env else None,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/moto-api/", timeout=1):  # noqa: S310
                    self.client()
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto_server did not start")

    def stop(self) -> None:
        """Stop the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self) -> Any:
        """A plain boto3 client talking to the server directly (for setup and checks).

        Made once (building a boto3 client costs ~0.25 s of CPU); use it from a thread.
        """
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket."""
        self.client().create_bucket(Bucket=name)

    def put(self, bucket: str, key: str, body: bytes) -> None:
        """Write an object directly (bypassing peerd)."""
        self.client().put_object(Bucket=bucket, Key=key, Body=body)

    def keys(self, bucket: str) -> set[str]:
        """Every key a bucket lists now (every page), without reading the objects."""
        c = self.client()
        out: set[str] = set()
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out.update(o["Key"] for o in page.get("Contents", []))
        return out

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object of a bucket, read directly.

        A running node may delete an object between the listing and the read; such an object
        is left out, as if the listing had come a moment later.
        """
        c = self.client()
        out = {}
        for key in sorted(self.keys(bucket)):
            try:
                out[key] = c.get_object(Bucket=bucket, Key=key)["Body"].read()
            except c.exceptions.NoSuchKey:
                continue
        return out

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
