"""NixlPosixIO: the disk tier's byte mover through NIXL's POSIX backend (skipped without NIXL)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm_fs.events import EventBus
from kvbm_fs.testing import TierTests, require_nixl
from kvbm_fs.tier import Tier
from kvbm_fs.tiers.disk import DiskTier
from kvbm_fs.tiers.disk.blockio import ALIGN, IoOp, aligned_buffer, probe_direct_io

require_nixl()
try:
    from kvbm_fs.tiers.disk.nixl_io import NixlPosixIO

    NixlPosixIO().close()
except Exception as e:  # NIXL installed but its POSIX backend unusable here
    pytest.skip(f"NIXL POSIX backend unavailable: {e}", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def io() -> Iterator[NixlPosixIO]:
    engine = NixlPosixIO()
    yield engine
    engine.close()


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    f = os.open(tmp_path / "seg", os.O_RDWR | os.O_CREAT, 0o644)
    yield f
    os.close(f)


def _rows(n: int, nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, nbytes), dtype=np.uint8)


def _slot_ops(fd: int, hdr: np.ndarray, pay: np.ndarray, slot: int) -> list[IoOp]:
    """Disk tier shaped operations: a header page and then the payload, contiguous on file."""
    return [IoOp(fd, i * slot, [memoryview(hdr[i].data), memoryview(pay[i].data)]) for i in range(len(hdr))]


def _aligned_rows(n: int, nbytes: int) -> np.ndarray:
    return np.frombuffer(aligned_buffer(n * nbytes), np.uint8).reshape(n, nbytes)


@pytest.mark.parametrize("direct", [False, True])
def test_roundtrip_many_aligned_ops(io: NixlPosixIO, tmp_path: Path, direct: bool) -> None:
    if direct and not probe_direct_io(str(tmp_path)):
        pytest.skip("filesystem refuses O_DIRECT")
    n, pay_bytes = 200, 3 * ALIGN
    slot = ALIGN + pay_bytes
    f = os.open(tmp_path / "seg", os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o644)
    try:
        hdr, pay = _aligned_rows(n, ALIGN), _aligned_rows(n, pay_bytes)
        hdr[:] = _rows(n, ALIGN, 1)
        pay[:] = _rows(n, pay_bytes, 2)
        assert io.write(_slot_ops(f, hdr, pay, slot)) == [slot] * n
        h2, p2 = _aligned_rows(n, ALIGN), _aligned_rows(n, pay_bytes)
        assert io.read(_slot_ops(f, h2, p2, slot)) == [slot] * n
        assert np.array_equal(h2, hdr) and np.array_equal(p2, pay)
        assert os.fstat(f).st_size == n * slot
    finally:
        os.close(f)
    s = io.stats()
    assert s["nixl_ops"] == 2 * n and s["transfers"] == 2 and s["posix_ops"] == 0, s


def test_roundtrip_unaligned_buffers(io: NixlPosixIO, fd: int) -> None:
    """Buffers at odd addresses and lengths, files at odd offsets (buffered descriptor)."""
    n, hlen, plen = 64, 100, 5001
    store = np.zeros(n * (hlen + plen) + 7, np.uint8)[3:]  # deliberately misaligned
    hdr = store[: n * hlen].reshape(n, hlen)
    pay = store[n * hlen : n * (hlen + plen)].reshape(n, plen)
    hdr[:] = _rows(n, hlen, 3)
    pay[:] = _rows(n, plen, 4)
    slot = hlen + plen + 13
    ops = [IoOp(fd, 11 + i * slot, [memoryview(hdr[i].data), memoryview(pay[i].data)]) for i in range(n)]
    assert io.write(ops) == [hlen + plen] * n
    back = np.zeros_like(store)
    h2 = back[: n * hlen].reshape(n, hlen)
    p2 = back[n * hlen : n * (hlen + plen)].reshape(n, plen)
    ops2 = [IoOp(fd, 11 + i * slot, [memoryview(h2[i].data), memoryview(p2[i].data)]) for i in range(n)]
    assert io.read(ops2) == [hlen + plen] * n
    assert np.array_equal(back, store)
    assert io.stats()["nixl_ops"] == 2 * n
    raw = os.pread(fd, slot, 11 + 5 * slot)  # and it landed where pwritev would have put it
    assert raw[:hlen] == hdr[5].tobytes() and raw[hlen : hlen + plen] == pay[5].tobytes()


def test_unaligned_ops_on_a_direct_descriptor(io: NixlPosixIO, tmp_path: Path) -> None:
    """O_DIRECT refuses unaligned I/O: those operations go to pwritev/preadv, the rest through NIXL."""
    if not probe_direct_io(str(tmp_path)):
        pytest.skip("filesystem refuses O_DIRECT")
    path = tmp_path / "seg"
    bfd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        n = 8
        good = _aligned_rows(n, ALIGN)
        good[:] = _rows(n, ALIGN, 5)
        odd = _rows(1, ALIGN + 1, 6)[0][1:]  # unaligned address
        ops = [IoOp(dfd, i * ALIGN, [memoryview(good[i].data)]) for i in range(n)]
        ops.append(IoOp(dfd, n * ALIGN, [memoryview(odd.data)]))
        res = io.write(ops)
        assert res[:n] == [ALIGN] * n
        assert res[n] in (ALIGN, -errno.EINVAL)  # whatever pwritev says, never an exception
        back = _aligned_rows(n, ALIGN)
        assert io.read([IoOp(dfd, i * ALIGN, [memoryview(back[i].data)]) for i in range(n)]) == [ALIGN] * n
        assert np.array_equal(back, good)
        assert io.stats()["nixl_ops"] == 2 * n and io.stats()["failed_transfers"] == 0
    finally:
        os.close(dfd)
        os.close(bfd)


def test_short_read_past_eof_is_short(io: NixlPosixIO, fd: int) -> None:
    n, plen = 10, 2 * ALIGN
    slot = ALIGN + plen
    hdr, pay = _aligned_rows(n, ALIGN), _aligned_rows(n, plen)
    hdr[:] = 7
    pay[:] = _rows(n, plen, 7)
    assert io.write(_slot_ops(fd, hdr, pay, slot)) == [slot] * n
    cut = 6 * slot + ALIGN + 100  # inside block 6's payload
    os.ftruncate(fd, cut)
    h2, p2 = _aligned_rows(n, ALIGN), _aligned_rows(n, plen)
    res = io.read(_slot_ops(fd, h2, p2, slot))
    assert res == [slot] * 6 + [ALIGN + 100] + [0] * 3
    assert np.array_equal(p2[:6], pay[:6]) and np.array_equal(p2[6, :100], pay[6, :100])
    assert io.stats()["past_eof_ops"] == 4


def test_bad_descriptor_is_negative(io: NixlPosixIO, fd: int, tmp_path: Path) -> None:
    closed = os.open(tmp_path / "gone", os.O_RDWR | os.O_CREAT, 0o644)
    os.close(closed)
    n = 6
    bufs = _aligned_rows(n, ALIGN)
    bufs[:] = 9
    ops = [IoOp(closed if i % 2 else fd, i * ALIGN, [memoryview(bufs[i].data)]) for i in range(n)]
    assert io.write(ops) == [ALIGN if i % 2 == 0 else -errno.EBADF for i in range(n)]
    assert io.read(ops) == [ALIGN if i % 2 == 0 else -errno.EBADF for i in range(n)]
    assert io.write([IoOp(-1, 0, [memoryview(bufs[0].data)])]) == [-errno.EBADF]


def test_odd_operations_never_raise(io: NixlPosixIO, fd: int) -> None:
    buf = _aligned_rows(3, ALIGN)
    ro = memoryview(bytes(ALIGN))
    ops = [
        IoOp(fd, 0, [memoryview(buf[0].data)]),
        IoOp(fd, ALIGN, [memoryview(buf[1].data)[:0]]),  # empty
        IoOp(fd, -5, [memoryview(buf[2].data)]),  # negative offset
        IoOp(fd, 2 * ALIGN, [ro]),
    ]
    assert io.write(ops) == [ALIGN, 0, -errno.EINVAL, ALIGN]
    assert io.read(ops) == [ALIGN, 0, -errno.EINVAL, -errno.EFAULT]  # no reading into read-only memory
    assert io.read([]) == [] and io.write([]) == []


def test_single_op_skips_nixl(io: NixlPosixIO, fd: int) -> None:
    """One small transfer costs ~15 us through NIXL and ~1 us through pwrite."""
    buf = _aligned_rows(1, ALIGN)
    assert io.write([IoOp(fd, 0, [memoryview(buf[0].data)])]) == [ALIGN]
    assert io.stats()["posix_ops"] == 1 and io.stats()["transfers"] == 0


def test_large_batches_are_split_into_transfers(fd: int) -> None:
    """NIXL POSIX queues at most 65536 I/Os per agent; batches go out in transfers of max_descs."""
    io = NixlPosixIO(max_descs=5)
    try:
        n = 10
        hdr, pay = _aligned_rows(n, ALIGN), _aligned_rows(n, ALIGN)
        pay[:] = _rows(n, ALIGN, 12)
        slot = 2 * ALIGN
        assert io.write(_slot_ops(fd, hdr, pay, slot)) == [slot] * n
        p2 = _aligned_rows(n, ALIGN)
        assert io.read(_slot_ops(fd, _aligned_rows(n, ALIGN), p2, slot)) == [slot] * n
        assert np.array_equal(p2, pay)
        assert io.stats()["transfers"] == 10 and io.stats()["nixl_ops"] == 2 * n  # 2 ops (4 descriptors) each
    finally:
        io.close()


def test_descriptor_reuse_registers_the_new_file(io: NixlPosixIO, tmp_path: Path) -> None:
    bufs = _aligned_rows(4, ALIGN)
    for k, name in enumerate(("a", "b")):
        f = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o644)
        bufs[:] = k + 1
        assert io.write([IoOp(f, i * ALIGN, [memoryview(bufs[i].data)]) for i in range(4)]) == [ALIGN] * 4
        os.close(f)  # the next open likely gets the same number
    assert (tmp_path / "a").read_bytes() == b"\x01" * 4 * ALIGN
    assert (tmp_path / "b").read_bytes() == b"\x02" * 4 * ALIGN
    assert io.stats()["transfers"] == 2


def test_concurrent_batches(io: NixlPosixIO, fd: int) -> None:
    threads, n = 4, 32
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            src = _aligned_rows(n, ALIGN)
            src[:] = _rows(n, ALIGN, 100 + t)
            base = t * n * ALIGN
            for _ in range(5):
                assert (
                    io.write([IoOp(fd, base + i * ALIGN, [memoryview(src[i].data)]) for i in range(n)]) == [ALIGN] * n
                )
                dst = _aligned_rows(n, ALIGN)
                assert io.read([IoOp(fd, base + i * ALIGN, [memoryview(dst[i].data)]) for i in range(n)]) == [ALIGN] * n
                assert np.array_equal(dst, src)
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]


# ---- failure paths: NIXL errors and stuck transfers -------------------------------------------
def _batch(fd: int, n: int = 8, seed: int = 0) -> tuple[np.ndarray, list[IoOp]]:
    src = _aligned_rows(n, ALIGN)
    src[:] = _rows(n, ALIGN, seed)
    return src, [IoOp(fd, i * ALIGN, [memoryview(src[i].data)]) for i in range(n)]


def test_nixl_error_falls_back_to_posix(io: NixlPosixIO, fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> str:
        raise RuntimeError("NIXL_ERR_BACKEND")

    monkeypatch.setattr(io._agent, "transfer", boom)
    src, ops = _batch(fd)
    assert io.write(ops) == [ALIGN] * 8
    assert os.pread(fd, 8 * ALIGN, 0) == src.tobytes()
    s = io.stats()
    assert s["failed_transfers"] == 1 and s["posix_ops"] == 8 and s["broken"] is None


def test_timeout_cancels_and_falls_back(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    io = NixlPosixIO(timeout_s=0.01, min_rate=1e18)
    try:
        monkeypatch.setattr(io._agent, "transfer", lambda h, *a: "PROC")  # never posted: release cancels it
        monkeypatch.setattr(io._agent, "check_xfer_state", lambda h: "PROC")
        src, ops = _batch(fd)
        assert io.write(ops) == [ALIGN] * 8
        assert os.pread(fd, 8 * ALIGN, 0) == src.tobytes()
        assert io.stats()["timeouts"] == 1 and io.stats()["broken"] is None
    finally:
        io.close()


def test_stuck_transfer_reports_etimedout_and_disables_nixl(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    class Stuck:
        def release(self) -> None:
            raise RuntimeError("NIXL_ERR_REPOST_ACTIVE")

    io = NixlPosixIO(timeout_s=0.01, min_rate=1e18)
    try:
        monkeypatch.setattr(io._agent, "initialize_xfer", lambda *a, **k: Stuck())
        monkeypatch.setattr(io._agent, "transfer", lambda h, *a: "PROC")
        monkeypatch.setattr(io._agent, "check_xfer_state", lambda h: "PROC")
        _, ops = _batch(fd)
        assert io.write(ops) == [-errno.ETIMEDOUT] * 8
        assert io.stats()["broken"]
        src, ops = _batch(fd, seed=1)
        assert io.write(ops) == [ALIGN] * 8  # later batches go through pwritev
        assert os.pread(fd, 8 * ALIGN, 0) == src.tobytes()
    finally:
        io.close()


def test_process_exits_cleanly_and_prints_nothing(tmp_path: Path) -> None:
    """NIXL's UCX backend can crash a process at exit; only POSIX is created here, and NIXL's INFO
    lines (printed to stdout) are muted."""
    code = f"""
