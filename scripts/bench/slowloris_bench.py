"""A normal viewer's latency with and without 2,000 slowloris connections, in the same run.

    .venv/bin/python scripts/bench/slowloris_bench.py [--conns 2000] [--seconds 8]

A real daemon (``python -m peerd run``, the ``[http]`` defaults unless HEADER_TIMEOUT_S,
KEEPALIVE_TIMEOUT_S or MAX_CONNECTIONS are set) serves a small MPEG-TS rendition made by the
ffmpeg CLI (5 segments of 2 s, 320x240). The normal client (aiohttp, this process) asks for the
media playlist and the segments in turn, one request at a time, two ways: on one keep-alive
connection (``keepalive``, as a player does) and on a new connection per request (``new_conn``,
which must get past the connection cap). Phases, alternating: ``baseline``, then ``attack``: a
second process (this script with ``--attack``) holds ``--conns`` connections open, half sending a
request head one byte every 2 s, half sending nothing, reopening every connection the server
closes 1 s later (sustained pressure). After each attack phase the attacker stops reopening,
waits for the header timeout plus 3 s and reports how many of its connections are still open.

Prints p50/p99 per phase, request kind and connection mode, the ratios attack/baseline, and the
server's ``peerd_http_connections_closed_total`` by reason. RLIMIT_NOFILE is raised to its hard
limit (the attacker needs one descriptor per connection). Raw rows go to
/tmp/peerd-bench-slowloris/results.jsonl.

Env: REPS (2: baseline/attack pairs), HEADER_TIMEOUT_S, KEEPALIVE_TIMEOUT_S, MAX_CONNECTIONS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
WORK = Path("/tmp/peerd-bench-slowloris")  # noqa: S108
sys.path.insert(0, str(ROOT))

from peerd.config import HttpSettings, load_settings  # noqa: E402
from peerd.core import tokens  # noqa: E402
from peerd.runtime import open_runtime  # noqa: E402
from tests.support.hlsmedia import import_hls, make_hls, read_hls  # noqa: E402

HEAD = b"GET /healthz HTTP/1.1\r\nHost: node\r\n"


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard one; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- the attacker (a separate process, so its loop does not delay the normal client) ----------


async def attack(host: str, port: int, n: int) -> None:
    """Hold ``n`` slow connections; reopen closed ones until stdin says ``hold``; then answer
    ``count`` with how many are still open, and exit at EOF."""
    loop = asyncio.get_running_loop()
    opened = closed_by_server = 0
    open_now: set[asyncio.StreamWriter] = set()
    reopen = True

    async def one(k: int) -> None:
        nonlocal opened, closed_by_server
        while True:
            try:
                r, w = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.5)
                continue
            opened += 1
            open_now.add(w)
            slow = k % 2 == 0
            try:
                if slow:
                    w.write(HEAD[:1])
                sent = 1
                while True:
                    # One byte of the head every 2 s (or nothing); EOF or reset: the server closed.
                    try:
                        data = await asyncio.wait_for(r.read(4096), 2.0)
                        if not data:
                            break
                    except TimeoutError:
                        if slow:
                            w.write(HEAD[sent % len(HEAD) : sent % len(HEAD) + 1])
                            sent += 1
            except (ConnectionError, OSError):
                pass
            open_now.discard(w)
            closed_by_server += 1
            w.close()
            if not reopen:
                return
            await asyncio.sleep(1.0)

    tasks = []
    for k in range(n):
        tasks.append(asyncio.ensure_future(one(k)))
        if k % 100 == 99:
            await asyncio.sleep(0)  # let accepts and the first bytes through
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"started": n}), flush=True)
    while line := (await reader.readline()).strip():
        if line == b"hold":
            reopen = False
        print(
            json.dumps(
                {"open": len(open_now), "opened": opened, "closed_by_server": closed_by_server}
            ),
            flush=True,
        )
    for t in tasks:
        t.cancel()


# -- the normal client ------------------------------------------------------------------------


async def client(base: str, paths: list[str], seconds: float, new_conn: bool) -> list[dict]:
    """Requests one at a time for ``seconds``; rows of (kind, ms, status)."""
    rows = []
    connector = aiohttp.TCPConnector(limit=1, force_close=new_conn)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as s:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            path = paths[i % len(paths)]
            kind = "playlist" if ".m3u8" in path else "segment"
            t0 = time.perf_counter()
            try:
                async with s.get(path) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = type(exc).__name__
            rows.append({"kind": kind, "ms": (time.perf_counter() - t0) * 1000, "status": status})
            i += 1
    return rows


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``xs``, nearest rank."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * len(xs)) - 1))]


async def prepare(state: Path, key_text: str) -> tuple[str, list[str]]:
    """A small rendition imported into a fresh state dir; (media id, segment cids)."""
    pl = make_hls(WORK / "media", "ts", seconds=10)
    # 1 s segments would need other ffmpeg flags; 2 s is what make_hls writes.
    sdir = state / "secrets"
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / "hls_signing_key").write_text(key_text + "\n")
    rt = await open_runtime(load_settings(None, node={"state_dir": state, "secrets_dir": sdir}))
    try:
        mid, manifest = await import_hls(rt, read_hls(pl), title="slowloris")
    finally:
        await rt.close()
    return mid, [str(s.cid) for s in manifest.renditions[0].segments]


def wait_http(url: str, timeout_s: float = 30) -> None:
    """Poll ``url`` until it answers 200."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310
                if r.status == 200:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


