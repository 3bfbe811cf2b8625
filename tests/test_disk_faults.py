"""G3 disk tier under bad input and faults: each ends in a clear error or a clean miss,
and every block committed before the fault still reads back bit-exact afterwards."""

from __future__ import annotations

import faulthandler
import fcntl
import json
import mmap
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm_fs.errors import ConfigError, FormatVersionError, LayoutMismatchError
from kvbm_fs.events import BlockEvent, EventKind
from kvbm_fs.keys import BlockKeys, Namespace
from kvbm_fs.layout import KVLayout
from kvbm_fs.testing import NS_A, NS_B, blocks_for, chain, keyset
from kvbm_fs.tiers.disk import HEADER_PAGE, DiskTier
from kvbm_fs.tiers.disk.index import KEY

REPO = Path(__file__).resolve().parents[1]
BN = NS_A.block_nbytes  # 8 KiB blocks
SLOT = HEADER_PAGE + BN  # one header page plus the payload


# ---- helpers ------------------------------------------------------------------------------
def open_tier(path: Path | str, slots: int = 16, seg: int = 4, **kw: Any) -> DiskTier:
    return DiskTier(path, BN, slots * SLOT, segment_bytes=seg * SLOT, **kw)


def put(t: DiskTier, keys: BlockKeys) -> np.ndarray:
    return t.put(keys, blocks_for(keys, BN))


def read(t: DiskTier, keys: BlockKeys) -> np.ndarray:
    """Get ``keys``; every block found must hold exactly its key's bytes. Returns the found mask."""
    out = np.zeros((len(keys), BN), np.uint8)
    found = t.get(keys, out)
    want = blocks_for(keys, BN)
    for i in np.flatnonzero(found):
        assert np.array_equal(out[i], want[i]), f"{keys[int(i)]} came back with wrong bytes"
    return found


def assert_intact(t: DiskTier, keys: BlockKeys) -> None:
    found = read(t, keys)
    assert found.all(), f"{int((~found).sum())} of {len(keys)} committed blocks were lost"


def cat(*parts: BlockKeys) -> BlockKeys:
    return BlockKeys(parts[0].ns, np.concatenate([p.hashes for p in parts]), np.concatenate([p.parents for p in parts]))


def slots_of(t: DiskTier, keys: BlockKeys) -> list[int]:
    recs = t.index.records(keys.ns, keys.hashes)
    assert all(r is not None for r in recs)
    return [r.slot for r in recs if r is not None]


def accounting(t: DiskTier) -> dict[str, int]:
    with t.index.read() as txn:
        n = {
            db: int(txn.stat(getattr(t.index, db))["entries"]) for db in ("blocks", "slots", "order", "free", "pending")
        }
        n["hwm"] = t.index.hwm(txn)
    return n


def assert_accounted(t: DiskTier) -> dict[str, int]:
    """Every slot below the high-water mark is exactly one of: holding a block, free, or pending."""
    a = accounting(t)
    assert a["blocks"] == a["slots"] == a["order"], a
    assert a["blocks"] + a["free"] + a["pending"] == a["hwm"] <= t.num_slots, a
    return a


def segment_files(t: DiskTier) -> list[Path]:
    return sorted(Path(t.root, "seg").glob("*/*.seg"))


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_HEAD = struct.Struct("=QQIIII")  # struct fiemap: start, length, flags, mapped extents, extent count, -
FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")  # struct fiemap_extent: logical, physical, length, -, -, flags, -


def data_bytes(path: Path, most: int = 256) -> int | None:
    """Bytes of disk the file's data extents take (FIEMAP), without the filesystem's own metadata:
    st_blocks also counts ext4's extent-tree blocks, 4 KiB each time a file's written and unwritten
    (preallocated) ranges split into more than 4 extents, and how they split depends on when the
    kernel writes dirty pages back, i.e. on how busy the machine is. None where FIEMAP is missing."""
    buf = bytearray(FIEMAP_HEAD.size + most * FIEMAP_EXTENT.size)
    FIEMAP_HEAD.pack_into(buf, 0, 0, 2**64 - 1, 0, 0, most, 0)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
    except OSError:
        return None
    finally:
        os.close(fd)
    mapped = FIEMAP_HEAD.unpack_from(buf, 0)[3]
    assert mapped < most, f"{path}: {mapped} extents or more"
    return sum(FIEMAP_EXTENT.unpack_from(buf, FIEMAP_HEAD.size + i * FIEMAP_EXTENT.size)[2] for i in range(mapped))


