"""Headless Chromium driven over the DevTools protocol, for tests that need a real browser.

Usage (in an async test)::

    async with Browser.launch(tmp_path) as browser:
        page = await browser.new_page()
        await page.goto("http://127.0.0.1:8737/ui")
        assert await page.evaluate("document.title") == "peerd"
        await page.wait_for("document.querySelector('video').currentTime > 1", timeout_s=20)
        shot = await page.screenshot(tmp_path / "ui.png")
        assert page.console_errors == []

A :class:`Page` collects everything the page reports as an error: ``console.error`` and failed
``console.assert`` calls (``Runtime.consoleAPICalled``), uncaught exceptions and unhandled
rejections (``Runtime.exceptionThrown``), and browser-side errors such as failed loads and CSP
violations (``Log.entryAdded`` at level ``error``). Tests assert that list is empty.

The client speaks CDP over one WebSocket per page (aiohttp), so it needs no extra package. Debian's
``chromium`` runs with the flags below; ``--no-sandbox`` because tests run as root in a container.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.process import REPO_ROOT

# hls.js as `make web-deps` pins it, outside the package.
HLS_JS = REPO_ROOT / ".venv" / "web" / "node_modules" / "hls.js" / "dist" / "hls.min.js"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--autoplay-policy=no-user-gesture-required",
    "--mute-audio",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1280,1000",
)
_DEVTOOLS_RE = re.compile(r"DevTools listening on (ws://\S+)")


class BrowserError(RuntimeError):
    """Chromium did not start, a CDP call failed, or page JavaScript threw."""


def find_chromium() -> str:
    """Path of the Chromium binary (``$CHROMIUM`` or ``chromium`` on PATH)."""
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        raise BrowserError("chromium not found: install the Debian package `chromium`")
    return exe


@dataclass
class ConsoleEntry:
    """One message the page logged."""

    source: str
    level: str
    text: str
    url: str | None = None

    def __str__(self) -> str:
        where = f" ({self.url})" if self.url else ""
        return f"[{self.source}/{self.level}] {self.text}{where}"


@dataclass
class Page:
    """One tab, with its own CDP WebSocket."""

    ws: aiohttp.ClientWebSocketResponse
    target_id: str
    console: list[ConsoleEntry] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def console_errors(self) -> list[ConsoleEntry]:
        """Errors and failed assertions the page reported."""
        return [e for e in self.console if e.level in ("error", "assert", "exception")]

    def _start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name=f"cdp-{self.target_id[:8]}")

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(BrowserError(f"CDP error: {data['error']}"))
                    else:
                        fut.set_result(data.get("result", {}))
                continue
            self._on_event(data.get("method", ""), data.get("params", {}))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrowserError("CDP connection closed"))

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(a.get("value", a.get("description", a.get("type"))))
                for a in params.get("args", [])
            )
            self.console.append(ConsoleEntry("console", params.get("type", "log"), text))
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            exc = d.get("exception", {})
            text = exc.get("description") or d.get("text", "exception")
            self.console.append(ConsoleEntry("js", "exception", text, d.get("url")))
        elif method == "Log.entryAdded":
            e = params.get("entry", {})
            self.console.append(
                ConsoleEntry(
                    e.get("source", "log"), e.get("level", "info"), e.get("text", ""), e.get("url")
                )
            )
        for i, (name, fut) in enumerate(self._waiters):
            if name == method and not fut.done():
                fut.set_result(params)
                del self._waiters[i]
                break

    async def send(
        self, method: str, params: dict[str, Any] | None = None, timeout_s: float = 30
    ) -> dict[str, Any]:
        """One CDP command; returns its result."""
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        return await asyncio.wait_for(fut, timeout_s)

    def expect(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next event called ``method`` (register before triggering it)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((method, fut))
        return fut

    async def goto(self, url: str, timeout_s: float = 30) -> None:
        """Navigate and wait for the load event."""
        loaded = self.expect("Page.loadEventFired")
        res = await self.send("Page.navigate", {"url": url}, timeout_s)
        if res.get("errorText"):
            raise BrowserError(f"navigation to {url} failed: {res['errorText']}")
        await asyncio.wait_for(loaded, timeout_s)

    async def evaluate(self, expression: str, timeout_s: float = 30) -> Any:
        """Evaluate JavaScript (promises are awaited); returns the value as JSON."""
        res = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            timeout_s,
        )
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text")
            raise BrowserError(f"JavaScript error in {expression[:80]!r}: {text}")
        return res.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout_s: float = 20, interval: float = 0.1) -> Any:
        """Poll ``expression`` until it is truthy; returns its value."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{expression!r} still falsy after {timeout_s}s")
            await asyncio.sleep(interval)

    async def screenshot(self, path: Path) -> Path:
        """Save a PNG of the viewport (full page) to ``path``."""
        res = await self.send(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
        )
        data = base64.b64decode(res["data"])
        await asyncio.to_thread(path.write_bytes, data)
        return path

    async def close(self) -> None:
        """Close the WebSocket (the tab goes with the browser)."""
        await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


