"""HLS serving: peerd vs nginx on the same media in the same run, alternating, with wrk.

    .venv/bin/python scripts/bench/serve_bench.py [HLSDIR]

HLSDIR is an ffmpeg-written HLS rendition (default ``/tmp/peerd-bench/hls/ts``, made by
``../shared/bench/make_media.sh``: 30 segments of ~3 MB). Its files are imported into a fresh
peerd state dir under /tmp (blobs + manifest + catalog rows), so both servers send the same bytes.
nginx serves the directory as files (``../shared/bench/nginx_conf.sh``); peerd runs as
``python -m peerd run`` with signed URLs (a generated key) as a viewer would use them.

Workloads (``../shared/bench/wrkrun.sh``; T=2 threads, C=64 connections, D=5s, REPS=3, order
alternating per rep): ``playlist`` (the media playlist, fixed URL) and ``segments`` (rotating over
every segment). Before each run the script waits (bounded) for the machine to be under 10% busy
and records ``other_cores``: CPU used by everything except the server and wrk during the run
(cores; >0.2 means a noisy neighbour). Prints a table of medians and the ratios peerd/nginx.
Raw JSON lines go to /tmp/peerd-bench-serve/results.jsonl.

peerd runs with ``http.fast_path = FAST_PATH`` (default 1, the configured default; 0 lets
aiohttp serve everything); the setting is in every JSON row and in the table.

Env: REPS (3), D (5s), C (64), T (2), FAST_PATH (1), QUIET_THRESH (10 %), QUIET_MAX (20 s),
SERVERS (``peerd,nginx``). ``peerd-budget`` in SERVERS adds peerd with an uplink budget it never
reaches (``[uplink] budget_mbps`` = 10^6): every request pays the send-side rate accounting and
the stream admission, no request is redirected; the ratio peerd-budget/peerd is its cost.
``peerd-cmcd`` in SERVERS adds peerd asked with hls.js's CMCD query argument on every request
(one session's data: sorted keys, ``nor`` naming the next segment; playback analytics on, as
by default): the ratio peerd-cmcd/peerd is the cost of CMCD intake on the hot path.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The shared bench tools sit in ``shared/bench`` next to the checkout (or next to the folder
# holding its worktrees); SHARED_BENCH names them elsewhere.
SHARED = Path(
    os.environ.get("SHARED_BENCH")
    or next(
        (p / "shared" / "bench" for p in ROOT.parents if (p / "shared" / "bench").is_dir()),
        ROOT.parent / "shared" / "bench",
    )
)
WORK = Path("/tmp/peerd-bench-serve")
HZ = os.sysconf("SC_CLK_TCK")

sys.path.insert(0, str(ROOT))

from peerd.config import load_settings  # noqa: E402
from peerd.core import tokens  # noqa: E402
from peerd.runtime import open_runtime  # noqa: E402
from tests.support.hlsmedia import import_hls, read_hls  # noqa: E402


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stat_ticks() -> tuple[int, int, int]:
    """(busy, total, user+nice+system+irq+softirq) jiffies of the whole machine."""
    with Path("/proc/stat").open() as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    total = sum(v)
    return total - v[3] - v[4], total, v[0] + v[1] + v[2] + v[5] + v[6]


def wait_quiet(thresh: float, max_s: float) -> None:
    """Wait (bounded) until the machine is less than ``thresh`` % busy."""
    start = time.monotonic()
    while True:
        b0, t0, _ = stat_ticks()
        time.sleep(0.5)
        b1, t1, _ = stat_ticks()
        if (b1 - b0) * 100 < thresh * max(t1 - t0, 1):
            return
        if time.monotonic() - start > max_s:
            print(f"machine not quiet after {max_s}s, measuring anyway", file=sys.stderr)
            return


def session_cpu(sid: int) -> float:
    """CPU seconds (user+sys) of every live process in session ``sid``."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            total += int(fields[11]) + int(fields[12])
    return total / HZ


async def prepare_peerd(hlsdir: Path, state: Path, key_text: str) -> tuple[str, list[str]]:
    """Import the rendition into a peerd state dir; returns (media id, segment cids)."""
    sdir = state / "secrets"
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / "hls_signing_key").write_text(key_text + "\n")
    settings = load_settings(None, node={"state_dir": state, "secrets_dir": sdir})
    rt = await open_runtime(settings)
    try:
        mid, manifest = await import_hls(rt, read_hls(hlsdir / "index.m3u8"), title="bench")
    finally:
        await rt.close()
    return mid, [str(s.cid) for s in manifest.renditions[0].segments]


