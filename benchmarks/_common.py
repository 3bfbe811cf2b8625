"""Plumbing the benchmark scripts share: where results go, how they are printed, the interleaved timing
harness, page-cache drops, scratch folders, the machine's description, and bulk-loading a disk tier's index.

Each benchmark measures something different, but they all have to be fair on a small, shared, noisy
machine in the same way (cases interleaved in rounds, ratios paired within a round, the load average
recorded) and to leave their JSON where the README and the committed ``results/`` expect it.  Keeping
that logic here means a fix to it (say, to how a ratio is paired) reaches every benchmark at once.

The scripts run as ``python benchmarks/X.py``, which puts this folder on ``sys.path``, so they import
it as ``from _common import ...``; mypy (``mypy kvbm_fs tests benchmarks``) resolves it the same way,
since ``benchmarks/`` is not a package.  Only the standard library and numpy are imported up front:
the "skipped" paths of the optional-dependency benchmarks must work anywhere.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRATCH = HERE / ".scratch"
OUT_HELP = "default: benchmarks/results/<name>[.quick].json"


# ---- command line and output ------------------------------------------------------------------------------
def add_output_args(ap: argparse.ArgumentParser, quick_help: str) -> None:
    """``--quick`` (a small run, what the smoke tests use) and ``--out``: every benchmark takes both, and
    ``--out`` defaults to :func:`results_path` so that a plain run refreshes the committed result."""
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", type=Path, default=None, help=OUT_HELP)


def add_scratch_arg(ap: argparse.ArgumentParser) -> None:
    """``--dir``: where the scratch folder goes; see :func:`scratch_parent` for why not the temp dir."""
    ap.add_argument("--dir", type=Path, default=None, help="scratch parent (default benchmarks/.scratch)")


def results_path(name: str, quick: bool, suffix: str = "") -> Path:
    """``benchmarks/results/<name>[.quick]<suffix>.json``: a quick run never overwrites a full run's numbers."""
    return RESULTS / f"{name}{'.quick' if quick else ''}{suffix}.json"


def emit(res: dict[str, Any], path: Path | None, indent: int = 2, one_line: bool = False) -> None:
    """Print the result as JSON on stdout (the smoke tests and CI parse it; ``one_line`` for the scripts
    whose output is grepped) and write it, indented, to ``path`` (``None``: print only)."""
    print(json.dumps(res) if one_line else json.dumps(res, indent=indent))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=indent) + "\n")


def skip(reason: str, **head: Any) -> dict[str, Any]:
    """Print and return ``{..head, "skipped": reason}``: a benchmark whose optional dependency (SGLang,
    vLLM, transformers, CUDA) is missing still prints valid JSON and exits 0, so CI and the smoke tests
    can run every script everywhere."""
    res = {**head, "skipped": reason}
    print(json.dumps(res))
    return res


# ---- the machine -------------------------------------------------------------------------------------------
def loadavg_1m() -> float:
    """The 1-minute load average: on a shared machine it says how much to trust the seconds."""
    return round(os.getloadavg()[0], 2)


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def env(**versions: Any) -> dict[str, Any]:
    """The ``env`` block: Python, the given library versions (in order), CPU count and 1-minute load."""
    return {"python": platform.python_version(), **versions, "cpus": os.cpu_count(), "loadavg_1m": loadavg_1m()}


def mount_of(path: str) -> dict[str, str]:
    """The /proc/self/mounts entry whose mount point is the longest prefix of ``path``: disk numbers mean
    nothing without the filesystem (and tmpfs is not a disk)."""
    path = os.path.realpath(path)
    best = {"mountpoint": "", "fstype": "unknown", "device": "unknown", "options": ""}
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, mnt, fstype, opts = line.split()[:4]
                mnt = mnt.replace("\\040", " ")
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best["mountpoint"]):
                    best = {"mountpoint": mnt, "fstype": fstype, "device": dev, "options": opts}
    except OSError:
        pass
    return best


