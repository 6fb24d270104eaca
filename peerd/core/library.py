"""Which local paths the daemon's API may ingest: only files under the configured library roots.

Pure: takes already-resolved paths (symlinks followed, no ``..`` left) and answers; resolving is
the caller's I/O. An API caller holding the token must not make the node read arbitrary files
(``/etc/...``, the node's own state), so a path outside every root is refused, not ingested.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePath


def within_roots(path: PurePath, roots: Iterable[PurePath]) -> bool:
    """True if resolved ``path`` is one of the resolved ``roots`` or lies under one."""
    if not path.is_absolute():
        return False
    return any(root.is_absolute() and path.is_relative_to(root) for root in roots)
