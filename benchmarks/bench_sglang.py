"""kvbm_fs as SGLang's HiCache L3 backend against SGLang's own ``HiCacheFile``, side by side in one run, on local disk.

What it measures
    Pages: 64 tokens of a Llama-3.2-1B-like model on one rank (16 layers, 8 KV heads, head dim 64,
    bfloat16: 64 x 16 x 8 x 64 x 2 (K, V) x 2 B = 2 MiB a page), in SGLang's default host layout
    for HiCache (``--hicache-mem-layout page_first`` with the default ``kernel`` I/O backend), TP 1.
    The host pool is a stand-in with the attributes and ``kv_buffer`` of SGLang 0.5.23's
    ``MHATokenToKVPoolHost`` whose page methods (``get_data_page``, ``get_dummy_flat_data_page``,
    ``set_from_flat_data_page``) are SGLang's own, compiled from the installed ``pool_host/mha.py``
    (the class itself does not import on a CPU machine; tests/test_sglang.py does the same).

    Both backends are driven with the calls SGLang's cache controller makes for them, in batches of
    128 pages (``STORAGE_BATCH_SIZE``):

    - ``HiCacheFile`` (``--hicache-storage-backend file``, its defaults: no eviction cap, no metadata
      cache): ``_generic_page_set`` = ``batch_set(keys, [get_data_page(i) ...])`` (one buffered
      ``.bin`` file per page, temp file + rename, no fsync), ``_generic_page_get`` =
      ``batch_get(keys, [get_dummy_flat_data_page() ...])`` then ``set_from_flat_data_page`` per page,
      and ``batch_exists`` (the ABC's loop of ``exists`` = one ``os.path.exists`` per page).
    - kvbm_fs (``dynamic`` + ``"interface_v1": 1``): ``batch_set_v1`` / ``batch_get_v1`` straight
      between the host pool and the store, ``batch_exists`` (one ``Store.match``). One disk tier
      (``file://``) in the same scratch folder, so both write to the same filesystem; its I/O
      engine and O_DIRECT use are what ``io=auto`` picks (``kvbm_disk`` in the JSON); every read is
      verified (xxh3-128 over the payload).

    Throughput (``set``, ``get_warm``, ``get_cold``; 1 GB = 1e9 B): ``--rounds`` rounds, each one
    batch of 128 fresh pages (256 MiB) per backend, backends back to back, who goes first
    alternating per round; GB/s are medians over rounds of one batch call each. After every set an
    untimed ``os.sync()`` flushes that backend's dirty pages so its write-back does not land in the
    other's timing (HiCacheFile's set itself returns once the bytes are in the page cache; kvbm_fs
    writes with O_DIRECT where the filesystem allows). ``get_warm`` reads the batch just written
    with nothing dropped: HiCacheFile reads it from the page cache, kvbm_fs from wherever its I/O
    engine reads (the device, with O_DIRECT). ``get_cold`` reads it again after
    ``sync; echo 3 > /proc/sys/vm/drop_caches`` (``drop_caches`` says whether that worked; it needs
    root), so both read from the device. Every get is checked byte for byte against the source
    pages. ``*_ratio`` = kvbm_fs GB/s / HiCacheFile GB/s (above 1: kvbm_fs faster).

    Existence (``exists``): ``batch_exists`` on a 128-page prefix, with ``--stored`` pages stored
    (default 10,000 and 1,000,000), ``--calls`` calls per case and backend, p50/p99. Cases: ``hit``
    (a stored 128-page chain: 128), ``miss_last`` (the first 127 pages of a stored chain and a page
    never stored: 127), ``miss_first`` (a never-stored chain: 0). Calls interleave cases and
    backends (orders rotated), each call another chain, warm caches (everything was just created);
    ``first_hit_after_drop_ms`` is one hit call right after a cache drop. The stored pages are
    chains of 128 SGLang-style page keys (64 hex digits, each the sha256 of the previous one), and
    they are populated without their bytes, since neither backend's existence check reads page data:

    - HiCacheFile: one empty file per page, created (``os.open(O_CREAT)`` + ``close``) under the exact
      name HiCacheFile uses (``<key>_<model>_<tp_rank>_<tp_size>.bin``, from its own
      ``_get_suffixed_key``) in its one folder, which is all its ``exists`` looks at;
    - kvbm_fs: the backend opens a disk tier (directory, geometry, namespace record), is closed, and
      one index record per page (the chained kvbm_fs key the backend itself computes for that page,
      in a slot below the high-water mark, as a committed block) is bulk-loaded into the tier's LMDB
      index in sorted transactions of 2^20 entries (as benchmarks/bench_disk.py does); then the
      backend is opened again on that directory. No segment data is written.

    ``population`` gives each side's seconds; ``files_per_folder`` is the most entries in any one
    folder of each backend's directory (throughput and each population), with the index size.

Why
    HiCacheFile is what an SGLang user gets out of the box; an L3 backend has to be at least as fast
    on the same pages while adding what it lacks (verification, bounded capacity, namespacing, one
    index instead of a file per page). The machine is small and shared: ``load_average`` is
    recorded at the start and the end, and nothing here passes or fails.

Run ``python benchmarks/bench_sglang.py [--quick]`` in an environment with SGLang (``.ci/run-sglang``
builds ``.venv-sglang``); prints one JSON object and writes it to ``benchmarks/results/bench_sglang.json``
(``bench_sglang.quick.json`` with ``--quick``: 2 rounds, 10,000 stored pages, 100 calls). Scratch goes
under ``--dir`` (default ``benchmarks/.scratch``) and is removed afterwards. Without SGLang it prints
``{"skipped": ...}`` and exits 0.
"""

