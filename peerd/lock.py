"""One daemon per state directory: an exclusive ``flock`` on ``<state>/peerd.lock``; and the
identity of this process as a lease holder (boot id, pid, start time), for outbox leases that
other processes can tell are dead."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from peerd.core.outbox import Holder, holder_gone
from peerd.errors import ConfigError

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


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


def boot_id() -> str:
    """This machine's current boot id (a new one at every boot)."""
    return BOOT_ID.read_text("ascii").strip()


def process_started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22);
    None if there is no such process or it is a zombie (dead, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def this_process() -> Holder:
    """This process as a lease holder."""
    pid = os.getpid()
    started = process_started(pid)
    assert started is not None
    return Holder(boot_id(), pid, started)


def holder_alive(holder: Holder) -> bool:
    """Whether the process ``holder`` names still runs on this machine."""
    boot = boot_id()
    started = process_started(holder.pid)
    if started is None and not Path(f"/proc/{holder.pid}").exists() and _exists(holder.pid):
        # Alive but hidden from our /proc (systemd's ProtectProc=invisible hides other users'
        # processes): its start time cannot be compared, so the lease is honoured.
        return holder.boot == boot
    return not holder_gone(holder, boot, started)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