def wait_http(url: str, timeout_s: float = 30) -> None:
    """Poll ``url`` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a server in its own session (so its CPU and children can be summed and stopped)."""
    return subprocess.Popen(  # noqa: S603
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(WORK / "server.log").open("ab"),
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's session; kill it if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


FAST_PATH = os.environ.get("FAST_PATH", "1") != "0"


def measure(
    server: str, workload: str, rep: int, sid: int, url: str, paths: Path | None
) -> dict[str, object]:
    """One wrk run with CPU accounting; returns the JSON row."""
    wait_quiet(
        float(os.environ.get("QUIET_THRESH", "10")), float(os.environ.get("QUIET_MAX", "20"))
    )
    timefile = WORK / "wrk.time"
    env = dict(os.environ, WRK_TIME_FILE=str(timefile))
    env.setdefault("D", "5s")
    env.setdefault("C", "64")
    env.setdefault("T", "2")
    _, _, m0 = stat_ticks()
    c0 = session_cpu(sid)
    cmd = ["bash", str(SHARED / "wrkrun.sh"), url] + ([str(paths)] if paths else [])
    with (WORK / "wrk.log").open("ab") as log:
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, check=True)  # noqa: S603
    c1 = session_cpu(sid)
    _, _, m1 = stat_ticks()
    wrk = json.loads(out.stdout)
    u, s = (float(x) for x in timefile.read_text().split()[:2])
    dur = float(wrk.get("duration_s", 5.0))
    other = max(0.0, ((m1 - m0) / HZ - (c1 - c0) - (u + s)) / dur)
    row = {
        "server": server,
        "workload": workload,
        "rep": rep,
        "peerd_fast_path": FAST_PATH,
        "server_cpu_s": round(c1 - c0, 2),
        "wrk_cpu_s": round(u + s, 2),
        "other_cores": round(other, 2),
        "wrk": wrk,
    }
    with (WORK / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(
        f"{server:6} {workload:9} rep {rep}: {wrk['rps']:>9.0f} req/s  p50 {wrk['lat_p50_ms']:.2f}"
        f" ms  p99 {wrk['lat_p99_ms']:.2f} ms  err {wrk.get('err_status', 0)}  other {other:.2f}",
        flush=True,
    )
    return row


def _cmcd(next_cid: str | None, ext: str) -> str:
    """hls.js 1.7.4's CMCD query value (``cmcd: {}``) of a segment request during playback (a
    playlist request's when ``next_cid`` is None), URL-encoded as URLSearchParams.set does."""
    sid = 'sid="0b5bd7ae-5d3e-4c8f-9f0c-5a1d6c4e7f21"'
    if next_cid is None:
        data = f"mtp=48700,ot=m,sf=h,{sid},st=v"
    else:
        nor = urllib.parse.quote(f"{next_cid}.{ext}", safe="")
        data = (
            f'bl=4200,br=1306,d=4000,dl=4200,mtp=48700,nor="{nor}",ot=av,rtp=6500,sf=h,'
            f"{sid},st=v,tb=1306"
        )
    return urllib.parse.quote_plus(data, safe="")


def main() -> int:
    """Set up both servers, alternate the workloads, print medians and ratios."""
    hlsdir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/peerd-bench/hls/ts")  # noqa: S108
    if not (hlsdir / "index.m3u8").is_file():
        print(f"no HLS rendition at {hlsdir}; run ../shared/bench/make_media.sh", file=sys.stderr)
        return 2
    reps = int(os.environ.get("REPS", "3"))
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    key_text = secrets.token_urlsafe(32)
    state = WORK / "state"
    mid, cids = asyncio.run(prepare_peerd(hlsdir, state, key_text))
    tok = tokens.mint(key_text.encode(), mid, "hls", int(time.time()) + 3600)
    ext = "m4s" if (hlsdir / "init.mp4").exists() else "ts"
    pp, np_ = free_port(), free_port()
    peerd_paths = WORK / "peerd.paths"
    peerd_paths.write_text("".join(f"/hls/{mid}/b/{c}.{ext}?token={tok}\n" for c in cids))
    cmcd_paths = WORK / "peerd-cmcd.paths"
    cmcd_paths.write_text(
        "".join(
            f"/hls/{mid}/b/{c}.{ext}?token={tok}&CMCD={_cmcd(cids[(i + 1) % len(cids)], ext)}\n"
            for i, c in enumerate(cids)
        )
    )
    nginx_paths = WORK / "nginx.paths"
    segs = read_hls(hlsdir / "index.m3u8").segments
    nginx_paths.write_text("".join(f"/{p.name}\n" for p, _ in segs))
    urls = {
        "peerd": (f"http://127.0.0.1:{pp}", f"/hls/{mid}/v0.m3u8?token={tok}", peerd_paths),
        "peerd-budget": (f"http://127.0.0.1:{pp}", f"/hls/{mid}/v0.m3u8?token={tok}", peerd_paths),
        "peerd-cmcd": (
            f"http://127.0.0.1:{pp}",
            f"/hls/{mid}/v0.m3u8?token={tok}&CMCD={_cmcd(None, ext)}",
            cmcd_paths,
        ),
        "nginx": (f"http://127.0.0.1:{np_}", "/index.m3u8", nginx_paths),
    }
    conf = subprocess.run(  # noqa: S603
        ["bash", str(SHARED / "nginx_conf.sh"), str(hlsdir), str(np_), str(WORK / "nginx")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        PEERD_NODE__STATE_DIR=str(state),
        PEERD_NODE__SECRETS_DIR=str(state / "secrets"),
        PEERD_HTTP__PORT=str(pp),
        PEERD_LOG__LEVEL="warning",
        PEERD_HTTP__FAST_PATH=str(FAST_PATH).lower(),
    )
    budget_env = dict(env, PEERD_UPLINK__BUDGET_MBPS="1000000")
    servers = {
        "peerd": lambda: start([sys.executable, "-m", "peerd", "run"], env),
        "peerd-budget": lambda: start([sys.executable, "-m", "peerd", "run"], budget_env),
        "peerd-cmcd": lambda: start([sys.executable, "-m", "peerd", "run"], env),
        "nginx": lambda: start(["nginx", "-p", str(WORK / "nginx"), "-c", conf]),
    }
    rows: list[dict[str, object]] = []
    order = os.environ.get("SERVERS", "peerd,nginx").split(",")
    for rep in range(reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            proc = servers[name]()
            try:
                base, pl, paths = urls[name]
                if name.startswith("peerd"):
                    wait_http(base + "/readyz")  # every service started: none busy starting
                wait_http(base + pl)
                rows.append(measure(name, "playlist", rep, proc.pid, base + pl, None))
                rows.append(measure(name, "segments", rep, proc.pid, base, paths))
            finally:
                stop(proc)
    print()
    print(f"peerd http.fast_path = {FAST_PATH}")
    print("| workload | server | req/s | MB/s | p50 ms | p99 ms | other_cores (max) |")
    print("|---|---|---|---|---|---|---|")
    med: dict[tuple[str, str], dict[str, float]] = {}
    for wl in ("playlist", "segments"):
        for srv in order:
            rs = [r for r in rows if r["server"] == srv and r["workload"] == wl]
            w = [r["wrk"] for r in rs]
            m = {
                k: statistics.median(float(x[k]) for x in w)  # type: ignore[index]
                for k in ("rps", "mbps", "lat_p50_ms", "lat_p99_ms")
            }
            med[(wl, srv)] = m
            other = max(float(r["other_cores"]) for r in rs)  # type: ignore[arg-type]
            print(
                f"| {wl} | {srv} | {m['rps']:.0f} | {m['mbps']:.0f} | {m['lat_p50_ms']:.2f} |"
                f" {m['lat_p99_ms']:.2f} | {other:.2f} |"
            )
    print()
    for wl in ("playlist", "segments"):
        if "peerd-budget" in order and "peerd" in order:
            b, p = med[(wl, "peerd-budget")], med[(wl, "peerd")]
            print(f"{wl}: peerd with uplink budget / without, req/s = {b['rps'] / p['rps']:.3f}x")
        if "peerd-cmcd" in order and "peerd" in order:
            c, p = med[(wl, "peerd-cmcd")], med[(wl, "peerd")]
            print(f"{wl}: peerd with CMCD / without, req/s = {c['rps'] / p['rps']:.3f}x")
            if "nginx" in order:
                n = med[(wl, "nginx")]
                print(f"{wl}: peerd with CMCD / nginx, req/s = {c['rps'] / n['rps']:.2f}x")
        if "nginx" not in order or "peerd" not in order:
            continue
        p, n = med[(wl, "peerd")], med[(wl, "nginx")]
        print(
            f"{wl}: peerd/nginx req/s = {p['rps'] / n['rps']:.2f}x, "
            f"p99 peerd {p['lat_p99_ms']:.2f} ms vs nginx {n['lat_p99_ms']:.2f} ms "
            f"({p['lat_p99_ms'] / max(n['lat_p99_ms'], 1e-9):.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