from __future__ import annotations
import __future__

import argparse
import ast
import gc
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    Caches,
    add_output_args,
    add_scratch_arg,
    bulk_load_index,
    emit,
    load_average,
    mount_of,
    pct,
    results_path,
    scratch_parent,
    skip,
)

from kvbm_fs.testing.sglang import storage_config

NAME = "bench_sglang"
MODEL_NAME = "meta-llama/Llama-3.2-1B"  # the namespace's model name (no download: random pages)
BATCH = 128  # SGLang's STORAGE_BATCH_SIZE
MODEL: dict[str, Any] = {
    "name": "Llama-3.2-1B-like (one rank, TP 1)",
    "layers": 16,
    "kv_heads": 8,
    "head_dim": 64,
    "dtype": "bfloat16",
    "page_tokens": 64,
    "layout": "page_first",
}
CHUNK = 1 << 20  # index records per bulk-load transaction
PAGE_METHODS = ("get_data_page", "get_dummy_flat_data_page", "set_from_flat_data_page")


# ---- the host pool ---------------------------------------------------------------------------------------


class PageFirstPool:
    """Attributes and ``kv_buffer`` of SGLang 0.5.23's ``MHATokenToKVPoolHost`` in ``page_first`` layout.

    The page methods below are fallbacks; :func:`use_sglang_page_methods` replaces them with SGLang's."""

    def __init__(self, pages: int, layers: int, heads: int, head_dim: int, page_size: int) -> None:
        import torch

        self.layout, self.layer_num, self.head_num, self.head_dim = "page_first", layers, heads, head_dim
        self.v_head_dim, self.page_size, self.page_num = head_dim, page_size, pages
        self.size, self.dtype, self.device, self.pin_memory = pages * page_size, torch.bfloat16, "cpu", False
        self.dcp_size, self.dcp_rank = 1, 0
        self.kv_buffer = torch.empty((2, self.size, layers, heads, head_dim), dtype=torch.bfloat16)

    def get_data_page(self, index: int, flat: bool = True) -> Any:
        page = self.kv_buffer[:, index : index + self.page_size]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> Any:
        import torch

        shape = (2, self.layer_num, self.page_size, self.head_num, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: Any) -> None:
        shape = (2, self.page_size, self.layer_num, self.head_num, self.head_dim)
        self.kv_buffer[:, index : index + self.page_size] = data_page.reshape(shape)

    @property
    def page_nbytes(self) -> int:
        return 2 * self.page_size * self.layer_num * self.head_num * self.head_dim * 2