import os, numpy as np
from kvbm_fs.tiers.disk.blockio import IoOp, aligned_buffer
from kvbm_fs.tiers.disk.nixl_io import NixlPosixIO
io = NixlPosixIO()
fd = os.open({str(tmp_path / "seg")!r}, os.O_RDWR | os.O_CREAT, 0o644)
b = np.frombuffer(aligned_buffer(8 * 4096), np.uint8).reshape(8, 4096)
ops = [IoOp(fd, i * 4096, [memoryview(b[i].data)]) for i in range(8)]
assert io.write(ops) == [4096] * 8 and io.read(ops) == [4096] * 8
assert io.stats()["transfers"] == 2
io.close()
"""
    env = {k: v for k, v in os.environ.items() if k != "NIXL_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == ""


# ---- the disk tier on this engine ------------------------------------------------------------
class TestDiskTierNixl(TierTests):
    """G3 with io="nixl": the shipped conformance suite, unchanged."""

    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.dir = tmp_path

    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> Tier:
        slot = 4096 + -(-block_nbytes // 4096) * 4096
        self.made = getattr(self, "made", 0) + 1
        tier = DiskTier(
            self.dir / f"tier{self.made}", block_nbytes, capacity_blocks * slot, events=events,
            segment_bytes=4 * slot, io="nixl",
        )  # fmt: skip
        assert tier.io.name == "nixl-posix"
        return tier

    def reopen(self, tier: Tier) -> Tier | None:
        assert isinstance(tier, DiskTier)
        tier.close()
        return DiskTier(tier.root, tier.block_nbytes, tier.capacity_bytes, segment_bytes=4 * tier.slot_bytes, io="nixl")


def test_disk_tier_batches_go_through_nixl(tmp_path: Path) -> None:
    from kvbm_fs.keys import BlockKeys

    nbytes = 8192
    tier = DiskTier(tmp_path / "t", nbytes, "4MiB", io="nixl")
    try:
        keys = BlockKeys.chain(7, np.arange(1, 33, dtype=np.uint64))
        rows = np.frombuffer(aligned_buffer(32 * nbytes), np.uint8).reshape(32, nbytes)
        rows[:] = _rows(32, nbytes, 11)
        assert tier.put(keys, rows).all()
        out = np.zeros((32, nbytes), np.uint8)
        assert tier.get(keys, out).all() and np.array_equal(out, rows)
        stats = tier.io.stats()  # type: ignore[attr-defined]
        assert stats["nixl_ops"] == 64 and stats["transfers"] == 2, stats
        assert tier.stats()["data_path"] == "nixl-posix"
    finally:
        tier.close()