@dataclass
class Browser:
    """A running headless Chromium."""

    proc: asyncio.subprocess.Process
    http: aiohttp.ClientSession
    endpoint: str
    stderr_tail: list[str]
    pages: list[Page] = field(default_factory=list)
    _drain: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(
        cls, profile_dir: Path, *extra_flags: str, timeout_s: float = 30
    ) -> AsyncIterator[Browser]:
        """Start Chromium with a fresh profile in ``profile_dir``; stop it on exit."""
        await asyncio.to_thread(profile_dir.mkdir, parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            find_chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile_dir}",
            *extra_flags,
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        tail: list[str] = []
        endpoint = ""
        try:
            async with asyncio.timeout(timeout_s):
                while not endpoint:
                    line = await proc.stderr.readline()
                    if not line:
                        raise BrowserError("chromium exited:\n" + "".join(tail[-30:]))
                    text = line.decode(errors="replace")
                    tail.append(text)
                    m = _DEVTOOLS_RE.search(text)
                    if m:
                        endpoint = m.group(1)
        except BaseException:
            await _stop(proc)
            raise
        http = aiohttp.ClientSession()
        browser = cls(proc=proc, http=http, endpoint=endpoint, stderr_tail=tail)
        browser._drain = asyncio.create_task(browser._drain_stderr(), name="chromium-stderr")
        try:
            yield browser
        finally:
            await browser.close()

    async def _drain_stderr(self) -> None:
        # Chromium blocks once its stderr pipe is full: keep reading, keep the tail for errors.
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr_tail.append(line.decode(errors="replace"))
            del self.stderr_tail[:-200]

    @property
    def _http_base(self) -> str:
        host_port = self.endpoint.split("/")[2]
        return f"http://{host_port}"

    async def new_page(self) -> Page:
        """Open a tab and connect to it, with Page, Runtime and Log events enabled."""
        async with self.http.put(f"{self._http_base}/json/new?about:blank") as r:
            if r.status != 200:
                raise BrowserError(f"/json/new answered {r.status}: {await r.text()}")
            target = await r.json()
        ws = await self.http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws=ws, target_id=target["id"])
        page._start()
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        self.pages.append(page)
        return page

    async def close(self) -> None:
        """Close pages, then the browser; kill it if it does not exit."""
        for page in self.pages:
            await page.close()
        await self.http.close()
        await _stop(self.proc)
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def hls_page(src: str, title: str = "player") -> str:
    """A page that plays ``src`` with hls.js (no worker) into ``<video id="v">`` and records
    what a test checks: ``window.hlsErrors`` (``type:details:fatal``), ``window.mediaErrors``
    (the video element's error codes) and ``window.fragUrls`` (each loaded fragment's final
    URL, after redirects)."""
    return _HLS_PAGE.replace("TITLE", title).replace("SRC", json.dumps(src))


_HLS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>TITLE</title><link rel="icon" href="data:,">
<script src="/hls.min.js"></script></head>
<body><video id="v" muted playsinline></video>
<script>
window.hlsErrors = [];
window.mediaErrors = [];
window.fragUrls = [];
const v = document.getElementById("v");
v.addEventListener("error", () => window.mediaErrors.push(String(v.error && v.error.code)));
const hls = new Hls({enableWorker: false});
hls.on(Hls.Events.ERROR, (_e, d) => window.hlsErrors.push(`${d.type}:${d.details}:${d.fatal}`));
hls.on(Hls.Events.FRAG_LOADED, (_e, d) => window.fragUrls.push(d.networkDetails.responseURL));
hls.loadSource(SRC);
hls.attachMedia(v);
hls.on(Hls.Events.MANIFEST_PARSED, () => v.play());
</script></body></html>
"""


@contextlib.asynccontextmanager
async def player_origin(page: Callable[[], str]) -> AsyncIterator[str]:
    """A second origin (``localhost``, not the node's ``127.0.0.1``) serving ``/player.html``
    (``page()``, made at each request) and ``/hls.min.js``; yields its base URL.

    Fails the test if hls.js is not installed: a player test never skips."""
    if not HLS_JS.is_file():
        raise AssertionError(f"hls.js is not installed at {HLS_JS}: run `make web-deps`")

    async def html(_r: web.Request) -> web.Response:
        return web.Response(text=page(), content_type="text/html")

    async def script(_r: web.Request) -> web.FileResponse:
        return web.FileResponse(HLS_JS, headers={"Content-Type": "text/javascript"})

    app = web.Application()
    app.router.add_get("/player.html", html)
    app.router.add_get("/hls.min.js", script)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://localhost:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