def use_sglang_page_methods() -> str:
    """Put SGLang's own ``MHATokenToKVPoolHost`` page methods on :class:`PageFirstPool` (compiled from the
    installed ``pool_host/mha.py``, whose package does not import here); where they are."""
    import sglang
    import torch

    path = Path(sglang.__file__).parent / "srt" / "mem_cache" / "pool_host" / "mha.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MHATokenToKVPoolHost")
    funcs: list[ast.stmt] = [f for f in node.body if isinstance(f, ast.FunctionDef) and f.name in PAGE_METHODS]
    flags = __future__.annotations.compiler_flag
    code = compile(ast.Module(body=funcs, type_ignores=[]), str(path), "exec", flags=flags, dont_inherit=True)
    ns: dict[str, Any] = {"torch": torch}
    exec(code, ns)
    for f in funcs:
        assert isinstance(f, ast.FunctionDef)
        setattr(PageFirstPool, f.name, ns[f.name])
    return f"sglang {path.relative_to(path.parents[3])}" if len(funcs) == len(PAGE_METHODS) else "partial"


def extra_info() -> Any:
    """What the controller passes with every storage call (a prompt with nothing before it)."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo

    return HiCacheStorageExtraInfo(prefix_keys=None)


def keys_for(n: int, salt: str) -> list[str]:
    """A chain of SGLang-style page keys: 64 hex digits, each the sha256 of the previous one."""
    out, prev = [], salt.encode()
    for i in range(n):
        prev = hashlib.sha256(prev + i.to_bytes(4, "little")).digest()
        out.append(prev.hex())
    return out


def page_indices(pool: PageFirstPool, first_page: int, n: int) -> Any:
    """SGLang's host indices for ``n`` whole pages: every token slot of each page, in order."""
    import torch

    return torch.arange(first_page * pool.page_size, (first_page + n) * pool.page_size, dtype=torch.int64)


# ---- one backend each, driven as SGLang's cache controller drives it ------------------------------------


class FileSide:
    """SGLang's ``HiCacheFile`` through the controller's generic page path (``_generic_page_set/get``)."""

    name = "file"

    def __init__(self, root: str, pool: PageFirstPool) -> None:
        from sglang.srt.mem_cache.hicache_storage import HiCacheFile

        self.root, self.pool = root, pool
        self.b = HiCacheFile(storage_config({}, model_name=MODEL_NAME), file_path=root)

    def set(self, keys: list[str], host_indices: Any) -> bool:
        ps = self.pool.page_size
        data = [self.pool.get_data_page(host_indices[i * ps]) for i in range(len(keys))]
        return bool(self.b.batch_set(keys, data))

    def get(self, keys: list[str], host_indices: Any) -> int:
        ps = self.pool.page_size
        page_data = self.b.batch_get(keys, [self.pool.get_dummy_flat_data_page() for _ in keys])
        count = 0
        for i in range(len(keys)):
            if page_data[i] is None:
                break
            self.pool.set_from_flat_data_page(host_indices[i * ps], page_data[i])
            count += 1
        return count

    def exists(self, keys: list[str], info: Any) -> int:
        return int(self.b.batch_exists(keys, info))

    def file_name(self, key: str) -> str:
        return f"{self.b._get_suffixed_key(key)}.bin"

    def close(self) -> None:
        pass


