"""``peerd ingest PATH...``: package files or folders into this node's store and catalog.

Prints one line per file (or a JSON object with ``--json``) and exits 1 if any file failed;
the rest of the batch still runs. A tqdm bar on stderr shows progress in media seconds and the
speed in x real time. ``--watch`` keeps watching the folders and ingests new or changed files
once they stop growing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerd.config import Settings

if TYPE_CHECKING:
    # The packager (PyAV), the catalog and the store are imported when `ingest` runs, not when
    # the CLI builds its parser for some other command.
    from peerd.media.ingest import IngestResult, ProgressFn


def register(sub: Any) -> None:
    """Add the ``ingest`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("ingest", help="package media files or folders into HLS blobs")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    p.add_argument("--watch", action="store_true", help="keep watching the folders")
    p.add_argument("--force", action="store_true", help="re-package files already ingested")
    p.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    p.add_argument("--container", choices=["fmp4", "ts"], help="override [media] container")
    p.add_argument("--segment-seconds", type=float, help="override [media] segment_seconds")
    p.add_argument("--transcode", choices=["auto", "always"], help="override [media] transcode")
    p.add_argument("--max-height", type=int, help="override [media] max_height")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ingest)


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``peerd ingest``."""
    media = settings.media
    overrides = {
        "container": args.container,
        "segment_seconds": args.segment_seconds,
        "transcode": args.transcode,
        "max_height": args.max_height,
    }
    update = {k: v for k, v in overrides.items() if v is not None}
    if update:
        settings.media = media.model_validate({**media.model_dump(), **update})
    try:
        return asyncio.run(_ingest(args, settings))
    except KeyboardInterrupt:
        return 130


def _print(res: IngestResult, as_json: bool) -> None:
    if as_json:
        obj = dataclasses.asdict(res)
        obj["path"] = str(res.path)
        obj["speed"] = round(res.speed, 3)
        print(json.dumps(obj), flush=True)
    elif not res.ok:
        print(f"FAIL {res.error}", flush=True)
    elif res.skipped:
        print(f"same {res.path} -> {res.media_id} (unchanged, already ingested)", flush=True)
    else:
        print(
            f"ok   {res.path} -> {res.media_id} [{','.join(res.renditions)}] "
            f"{res.new_blobs} new / {res.reused_blobs} reused blobs, "
            f"{res.bytes_added / 1e6:.1f} MB, {res.duration_s:.1f} s of media in "
            f"{res.wall_s:.2f} s ({res.speed:.1f}x real time)",
            flush=True,
        )


def _bar_factory(enabled: bool) -> Any:
    def make(path: Path) -> ProgressFn | None:
        if not enabled:
            return None
        from tqdm import tqdm

        bar: Any = None
        started = time.monotonic()

        def progress(done: float, total: float) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(
                    total=round(total, 1),
                    unit="s",
                    desc=path.name[:30],
                    file=sys.stderr,
                    leave=False,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s "
                    "[{elapsed}<{remaining}{postfix}]",
                )
            elapsed = max(time.monotonic() - started, 1e-6)
            bar.update(max(0.0, round(done, 1) - bar.n))
            bar.set_postfix_str(f"{done / elapsed:.1f}x real time", refresh=False)
            if total and done >= total:
                bar.close()

        return progress

    return make


async def _open_store(settings: Settings) -> Any:
    """The node's catalog and blob store: all that ingesting needs.

    Not `open_runtime`: the node key (cryptography) and the metrics registry (prometheus) are
    of no use to a one-shot CLI run and cost ~50 ms of imports at every start.
    """
    from peerd.catalog import Catalog
    from peerd.store import BlobStore

    await asyncio.to_thread(settings.state_dir.mkdir, parents=True, exist_ok=True, mode=0o750)
    catalog = await Catalog.open(settings.catalog_path)
    store = BlobStore(
        settings.blob_dir,
        catalog,
        quota_bytes=settings.store.quota_bytes,
        min_free_bytes=settings.store.min_free_bytes,
    )
    try:
        await store.open()
    except BaseException:
        await catalog.close()
        raise
    return store


async def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    from peerd.media.ingest import Ingestor

    store = await _open_store(settings)
    try:
        ing = Ingestor(store.catalog, store, settings.media.packaging_options())
        bars = _bar_factory(not args.no_progress and not args.json and sys.stderr.isatty())
        if args.watch:
            dirs = [p for p in args.paths if p.is_dir()]
            if not dirs:
                print("peerd: --watch needs at least one folder", file=sys.stderr)
                return 2
            await ing.watch(
                dirs,
                settle_s=settings.media.watch_settle_s,
                interval_s=settings.media.watch_interval_s,
                on_result=lambda r: _print(r, args.json),
            )
            return 0
        results = await ing.ingest_many(
            args.paths,
            force=args.force,
            progress_for=bars,
            on_result=lambda r: _print(r, args.json),
        )
        if not results:
            print("peerd: no media files found", file=sys.stderr)
            return 1
        return 0 if all(r.ok for r in results) else 1
    finally:
        await store.catalog.close()