class Caches:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` before a timed read, so that it reads the device and not
    the page cache; it needs root, so every attempt is counted and the JSON says whether it worked."""

    def __init__(self) -> None:
        self.tried = self.ok = 0
        self.error = ""

    def drop(self) -> bool:
        os.sync()
        self.tried += 1
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            self.error = f"{type(e).__name__}: {e.strerror}"
            return False
        self.ok += 1
        return True

    @property
    def all_worked(self) -> bool:
        """At least one drop was tried and every one worked."""
        return self.tried > 0 and self.ok == self.tried


# ---- scratch folders ---------------------------------------------------------------------------------------
def scratch_parent(d: Path | None) -> Path:
    """``d``, or ``benchmarks/.scratch`` (git-ignored): on the repository's disk rather than the temp dir,
    which may be tmpfs, so disk benchmarks touch a real device.  Created if missing."""
    parent = d if d is not None else SCRATCH
    parent.mkdir(parents=True, exist_ok=True)
    return parent


@contextmanager
def scratch_dir(parent: Path, prefix: str, keep: bool = False) -> Iterator[Path]:
    """A fresh folder under ``parent``, removed afterwards (also on failure) unless ``keep``."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield root
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


# ---- timing ------------------------------------------------------------------------------------------------
class Case:
    """One timed operation, run once per round by :func:`interleave`.

    ``before``/``after`` run untimed around it every round (resetting state, dropping caches, checking
    bytes); the garbage collector is off while ``fn`` runs so that a collection never lands in one case's
    time.  Subclasses switch on extra per-call measures: ``track_cpu`` (process CPU seconds, all threads),
    ``track_faults`` (minor page faults: a hidden temporary buffer shows up there), ``self_timed`` (``fn``
    returns its own duration in seconds, e.g. dd's, recorded in ``times``; ``wall`` keeps the clock's)."""

    track_cpu: ClassVar[bool] = False
    track_faults: ClassVar[bool] = False
    self_timed: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        fn: Callable[[], Any],
        before: Callable[[], Any] | None = None,
        after: Callable[[], Any] | None = None,
    ) -> None:
        self.name, self.fn, self.before, self.after = name, fn, before, after
        self.times: list[float] = []
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.faults: list[int] = []

    def run(self, record: bool) -> None:
        if self.before:
            self.before()
        gc.disable()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if self.track_faults else 0
        c0 = time.process_time() if self.track_cpu else 0.0
        t0 = time.perf_counter()
        own = self.fn()
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0 if self.track_cpu else 0.0
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if self.track_faults else 0
        gc.enable()
        if self.after:
            self.after()
        if record:
            self.times.append(float(own) if self.self_timed and own is not None else dt)
            self.wall.append(dt)
            self.cpu.append(dc)
            self.faults.append(f1 - f0)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def interleave(cases: Sequence[Case], rounds: int, warmup: int = 1) -> None:
    """Every case once per round; the order rotates each round so no case always runs first (or always
    right after the same neighbour): on a noisy machine, drift then hits every case alike."""
    cases = list(cases)
    for r in range(warmup + rounds):
        k = r % len(cases)
        for c in cases[k:] + cases[:k]:
            c.run(record=r >= warmup)


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of (den time / num time), paired within a round: how many times faster ``num``
    is than ``den``.  Pairing cancels the load that changes from round to round, which a ratio of two
    medians would not."""
    return statistics.median(d / n for n, d in zip(num, den))


def gbps(nbytes: int, times: Sequence[float], digits: int = 3) -> float:
    """GB/s (1 GB = 1e9 bytes) of moving ``nbytes`` in the median of ``times``."""
    return round(nbytes / statistics.median(times) / 1e9, digits)


def gbps_spread(nbytes: int, times: Sequence[float], digits: int) -> dict[str, float]:
    """GB/s at the slowest, median and fastest round: how noisy a case was, next to its median."""
    return {
        "gbps_min": round(nbytes / max(times) / 1e9, digits),
        "gbps_median": gbps(nbytes, times, digits),
        "gbps_max": round(nbytes / min(times) / 1e9, digits),
    }


def pct(ts: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``ts`` (latency tails: p50/p99)."""
    return float(np.percentile(np.asarray(ts), q))


# ---- a big disk-tier index without writing its data ----------------------------------------------------------
def bulk_load_index(
    index_dir: str,
    ns_id: int,
    hashes: np.ndarray,
    parents: np.ndarray,
    payload_len: int,
    chunk: int = 1 << 20,
    map_size: int | None = None,
    ns_record: bytes | None = None,
) -> float:
    """Write committed-block records for ``hashes`` (with ``parents``) straight into a disk tier's LMDB
    index: slot i holds the i-th smallest key, rank grows with slot, ``hwm`` = n, checksums random.
    Sorted ``putmulti(append=True)`` transactions of ``chunk`` records into ``blocks``, ``slots`` and
    ``order``; ``ns_record`` (a namespace's canonical bytes), if given, is stored as ``ns/<id>``.

    Why: lookup and reopen at millions of entries are what matter, and putting that many blocks through
    the tier would write terabytes; nothing that is measured reads segment data.  Returns the seconds
    from opening the index to closing it (the sort before is not counted)."""
    from kvbm_fs.tiers.disk.index import KEY, U64, VAL, DiskIndex

    n = hashes.size
    order = np.argsort(hashes, kind="stable")
    h, p = hashes[order], parents[order]
    assert n == 0 or (np.diff(h) > 0).all(), "duplicate keys"
    kdt = np.dtype([("ns", ">u8"), ("h", ">u8")])
    u8, u4 = "<u8", "<u4"  # VAL: slot, parent, csum lo, csum hi, rank, payload_len, hits
    vdt = np.dtype([("slot", u8), ("parent", u8), ("lo", u8), ("hi", u8), ("rank", u8), ("plen", u4), ("hits", u4)])
    assert kdt.itemsize == KEY.size and vdt.itemsize == VAL.size
    rng = np.random.default_rng(1)
    rank0 = time.time_ns() // 1000 - n  # older than anything written later
    t0 = time.perf_counter()
    idx = DiskIndex(index_dir) if map_size is None else DiskIndex(index_dir, map_size=map_size)
    try:
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            slots = np.arange(a, b, dtype=np.uint64)
            k = np.empty(b - a, kdt)
            k["ns"], k["h"] = ns_id, h[a:b]
            v = np.zeros(b - a, vdt)
            v["slot"], v["parent"], v["rank"], v["plen"] = slots, p[a:b], rank0 + slots, payload_len
            v["lo"] = rng.integers(0, np.iinfo(np.uint64).max, b - a, dtype=np.uint64)
            v["hi"] = rng.integers(0, np.iinfo(np.uint64).max, b - a, dtype=np.uint64)
            kb = np.frombuffer(k.tobytes(), f"V{KEY.size}").tolist()
            vb = np.frombuffer(v.tobytes(), f"V{VAL.size}").tolist()
            sk = np.frombuffer(slots.astype(">u8").tobytes(), "V8").tolist()
            o = np.empty(b - a, kdt)
            o["ns"], o["h"] = rank0 + slots, slots  # order key: (rank, slot) BE
            ob = np.frombuffer(o.tobytes(), f"V{KEY.size}").tolist()
            with idx.env.begin(write=True) as txn:
                for db, items in (
                    (idx.blocks, zip(kb, vb)),
                    (idx.slots, zip(sk, kb)),
                    (idx.order, ((x, b"") for x in ob)),
                ):
                    added = txn.cursor(db).putmulti(items, append=True)[1]
                    assert added == b - a, f"bulk load: {added} of {b - a} added"
        with idx.env.begin(write=True) as txn:
            txn.put(b"hwm", U64.pack(n), db=idx.meta)
            if ns_record is not None:
                txn.put(b"ns/%016x" % ns_id, ns_record, db=idx.meta)
        idx.env.sync(True)
    finally:
        idx.close()
    return time.perf_counter() - t0


def bench_blocks(name: str, blocks: int, block_mib: float) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """A namespace of ~``block_mib`` MiB bfloat16 blocks, ``blocks`` chained keys in it, random rows
    and a zeroed output buffer: the set-up the transport benchmarks (peer, Mooncake) share."""
    from kvbm_fs import BlockKeys, KVLayout, Namespace

    layout = KVLayout(
        num_layers=32, num_kv_heads=8, head_dim=128, block_size=max(1, int(block_mib * 8)), dtype="bfloat16"
    )
    ns = Namespace(name, layout)
    keys = BlockKeys.chain(ns.id, np.arange(1, blocks + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    data = np.random.default_rng(0).integers(0, 256, (blocks, ns.block_nbytes), np.uint8)
    return ns, keys, data, np.zeros_like(data)