class KvbmSide:
    """kvbm_fs through SGLang's zero-copy path (``_page_set_zero_copy`` / ``_page_get_zero_copy``)."""

    name = "kvbm"

    def __init__(self, root: str, pool: PageFirstPool, capacity: int, opts: str = "") -> None:
        from kvbm_fs.integration.sglang import KvbmFsHiCacheStorage

        self.root, self.pool = root, pool
        extra = {"interface_v1": 1, "tiers": [f"file://{root}?capacity={capacity}{opts}"]}
        self.b = KvbmFsHiCacheStorage(storage_config(extra, model_name=MODEL_NAME), {})
        self.b.register_mem_pool_host(pool)

    def set(self, keys: list[str], host_indices: Any) -> bool:
        return all(self.b.batch_set_v1(keys, host_indices, extra_info()))

    def get(self, keys: list[str], host_indices: Any) -> int:
        results = self.b.batch_get_v1(keys, host_indices, extra_info())
        count = 0
        for ok in results:
            if not ok:
                break
            count += 1
        return count

    def exists(self, keys: list[str], info: Any) -> int:
        return int(self.b.batch_exists(keys, info))

    def disk(self) -> dict[str, Any]:
        tier = self.b.stats()["store"]["tiers"][0]
        return {k: tier.get(k) for k in ("data_path", "direct_io", "durable", "slot_bytes", "slots")}

    def close(self) -> None:
        self.b.close()


# ---- the machine --------------------------------------------------------------------------------------


def filesystem(path: str) -> dict[str, Any]:
    st = os.statvfs(path)
    m = mount_of(path)
    fs = {"device": m["device"], "mount": m["mountpoint"], "type": m["fstype"]}
    return {**fs, "free_gib": round(st.f_bavail * st.f_frsize / 2**30, 1), "free_inodes": st.f_favail}


def max_entries(root: str) -> int:
    return max((len(files) + len(dirs) for _, dirs, files in os.walk(root)), default=0)


