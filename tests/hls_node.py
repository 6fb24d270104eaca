"""Shared fixtures of the HLS tests: generated media and a node serving it on loopback."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from peerd.config import load_settings
from peerd.core import tokens
from peerd.http import fastpath, hls
from peerd.http.server import Listener, RouteInstaller, build_app, listen, runner_for
from peerd.runtime import Runtime, open_runtime
from tests.support.hlsmedia import import_hls, read_hls

KEY_TEXT = "test-signing-key-0123456789abcdef-0123456789"
KEY = KEY_TEXT.encode()


@dataclass
class Node:
    """A running node with imported media."""

    rt: Runtime
    base: str
    media: dict[str, str]  # container -> media id
    routes: hls.HlsRoutes
    fast: fastpath.FastPath | None  # with [http] fast_path, its ``answered`` tells the paths apart
    plain: str  # the same application on a second port, without the fast path

    @property
    def answered(self) -> int:
        """Responses the fast path sent itself (0 without a fast path)."""
        return self.fast.answered if self.fast is not None else 0

    def url(self, container: str, path: str = "master.m3u8", token: str | None = "") -> str:
        """A URL under the media; token "" means a fresh valid one, None means no token."""
        mid = self.media[container]
        if token == "":
            token = tokens.mint(KEY, mid, "hls", int(time.time()) + 600)
        q = f"?token={token}" if token is not None else ""
        return f"{self.base}/hls/{mid}/{path}{q}"


@contextlib.asynccontextmanager
async def run_node(
    tmp: Path,
    playlists: dict[str, Path],
    *,
    http: dict[str, Any] | None = None,
    extra: list[RouteInstaller] | None = None,
    before_start: Callable[[Runtime], None] | None = None,
) -> AsyncIterator[Node]:
    """Open a runtime in ``tmp``, import the media, serve the HLS routes on 127.0.0.1:0."""
    secrets = tmp / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    (secrets / "hls_signing_key").write_text(KEY_TEXT + "\n")
    settings = load_settings(
        None,
        node={"state_dir": tmp / "state", "secrets_dir": secrets},
        http={"port": 0, **(http or {})},
    )
    rt = await open_runtime(settings)
    runner: web.AppRunner | None = None
    listeners: list[Listener] = []
    try:
        media = {}
        for container, pl in playlists.items():
            media[container], _ = await import_hls(rt, read_hls(pl))
        if before_start is not None:
            before_start(rt)
        app = build_app(rt, [hls.install, *(extra or [])])
        runner = runner_for(app, settings.http)
        await runner.setup()
        listeners.append(await listen(runner, settings.http))
        plain = settings.http.model_copy(update={"fast_path": False, "port": 0})
        listeners.append(await listen(runner, plain))
        routes = app[fastpath.HLS_KEY]
        assert isinstance(routes, hls.HlsRoutes)
        fast, full = listeners
        yield Node(
            rt,
            f"http://127.0.0.1:{fast.port}",
            media,
            routes,
            fast.fast if settings.http.fast_path else None,  # it reads every head either way
            f"http://127.0.0.1:{full.port}",
        )
    finally:
        for listener in listeners:
            await listener.stop(1.0)
        if runner is not None:
            await runner.cleanup()
        await rt.close()