def flip(path: Path, offset: int, rng: np.random.Generator) -> None:
    """XOR one byte of a file with a random non-zero value, behind the tier's back."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, offset)[0]
        os.pwrite(fd, bytes([old ^ int(rng.integers(1, 256))]), offset)
    finally:
        os.close(fd)


def locate(t: DiskTier, slot: int) -> tuple[Path, int]:
    seg, off = t._locate(slot)
    return Path(t._segment_path(seg)), off


def failed_keys(events: list[BlockEvent]) -> set[tuple[int, int]]:
    return {(k.ns, k.seq_hash) for e in events if e.kind is EventKind.LOAD_FAILED for k in e.keys}


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount small file systems: ``mount("tmpfs", "1m")`` (root only; skipped where mounting is refused)."""
    mounted: list[Path] = []

    def do(fstype: str, size: str | None = None) -> Path:
        d = tmp_path / f"{fstype}{len(mounted)}"
        d.mkdir()
        cmd = ["mount", "-t", fstype, *(["-o", f"size={size}"] if size else []), fstype, str(d)]
        try:
            r = subprocess.run(cmd, capture_output=True)
        except OSError as e:
            pytest.skip(f"cannot mount {fstype} here: {e}")
        if r.returncode:
            pytest.skip(f"cannot mount {fstype} here: {r.stderr.decode().strip()}")
        mounted.append(d)
        return d

    yield do
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def accepts_o_direct(d: Path) -> bool:
    """Does this file system take an aligned O_DIRECT write? (tmpfs before Linux 6.6 and ramfs do not.)"""
    probe = d / ".probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        return os.pwritev(fd, [mmap.mmap(-1, 4096)], 0) == 4096
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def test_buffered_fallback_where_o_direct_is_refused(mount: Callable[..., Path]) -> None:
    d = mount("ramfs")
    assert not accepts_o_direct(d)
    t = open_tier(d / "tier")
    keys = chain(NS_A, 6)
    try:
        assert t.stats()["direct_io"] is False
        assert put(t, keys).all()
        assert_intact(t, keys)
    finally:
        t.close()
    t = open_tier(d / "tier")
    try:
        assert_intact(t, keys)
        assert t.check(deep=True)["bad"] == 0
    finally:
        t.close()