def du(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        total += os.lstat(dirpath).st_blocks * 512
        total += sum(os.lstat(os.path.join(dirpath, f)).st_blocks * 512 for f in files)
    return total


# ---- part 1: batch_set / batch_get GB/s -------------------------------------------------------------------


def throughput(parent: str, pool: PageFirstPool, rounds: int, caches: Caches, disk_opts: str) -> dict[str, Any]:
    import torch

    root = tempfile.mkdtemp(prefix="tput-", dir=parent)
    nbytes = pool.page_nbytes
    capacity = (rounds + 2) * BATCH * (nbytes + (1 << 16)) + (256 << 20)
    sides: list[Any] = [
        FileSide(os.path.join(root, "file"), pool),
        KvbmSide(os.path.join(root, "kvbm"), pool, capacity, disk_opts),
    ]
    src, dst = page_indices(pool, 0, BATCH), page_indices(pool, BATCH, BATCH)
    raw = pool.kv_buffer.view(torch.uint8)
    n_tok = BATCH * pool.page_size
    cases = ("set", "get_warm", "get_cold")
    secs: dict[str, list[float]] = {f"{s.name}_{c}": [] for s in sides for c in cases}

    def timed_get(side: Any, keys: list[str], case: str) -> None:
        raw[:, n_tok:].zero_()
        if case == "get_cold":
            caches.drop()
        gc.disable()
        t0 = time.perf_counter()
        got = side.get(keys, dst)
        secs[f"{side.name}_{case}"].append(time.perf_counter() - t0)
        gc.enable()
        assert got == BATCH, f"{side.name} {case}: {got} of {BATCH} pages read"
        assert raw[:, n_tok:].equal(raw[:, :n_tok]), f"{side.name} {case}: pages read back differ"

    try:
        for r in range(rounds):
            keys = keys_for(BATCH, f"tput-{r}")
            for side in sides if r % 2 == 0 else sides[::-1]:
                os.sync()
                gc.disable()
                t0 = time.perf_counter()
                ok = side.set(keys, src)
                secs[f"{side.name}_set"].append(time.perf_counter() - t0)
                gc.enable()
                assert ok, f"{side.name}: set failed"
                os.sync()  # untimed: this backend's write-back stays out of the next timing
                timed_get(side, keys, "get_warm")
                timed_get(side, keys, "get_cold")
        kvbm = sides[1]
        stats = kvbm.b.stats()
        disk = kvbm.disk()
        files = {s.name: max_entries(s.root) for s in sides}
    finally:
        for s in sides:
            s.close()
        shutil.rmtree(root, ignore_errors=True)

    gbps = {k: BATCH * nbytes / statistics.median(v) / 1e9 for k, v in secs.items()}
    out: dict[str, Any] = {}
    for c in cases:
        out[c] = {
            "kvbm_gbps": round(gbps[f"kvbm_{c}"], 3),
            "file_gbps": round(gbps[f"file_{c}"], 3),
            "ratio": round(gbps[f"kvbm_{c}"] / gbps[f"file_{c}"], 3),
            "kvbm_batch_ms": [round(x * 1e3, 1) for x in secs[f"kvbm_{c}"]],
            "file_batch_ms": [round(x * 1e3, 1) for x in secs[f"file_{c}"]],
        }
    out["rounds"] = rounds
    out["batch_pages"] = BATCH
    out["batch_bytes"] = BATCH * nbytes
    out["files_per_folder"] = files
    out["kvbm_disk"] = disk
    out["kvbm_failed_pages"] = stats["failed_pages"]
    out["page_cache"] = (
        "set: HiCacheFile's writes end in the page cache (no fsync; an untimed os.sync follows each set), "
        "kvbm_fs writes with O_DIRECT when kvbm_disk.direct_io; get_warm: no drop, HiCacheFile reads the "
        "just-written pages from the page cache; get_cold: after drop_caches, both read from the device "
        "(if drop_caches worked)"
    )
    return out


# ---- part 2: batch_exists with many stored pages ----------------------------------------------------------


def chains_of(stored: int) -> list[tuple[int, int]]:
    """(chain id, length) of the stored pages: chains of 128 pages, the last one shorter."""
    return [(c, min(BATCH, stored - c * BATCH)) for c in range((stored + BATCH - 1) // BATCH)]


def stored_keys(c: int, n: int = BATCH) -> list[str]:
    return keys_for(n, f"stored-{c}")


def populate_file(side: FileSide, stored: int) -> float:
    """One empty file per stored page, under HiCacheFile's own name for it, in its folder."""
    t0 = time.perf_counter()
    folder = side.b.file_path
    flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL
    for c, n in chains_of(stored):
        for k in stored_keys(c, n):
            os.close(os.open(os.path.join(folder, side.file_name(k)), flags, 0o644))
    return time.perf_counter() - t0


def populate_kvbm(root: str, pool: PageFirstPool, stored: int, disk_opts: str) -> dict[str, Any]:
    """Index records for every stored page, bulk-loaded into the disk tier's LMDB index (no data)."""
    from kvbm_fs.tiers.disk import ALIGN, HEADER_PAGE, round_up

    nbytes = pool.page_nbytes
    slot_bytes = HEADER_PAGE + round_up(nbytes, ALIGN)
    capacity = (stored + 2 * BATCH) * slot_bytes
    t0 = time.perf_counter()
    side = KvbmSide(root, pool, capacity, disk_opts)  # directory, geometry, namespace record
    ns = side.b.namespace
    assert ns is not None
    hashes, parents = [], []
    for c, n in chains_of(stored):
        bk = side.b.keys(stored_keys(c, n), extra_info())  # the backend's own chained keys for these pages
        hashes.append(bk.hashes)
        parents.append(bk.parents)
    side.close()
    keys_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    bulk_load_index(os.path.join(root, "index"), ns.id, np.concatenate(hashes), np.concatenate(parents), nbytes, CHUNK)
    load_s = time.perf_counter() - t0
    return {"capacity": capacity, "keys_s": keys_s, "bulk_load_s": load_s}


def existence(parent: str, pool: PageFirstPool, stored: int, calls: int, caches: Caches, opts: str) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix=f"exists-{stored}-", dir=parent)
    file_side = FileSide(os.path.join(root, "file"), pool)
    kvbm_side: KvbmSide | None = None
    try:
        file_s = populate_file(file_side, stored)
        kv = populate_kvbm(os.path.join(root, "kvbm"), pool, stored, opts)
        t0 = time.perf_counter()
        kvbm_side = KvbmSide(os.path.join(root, "kvbm"), pool, kv["capacity"], opts)
        reopen_s = time.perf_counter() - t0
        sides: list[Any] = [file_side, kvbm_side]
        n_files = sum(1 for n in os.listdir(file_side.root) if n.endswith(".bin"))
        assert kvbm_side.b.store is not None
        n_index = len(kvbm_side.b.store.tiers[0])
        assert n_files == stored and n_index == stored, f"populated {n_files} files, {n_index} index records"

        full = [c for c, n in chains_of(stored) if n == BATCH]
        rng = np.random.default_rng(3)
        picks = rng.choice(full, size=min(len(full), max(calls, 64)), replace=len(full) < max(calls, 64)).tolist()
        prompts: dict[str, list[list[str]]] = {"hit": [], "miss_last": [], "miss_first": []}
        for i, c in enumerate(picks):
            ks = stored_keys(c)
            prompts["hit"].append(ks)
            prompts["miss_last"].append(ks[:-1] + keys_for(1, f"never-{i}"))
            prompts["miss_first"].append(keys_for(BATCH, f"never-chain-{i}"))
        expect = {"hit": BATCH, "miss_last": BATCH - 1, "miss_first": 0}
        info = extra_info()

        # one hit call each right after a cache drop (page cache and dentries gone), on a chain of its own
        first: dict[str, float | None] = {}
        for j, side in enumerate(sides):
            dropped = caches.drop()
            ks = stored_keys(full[(j + 1) * len(full) // 3])
            t0 = time.perf_counter()
            got = side.exists(ks, info)
            first[side.name] = round((time.perf_counter() - t0) * 1e3, 3) if dropped else None
            assert got == BATCH, f"{side.name}: first exists found {got}"

        times: dict[str, list[float]] = {f"{s.name}_{k}": [] for s in sides for k in prompts}
        kinds = list(prompts)
        for i in range(-3, calls):  # 3 warm-up calls of each
            r = i % len(kinds)
            for kind in kinds[r:] + kinds[:r]:
                ks = prompts[kind][i % len(prompts[kind])]
                for side in sides if i % 2 == 0 else sides[::-1]:
                    gc.disable()
                    t0 = time.perf_counter()
                    got = side.exists(ks, info)
                    dt = time.perf_counter() - t0
                    gc.enable()
                    assert got == expect[kind], f"{side.name} {kind}: batch_exists {got}, expected {expect[kind]}"
                    if i >= 0:
                        times[f"{side.name}_{kind}"].append(dt)
        files = {s.name: max_entries(s.root) for s in sides}
        index_bytes = du(os.path.join(kvbm_side.root, "index"))
        folder_bytes = os.stat(file_side.root).st_size
    finally:
        if kvbm_side is not None:
            kvbm_side.close()
        t0 = time.perf_counter()
        shutil.rmtree(root, ignore_errors=True)
        cleanup_s = time.perf_counter() - t0

    out: dict[str, Any] = {"stored_pages": stored, "calls_per_case": calls}
    for kind in kinds:
        row: dict[str, Any] = {}
        for s in ("kvbm", "file"):
            ts = times[f"{s}_{kind}"]
            row[f"{s}_p50_us"] = round(pct(ts, 50) * 1e6, 1)
            row[f"{s}_p99_us"] = round(pct(ts, 99) * 1e6, 1)
        row["p50_speedup"] = round(row["file_p50_us"] / row["kvbm_p50_us"], 2)
        row["returned"] = expect[kind]
        out[kind] = row
    out["first_hit_after_drop_ms"] = first
    out["files_per_folder"] = files
    out["file_folder_inode_bytes"] = folder_bytes
    out["kvbm_index_bytes"] = index_bytes
    out["population_s"] = {
        "file_create_empty_files": round(file_s, 1),
        "file_files_per_s": round(stored / file_s),
        "kvbm_compute_keys": round(kv["keys_s"], 1),
        "kvbm_bulk_load_index": round(kv["bulk_load_s"], 1),
        "kvbm_reopen_backend": round(reopen_s, 2),
        "cleanup_rmtree_both": round(cleanup_s, 1),
    }
    return out


# ---- main ---------------------------------------------------------------------------------------------------


def have_sglang() -> str | None:
    try:
        import sglang.srt.mem_cache.hicache_storage  # noqa: F401
    except ImportError as e:
        return f"SGLang is not installed here ({e}); run it in .venv-sglang (.ci/run-sglang builds it)"
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="throughput rounds of one 128-page batch (default 20)")
    ap.add_argument(
        "--stored",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10_000, 1_000_000],
        help="stored pages for batch_exists, comma-separated (default 10000,1000000)",
    )
    ap.add_argument("--calls", type=int, default=1000, help="batch_exists calls per case and backend (default 1000)")
    add_scratch_arg(ap)
    ap.add_argument("--disk-opts", default="", help="extra kvbm_fs disk tier URL options, e.g. '&direct=false'")
    add_output_args(ap, "small run: 2 rounds, 10,000 stored pages, 100 calls")
    args = ap.parse_args(argv)
    args.out = args.out or results_path(NAME, args.quick)
    if args.quick:
        args.rounds, args.stored, args.calls = 2, [10_000], 100
    skipped = have_sglang()
    if skipped is not None:
        return skip(skipped)
    import sglang
    import torch

    parent = scratch_parent(args.dir)
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": NAME,
        "load_average_start": load_average(),
        "filesystem_start": filesystem(str(parent)),
    }
    methods = use_sglang_page_methods()
    m = MODEL
    pool = PageFirstPool(2 * BATCH, m["layers"], m["kv_heads"], m["head_dim"], m["page_tokens"])
    pool.kv_buffer.view(torch.int64).random_(generator=torch.Generator().manual_seed(0))
    caches = Caches()
    tput = throughput(str(parent), pool, args.rounds, caches, args.disk_opts)
    exists = {f"{n}": existence(str(parent), pool, n, args.calls, caches, args.disk_opts) for n in args.stored}

    result["model"] = {**m, "page_bytes": pool.page_nbytes, "tp_size": 1, "sglang": sglang.__version__}
    result["pool_page_methods"] = methods
    for c in ("set", "get_cold", "get_warm"):
        result[f"{c}_kvbm_gbps"] = tput[c]["kvbm_gbps"]
        result[f"{c}_file_gbps"] = tput[c]["file_gbps"]
        result[f"{c}_ratio"] = tput[c]["ratio"]
    for n, e in exists.items():
        for kind in ("hit", "miss_last"):
            for s in ("kvbm", "file"):
                for q in ("p50", "p99"):
                    result[f"exists_{n}_{kind}_{s}_{q}_us"] = e[kind][f"{s}_{q}_us"]
    result["throughput"] = tput
    result["exists"] = exists
    result["drop_caches"] = {"tried": caches.tried, "worked": caches.ok, "error": caches.error or None}
    result["load_average_end"] = load_average()
    result["filesystem_end"] = filesystem(str(parent))
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    emit(result, args.out, one_line=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
