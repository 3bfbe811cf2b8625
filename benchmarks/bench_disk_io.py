"""G3 data path: batched block write/read GB/s through NixlPosixIO vs PosixIO vs a plain pwrite/pread loop.

What it measures
    One batch of 64 blocks x 2 MiB, laid out the way the disk tier lays out slots (a 4 KiB
    header page followed by the payload, one ``IoOp`` per block with two buffers), written to
    and read back from the *same* preallocated file at the same offsets by each engine:

    - ``nixl``: :class:`tiers.disk.nixl_io.NixlPosixIO`, the whole batch as one NIXL POSIX transfer
      (one descriptor per buffer, default libaio queue; ``nixl_uring`` is the io_uring queue);
    - ``posix``: :class:`tiers.disk.blockio.PosixIO`, ``os.pwritev``/``os.preadv`` per block on a
      thread pool;
    - ``seq``: a plain sequential loop of ``os.pwritev``/``os.preadv``, one block at a time.

    The file is opened with ``O_DIRECT`` when the filesystem takes it
    (:func:`tiers.disk.blockio.probe_direct_io`); buffers are page-aligned so every engine can use it.
    Without ``O_DIRECT`` a timed write includes an ``fdatasync`` (otherwise it would time a memcpy
    into the page cache; ``--no-sync`` times just that, which is what a non-durable tier put costs).  Before every timed read the page cache is dropped
    (``echo 3 > /proc/sys/vm/drop_caches``, root only; ``caches_dropped`` says whether it worked).

    Also: what one DRAM registration of the batch costs in NixlPosixIO (it registers the caller's
    buffers per call), and the latency of a single 4 KiB block through each engine (NIXL forced
    on with ``min_ops=1``), which is why NixlPosixIO sends batches of one to ``pwritev``.

Why
    The disk tier's ``io="auto"`` should pick whichever engine moves a batch faster on the
    machine at hand.  Every variant runs in the same rounds (order rotated per round); numbers
    are medians, ratios are medians of per-round paired ratios; nothing passes or fails.

Run ``python benchmarks/bench_disk_io.py [--quick] [--dir DIR]``; prints one JSON object and writes it to
``benchmarks/results/bench_disk_io.json`` (``bench_disk_io.quick.json`` with ``--quick``: 8 blocks, 3 rounds).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common
import numpy as np
from _common import Caches, add_output_args, emit, env, gbps_spread, interleave, paired_ratio, results_path

from kvbm_fs.tiers.disk.blockio import ALIGN, BlockIO, IoOp, PosixIO, aligned_buffer, probe_direct_io

NAME = "bench_disk_io"
MiB = 1 << 20


class Case(_common.Case):
    track_cpu = True  # CPU seconds of the whole process (all threads) during the call


class SeqIO:
    """The baseline: one ``os.pwritev``/``os.preadv`` per block, in order, on the calling thread."""

    name = "seq-pwritev"

    def read(self, ops: Sequence[IoOp]) -> list[int]:
        return [os.preadv(op.fd, list(op.bufs), op.offset) for op in ops]

    def write(self, ops: Sequence[IoOp]) -> list[int]:
        return [os.pwritev(op.fd, list(op.bufs), op.offset) for op in ops]

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64, help="blocks per batch (default 64)")
    ap.add_argument("--block-mib", type=float, default=2.0, help="payload per block in MiB (default 2)")
    ap.add_argument("--rounds", type=int, default=11, help="timed rounds (default 11)")
    ap.add_argument("--dir", type=Path, default=None, help="where the test file goes (default: the temp dir)")
    ap.add_argument("--no-direct", action="store_true", help="do not use O_DIRECT even where it works")
    ap.add_argument("--no-sync", action="store_true", help="without O_DIRECT, time writes without fdatasync")
    ap.add_argument("--no-drop", action="store_true", help="do not drop the page cache before reads")
    add_output_args(ap, "small run for smoke tests (8 blocks, 3 rounds)")
    args = ap.parse_args(argv)
    args.out = args.out or results_path(NAME, args.quick)
    rounds = 3 if args.quick else args.rounds
    n, bnb = (8 if args.quick else args.blocks), int(args.block_mib * MiB)
    pay = -(-bnb // ALIGN) * ALIGN
    slot = ALIGN + pay
    batch = n * (ALIGN + bnb)  # bytes moved per batch: header pages + payloads

    workdir = Path(tempfile.mkdtemp(prefix="kvbm-bench-disk-", dir=args.dir))
    direct = probe_direct_io(str(workdir)) and not args.no_direct
    path = workdir / "segment.seg"
    bfd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.posix_fallocate(bfd, 0, n * slot)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT) if direct else bfd

    # caller-owned, page-aligned buffers: header pages + payload rows, source and destination
    src_h = np.frombuffer(aligned_buffer(n * ALIGN), np.uint8).reshape(n, ALIGN)
    src_p = np.frombuffer(aligned_buffer(n * pay), np.uint8).reshape(n, pay)[:, :bnb]
    dst_h = np.frombuffer(aligned_buffer(n * ALIGN), np.uint8).reshape(n, ALIGN)
    dst_p = np.frombuffer(aligned_buffer(n * pay), np.uint8).reshape(n, pay)[:, :bnb]
    rng = np.random.default_rng(0)
    src_h[:] = rng.integers(0, 256, src_h.shape, dtype=np.uint8)
    src_p[:] = rng.integers(0, 256, src_p.shape, dtype=np.uint8)
    wops = [IoOp(fd, i * slot, [memoryview(src_h[i].data), memoryview(src_p[i].data)]) for i in range(n)]
    rops = [IoOp(fd, i * slot, [memoryview(dst_h[i].data), memoryview(dst_p[i].data)]) for i in range(n)]
    want = [op.nbytes for op in wops]

    engines: dict[str, BlockIO] = {}
    nixl_error = None
    try:
        from kvbm_fs.tiers.disk.nixl_io import NixlPosixIO

        engines["nixl"] = NixlPosixIO()
        try:
            engines["nixl_uring"] = NixlPosixIO(queue="URING")
        except Exception as e:
            nixl_error = f"io_uring queue: {e}"
    except Exception as e:
        nixl_error = f"{type(e).__name__}: {e}"
    engines["posix"] = PosixIO()
    engines["seq"] = SeqIO()

    caches = Caches()

    def before_read() -> None:
        dst_h.fill(0)
        dst_p.fill(0)
        if not args.no_drop:
            caches.drop()

    def write(io: BlockIO) -> Callable[[], None]:
        def f() -> None:
            got = io.write(wops)
            if not direct and not args.no_sync:
                os.fdatasync(bfd)
            assert got == want, f"{io.name} wrote {got[:4]}..."

        return f

    def read(io: BlockIO) -> Callable[[], None]:
        def f() -> None:
            got = io.read(rops)
            assert got == want, f"{io.name} read {got[:4]}..."

        return f

    def check_read() -> None:
        assert np.array_equal(dst_h, src_h) and np.array_equal(dst_p, src_p), "read returned wrong bytes"

    cases: list[Case] = []
    for name, io in engines.items():
        cases.append(Case(f"write_{name}", write(io)))
        cases.append(Case(f"read_{name}", read(io), before=before_read, after=check_read))
    by = {c.name: c for c in cases}
    t0 = time.perf_counter()
    interleave(cases, rounds)
    wall = time.perf_counter() - t0

    def gbps(name: str) -> float:
        return _common.gbps(batch, by[name].times)

    def ratio(a: str, b: str) -> float:
        return round(paired_ratio(by[a].times, by[b].times), 3)

    res: dict[str, Any] = {"benchmark": NAME, "quick": bool(args.quick)}
    for name in engines:
        res[f"write_gbps_{name}"] = gbps(f"write_{name}")
        res[f"read_gbps_{name}"] = gbps(f"read_{name}")
    for name in engines:  # CPU seconds (all threads) per GB moved, write and read together
        cpu = statistics.median(by[f"write_{name}"].cpu) + statistics.median(by[f"read_{name}"].cpu)
        res[f"cpu_s_per_gb_{name}"] = round(cpu / (2 * batch / 1e9), 4)
    if "nixl" in engines:
        res["write_ratio_nixl_vs_posix"] = ratio("write_nixl", "write_posix")
        res["read_ratio_nixl_vs_posix"] = ratio("read_nixl", "read_posix")
        res["write_ratio_nixl_vs_seq"] = ratio("write_nixl", "write_seq")
        res["read_ratio_nixl_vs_seq"] = ratio("read_nixl", "read_seq")
    res["write_ratio_posix_vs_seq"] = ratio("write_posix", "write_seq")
    res["read_ratio_posix_vs_seq"] = ratio("read_posix", "read_seq")
    tier_engines = [e for e in ("nixl", "posix") if e in engines]
    # the tier's choice: the engine with the better geometric mean of write and read throughput
    score = {e: (res[f"write_gbps_{e}"] * res[f"read_gbps_{e}"]) ** 0.5 for e in tier_engines}
    res["faster_engine"] = max(score, key=lambda e: score[e])
    res["nixl_available"] = "nixl" in engines
    res["nixl_error"] = nixl_error
    res.update(_registration_cost(engines.get("nixl"), rops, rounds))
    res.update(_single_block_latency(bfd, src_h, dst_h, rounds))
    res.update(
        direct_io=direct,
        caches_dropped=caches.all_worked,
        write_includes_fdatasync=not direct and not args.no_sync,
        block_nbytes=bnb,
        blocks_per_batch=n,
        batch_bytes=batch,
        rounds=rounds,
        ratio_method="median over rounds of paired (baseline time / case time), same round",
        wall_seconds=round(wall, 2),
        detail={
            c.name: {**gbps_spread(batch, c.times, 3), "cpu_ms": round(statistics.median(c.cpu) * 1e3, 1)}
            for c in cases
        },
        engine_stats={k: io.stats() for k, io in engines.items() if hasattr(io, "stats")},
        filesystem_dir=str(workdir.parent),
        env=env(numpy=np.__version__, kernel=platform.release()),
    )
    for io in engines.values():
        io.close()
    if fd != bfd:
        os.close(fd)
    os.close(bfd)
    shutil.rmtree(workdir, ignore_errors=True)
    emit(res, args.out)
    return res


def _registration_cost(nixl: Any, ops: list[IoOp], rounds: int) -> dict[str, Any]:
    """Register + deregister the batch's buffers as NixlPosixIO does per call (adjacent ones merged)."""
    if nixl is None:
        return {}
    from kvbm_fs.tiers.disk.blockio import address
    from kvbm_fs.tiers.disk.nixl_io import _merge

    regions = [(address(b), b.nbytes) for op in ops for b in op.bufs]
    out: dict[str, Any] = {"registration_descs": len(regions)}
    for label, descs in (
        ("merged", _merge(regions)),
        ("unmerged", np.array([(a, n, 0) for a, n in regions], np.uint64)),
    ):
        ts = []
        for _ in range(max(5, rounds)):
            t0 = time.perf_counter()
            reg = nixl._agent.register_memory(descs, "DRAM", backends=nixl._backends)
            nixl._agent.deregister_memory(reg, backends=nixl._backends)
            ts.append(time.perf_counter() - t0)
        out[f"registration_us_{label}"] = round(statistics.median(ts) * 1e6, 1)
        out[f"registration_regions_{label}"] = len(descs)
    return out


def _single_block_latency(fd: int, src_h: np.ndarray, dst_h: np.ndarray, rounds: int) -> dict[str, Any]:
    """One 4 KiB write and read on the buffered descriptor (engine overhead, not disk latency):
    NIXL (forced, min_ops=1) vs one pwritev/preadv."""
    engines: dict[str, BlockIO] = {"posix": SeqIO()}
    try:
        from kvbm_fs.tiers.disk.nixl_io import NixlPosixIO

        engines["nixl"] = NixlPosixIO(min_ops=1)
    except Exception:
        pass
    w = [IoOp(fd, 0, [memoryview(src_h[0].data)])]
    r = [IoOp(fd, 0, [memoryview(dst_h[0].data)])]
    out: dict[str, Any] = {}
    reps = 50 * max(3, rounds)
    for name, io in engines.items():
        for kind, ops in (("write", w), ("read", r)):
            fn = io.write if kind == "write" else io.read
            fn(ops)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn(ops)
                ts.append(time.perf_counter() - t0)
            out[f"single_4k_{kind}_us_{name}"] = round(statistics.median(ts) * 1e6, 1)
        io.close()
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
