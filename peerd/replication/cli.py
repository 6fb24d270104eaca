"""``peerd replicate push|pull|status``: replication by hand, with progress bars.

``push [MEDIA_ID ...]`` promotes the named media (default: every media item and every local blob
R2 lacks) and works the outbox until it is empty, showing bytes verified in R2 and throughput.
It first queues again the jobs that failed for good (an earlier outage), and aborts abandoned
multipart uploads. It uses the same durable outbox as the daemon (leases keep the two from doing
a job twice), so an interrupted push resumes where it stopped: the jobs a killed process held
are taken over at once, and while another live process holds jobs, push says which process,
how many and until when. ``pull MEDIA_ID ...`` fetches media from R2,
verifying every blob. ``evict`` runs one eviction round under ``[store] quota_bytes`` (only
blobs confirmed in R2 by HEAD, never pinned ones). ``status`` shows jobs, the processes holding
leases on them, R2 states and this month's R2 requests.
Exit codes: 0 done, 1 some jobs failed (their latest attempt; a later success clears it), 2 R2
not configured.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from peerd.config import Settings
from peerd.errors import ConfigError

if TYPE_CHECKING:
    from peerd.catalog.outbox import Lease

# How often an unchanged "waiting for" line is repeated.
WAIT_NOTE_S = 30.0


def register(sub: Any) -> None:
    """Add ``replicate`` and its subcommands to the ``peerd`` parser."""
    p = sub.add_parser("replicate", help="push to / pull from R2, evict, replication status")
    rsub = p.add_subparsers(dest="replicate_command", required=True, metavar="ACTION")
    push = rsub.add_parser("push", help="upload media (default: everything R2 lacks) to R2")
    push.add_argument("media", nargs="*", help="media ids (default: all)")
    push.add_argument("--no-progress", action="store_true")
    push.set_defaults(func=_sync(_push))
    pull = rsub.add_parser("pull", help="fetch media from R2 into the local store")
    pull.add_argument("media", nargs="+", help="media ids")
    pull.add_argument("--no-progress", action="store_true")
    pull.set_defaults(func=_sync(_pull))
    ev = rsub.add_parser("evict", help="one eviction round under [store] quota_bytes")
    ev.set_defaults(func=_sync(_evict))
    st = rsub.add_parser("status", help="replication jobs, R2 states, request counts")
    st.add_argument("--json", action="store_true")
    st.add_argument("--batch", help="show one job or batch id")
    st.set_defaults(func=_sync(_status))
    cors = rsub.add_parser(
        "cors", help="set the bucket's CORS rule so players follow overflow redirects to it"
    )
    cors.add_argument(
        "--origin",
        action="append",
        help="allowed origin (repeatable; default *: a redirected request's Origin is null)",
    )
    cors.set_defaults(func=_sync(_cors))


Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


def _sync(command: Command) -> Callable[[argparse.Namespace, Settings], int]:
    return lambda args, settings: asyncio.run(command(args, settings))


@asynccontextmanager
async def open_replication(settings: Settings) -> AsyncIterator[tuple[Any, Any]]:
    """The node's runtime and a replicator, closed on exit."""
    from peerd.replication.metrics import r2_metrics
    from peerd.replication.r2 import R2Client, config_from_settings
    from peerd.replication.service import Replicator
    from peerd.runtime import open_runtime

    cfg = config_from_settings(settings)
    if cfg is None:
        raise ConfigError(
            "R2 is not configured: set [r2] bucket and account_id (or endpoint) and the secrets "
            "r2_access_key_id and r2_secret_access_key"
        )
    rt = await open_runtime(settings)
    client = R2Client(cfg, on_request=r2_metrics(rt.metrics.registry).on_request)
    try:
        yield rt, Replicator(rt, client)
    finally:
        await client.close()
        await rt.close()


def _bar(total: int, desc: str, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        disable=disable,
        smoothing=0.1,
    )


