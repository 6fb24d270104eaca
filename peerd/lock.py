"""One daemon per state directory: an exclusive ``flock`` on ``<state>/peerd.lock``."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from peerd.errors import ConfigError


class StateLock:
    """Held while a daemon (or a repairing ``peerd verify``) owns the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "peerd.lock"
        self._fd: int | None = None

    def __enter__(self) -> StateLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"another peerd is using {self.path.parent} (lock {self.path} is held)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
