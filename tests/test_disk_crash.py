"""G3 disk tier crash test: a writer is SIGKILLed at random moments, again and again, in one directory.

The child acknowledges each block on a pipe only after ``put`` returned it as stored. After every
kill, reopening must find every acknowledged block, bit-exact, and ``check(deep=True)`` must find
no block whose bytes fail verification.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kvbm_fs.keys import BlockKeys
from kvbm_fs.testing import NS_A, blocks_for, require_nixl
from kvbm_fs.tiers.disk import HEADER_PAGE, DiskTier
from kvbm_fs.tiers.disk.index import DiskIndex

REPO = Path(__file__).resolve().parents[1]
BN = NS_A.block_nbytes
SLOT = HEADER_PAGE + BN
SLOTS, SEG = 128, 16  # room for everything alive at once, so nothing acknowledged is ever evicted
KILLS = 60
KILLS_DEVICE = 20  # the device-path writer starts torch and NIXL: slower to start, fewer kills
KEEP = 32  # acknowledged blocks carried over to the next run; the rest are deleted between runs

# Cheap to start: numpy and the disk tier only (no torch, no pytest). Block bytes are derived from
# the key exactly as kvbm_fs.testing.block_bytes does, which the parent checks on every read.
CHILD = """
import sys
import numpy as np
from kvbm_fs.keys import BlockKeys
from kvbm_fs.tiers.disk import DiskTier
path, ns, base, slots, seg, nbytes, seed = sys.argv[1], *map(int, sys.argv[2:8])
device = sys.argv[8] == "device"  # tensors through the device path (NIXL POSIX, dsum128, gds_write)
if device:
    import torch
slot = 4096 + nbytes
M = 0xFFFFFFFF
def content(h):
    return np.random.default_rng([ns & M, ns >> 32, h & M, h >> 32]).integers(0, 256, nbytes, dtype=np.uint8)
def say(tag, hs):
    print(tag, *(format(h, "x") for h in hs), flush=True)  # one short line: one atomic pipe write