def fill(path: Path) -> None:
    """Write a file until its file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    chunk = b"\xff" * 4096
    try:
        while True:
            os.write(fd, chunk)
    except OSError as e:
        assert e.errno == 28, e
    finally:
        os.close(fd)


# ---- a full disk ------------------------------------------------------------------------------
@pytest.mark.parametrize("direct", [None, False], ids=["probed", "buffered"])
def test_full_disk_refuses_puts_and_keeps_what_was_committed(mount: Callable[..., Path], direct: bool | None) -> None:
    root = mount("tmpfs", "1m") / "tier"
    t = open_tier(root, slots=640, seg=4, direct=direct)  # 7.5 MiB of capacity on a 1 MiB file system
    stored: list[BlockKeys] = []
    try:
        # tmpfs takes O_DIRECT since Linux 6.6 and refuses it before; "buffered" covers the fallback anywhere
        assert t.stats()["direct_io"] is (accepts_o_direct(root) if direct is None else False)
        refused = 0
        for i in range(0, 160, 4):
            keys = chain(NS_A, 4, start=1 + i)
            ok = put(t, keys)  # ENOSPC while preallocating a segment: refused, not raised
            stored.append(keys[ok])
            refused += int((~ok).sum())
            assert not (ok & ~t.contains(keys)).any()
        committed = cat(*stored)
        assert refused > 0 and len(committed) > 0
        assert t.stats()["write_failures"] >= refused
        assert len(t) == len(committed)
        assert_intact(t, committed)
        assert t.check(deep=True)["bad"] == 0
        assert_accounted(t)
        assert sum(p.stat().st_size for p in segment_files(t)) < 1 << 20
        # deleting frees slots in segments that exist, so puts succeed again
        assert t.delete(committed[:8]).all()
        more = chain(NS_A, 8, start=10_000)
        assert put(t, more).all()
        assert_intact(t, cat(committed[8:], more))
    finally:
        t.close()
    t = open_tier(root, slots=640, seg=4, direct=direct)
    try:
        assert_intact(t, cat(committed[8:], more))
        assert len(t) == len(committed)
    finally:
        t.close()


def test_full_disk_under_the_index_refuses_puts_and_recovers(mount: Callable[..., Path]) -> None:
    fs = mount("tmpfs", "2m")
    t = open_tier(fs / "tier", slots=32, seg=32)  # one preallocated segment: data slots never need space
    try:
        first = chain(NS_A, 8)
        assert put(t, first).all()
        fill(fs / "filler")  # now LMDB cannot grow its file: commits fail with ENOSPC
        stored, refused = [first], 0
        for i in range(8, 200, 4):
            keys = chain(NS_A, 4, start=1 + i)
            ok = put(t, keys)
            stored.append(keys[ok])
            refused += int((~ok).sum())
            assert_intact(t, first)
        assert refused > 0, "the index never ran out of space; the test did not exercise ENOSPC"
        committed = cat(*stored)
        assert t.contains(committed).all()
        assert_intact(t, committed)
        assert t.check(deep=True)["bad"] == 0
        # space comes back: puts work again and slots of refused commits are not leaked
        (fs / "filler").unlink()
        extra = chain(NS_A, 2, start=5_000)
        assert put(t, extra).all()
        assert assert_accounted(t)["pending"] == 0
        rest = chain(NS_A, t.num_slots - len(t), start=6_000)
        before = t.stats()["evictions"]
        assert put(t, rest).all()
        assert t.stats()["evictions"] == before, "a full tier evicted: slots were leaked"
        assert_intact(t, cat(committed, extra, rest))
    finally:
        t.close()


FSIZE_CHILD = """
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
import numpy as np
from kvbm_fs.testing import NS_A, blocks_for, chain
from kvbm_fs.tiers.disk import DiskTier
path, slot, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = DiskTier(path, NS_A.block_nbytes, 32 * slot, segment_bytes=32 * slot)
acked, refused = [], 0
def put(keys):
    global refused
    ok = t.put(keys, blocks_for(keys, NS_A.block_nbytes))
    acked.extend(keys.hashes[ok].tolist())
    refused += int((~ok).sum())
put(chain(NS_A, 8))  # preallocates the one segment before the limit
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # slots past the limit fail with EFBIG
for i in range(8, 48, 4):
    put(chain(NS_A, 4, start=1 + i))
data_refused, refused = refused, 0
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # now the index cannot grow either
for i in range(48, 64, 4):
    put(chain(NS_A, 4, start=1 + i))
print(json.dumps(dict(acked=acked, data_refused=data_refused, index_refused=refused, stats=t.stats())))
t.close()
"""


def test_file_size_limit_refuses_puts_with_efbig(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    r = run_child(FSIZE_CHILD, str(root), str(SLOT), str(16 * SLOT))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["data_refused"] > 0, "no write reached the file size limit"
    assert report["index_refused"] == 16, "puts must be refused when the index cannot be written"
    assert report["stats"]["write_failures"] >= report["data_refused"] + report["index_refused"]
    acked = BlockKeys(NS_A.id, np.array(report["acked"], np.uint64))
    assert len(acked) >= 8
    t = DiskTier(root, BN, 32 * SLOT, segment_bytes=32 * SLOT)
    try:
        assert_intact(t, acked)
        assert len(t) == len(acked)
        rep = t.check(deep=True)
        assert rep["bad"] == 0 and rep["stale_pending"] == 0
        assert_accounted(t)
    finally:
        t.close()


# ---- a directory that is not writable ------------------------------------------------------------
NOBODY_CHILD = """
import json, os, sys
from kvbm_fs.tiers.disk import DiskTier
os.setgroups([])  # started as root so the interpreter loads; from here on an unprivileged user
os.setgid(65534)
os.setuid(65534)
capacity, out = int(sys.argv[1]), []
for path in sys.argv[2:]:
    try:
        DiskTier(path, 8192, capacity, segment_bytes=capacity // 4).close()
        out.append(["opened", path])
    except Exception as e:
        out.append([type(e).__name__, str(e)])
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_unwritable_directory_is_a_config_error_naming_it() -> None:
    base = Path(tempfile.mkdtemp(prefix="kvbm-ro-"))
    try:
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)
        made = base / "made"  # a tier created by root, then opened by a user who may not write it
        t = open_tier(made)
        keys = chain(NS_A, 4)
        assert put(t, keys).all()
        t.close()
        idx_only = base / "idx"  # everything writable but the index
        t = open_tier(idx_only)
        t.close()
        for p in [idx_only, idx_only / ".lock", idx_only / "kvbm_fs.json"]:
            p.chmod(0o777 if p.is_dir() else 0o666)
        paths = [ro, ro / "sub", made, idx_only]
        r = run_child(NOBODY_CHILD, str(16 * SLOT), *map(str, paths))
        assert r.returncode == 0, r.stderr
        results = json.loads(r.stdout)
        for (kind, msg), path in zip(results, [ro, ro / "sub", made, idx_only / "index"]):
            assert kind == "ConfigError", (path, kind, msg)
            assert str(path) in msg, msg
        t = open_tier(made)
        try:
            assert_intact(t, keys)
        finally:
            t.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_path_under_a_regular_file_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"not a directory")
    for path in (f / "tier", f):
        with pytest.raises(ConfigError, match=re.escape(str(path))):
            open_tier(path)
    assert f.read_bytes() == b"not a directory"


