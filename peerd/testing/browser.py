"""Headless Chromium driven over the DevTools protocol (CDP), for page and WebRTC tests.

A small asyncio API: :meth:`Browser.launch` starts Debian's ``chromium`` with a throw-away
profile and no background traffic, :meth:`Browser.new_page` opens a tab, :meth:`Page.evaluate`
runs JavaScript (awaiting promises) and returns its JSON value, :attr:`Page.console_errors`
collects console errors and uncaught exceptions, :meth:`Page.screenshot` saves a PNG,
:meth:`Browser.close` ends the process. One websocket to the browser carries every tab's
messages (flattened sessions).

WebRTC on loopback needs host candidates Chromium normally hides: ``webrtc=True`` (the default)
adds ``--allow-loopback-in-peer-connection`` and turns off mDNS obfuscation of host candidates,
so the node (aiortc, which resolves no mDNS names) sees real addresses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_ARGS = (
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
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--metrics-recording-only",
    "--password-store=basic",
    "--autoplay-policy=no-user-gesture-required",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)
WEBRTC_ARGS = (
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
)


class CdpError(RuntimeError):
    """The browser answered a command with an error, or JavaScript threw."""


class Browser:
    """A running headless Chromium and its DevTools connection."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        profile: Path,
        http: aiohttp.ClientSession,
        ws: aiohttp.ClientWebSocketResponse,
        own_profile: bool,
    ) -> None:
        self._proc = proc
        self._profile = profile
        self._own_profile = own_profile
        self._http = http
        self._ws = ws
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._pages: dict[str, Page] = {}
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")

    @classmethod
    async def launch(
        cls,
        *,
        profile_dir: Path | None = None,
        webrtc: bool = True,
        extra_args: tuple[str, ...] = (),
        timeout: float = 30.0,  # noqa: ASYNC109 - bounds start-up, not one await
    ) -> Browser:
        """Start Chromium; raise RuntimeError (with its output) if it does not come up."""
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            raise RuntimeError("chromium is required (apt install chromium)")
        own = profile_dir is None
        profile = Path(tempfile.mkdtemp(prefix="peerd-chromium-")) if own else profile_dir
        assert profile is not None
        args = [*CHROMIUM_ARGS, *(WEBRTC_ARGS if webrtc else ()), *extra_args]
        args += [f"--user-data-dir={profile}", "about:blank"]
        log = (profile / "chromium.log").open("wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                exe, *args, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL
            )
        finally:
            log.close()
        port_file = profile / "DevToolsActivePort"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            text = await asyncio.to_thread(_read_if_exists, port_file)
            if text and len(text.splitlines()) >= 2:
                break
            if proc.returncode is not None or loop.time() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                output = await asyncio.to_thread(_read_if_exists, profile / "chromium.log")
                raise RuntimeError(f"chromium did not start:\n{output[-4000:]}")
            await asyncio.sleep(0.05)
        port, path = text.splitlines()[:2]
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        except BaseException:
            await http.close()
            proc.kill()
            await proc.wait()
            raise
        return cls(proc, profile, http, ws, own)

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(CdpError(json.dumps(data["error"])))
                    else:
                        fut.set_result(data.get("result", {}))
            elif "sessionId" in data:
                page = self._pages.get(data["sessionId"])
                if page is not None:
                    page._event(data["method"], data.get("params", {}))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CdpError("browser connection closed"))

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session_id: str | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - a per-command deadline
    ) -> Any:
        """One CDP command; its result, or CdpError."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session_id is not None:
            msg["sessionId"] = session_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = fut
        await self._ws.send_str(json.dumps(msg))
        return await asyncio.wait_for(fut, timeout)

    async def new_page(self, url: str = "about:blank") -> Page:
        """Open a tab, attach to it, and navigate to ``url``."""
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, target["targetId"], attached["sessionId"])
        self._pages[page.session_id] = page
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            await page.send(domain)
        if url != "about:blank":
            await page.goto(url)
        return page

    async def close(self) -> None:
        """Close the browser and remove the profile it created."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close"), 5)
        await self._ws.close()
        await self._http.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 10)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        if self._own_profile:
            await asyncio.to_thread(shutil.rmtree, self._profile, True)


class Page:
    """One tab."""

    def __init__(self, browser: Browser, target_id: str, session_id: str) -> None:
        self.browser = browser
        self.target_id = target_id
        self.session_id = session_id
        self.console_errors: list[str] = []
        self.console: list[str] = []
        self._loaded = asyncio.Event()

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            self._loaded.set()
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])
            )
            self.console.append(f"{params.get('type')}: {text}")
            if params.get("type") in ("error", "assert"):
                self.console_errors.append(text)
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exc = details.get("exception", {})
            self.console_errors.append(exc.get("description") or details.get("text", "exception"))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error":
                self.console_errors.append(f"{entry.get('url', '')}: {entry.get('text', '')}")

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """A CDP command in this tab's session."""
        return await self.browser.send(method, params, session_id=self.session_id)

    async def goto(self, url: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Navigate and wait for the load event."""
        self._loaded.clear()
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigation to {url} failed: {result['errorText']}")
        await asyncio.wait_for(self._loaded.wait(), timeout)

    async def evaluate(self, expression: str, timeout: float = 30.0) -> Any:  # noqa: ASYNC109
        """Evaluate JavaScript (promises awaited) and return its value as JSON data."""
        result = await self.browser.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session_id=self.session_id,
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise CdpError(d.get("exception", {}).get("description") or d.get("text", "error"))
        return result.get("result", {}).get("value")

    async def screenshot(self, path: Path) -> Path:
        """Save a PNG of the viewport."""
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        """Close the tab."""
        await self.browser.send("Target.closeTarget", {"targetId": self.target_id})
        self.browser._pages.pop(self.session_id, None)


def _read_if_exists(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