opts = dict(gds="posix", gds_write=True) if device else {}
t = DiskTier(path, nbytes, slots * slot, segment_bytes=seg * slot, **opts)
rows = torch.from_numpy if device else (lambda a: a)
print("R", flush=True)
rng = np.random.default_rng(seed)
live, n = [], base
while True:
    k = int(rng.integers(1, 9))
    hs = np.arange(n, n + k, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    n += k
    keys = BlockKeys.chain(ns, hs)
    ok = t.put(keys, rows(np.stack([content(h) for h in hs.tolist()])))
    say("A", hs[ok].tolist())
    live.append(hs[ok])
    if len(live) > 8:  # keep the live set bounded: announce a delete before starting it
        old = live.pop(0)
        say("D", old.tolist())
        t.delete(BlockKeys(ns, old))
    if rng.random() < 0.5:  # reads update access statistics, written with the next put
        probe = live[int(rng.integers(0, len(live)))]
        t.get(BlockKeys(ns, probe), rows(np.empty((probe.size, nbytes), np.uint8)))
"""


def open_tier(root: Path) -> DiskTier:
    return DiskTier(root, BN, SLOTS * SLOT, segment_bytes=SEG * SLOT)


def run_and_kill(root: Path, base: int, rng: random.Random, log: Path, mode: str = "host") -> list[str]:
    """Start a writer, SIGKILL it at a random moment, and return the complete lines it printed."""
    with log.open("w") as err:
        p = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), str(NS_A.id), str(base), str(SLOTS), str(SEG), str(BN),
             str(rng.randrange(1 << 30)), mode],
            cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
        assert p.stdout is not None
        if rng.random() < 0.2:  # sometimes while it starts, opens the index or reclaims slots
            time.sleep(rng.uniform(0.0, 0.25))
        else:  # mostly while it writes
            assert p.stdout.readline() == "R\n", log.read_text()
            time.sleep(rng.uniform(0.0, 0.06))
        p.kill()
        out, _ = p.communicate()
    assert p.returncode == -9, f"the writer exited by itself ({p.returncode}): {log.read_text()}"
    return [line for line in out.splitlines(keepends=True) if line.endswith("\n")]


def pending_slots(root: Path) -> int:
    """Slots reserved by a put that has not committed (a writer killed mid-put leaves some)."""
    ix = DiskIndex(str(root / "index"))
    try:
        with ix.read() as txn:
            return int(txn.stat(ix.pending)["entries"])
    finally:
        ix.close()


def verify(root: Path, expected: dict[int, None], run: int) -> None:
    """Reopen after a kill: every acknowledged block reads back bit-exact and no stored block fails
    verification. Then trim the tier to the newest KEEP acknowledged blocks."""
    t = open_tier(root)
    try:
        keys = BlockKeys(NS_A.id, np.fromiter(expected, np.uint64, len(expected)))
        out = np.zeros((len(keys), BN), np.uint8)
        found = t.get(keys, out)
        assert found.all(), f"kill {run}: {int((~found).sum())} of {len(keys)} acknowledged blocks lost"
        assert np.array_equal(out, blocks_for(keys, BN)), f"kill {run}: an acknowledged block has wrong bytes"
        rep = t.check(deep=True)
        assert rep["bad"] == 0, f"kill {run}: blocks that fail verification: {rep['bad_keys']}"
        assert rep["stale_pending"] == 0
        everything = [k for batch in t.iter_keys() for k in batch.hashes.tolist()]
        stored = BlockKeys(NS_A.id, np.array(everything, np.uint64))
        out = np.zeros((len(stored), BN), np.uint8)
        assert t.get(stored, out).all() and np.array_equal(out, blocks_for(stored, BN))
        assert len(t) <= t.num_slots
        keep = set(list(expected)[-KEEP:])
        drop = [h for h in everything if h not in keep]
        if drop:
            t.delete(BlockKeys(NS_A.id, np.array(drop, np.uint64)))
        for h in list(expected):
            if h not in keep:
                del expected[h]
    finally:
        t.close()


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acknowledged_block(tmp_path: Path, watchdog: None) -> None:
    crash_loop(tmp_path, KILLS, "host")


@pytest.mark.slow
def test_sigkill_of_a_device_path_writer_loses_no_acknowledged_block(tmp_path: Path, watchdog: None) -> None:
    """The same with tensors through the device path: header page from the host, payload by one
    NIXL transfer (gds_write), dsum128 in the header; the parent reads back on the host path and
    the deep check holds both checksums to every payload."""
    require_nixl()
    crash_loop(tmp_path, KILLS_DEVICE, "device")


def crash_loop(tmp_path: Path, kills: int, mode: str) -> None:
    root = tmp_path / "tier"
    rng = random.Random(0xC0FFEE)
    expected: dict[int, None] = {}  # acknowledged and not announced as deleted, oldest first
    acked = runs_with_writes = killed_mid_put = done = 0
    # Strength comes from enough kills landing mid-put, not from timing luck on a busy machine: kill
    # at least `kills` times, and on (up to 4x) until 3 kills landed mid-put and half of them after writing.
    for run in range(4 * kills):
        if run >= kills and killed_mid_put >= 3 and runs_with_writes >= kills // 2:
            break
        lines = run_and_kill(root, 1 + run * 1_000_000, rng, tmp_path / "child.err", mode)
        wrote = False
        for line in lines:
            tag, *hs = line.split()
            for h in (int(x, 16) for x in hs):
                if tag == "A":
                    expected[h] = None
                    acked += 1
                    wrote = True
                elif tag == "D":
                    expected.pop(h, None)
        runs_with_writes += wrote
        killed_mid_put += (root / "index").exists() and pending_slots(root) > 0
        verify(root, expected, run)
        done += 1
    print(f"{done} kills: {runs_with_writes} after writing, {killed_mid_put} mid-put; {acked} blocks acknowledged")
    assert runs_with_writes >= kills // 2, "the writer was mostly killed before it wrote anything"
    assert killed_mid_put >= 3, "too few kills landed between reserving slots and committing them"
    assert acked > 2 * kills
