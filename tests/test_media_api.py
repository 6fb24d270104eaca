"""`POST /api/v1/commands/ingest`: token auth, library-root confinement, a pollable job whose
result names the media ids, and the same media id as the CLI path (determinism)."""

from __future__ import annotations

import gc
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from aiohttp.test_utils import TestServer

from peerd.api import routes
from peerd.api.node import node_api
from peerd.config import load_settings
from peerd.core.library import within_roots
from peerd.http.server import build_app
from peerd.runtime import Runtime, open_runtime
from peerd.testing.coordinator import NodeApiClient
from peerd.testing.media import make_bad, make_media

JOB_WAIT_S = 120.0  # generous: packaging runs in worker threads on a shared 2-core machine


@pytest.fixture(autouse=True)
def _quiet_gc() -> None:
    """Freeze import garbage so a full collection does not land inside the loop guard."""
    gc.collect()
    gc.freeze()


@dataclass
class Node:
    rt: Runtime
    client: NodeApiClient
    token: str
    library: Path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny clips made once (ffmpeg runs synchronously, so never inside the event loop)."""
    d = tmp_path_factory.mktemp("sources")
    make_media(d / "a.mp4", seconds=2.0, size=(96, 64))
    make_media(d / "b.mp4", seconds=2.0, size=(96, 64), acodec=None)
    make_media(d / "outside.mp4", seconds=1.0, size=(64, 64))
    make_bad(d / "broken.mp4", "text")
    return d


@pytest.fixture
def library(tmp_path: Path, sources: Path) -> Path:
    """A library root: shows/a.mp4, b.mp4 and broken/broken.mp4; outside.mp4 lies beside it."""
    lib = tmp_path / "library"
    for name, where in (("a.mp4", "shows"), ("b.mp4", "."), ("broken.mp4", "broken")):
        (lib / where).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources / name, lib / where / name)
    shutil.copyfile(sources / "outside.mp4", tmp_path / "outside.mp4")
    return lib


@pytest.fixture
async def node(tmp_path: Path, library: Path) -> AsyncIterator[Node]:
    settings = load_settings(
        None, node={"state_dir": tmp_path / "state"}, media={"library_roots": [library]}
    )
    rt = await open_runtime(settings)
    token = secrets.token_urlsafe(24)
    settings.secrets_path.mkdir(parents=True, exist_ok=True)
    (settings.secrets_path / "api_token").write_text(token)
    server = TestServer(build_app(rt, [routes.install]), host="127.0.0.1")
    await server.start_server()
    client = NodeApiClient(str(server.make_url("/")), token)
    try:
        yield Node(rt, client, token, library)
    finally:
        await client.close()
        await node_api(rt).jobs.close()
        await server.close()
        await rt.close()


async def test_ingest_needs_the_token(node: Node) -> None:
    body = {"path": str(node.library / "b.mp4")}
    c = node.client
    ans = await c.call("POST", "/api/v1/commands/ingest", body=body, token="")
    assert ans.status == 401
    ans = await c.call("POST", "/api/v1/commands/ingest", body=body, token=node.token + "x")
    assert ans.status == 403
    assert ans.body["error"] == "forbidden"
    assert await node.rt.catalog.conn.execute_fetchall("SELECT * FROM api_jobs") == []


async def test_ingest_refuses_paths_outside_the_roots(node: Node, tmp_path: Path) -> None:
    outside = tmp_path / "outside.mp4"
    (node.library / "link.mp4").symlink_to(outside)
    c = node.client
    for path in (
        str(outside),
        str(node.library / ".." / "outside.mp4"),
        str(node.library / "link.mp4"),
    ):
        ans = await c.command("ingest", {"path": path})
        assert ans.status == 403, path
        assert "outside" in ans.body["message"]
    ans = await c.command("ingest", {"path": "library/b.mp4"})
    assert ans.status == 400
    assert "absolute" in ans.body["message"]
    ans = await c.command("ingest", {"path": str(node.library / "nope.mp4")})
    assert ans.status == 404
    assert await node.rt.catalog.conn.execute_fetchall("SELECT * FROM media") == []


async def test_ingest_without_roots_is_not_configured(tmp_path: Path) -> None:
    settings = load_settings(None, node={"state_dir": tmp_path / "state"})
    rt = await open_runtime(settings)
    settings.secrets_path.mkdir(parents=True, exist_ok=True)
    (settings.secrets_path / "api_token").write_text("tok")
    server = TestServer(build_app(rt, [routes.install]), host="127.0.0.1")
    await server.start_server()
    client = NodeApiClient(str(server.make_url("/")), "tok")
    try:
        ans = await client.command("ingest", {"path": str(tmp_path)})
        assert ans.status == 409
        assert ans.body["error"] == "not_configured"
    finally:
        await client.close()
        await server.close()
        await rt.close()


async def test_ingest_folder_job_then_repeat_stores_nothing(node: Node) -> None:
    c = node.client
    ans = await c.command("ingest", {"path": str(node.library / "shows")})
    assert ans.status == 202
    first = await c.wait_job(ans.body["job_id"], within_s=JOB_WAIT_S)
    assert first["state"] == "done", first
    ans = await c.command("ingest", {"path": str(node.library / "b.mp4")})
    assert ans.status == 202
    assert ans.body["kind"] == "ingest"
    assert ans.body["target"] == str((node.library / "b.mp4").resolve())
    done = await c.wait_job(ans.body["job_id"], within_s=JOB_WAIT_S)
    assert done["state"] == "done", done
    assert done["progress"] == 1.0
    result = done["result"]
    assert result["files"] == 1
    result["media_ids"] += first["result"]["media_ids"]
    assert result["skipped"] == 0
    assert result["new_blobs"] > 0
    rows = await node.rt.catalog.conn.execute_fetchall("SELECT media_id FROM media")
    assert sorted(r[0] for r in rows) == sorted(result["media_ids"])
    again = await c.command("ingest", {"path": str(node.library / "shows" / "a.mp4")})
    done = await c.wait_job(again.body["job_id"], within_s=JOB_WAIT_S)
    assert done["state"] == "done", done
    assert done["result"]["skipped"] == 1
    assert done["result"]["new_blobs"] == 0
    assert done["result"]["media_ids"][0] in result["media_ids"]


async def test_ingest_job_fails_naming_the_bad_file(node: Node) -> None:
    ans = await node.client.command("ingest", {"path": str(node.library / "broken")})
    done = await node.client.wait_job(ans.body["job_id"], within_s=JOB_WAIT_S)
    assert done["state"] == "failed"
    assert "broken.mp4" in done["error"]
    assert await node.rt.catalog.conn.execute_fetchall("SELECT * FROM media") == []


def test_within_roots() -> None:
    p = PurePosixPath
    assert within_roots(p("/lib/a/b.mp4"), [p("/other"), p("/lib")])
    assert within_roots(p("/lib"), [p("/lib")])
    assert not within_roots(p("/library2/x.mp4"), [p("/lib")])
    assert not within_roots(p("lib/x.mp4"), [p("lib")])
    assert not within_roots(p("/lib/x.mp4"), [])
