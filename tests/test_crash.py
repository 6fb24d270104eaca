"""Crash safety of the blob store: SIGKILL a writer at 50+ random moments.

After each kill, start-up recovery (``peerd verify --repair``) must leave zero corrupt blobs,
zero orphans and zero temp files, and every blob whose ``put`` was journalled (committed) and not
deleted since must still be present and intact (``peerd verify`` re-hashes everything). A
``put_many`` batch killed midway must have committed all of its blobs or none.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.process import peerd_env, run_cli

KILLS = 52


def _inflight_batch(journal: Path) -> set[str]:
    """The cids of a ``put_many`` that started and was not journalled as done (else empty)."""
    batch: set[str] = set()
    if not journal.exists():
        return batch
    for line in journal.read_text().splitlines():
        op, _, rest = line.partition(" ")
        if op == "batch":
            batch = set(rest.split())
        elif op == "put":
            batch.clear()
    return batch


def _expected(journal: Path) -> tuple[set[str], set[str]]:
    """(must be present, may be either way) from the journal."""
    must: set[str] = set()
    maybe: set[str] = set()
    if not journal.exists():
        return must, maybe
    for line in journal.read_text().splitlines():
        op, _, cid = line.partition(" ")
        if op == "put":
            must.add(cid)
            maybe.discard(cid)
        elif op == "del-":
            must.discard(cid)
            maybe.add(cid)
        elif op == "del+":
            maybe.discard(cid)
    return must, maybe


# Tens of seconds on a quiet machine; CI machines may be several times slower.
@pytest.mark.timeout(400)
def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = tmp_path / "journal"
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    kills = 0
    batches_cut = 0
    repaired = {"temp_removed": 0, "orphans_removed": 0, "marked_absent": 0}
    for _ in range(KILLS):
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "tests.support.crashwriter", str(state), str(journal)],
            env=peerd_env(),
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        proc.stdout.close()
        kills += 1

        res = run_cli("verify", "--repair", "--json", state_dir=state)
        report = json.loads(res.stdout)
        rec = json.loads(res.stderr.split("repair: ", 1)[1].splitlines()[0])
        for key in repaired:
            repaired[key] += rec[key]
        assert res.returncode == 0, report
        assert report["ok"], report

        must, _maybe = _expected(journal)
        rows = _present(state)
        lost = must - rows
        assert not lost, f"after kill {kills}: committed blobs lost: {sorted(lost)[:5]}"
        batch = _inflight_batch(journal)
        if batch:
            batches_cut += 1
            part = batch & rows
            assert part in (set(), batch), f"after kill {kills}: half a batch committed"
    assert kills >= 50
    must, _ = _expected(journal)
    assert len(must) > 20  # the workload really wrote things between kills
    # Some kills landed mid-write: recovery had temp files or orphans to clean up.
    assert repaired["temp_removed"] + repaired["orphans_removed"] > 0, repaired
    print("recovery totals over", kills, "kills:", repaired, "batches cut:", batches_cut)


def _present(state: Path) -> set[str]:
    import sqlite3

    con = sqlite3.connect(state / "catalog.sqlite3")
    try:
        return {r[0] for r in con.execute("SELECT cid FROM blobs WHERE local_state='present'")}
    finally:
        con.close()
