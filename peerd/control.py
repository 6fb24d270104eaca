"""The daemon's local control socket: ``peerd ingest`` run by the daemon for a local user.

``<state>/control.sock`` is a Unix stream socket, mode 0600 in the state directory, and every
connection's peer is checked with ``SO_PEERCRED``: only the daemon's own user (or root) gets an
answer. The file system is the authentication, as for other daemons' control sockets; unlike
the HTTP API (for the coordinator), a request here may name any file the daemon can read.

Protocol (JSON lines, one request per connection; the client is :mod:`peerd.ctl`)::

    -> {"op": "ingest", "paths": ["/abs/file.mp4", ...], "force": false,
        "media": {"container": "ts", ...}, "progress": true}
    <- {"event": "progress", "path": "...", "done": 12.0, "total": 120.0}   (if asked, <= 10/s)
    <- {"event": "result", "result": {IngestResult fields}}                 (one per file)
    <- {"event": "end", "files": 1, "failed": 0}
    -> {"op": "ingest_upload", "keys": ["uploads/film.mkv", ...], "media": {...}}
    <- {"event": "result", "result": {...}}   (one per key: an IngestResult's fields, the key as
                                             path, and "upload": ok|failed|retry|gone|...)
    <- {"event": "end", "files": 1, "failed": 0}
    -> {"op": "ping"}
    <- {"event": "pong", "pid": 123, "version": "0.1.0", "state_dir": "..."}

A bad request gets ``{"event": "error", "message": ..., "exit_code": 2}`` and the connection
closes. A client that disconnects mid-ingest cancels the job: the packager stops and the blobs
it wrote are removed, exactly as for an interrupted ``peerd ingest --local``. ``media`` keys are
the ``[media]`` settings the CLI overrides, validated by the same config model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerd import __version__
from peerd.errors import BadRequest, ConfigError
from peerd.paths import MAX_LINE, SOCKET_NAME, listen_unix
from peerd.runtime import Runtime

if TYPE_CHECKING:
    from peerd.media.ingest import Ingestor
    from peerd.replication.uploads import Uploads

log = logging.getLogger("peerd.control")

OVERRIDABLE = frozenset({"container", "segment_seconds", "transcode", "max_height"})
MAX_PATHS = 10_000
PROGRESS_EVERY_S = 0.1


@dataclass(frozen=True)
class IngestCommand:
    """A validated ``ingest`` request."""

    paths: tuple[Path, ...]
    force: bool
    media: dict[str, Any]
    progress: bool


@dataclass(frozen=True)
class UploadCommand:
    """A validated ``ingest_upload`` request: object keys of uploads in the node's bucket."""

    keys: tuple[str, ...]
    media: dict[str, Any]


def parse_request(line: bytes) -> IngestCommand | UploadCommand | str:
    """The command in one request line: an :class:`IngestCommand`, an :class:`UploadCommand`,
    or ``"ping"``.

    Raises :class:`BadRequest` naming what is wrong.
    """
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request is not JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("request must be a JSON object")
    op = obj.get("op")
    if op == "ping":
        return "ping"
    if op == "ingest_upload":
        return _parse_upload(obj)
    if op != "ingest":
        raise BadRequest(f"unknown op {op!r}")
    unknown = set(obj) - {"op", "paths", "force", "media", "progress"}
    if unknown:
        raise BadRequest(f"unknown request keys: {', '.join(sorted(unknown))}")
    paths = obj.get("paths")
    if (
        not isinstance(paths, list)
        or not paths
        or len(paths) > MAX_PATHS
        or not all(isinstance(p, str) and p.startswith("/") and "\0" not in p for p in paths)
    ):
        raise BadRequest(f"paths must be a list of 1 to {MAX_PATHS} absolute paths")
    media = obj.get("media", {})
    if not isinstance(media, dict) or not set(media) <= OVERRIDABLE:
        raise BadRequest(f"media may only override {', '.join(sorted(OVERRIDABLE))}")
    force = obj.get("force", False)
    progress = obj.get("progress", False)
    if not isinstance(force, bool) or not isinstance(progress, bool):
        raise BadRequest("force and progress must be true or false")
    return IngestCommand(tuple(Path(p) for p in paths), force, media, progress)


def _parse_upload(obj: dict[str, Any]) -> UploadCommand:
    unknown = set(obj) - {"op", "keys", "media"}
    if unknown:
        raise BadRequest(f"unknown request keys: {', '.join(sorted(unknown))}")
    keys = obj.get("keys")
    if (
        not isinstance(keys, list)
        or not keys
        or len(keys) > MAX_PATHS
        or not all(isinstance(k, str) and 0 < len(k) <= 1024 and "\0" not in k for k in keys)
    ):
        raise BadRequest(f"keys must be a list of 1 to {MAX_PATHS} object keys")
    media = obj.get("media", {})
    if not isinstance(media, dict) or not set(media) <= OVERRIDABLE:
        raise BadRequest(f"media may only override {', '.join(sorted(OVERRIDABLE))}")
    return UploadCommand(tuple(keys), media)


