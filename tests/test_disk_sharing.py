"""G3 disk tier shared by several processes (TP ranks, two server instances) at once.

Any miss is allowed (another process may have evicted the block); a wrong byte never is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm_fs.errors import IllegalTransitionError
from kvbm_fs.events import BlockEvent, EventKind
from kvbm_fs.keys import BlockKeys
from kvbm_fs.testing import NS_A, blocks_for, chain
from kvbm_fs.tiers.disk import HEADER_PAGE, DiskTier
from kvbm_fs.tiers.disk.index import KEY, DiskIndex

REPO = Path(__file__).resolve().parents[1]
BN = NS_A.block_nbytes
SLOT = HEADER_PAGE + BN
WORKERS, SLOTS, SEG, STEPS = 3, 24, 5, 300
FIRST = 6  # each worker's first blocks; all of them fit at once (WORKERS * FIRST <= SLOTS)
UNIVERSE = 64  # keys every worker may put, get, pin or delete: far more than fit

# A worker: phase 1 puts its own first blocks; phase 2 (all workers done with 1) reads every other
# worker's first blocks, which must all be there; phase 3 churns on keys shared by all workers.
WORKER = """
import json, sys
import numpy as np
from kvbm_fs.keys import BlockKeys
from kvbm_fs.tiers.disk import DiskTier
path, ns, me, workers, slots, seg, nbytes, steps, first, universe = sys.argv[1], *map(int, sys.argv[2:])
M, GOLD = 0xFFFFFFFF, np.uint64(0x9E3779B97F4A7C15)
def content(h):
    return np.random.default_rng([ns & M, ns >> 32, h & M, h >> 32]).integers(0, 256, nbytes, dtype=np.uint8)
def keys_of(ids):
    return BlockKeys(ns, (np.asarray(ids, np.uint64) + np.uint64(1)) * GOLD)
t = DiskTier(path, nbytes, slots * (4096 + nbytes), segment_bytes=seg * (4096 + nbytes))
st = dict(wrong=0, found_other=0, found=0, missed=0, stored=0, over_capacity=0, errors=[])
def read(keys):
    out = np.zeros((len(keys), nbytes), np.uint8)
    found = t.get(keys, out)
    for i in np.flatnonzero(found).tolist():
        st["wrong"] += not np.array_equal(out[i], content(int(keys.hashes[i])))
    st["found"] += int(found.sum())
    st["missed"] += int((~found).sum())
    return found
def sync(tag):
    print(tag, flush=True)
    sys.stdin.readline()
mine = keys_of(range(1000 + me * first, 1000 + (me + 1) * first))
assert t.put(mine, np.stack([content(h) for h in mine.hashes.tolist()])).all()
sync("put")
others = keys_of([1000 + w * first + i for w in range(workers) if w != me for i in range(first)])
st["found_other"] = int(read(others).sum())
sync("read")
rng = np.random.default_rng(me)
for step in range(steps):
    keys = keys_of(np.unique(rng.integers(0, universe, int(rng.integers(1, 5)))))
    op = rng.random()
    try:
        if op < 0.4:
            st["stored"] += int(t.put(keys, np.stack([content(h) for h in keys.hashes.tolist()])).sum())
        elif op < 0.75:
            read(keys)
        elif op < 0.85:
            t.evict(int(rng.integers(1, 4)))
        elif op < 0.9:
            t.delete(keys)
        else:
            pinned = t.pin(keys)
            read(keys)
            t.unpin(keys[pinned])  # only what pin reported: others may have put the rest since
    except Exception as e:
        st["errors"].append(f"step {step}: {type(e).__name__}: {e}")
    st["over_capacity"] += len(t) > slots
