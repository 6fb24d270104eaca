"""A blob-writing workload for crash tests: ``python -m tests.support.crashwriter STATE JOURNAL``.

Stores random blobs (whole puts, batches of 1-5 through ``put_many``, streamed puts; 1 KiB -
2 MiB) and deletes some, forever, through the real runtime. It appends to JOURNAL, fsynced,
*after* each operation returns: ``put <cid>`` once the blob is committed, ``batch <cid>...``
before a ``put_many`` starts, ``del- <cid>`` before a delete starts and ``del+ <cid>`` after it
returns. A test kills it with SIGKILL at a random moment and then checks that every committed,
not-deleted blob is present and intact after recovery, and that a batch cut short by the kill
committed all of its blobs or none.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from peerd.config import load_settings
from peerd.core.ids import cid_of
from peerd.runtime import open_runtime
from tests.support.store import put_many


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def main(state: Path, journal: Path) -> None:
    """Run the workload until killed."""
    settings = load_settings(None, node={"state_dir": state})
    rt = await open_runtime(settings)
    if await rt.catalog.get_state("clean_shutdown") != "1":
        await rt.store.recover()
    await rt.catalog.set_state("clean_shutdown", "0")
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    rng = random.Random()  # noqa: S311 - test workload, not security

    def note(line: str) -> None:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)

    held: list[str] = []
    sys.stdout.write("started\n")
    sys.stdout.flush()
    while True:
        roll = rng.random()
        if roll < 0.2 and held:
            cid = held.pop(rng.randrange(len(held)))
            await asyncio.to_thread(note, f"del- {cid}")
            await rt.store.delete(cid)  # type: ignore[arg-type]
            await asyncio.to_thread(note, f"del+ {cid}")
            continue
        if roll < 0.45:
            # A batch (the ingest path): every blob committed together or none of them.
            items = [
                (rng.randbytes(rng.randint(1024, 1024 * 1024)), "segment")
                for _ in range(rng.randint(1, 5))
            ]
            names = " ".join(cid_of(d) for d, _ in items)
            await asyncio.to_thread(note, f"batch {names}")
            for cid in await put_many(rt.store, items):
                held.append(cid)
                await asyncio.to_thread(note, f"put {cid}")
            continue
        data = rng.randbytes(rng.randint(1024, 2 * 1024 * 1024))
        if roll < 0.7:
            cid = await rt.store.put(data)
        else:
            cid = await rt.store.put_stream(_chunks(data, 65536), expected=cid_of(data))
        held.append(cid)
        await asyncio.to_thread(note, f"put {cid}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