async def ask(proc: asyncio.subprocess.Process, line: bytes) -> dict:
    """Send a command line to the attacker; its JSON answer."""
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(line + b"\n")
    await proc.stdin.drain()
    return dict(json.loads(await proc.stdout.readline()))


async def run(args: argparse.Namespace) -> int:
    """The whole benchmark."""
    nofile = raise_nofile()
    if nofile < args.conns + 256:
        print(f"RLIMIT_NOFILE hard limit {nofile} is too low for {args.conns}", file=sys.stderr)
        return 2
    await asyncio.to_thread(shutil.rmtree, WORK, ignore_errors=True)
    await asyncio.to_thread(WORK.mkdir, parents=True)
    key_text = secrets.token_urlsafe(32)
    state = WORK / "state"
    mid, cids = await prepare(state, key_text)
    tok = tokens.mint(key_text.encode(), mid, "hls", int(time.time()) + 3600)
    paths = []
    for c in cids:
        paths += [f"/hls/{mid}/v0.m3u8?token={tok}", f"/hls/{mid}/b/{c}.ts?token={tok}"]
    defaults = HttpSettings()
    http = {
        "header_timeout_s": float(os.environ.get("HEADER_TIMEOUT_S", defaults.header_timeout_s)),
        "keepalive_timeout_s": float(
            os.environ.get("KEEPALIVE_TIMEOUT_S", defaults.keepalive_timeout_s)
        ),
        "max_connections": int(os.environ.get("MAX_CONNECTIONS", defaults.max_connections)),
    }
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        PEERD_NODE__STATE_DIR=str(state),
        PEERD_NODE__SECRETS_DIR=str(state / "secrets"),
        PEERD_HTTP__PORT="0",
        PEERD_LOG__LEVEL="info",
        PEERD_MDNS__ENABLED="false",
        PEERD_P2P__ENABLED="false",
        **{f"PEERD_HTTP__{k.upper()}": str(v) for k, v in http.items()},
    )
    log = await asyncio.to_thread((WORK / "daemon.log").open, "ab")
    daemon = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "peerd",
        "run",
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    attacker: asyncio.subprocess.Process | None = None
    rows: list[dict] = []
    try:
        addr = state / "http.addr"
        for _ in range(300):
            if addr.exists():
                break
            await asyncio.sleep(0.1)
        host, _, port = addr.read_text().strip().rpartition(":")
        base = f"http://{host}:{port}"
        await asyncio.to_thread(wait_http, base + "/readyz")
        await client(base, paths, 1.0, False)  # warm: manifest cached, files open
        remaining: dict | None = None
        for rep in range(args.reps):
            for phase in ("baseline", "attack"):
                if phase == "attack":
                    attacker = await asyncio.create_subprocess_exec(
                        sys.executable,
                        __file__,
                        "--attack",
                        f"{host}:{port}",
                        "--conns",
                        str(args.conns),
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                    )
                    assert attacker.stdout is not None
                    json.loads(await attacker.stdout.readline())
                    # Until the attacker holds its connections (or the server sheds them).
                    for _ in range(100):
                        st = await ask(attacker, b"count")
                        if st["opened"] >= args.conns:
                            break
                        await asyncio.sleep(0.2)
                for mode in ("keepalive", "new_conn"):
                    got = await client(base, paths, args.seconds, mode == "new_conn")
                    for r in got:
                        r.update(rep=rep, phase=phase, mode=mode)
                    rows += got
                    print(f"rep {rep} {phase:8} {mode:9} {len(got)} requests", flush=True)
                if attacker is not None:
                    st = await ask(attacker, b"hold")
                    print(f"  attacker during the phase: {st}", flush=True)
                    await asyncio.sleep(http["header_timeout_s"] + 3)
                    remaining = await ask(attacker, b"count")
                    print(f"  attacker after the header timeout: {remaining}", flush=True)
                    assert attacker.stdin is not None
                    attacker.stdin.close()
                    await attacker.wait()
                    attacker = None
        async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
            metrics = await r.text()
    finally:
        if attacker is not None:
            attacker.kill()
            await attacker.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGTERM)
        await asyncio.wait_for(daemon.wait(), 30)
        log.close()
    with (WORK / "results.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print()
    print(f"daemon [http] {http}; attack: {args.conns} connections, {args.seconds} s per mode")
    print("| mode | kind | baseline p50 ms | baseline p99 ms | attack p50 ms | attack p99 ms |"
          " p50 ratio | p99 ratio | errors (attack) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in ("keepalive", "new_conn"):
        for kind in ("playlist", "segment"):
            stat = {}
            for phase in ("baseline", "attack"):
                sel = [r for r in rows if (r["mode"], r["kind"], r["phase"]) == (mode, kind, phase)]
                ok = [r["ms"] for r in sel if r["status"] == 200]
                stat[phase] = (pct(ok, 0.5), pct(ok, 0.99), len(sel) - len(ok))
            (b50, b99, _), (a50, a99, aerr) = stat["baseline"], stat["attack"]
            print(
                f"| {mode} | {kind} | {b50:.2f} | {b99:.2f} | {a50:.2f} | {a99:.2f} |"
                f" {a50 / b50:.2f}x | {a99 / b99:.2f}x | {aerr} |"
            )
    closed = dict(
        re.findall(r'peerd_http_connections_closed_total\{reason="(\w+)"\} (\S+)', metrics)
    )
    print()
    print(f"server closes by reason: {closed}")
    still = remaining["open"] if remaining else "?"
    print(
        f"attack connections still open {http['header_timeout_s'] + 3:.0f} s after the attacker"
        f" stopped reopening: {still} of {args.conns}"
    )
    return 0


def main() -> int:
    """Run the benchmark, or (``--attack HOST:PORT``) be its attacker."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=8.0, help="per phase and connection mode")
    ap.add_argument("--reps", type=int, default=int(os.environ.get("REPS", "2")))
    ap.add_argument("--attack", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.attack:
        raise_nofile()
        host, _, port = args.attack.rpartition(":")
        asyncio.run(attack(host, int(port), args.conns))
        return 0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
