"""`POST /api/v1/commands/ingest` refusals: no token, a wrong token, and paths that leave the
library folders through `..` or a symlink (resolved before the check); nothing is queued or
ingested for any of them. The accepted path is covered in tests/test_api.py."""

from __future__ import annotations

import gc
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from peerd.api import routes
from peerd.api.commands import Subsystems
from peerd.api.node import NodeApi
from peerd.config import load_settings
from peerd.http.server import build_app
from peerd.media.ingest import node_ingestor
from peerd.runtime import open_runtime
from tests.support.coordinator import NodeApiClient


@pytest.fixture(autouse=True)
def _quiet_gc() -> None:
    """Freeze import garbage so a full collection does not land inside the loop guard."""
    gc.collect()
    gc.freeze()


@dataclass
class Node:
    client: NodeApiClient
    token: str
    library: Path
    outside: Path


@pytest.fixture
def library(tmp_path: Path) -> tuple[Path, Path]:
    """A library folder holding a symlink to a file beside it (made before the loop runs)."""
    lib = tmp_path / "library"
    lib.mkdir()
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"not read: refused before any packaging\n")
    (lib / "link.mp4").symlink_to(outside)
    return lib, outside


@pytest.fixture
async def node(tmp_path: Path, library: tuple[Path, Path]) -> AsyncIterator[Node]:
    lib, outside = library
    settings = load_settings(
        None, node={"state_dir": tmp_path / "state"}, media={"library_dirs": [lib]}
    )
    rt = await open_runtime(settings)
    token = secrets.token_urlsafe(24)
    settings.secrets_path.mkdir(parents=True, exist_ok=True)
    (settings.secrets_path / "api_token").write_text(token)
    api = NodeApi(rt, Subsystems(ingestor=node_ingestor(rt)))
    server = TestServer(build_app(rt, [partial(routes.install, api=api)]), host="127.0.0.1")
    await server.start_server()
    client = NodeApiClient(str(server.make_url("/")), token)
    try:
        yield Node(client, token, lib, outside)
        jobs = await rt.catalog.conn.execute_fetchall("SELECT job_id FROM api_jobs")
        media = await rt.catalog.conn.execute_fetchall("SELECT media_id FROM media")
        assert list(jobs) == []
        assert list(media) == []
    finally:
        await client.close()
        await api.jobs.close()
        await server.close()
        await rt.close()


async def test_ingest_needs_the_token(node: Node) -> None:
    body = {"path": str(node.library)}
    c = node.client
    ans = await c.call("POST", "/api/v1/commands/ingest", body=body, token="")
    assert ans.status == 401
    ans = await c.call("POST", "/api/v1/commands/ingest", body=body, token=node.token + "x")
    assert ans.status == 403
    assert ans.body["error"] == "forbidden"


async def test_ingest_refuses_escapes_from_the_library(node: Node) -> None:
    for path in (
        str(node.outside),
        str(node.library / ".." / node.outside.name),
        str(node.library / "link.mp4"),
    ):
        ans = await node.client.command("ingest", {"path": path})
        assert ans.status == 403, path
        assert "outside" in ans.body["message"]
    ans = await node.client.command("ingest", {"path": "library/link.mp4"})
    assert ans.status == 400