# ---- damage behind the store's back ------------------------------------------------------------
def test_truncated_segment_is_a_miss_reported_and_removed(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "tier", slots=16, seg=4)
    events: list[BlockEvent] = []
    t.events.subscribe(events.append)
    try:
        keys = chain(NS_A, 12)  # slots 0..11 in segments 0, 1, 2
        assert put(t, keys).all()
        slots = slots_of(t, keys)
        seg, off = locate(t, 5)
        os.truncate(seg, off + HEADER_PAGE + 100)  # slot 5 loses most of its payload, slots 6 and 7 all
        lost = keys[np.isin(slots, [5, 6, 7])]
        rest = keys[~np.isin(slots, [5, 6, 7])]
        deep = t.check(deep=True)
        assert deep["bad"] == 3 and {k for k, _ in deep["bad_keys"]} == {str(k) for k in lost}
        assert t.check()["bad"] >= 2  # without payloads: at least the slots whose header page is gone
        found = read(t, keys)
        assert found.tolist() == t.contains(keys).tolist() == np.isin(keys.hashes, rest.hashes).tolist()
        assert failed_keys(events) == keyset(lost)
        s = t.stats()
        assert s["load_failures"] == 3 and s["corrupt_removed"] == 3
        assert len(t) == 9
        assert not read(t, lost).any() and failed_keys(events) == keyset(lost)  # now a plain miss
        assert t.check(deep=True)["bad"] == 0
        assert put(t, lost).all()  # their slots are reused; writing extends the segment again
        assert_intact(t, keys)
        assert seg.stat().st_size <= 4 * SLOT
        assert_accounted(t)
    finally:
        t.close()
    t = open_tier(tmp_path / "tier", slots=16, seg=4)
    try:
        assert_intact(t, keys)
    finally:
        t.close()