async def _push(args: argparse.Namespace, settings: Settings) -> int:
    """Promote media (or everything) and work the outbox until it is empty."""
    from peerd.catalog.media import media_not_in_r2
    from peerd.catalog.outbox import job_counts, push_backlog

    async with open_replication(settings) as (rt, rep):
        await rep.outbox.retry_failed()
        await rep.sweep_uploads()
        for m in args.media or await media_not_in_r2(rt.catalog):
            await rep.promote_media(m)
        if not args.media:
            stray: list[str] = list(await rt.catalog.not_in_r2())
            await rep.outbox.enqueue_many("push_blob", stray)
        total, count = await push_backlog(rt.catalog)
        bar = _bar(total, f"push {count} blobs", args.no_progress)
        pushed = 0

        def progress(n: int) -> None:
            # Counted here: a disabled bar counts nothing.
            nonlocal pushed
            pushed += n
            bar.update(n)

        rep.on_progress = progress
        rep.on_wait = _wait_notes()
        started = time.monotonic()
        await rep.run_until_idle()
        bar.close()
        elapsed = time.monotonic() - started
        counts = await job_counts(rt.catalog)
        failed = await rep.outbox.failed_count()
    print(
        f"pushed {pushed} bytes in {elapsed:.1f} s "
        f"({pushed / max(elapsed, 1e-9) / 1e6:.1f} MB/s); jobs: {json.dumps(counts)}"
    )
    if failed:
        print(f"{failed} jobs failed; see `peerd replicate status`", file=sys.stderr)
    return 1 if failed else 0


def _wait_notes() -> Callable[[list[Lease]], None]:
    """A printer of what a push waits for: once per change, and again every WAIT_NOTE_S."""
    last: list[tuple[int, int]] = []
    last_at = 0.0

    def note(leases: list[Lease]) -> None:
        nonlocal last, last_at
        now = time.monotonic()
        key = sorted((lease.holder.pid, lease.jobs) for lease in leases)
        if key == last and now - last_at < WAIT_NOTE_S:
            return
        last, last_at = key, now
        for lease in leases:
            until = datetime.datetime.fromtimestamp(lease.until, datetime.UTC)
            print(
                f"waiting for {lease.jobs} jobs held by process {lease.holder.pid} "
                f"(another push or the daemon), leased until {until:%H:%M:%S} UTC",
                file=sys.stderr,
                flush=True,
            )

    return note


async def _pull(args: argparse.Namespace, settings: Settings) -> int:
    """Pull media from R2."""
    async with open_replication(settings) as (_rt, rep):
        for media_id in args.media:
            bar = _bar(0, f"pull {media_id[:16]}", args.no_progress)
            rep_ = await rep.pull_media(media_id, progress=bar.update)
            bar.close()
            print(
                f"{media_id}: {rep_.blobs} blobs, {rep_.fetched} fetched "
                f"({rep_.bytes} bytes), {'recorded' if rep_.recorded else 'already catalogued'}"
            )
    return 0


async def _evict(args: argparse.Namespace, settings: Settings) -> int:
    """Evict blobs confirmed in R2 until the store is under its low watermark."""
    from peerd.replication.tiering import TieringService

    async with open_replication(settings) as (rt, rep):
        evicted, refused = await TieringService(rt, rep, rep.client).evict(time.time())
        print(
            f"evicted {evicted} blobs, {refused} not confirmed in R2; "
            f"store holds {rt.store.used_bytes} bytes (quota {rt.store.quota_bytes})"
        )
    return 0


async def _cors(args: argparse.Namespace, settings: Settings) -> int:
    """PutBucketCors on the node's bucket (README "Uplink budget and overflow to R2")."""
    from peerd.replication.r2 import R2Client, config_from_settings

    cfg = config_from_settings(settings)
    if cfg is None:
        raise ConfigError("R2 is not configured (see `peerd replicate push`)")
    client = R2Client(cfg)
    try:
        await client.put_cors(args.origin or ["*"])
    finally:
        await client.close()
    print(f"CORS set on bucket {cfg.bucket}: GET/HEAD from {', '.join(args.origin or ['*'])}")
    return 0


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    """Show replication state."""
    from peerd.catalog import Catalog
    from peerd.catalog.media import media_by_r2_state
    from peerd.catalog.outbox import Outbox, job_counts, recent_errors
    from peerd.catalog.usage import usage_since

    if not settings.catalog_path.exists():
        print(f"no node at {settings.state_dir} (run `peerd init`)", file=sys.stderr)
        return 1
    cat = await Catalog.open(settings.catalog_path)
    try:
        outbox = Outbox(cat)
        if args.batch:
            from peerd.replication.service import Replicator

            info: dict[str, Any] = await Replicator.job_status_of(outbox, args.batch)
        else:
            month = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-01")
            info = {
                "configured": settings.r2.configured,
                "jobs": await job_counts(cat),
                "leases": [
                    {"pid": lease.holder.pid, "jobs": lease.jobs, "until": lease.until}
                    for lease in await outbox.leases()
                ],
                "blobs_by_r2_state": await cat.blobs_by_r2_state(),
                "media_by_r2_state": await media_by_r2_state(cat),
                "requests_this_month": await usage_since(cat, "r2_requests", month),
                "recent_errors": await recent_errors(cat),
            }
    finally:
        await cat.close()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:22} {json.dumps(v)}")
    return 0