def _event(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def bind_socket(state_dir: Path) -> socket.socket:
    """The listening control socket in ``state_dir`` (0600; a stale socket file replaced)."""
    return listen_unix(state_dir, SOCKET_NAME)


class ControlService:
    """Daemon service: serves the control socket until cancelled."""

    name = "control"

    def __init__(self, rt: Runtime, ingestor: Ingestor, uploads: Uploads | None = None) -> None:
        self.rt = rt
        self.ingestor = ingestor
        self.uploads = uploads
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def path(self) -> Path:
        """Where the socket lives."""
        return self.rt.settings.state_dir / SOCKET_NAME

    async def run(self, ready: Callable[[], None]) -> None:
        """Bind, serve, and on stop cancel running commands and remove the socket."""
        sock = await asyncio.to_thread(bind_socket, self.rt.settings.state_dir)
        server = await asyncio.start_unix_server(self._accept, sock=sock, limit=MAX_LINE)
        log.info("control socket listening", extra={"path": str(self.path)})
        ready()
        try:
            await asyncio.Event().wait()
        finally:
            server.close()
            for t in list(self._handlers):
                t.cancel()
            if self._handlers:
                await asyncio.gather(*self._handlers, return_exceptions=True)
            await asyncio.shield(asyncio.to_thread(self.path.unlink, missing_ok=True))

    async def drain(self) -> None:
        """Nothing to drain: running commands end with the service."""

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            _write_quietly(
                writer, {"event": "error", "message": "the daemon is stopping", "exit_code": 1}
            )
            raise
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        uid = peer_uid(sock)
        if uid not in (os.getuid(), 0):
            log.warning("control connection from another user refused", extra={"uid": uid})
            return
        try:
            line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            await _send(writer, {"event": "error", "message": "request too long", "exit_code": 2})
            return
        if not line.endswith(b"\n"):
            return  # closed before a whole request
        try:
            cmd = parse_request(line)
        except BadRequest as exc:
            await _send(writer, {"event": "error", "message": exc.message, "exit_code": 2})
            return
        if cmd == "ping":
            pong = {
                "event": "pong",
                "pid": os.getpid(),
                "version": __version__,
                "state_dir": str(self.rt.settings.state_dir),
            }
            await _send(writer, pong)
            return
        if isinstance(cmd, UploadCommand):
            await self._ingest_uploads(cmd, writer)
            return
        assert isinstance(cmd, IngestCommand)
        await self._ingest(cmd, reader, writer)

    async def _ingest_uploads(self, cmd: UploadCommand, writer: asyncio.StreamWriter) -> None:
        if self.uploads is None:
            message = "R2 is not configured on this node: no bucket to ingest from"
            await _send(writer, {"event": "error", "message": message, "exit_code": 2})
            return
        try:
            options = self.rt.settings.media.overridden(cmd.media).packaging_options()
        except ConfigError as exc:
            await _send(writer, {"event": "error", "message": exc.message, "exit_code": 2})
            return
        log.info("control ingest from the bucket", extra={"keys": len(cmd.keys)})
        failed = 0
        for key in cmd.keys:
            res = await self.uploads.ingest_key(key, options=options)
            failed += 0 if res.ok else 1
            await _send(writer, {"event": "result", "result": res.as_json()})
        await _send(writer, {"event": "end", "files": len(cmd.keys), "failed": failed})

    async def _ingest(
        self, cmd: IngestCommand, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            options = self.rt.settings.media.overridden(cmd.media).packaging_options()
        except ConfigError as exc:
            await _send(writer, {"event": "error", "message": exc.message, "exit_code": 2})
            return
        loop = asyncio.get_running_loop()
        log.info("control ingest", extra={"paths": len(cmd.paths), "force": cmd.force})

        def progress_for(path: Path) -> Callable[[float, float], None] | None:
            if not cmd.progress:
                return None
            last = [0.0]

            def progress(done: float, total: float) -> None:  # in the packager's thread
                now = time.monotonic()
                if now - last[0] < PROGRESS_EVERY_S and done < total:
                    return
                last[0] = now
                ev = {"event": "progress", "path": str(path), "done": done, "total": total}
                loop.call_soon_threadsafe(_write_quietly, writer, ev)

            return progress

        failed = [0]

        def on_result(res: Any) -> None:
            failed[0] += 0 if res.ok else 1
            _write_quietly(writer, {"event": "result", "result": res.as_json()})

        job = asyncio.ensure_future(
            self.ingestor.ingest_many(
                cmd.paths,
                force=cmd.force,
                progress_for=progress_for,
                on_result=on_result,
                options=options,
            )
        )
        # The client only reads from here on: end of input means it has gone (Ctrl-C, killed).
        gone = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not job.done():
                log.info("control client went away; cancelling its ingest")
                job.cancel()
                await asyncio.gather(job, return_exceptions=True)
                return
            try:
                results = job.result()
            except Exception:
                log.exception("control ingest failed")
                await _send(writer, {"event": "error", "message": "internal error", "exit_code": 1})
                return
            await _send(writer, {"event": "end", "files": len(results), "failed": failed[0]})
        finally:
            gone.cancel()
            if not job.done():
                job.cancel()
                await asyncio.gather(job, return_exceptions=True)


def _write_quietly(writer: asyncio.StreamWriter, ev: dict[str, Any]) -> None:
    if not writer.is_closing():
        writer.write(_event(ev))


async def _send(writer: asyncio.StreamWriter, ev: dict[str, Any]) -> None:
    _write_quietly(writer, ev)
    await writer.drain()