def test_missing_segment_file_is_a_miss(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "tier", slots=16, seg=4)
    keys = chain(NS_A, 12)
    assert put(t, keys).all()
    gone = keys[np.array(slots_of(t, keys)) // 4 == 2]
    seg = locate(t, 8)[0]
    t.close()
    seg.unlink()
    t = open_tier(tmp_path / "tier", slots=16, seg=4)
    events: list[BlockEvent] = []
    t.events.subscribe(events.append)
    try:
        assert read(t, keys).tolist() == (~np.isin(keys.hashes, gone.hashes)).tolist()
        assert failed_keys(events) == keyset(gone)
        assert len(t) == 8 and t.check(deep=True)["bad"] == 0
        assert put(t, gone).all()  # the segment is created again
        assert_intact(t, keys)
    finally:
        t.close()


def corrupt(t: DiskTier, keys: BlockKeys, seed: int) -> BlockKeys:
    """Flip random bytes: in the 128-byte block header of 3 blocks, in the payload of 3 more, and
    in both for one more. Returns the damaged keys."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(keys), 7, replace=False)
    for n, i in enumerate(pick.tolist()):
        path, off = locate(t, slots_of(t, keys[i : i + 1])[0])
        if n < 3 or n == 6:
            flip(path, off + int(rng.integers(0, 128)), rng)
        if n >= 3:
            for _ in range(1 + 3 * (n == 6)):
                flip(path, off + HEADER_PAGE + int(rng.integers(0, BN)), rng)
    return keys[np.sort(pick)]


def test_flipped_bytes_are_found_by_check_and_removed_by_fix(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "tier", slots=16, seg=4)
    try:
        keys = chain(NS_A, 16)
        assert put(t, keys).all()
        bad = corrupt(t, keys, seed=11)
        good = keys[~np.isin(keys.hashes, bad.hashes)]
        shallow = {k for k, _ in t.check()["bad_keys"]}
        assert len(shallow) >= 3 and shallow <= {str(k) for k in bad}  # header damage needs no payload read
        rep = t.check(deep=True)
        assert rep["bad"] == 7 and {k for k, _ in rep["bad_keys"]} == {str(k) for k in bad}
        assert len(t) == 16, "check without fix must not change anything"
        rep = t.check(deep=True, fix=True)
        assert rep["fixed"] == 7
        assert not t.contains(bad).any() and len(t) == 9
        assert t.check(deep=True)["bad"] == 0
        assert not read(t, bad).any()
        assert_intact(t, good)
        assert_accounted(t)
    finally:
        t.close()


def test_flipped_bytes_are_a_miss_reported_and_never_returned(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "tier", slots=16, seg=4)
    events: list[BlockEvent] = []
    t.events.subscribe(events.append)
    try:
        keys = chain(NS_A, 16)
        assert put(t, keys).all()
        bad = corrupt(t, keys, seed=12)
        found = read(t, keys)
        assert found.tolist() == (~np.isin(keys.hashes, bad.hashes)).tolist()
        assert failed_keys(events) == keyset(bad)
        s = t.stats()
        assert s["load_failures"] == 7 and s["corrupt_removed"] == 7
        assert not t.contains(bad).any() and len(t) == 9
        assert not read(t, bad).any()
        assert t.check(deep=True)["bad"] == 0
        assert put(t, bad).all()
        assert_intact(t, keys)
    finally:
        t.close()


# ---- a stale lock left by a killed process -------------------------------------------------------
STUCK_CHILD = """
import sys, threading, time
from kvbm_fs.testing import NS_A, blocks_for, chain
from kvbm_fs.tiers.disk import DiskTier
path, slot = sys.argv[1], int(sys.argv[2])
t = DiskTier(path, NS_A.block_nbytes, 16 * slot, segment_bytes=4 * slot)
done = chain(NS_A, 4, start=100)
assert t.put(done, blocks_for(done, NS_A.block_nbytes)).all()
writing = threading.Event()
def stuck(ops):  # the put has reserved its slots and is writing them when the process dies
    writing.set()
    time.sleep(600)
t.io.write = stuck
inflight = chain(NS_A, 3, start=200)
threading.Thread(target=t.put, args=(inflight, blocks_for(inflight, NS_A.block_nbytes)), daemon=True).start()
writing.wait()
txn = t.index.env.begin(write=True)  # and it holds LMDB's writer lock, mid-transaction
txn.put(b"junk", b"never committed", db=t.index.meta)
print("ready", flush=True)
time.sleep(600)
"""


def kill_stuck_writer(root: Path) -> tuple[BlockKeys, BlockKeys]:
    """Run a writer that dies (SIGKILL) holding LMDB's write lock with 3 slots reserved.
    Returns (its committed keys, its in-flight keys)."""
    p = subprocess.Popen(
        [sys.executable, "-c", STUCK_CHILD, str(root), str(SLOT)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    return chain(NS_A, 4, start=100), chain(NS_A, 3, start=200)


@pytest.fixture
def watchdog() -> Iterator[None]:
    """Abort (with tracebacks) instead of hanging forever if a dead process's lock is never recovered."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def test_writer_killed_holding_the_lock_while_another_process_has_the_tier_open(tmp_path: Path, watchdog: None) -> None:
    root = tmp_path / "tier"
    t = open_tier(root, slots=16, seg=4)
    try:
        mine = chain(NS_A, 4)
        assert put(t, mine).all()
        theirs, inflight = kill_stuck_writer(root)
        rep = t.check()
        assert rep["stale_pending"] == 3 and rep["bad"] == 0 and rep["entries"] == 8
        more = chain(NS_A, 4, start=300)
        assert put(t, more).all(), "the dead writer's lock was not recovered"
        assert_intact(t, cat(mine, theirs, more))
        assert not t.contains(inflight).any(), "an uncommitted block became visible"
        # 12 blocks + 3 dead reservations in 16 slots: filling up must reuse them, not evict
        fill_up = chain(NS_A, 4, start=400)
        assert put(t, fill_up).all()
        assert t.stats()["evictions"] == 0, "slots of the dead writer were leaked"
        assert len(t) == t.num_slots
        assert assert_accounted(t)["pending"] == 0
        assert t.check()["stale_pending"] == 0
        with t.index.read() as txn:
            assert txn.get(b"junk", db=t.index.meta) is None  # the dead writer's transaction never landed
    finally:
        t.close()
    t = open_tier(root, slots=16, seg=4)
    try:
        assert_intact(t, cat(mine, theirs, more, fill_up))
    finally:
        t.close()


def test_open_after_a_writer_was_killed_reclaims_its_slots(tmp_path: Path, watchdog: None) -> None:
    root = tmp_path / "tier"
    theirs, inflight = kill_stuck_writer(root)
    t = open_tier(root, slots=16, seg=4)
    try:
        a = assert_accounted(t)
        assert a["pending"] == 0 and a["free"] == 3
        assert t.check(deep=True) | dict(bad_keys=[]) == dict(
            entries=4, ok=4, bad=0, bad_keys=[], stale_pending=0, fixed=0
        )
        assert_intact(t, theirs)
        assert not t.contains(inflight).any()
        assert put(t, inflight).all()
        rest = chain(NS_A, t.num_slots - len(t), start=500)
        assert put(t, rest).all() and t.stats()["evictions"] == 0
        assert_intact(t, cat(theirs, inflight, rest))
    finally:
        t.close()


# ---- a directory written with another format, layout, namespace or capacity -----------------------
def edit_meta(root: Path, **changes: Any) -> dict[str, Any]:
    path = root / "kvbm_fs.json"
    meta: dict[str, Any] = json.loads(path.read_text())
    path.write_text(json.dumps(meta | changes))
    return meta


def test_other_format_version_is_refused_and_a_garbled_index_is_rebuilt_losing_nothing(tmp_path: Path) -> None:
    """A tier description of another format (or not one at all) is refused, touching nothing; an index
    file that is not LMDB is moved aside and rebuilt from the segments, with every block intact."""
    root = tmp_path / "tier"
    t = open_tier(root)
    keys = chain(NS_A, 6)
    assert put(t, keys).all()
    t.close()
    meta_path = root / "kvbm_fs.json"
    original = meta_path.read_text()
    edit_meta(root, format="kvbm_fs.disk.v2")
    with pytest.raises(FormatVersionError, match=r"kvbm_fs\.disk\.v2"):
        open_tier(root)
    for text in (
        "{not json",
        "[1, 2]",
        json.dumps({k: v for k, v in json.loads(original).items() if k != "num_slots"}),
    ):
        meta_path.write_text(text)
        with pytest.raises(FormatVersionError, match=r"kvbm_fs\.json"):
            open_tier(root)
    meta_path.write_text(original)
    data = root / "index" / "data.mdb"
    index_bytes = data.read_bytes()
    data.write_bytes(b"\x5a" * len(index_bytes))
    t = open_tier(root)  # not an LMDB file: moved aside and rebuilt from the segments (test_disk_index_damage.py)
    assert len(list(root.glob("index.damaged-*"))) == 1
    try:
        assert_intact(t, keys)
    finally:
        t.close()


def test_other_block_size_is_a_layout_mismatch_naming_both(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    t = open_tier(root)
    keys = chain(NS_A, 4)
    assert put(t, keys).all()
    t.close()
    with pytest.raises(LayoutMismatchError) as e:
        DiskTier(root, BN // 2, 16 * SLOT, segment_bytes=4 * SLOT)
    assert str(BN) in str(e.value) and str(BN // 2) in str(e.value)
    t = open_tier(root)
    try:
        assert_intact(t, keys)
        small = Namespace("conformance-model", KVLayout(1, 2, 32, 16, "float16"), tenant="a")
        with pytest.raises(LayoutMismatchError):
            t.bind_namespace(small)
    finally:
        t.close()


def test_other_namespace_sees_only_misses(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    t = open_tier(root)
    t.bind_namespace(NS_A)
    keys = chain(NS_A, 4)
    assert put(t, keys).all()
    t.close()
    t = open_tier(root)
    try:
        t.bind_namespace(NS_B)
        other = BlockKeys(NS_B.id, keys.hashes, keys.parents)
        assert not t.contains(other).any() and not read(t, other).any()
        assert_intact(t, keys)
        assert {(k.ns, k.seq_hash) for k in t.all_keys()} == keyset(keys)
    finally:
        t.close()


def test_shrinking_is_refused_and_growing_keeps_data(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    t = open_tier(root, slots=8, seg=3)  # segments of 3, 3 and 2 slots
    keys = chain(NS_A, 8)
    assert put(t, keys).all()
    t.close()
    with pytest.raises(ConfigError, match="shrink"):
        open_tier(root, slots=4, seg=3)
    t = open_tier(root, slots=16, seg=3)
    try:
        assert t.num_slots == 16 and len(t) == 8
        assert_intact(t, keys)
        more = chain(NS_A, 8, start=100)
        assert put(t, more).all() and t.stats()["evictions"] == 0
        assert_intact(t, cat(keys, more))
        assert sum(p.stat().st_size for p in segment_files(t)) <= 16 * SLOT
    finally:
        t.close()
    assert json.loads((root / "kvbm_fs.json").read_text())["num_slots"] == 16
    with pytest.raises(ConfigError, match="shrink"):
        open_tier(root, slots=8, seg=3)
    t = open_tier(root, slots=16, seg=3)
    try:
        assert_intact(t, cat(keys, more))
    finally:
        t.close()


# ---- capacity under churn -----------------------------------------------------------------------
def test_capacity_holds_under_churn(tmp_path: Path) -> None:
    capacity = 16 * SLOT + 1000  # not a whole number of slots, nor of segments
    t = DiskTier(tmp_path / "tier", BN, capacity, segment_bytes=5 * SLOT)
    rng = np.random.default_rng(5)
    try:
        assert t.num_slots == 16
        keys = chain(NS_A, 5 * t.num_slots)
        for i in range(0, len(keys), 3):
            put(t, keys[i : i + 3])
            files = segment_files(t)
            assert sum(p.stat().st_size for p in files) <= capacity
            extents = [data_bytes(p) for p in files]
            if None not in extents:  # the data the tier allocated, exactly
                assert sum(e or 0 for e in extents) <= capacity
            # and what the filesystem charges for it: plus at most one extent-tree block per segment
            assert sum(p.stat().st_blocks * 512 for p in files) <= capacity + 4096 * len(files)
            assert len(t) <= t.num_slots and t.used_bytes <= t.capacity_bytes <= capacity
            assert_accounted(t)
            written = min(i + 3, len(keys))
            seen = keys[rng.choice(written, min(written, 6), replace=False)]
            read(t, seen)
            if i % 4 == 0:
                t.delete(keys[i : i + 1])
        assert t.stats()["evictions"] > 0
        assert t.check(deep=True)["bad"] == 0
        present = keys[t.contains(keys)]
        assert len(present) == len(t) and read(t, present).all()
    finally:
        t.close()


def test_key_echo_guards_against_a_misfiled_block(tmp_path: Path) -> None:
    """Two entries swapped in the index (bytes intact, wrong place) are misses, never each other's bytes."""
    t = open_tier(tmp_path / "tier")
    try:
        keys = chain(NS_A, 2)
        assert put(t, keys).all()
        a, b = t.index.records(keys.ns, keys.hashes)
        assert a is not None and b is not None

        def swap(txn: Any) -> None:
            a2, b2 = a.pack(), b.pack()
            txn.put(KEY.pack(keys.ns, int(keys.hashes[0])), b2, db=t.index.blocks)
            txn.put(KEY.pack(keys.ns, int(keys.hashes[1])), a2, db=t.index.blocks)

        t.index.write(swap)
        assert not read(t, keys).any()
        assert t.stats()["load_failures"] == 2 and len(t) == 0
    finally:
        t.close()