st.update(t.stats())
t.close()
print(json.dumps(st), flush=True)
"""


def open_tier(root: Path) -> DiskTier:
    return DiskTier(root, BN, SLOTS * SLOT, segment_bytes=SEG * SLOT)


def run_workers(root: Path) -> list[dict[str, Any]]:
    args = [str(root), str(NS_A.id), "", str(WORKERS), str(SLOTS), str(SEG), str(BN), str(STEPS), str(FIRST)]
    args.append(str(UNIVERSE))
    procs = []
    for w in range(WORKERS):
        args[2] = str(w)
        cmd = [sys.executable, "-c", WORKER, *args]
        pipe = subprocess.PIPE
        procs.append(subprocess.Popen(cmd, cwd=REPO, text=True, stdin=pipe, stdout=pipe, stderr=pipe))
    try:
        for phase in ("put", "read"):  # a barrier: every worker finishes the phase before any goes on
            for p in procs:
                assert p.stdout is not None
                line = p.stdout.readline().strip()
                assert line == phase, p.stderr.read() if p.stderr else line
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return [json.loads(out) for out, _ in outs]


def test_processes_share_one_directory_and_never_see_a_wrong_byte(tmp_path: Path, watchdog: None) -> None:
    root = tmp_path / "tier"
    open_tier(root).close()  # created up front, so the workers race on use, not on creation
    reports = run_workers(root)
    for w, r in enumerate(reports):
        assert r["wrong"] == 0, f"worker {w} read {r['wrong']} blocks with wrong bytes"
        assert r["errors"] == [], f"worker {w}: {r['errors'][:5]}"
        assert r["over_capacity"] == 0, f"worker {w} saw more blocks than slots"
        assert r["found_other"] == (WORKERS - 1) * FIRST, f"worker {w} could not read the others' blocks"
        assert r["found"] > r["found_other"] and r["stored"] > 0
    assert sum(r["evictions"] for r in reports) > 0, "the tier never filled up"
    t = open_tier(root)
    try:
        rep = t.check(deep=True)
        assert rep["bad"] == 0 and rep["stale_pending"] == 0, rep
        assert len(t) <= t.num_slots
        with t.index.read() as txn:
            n = {
                db: txn.stat(getattr(t.index, db))["entries"] for db in ("blocks", "slots", "order", "free", "pending")
            }
            hwm = t.index.hwm(txn)
        assert n["blocks"] == n["slots"] == n["order"] and n["pending"] == 0
        assert n["blocks"] + n["free"] == hwm <= t.num_slots
        stored = BlockKeys(NS_A.id, np.array([h for b in t.iter_keys() for h in b.hashes.tolist()], np.uint64))
        out = np.zeros((len(stored), BN), np.uint8)
        assert t.get(stored, out).all() and np.array_equal(out, blocks_for(stored, BN))
    finally:
        t.close()


def test_two_tiers_on_one_directory_in_one_process(tmp_path: Path) -> None:
    """LMDB allows one environment per process and directory; the tiers share it."""
    a = open_tier(tmp_path / "tier")
    b = open_tier(tmp_path / "tier")
    try:
        keys = chain(NS_A, 4)
        assert a.put(keys, blocks_for(keys, BN)).all()
        out = np.zeros((4, BN), np.uint8)
        assert b.get(keys, out).all() and np.array_equal(out, blocks_for(keys, BN))
        a.close()
        more = chain(NS_A, 4, start=10)
        assert b.put(more, blocks_for(more, BN)).all()
        assert len(b) == 8 and b.check(deep=True)["bad"] == 0
    finally:
        a.close()
        b.close()


def test_pin_holds_when_another_process_moves_the_block(tmp_path: Path) -> None:
    """Pins are per process. Another one may evict a pinned block, reuse its slot and write the block
    to another slot; unpin must still release exactly what pin took, and nothing stays pinned."""
    a, b = open_tier(tmp_path / "tier"), open_tier(tmp_path / "tier")  # two tiers: two sets of pins
    try:
        key, other = chain(NS_A, 1), chain(NS_A, 1, start=50)
        assert a.put(key, blocks_for(key, BN)).all() and a.pin(key).all()
        (slot,) = [r.slot for r in a.index.records(key.ns, key.hashes) if r is not None]
        assert b.delete(key).all()  # b does not see a's pin
        assert b.put(other, blocks_for(other, BN)).all()
        assert [r.slot for r in b.index.records(other.ns, other.hashes) if r is not None] == [slot]
        assert b.put(key, blocks_for(key, BN)).all()  # the block is back, in another slot
        a.unpin(key)
        assert not a.pinned(cat_keys(key, other)).any()
        assert a.delete(other).all()  # its slot is no longer pinned here
        with pytest.raises(IllegalTransitionError):
            a.unpin(key)  # pinned once, released once
    finally:
        a.close()
        b.close()


def cat_keys(a: BlockKeys, b: BlockKeys) -> BlockKeys:
    return BlockKeys(a.ns, np.concatenate([a.hashes, b.hashes]))


def test_slot_reused_during_a_read_is_a_plain_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that races another process's eviction and reuse of the slot is a miss, not corruption:
    no LOAD_FAILED, no load failure counted, and the new block in that slot is left alone."""
    a, b = open_tier(tmp_path / "tier"), open_tier(tmp_path / "tier")
    events: list[BlockEvent] = []
    a.events.subscribe(events.append)
    try:
        key, other = chain(NS_A, 1), chain(NS_A, 1, start=50)
        assert a.put(key, blocks_for(key, BN)).all()
        read = a.io.read

        def racing_read(ops: Any) -> list[int]:  # a has looked the key up; b now evicts it and reuses the slot
            assert b.delete(key).all() and b.put(other, blocks_for(other, BN)).all()
            return read(ops)

        monkeypatch.setattr(a.io, "read", racing_read)
        out = np.zeros((1, BN), np.uint8)
        assert not a.get(key, out).any()
        monkeypatch.undo()
        assert a.stats()["load_failures"] == 0 and not [e for e in events if e.kind is EventKind.LOAD_FAILED]
        assert a.get(other, out).all() and np.array_equal(out, blocks_for(other, BN))
    finally:
        a.close()
        b.close()


GROW = """
import sys
from kvbm_fs.tiers.disk.index import KEY, DiskIndex
ix = DiskIndex(sys.argv[1], map_size=1 << 16)
ix.write(lambda txn: [txn.put(KEY.pack(1, i), bytes(64), db=ix.blocks) for i in range(5000)])
print(ix.env.info()["map_size"])
"""


def test_index_map_grown_by_another_process_is_adopted(tmp_path: Path) -> None:
    """Another process growing the LMDB map must not make every transaction here fail."""
    ix = DiskIndex(str(tmp_path / "index"), map_size=1 << 16)
    try:
        assert ix.count() == 0
        r = subprocess.run(
            [sys.executable, "-c", GROW, str(tmp_path / "index")], cwd=REPO, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) > 1 << 16
        assert ix.count() == 5000
        ix.write(lambda txn: txn.put(KEY.pack(2, 1), b"x", db=ix.blocks))
        assert ix.count() == 5001
    finally:
        ix.close()
