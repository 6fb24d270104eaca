"""Where a node's files and local sockets live: a leaf every layer may import.

The default state directory, the control socket's name and line limit, and the Unix-socket
helpers shared by the control socket (:mod:`peerd.control`, :mod:`peerd.ctl`) and the HTTP
service. Standard library only: the light ``peerd ingest`` path imports it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

DEFAULT_STATE_DIR = Path("~/.local/share/peerd")
SOCKET_NAME = "control.sock"
MAX_LINE = 1 << 20
"""Longest control request or event line either side accepts."""


@contextlib.contextmanager
def short_path(directory: Path) -> Iterator[str]:
    """A name of ``directory`` short enough for ``sockaddr_un`` (108 bytes), while open.

    Long state paths (deep test folders, say) would not fit: through an ``O_PATH`` descriptor,
    ``/proc/self/fd/N`` names the same directory in ~20 bytes.
    """
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def listen_unix(directory: Path, name: str, backlog: int = 16) -> socket.socket:
    """A listening, non-blocking Unix socket ``directory/name``, mode 0600.

    A socket file already there is replaced (the caller holds the state lock, so it is a dead
    daemon's); the bind goes through :func:`short_path`, so long directories work.
    """
    path = directory / name
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_path(directory) as d:
            if path.is_socket():
                path.unlink()
            sock.bind(f"{d}/{name}")
        # Owner only before anyone can connect: nothing listens until listen().
        path.chmod(0o600)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
