"""kvbm_fs as SGLang's HiCache L3 backend, side by side with SGLang's own ``HiCacheFile`` on the same pages.

What it measures
    Pages of one host pool (SGLang's page_first MHA layout, bfloat16; 8 layers x 4 KV heads x 128 dims
    x 32 tokens = 512 KiB a page) go through both backends the way SGLang's cache controller drives
    them, in batches of 128 pages (``STORAGE_BATCH_SIZE``):

    - ``HiCacheFile`` (``--hicache-storage-backend file``, the generic path): ``batch_set`` of
      ``get_data_page`` tensors, ``batch_get`` into dummy flat pages then ``set_from_flat_data_page``,
      ``batch_exists``. One ``.bin`` file per page per rank, all in one folder.
    - kvbm_fs (``dynamic`` + ``interface_v1``): ``batch_set_v1`` / ``batch_get_v1`` straight between the
      pool and the store, ``batch_exists``; tiers: one disk tier (``file://``), so both write every page
      to the same filesystem; every read is verified (xxh3-128 over the payload).

    ``set_ratio``, ``get_ratio``, ``exists_ratio`` are kvbm_fs pages/s over HiCacheFile pages/s (above
    1: kvbm_fs faster), medians over rounds that run both backends back to back on fresh keys (sets)
    or the pages just written (gets, exists). ``files_per_folder_*`` is the most directory entries in
    any one folder of each backend's directory after the run. Reads come from the page cache for both
    (the data was just written); kvbm_fs may read with O_DIRECT where the filesystem allows.

Why
    HiCacheFile is what an SGLang user gets out of the box; an L3 backend has to be at least as fast on
    the same pages while adding what it lacks (verification, bounded capacity, namespacing, one index
    instead of a file per page).

Run ``python benchmarks/bench_sglang.py [--quick]`` in an environment with SGLang (``.ci/run-sglang``
builds ``.venv-sglang``); prints one JSON object and writes it to ``benchmarks/results/bench_sglang.json``
(``bench_sglang.quick.json`` with ``--quick``: 32 pages, 3 rounds). Without SGLang it prints
``{"skipped": ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

NAME = "bench_sglang"
BATCH = 128  # SGLang's STORAGE_BATCH_SIZE


class PageFirstPool:
    """The attributes and page methods of SGLang 0.5.23's ``MHATokenToKVPoolHost`` in ``page_first``
    layout (its module cannot be imported on a CPU machine; see tests/test_sglang.py)."""

    def __init__(self, pages: int, layers: int = 8, heads: int = 4, head_dim: int = 128, page_size: int = 32) -> None:
        import torch

        self.layout, self.layer_num, self.head_num, self.head_dim = "page_first", layers, heads, head_dim
        self.v_head_dim, self.page_size, self.page_num = head_dim, page_size, pages
        self.size, self.dtype, self.dcp_size = pages * page_size, torch.bfloat16, 1
        self.kv_buffer = torch.empty((2, self.size, layers, heads, head_dim), dtype=torch.bfloat16)
        raw = self.kv_buffer.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))

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


def storage_config(extra: dict[str, Any]) -> Any:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return HiCacheStorageConfig(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=True,
        model_name="bench/model",
        extra_config=extra,
    )


def keys_for(n: int, salt: str) -> list[str]:
    out, prev = [], salt.encode()
    for i in range(n):
        prev = hashlib.sha256(prev + i.to_bytes(4, "little")).digest()
        out.append(prev.hex())
    return out


def batches(n: int) -> list[tuple[int, int]]:
    return [(a, min(a + BATCH, n)) for a in range(0, n, BATCH)]


# ---- one backend each, driven as SGLang's controller does ----------------------------------------------


class FileSide:
    """SGLang's ``HiCacheFile`` through the controller's generic page path."""

    def __init__(self, root: str, pool: PageFirstPool) -> None:
        from sglang.srt.mem_cache.hicache_storage import HiCacheFile

        self.root, self.pool = root, pool
        self.b = HiCacheFile(storage_config({}), file_path=root)

    def set(self, keys: list[str], pages: list[int]) -> bool:
        ps = self.pool.page_size
        ok = True
        for a, z in batches(len(keys)):
            ok &= self.b.batch_set(keys[a:z], [self.pool.get_data_page(p * ps) for p in pages[a:z]])
        return ok

    def get(self, keys: list[str], pages: list[int]) -> int:
        ps, n = self.pool.page_size, 0
        for a, z in batches(len(keys)):
            got = self.b.batch_get(keys[a:z], [self.pool.get_dummy_flat_data_page() for _ in range(z - a)])
            for p, t in zip(pages[a:z], got):
                if t is not None:
                    self.pool.set_from_flat_data_page(p * ps, t)
                    n += 1
        return n

    def exists(self, keys: list[str]) -> int:
        return sum(self.b.batch_exists(keys[a:z]) for a, z in batches(len(keys)))

    def close(self) -> None:
        pass


class KvbmSide:
    """kvbm_fs through SGLang's zero-copy path (``interface_v1``), one disk tier."""

    def __init__(self, root: str, pool: PageFirstPool, capacity: int, opts: str = "") -> None:
        from kvbm_fs.integration.sglang import KvbmFsHiCacheStorage

        self.root, self.pool = root, pool
        extra = {"interface_v1": 1, "tiers": [f"file://{root}?capacity={capacity}{opts}"]}
        self.b = KvbmFsHiCacheStorage(storage_config(extra), {})
        self.b.register_mem_pool_host(pool)

    def _idx(self, pages: list[int]) -> Any:
        import torch

        ps = self.pool.page_size
        return (torch.tensor(pages)[:, None] * ps + torch.arange(ps)).reshape(-1)

    def set(self, keys: list[str], pages: list[int]) -> bool:
        return all(all(self.b.batch_set_v1(keys[a:z], self._idx(pages[a:z]))) for a, z in batches(len(keys)))

    def get(self, keys: list[str], pages: list[int]) -> int:
        return sum(sum(self.b.batch_get_v1(keys[a:z], self._idx(pages[a:z]))) for a, z in batches(len(keys)))

    def exists(self, keys: list[str]) -> int:
        return sum(self.b.batch_exists(keys[a:z]) for a, z in batches(len(keys)))

    def close(self) -> None:
        self.b.close()


# ---- measurement ------------------------------------------------------------------------------------------


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def max_entries(root: str) -> int:
    return max((len(files) + len(dirs) for _, dirs, files in os.walk(root)), default=0)


def one_round(sides: dict[str, Any], n: int, r: int, rates: dict[str, list[float]]) -> None:
    """Both backends, back to back, on the same pages: set (fresh keys), get (into other slots), exists."""
    import torch

    src, dst = list(range(n)), list(range(n, 2 * n))
    keys = keys_for(n, f"round{r}")
    order = list(sides.items()) if r % 2 == 0 else list(reversed(sides.items()))  # alternate who goes first
    for name, side in order:
        dt, ok = timed(side.set, keys, src)
        assert ok, f"{name}: set failed"
        rates[f"{name}_set"].append(n / dt)
        dt, got = timed(side.get, keys, dst)
        assert got == n, f"{name}: {got} of {n} pages read"
        rates[f"{name}_get"].append(n / dt)
        raw, half = side.pool.kv_buffer.view(torch.uint8), n * side.pool.page_size
        assert raw[:, half:].equal(raw[:, :half]), f"{name}: pages read back differ"
        dt, hit = timed(side.exists, keys)
        assert hit == n, f"{name}: exists found {hit} of {n}"
        rates[f"{name}_exists"].append(n / dt)


def run(n: int, rounds: int, parent: Path, disk_opts: str = "") -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix=f"{NAME}-", dir=parent)
    pools = {"file": PageFirstPool(2 * n), "kvbm": PageFirstPool(2 * n)}
    nbytes = pools["file"].page_nbytes
    capacity = (rounds + 1) * n * (nbytes + 8192) + (64 << 20)
    sides: dict[str, Any] = {
        "file": FileSide(os.path.join(root, "file"), pools["file"]),
        "kvbm": KvbmSide(os.path.join(root, "kvbm"), pools["kvbm"], capacity, disk_opts),
    }
    rates: dict[str, list[float]] = {f"{s}_{op}": [] for s in sides for op in ("set", "get", "exists")}
    try:
        for r in range(rounds):
            one_round(sides, n, r, rates)
        stats = sides["kvbm"].b.stats()
        files = {s: max_entries(side.root) for s, side in sides.items()}
    finally:
        for side in sides.values():
            side.close()
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    out: dict[str, Any] = {}
    for op in ("set", "get", "exists"):
        out[f"{op}_ratio"] = round(med[f"kvbm_{op}"] / med[f"file_{op}"], 3)
        out[f"kvbm_{op}_pages_per_s"] = round(med[f"kvbm_{op}"], 1)
        out[f"file_{op}_pages_per_s"] = round(med[f"file_{op}"], 1)
    out["files_per_folder_file"] = files["file"]
    out["files_per_folder_kvbm"] = files["kvbm"]
    out["page_bytes"] = nbytes
    out["pages_per_round"] = n
    out["rounds"] = rounds
    out["kvbm_disk_opts"] = disk_opts
    out["kvbm_failed_pages"] = stats["failed_pages"]
    return out


def have_sglang() -> str | None:
    try:
        import sglang.srt.mem_cache.hicache_storage  # noqa: F401
    except ImportError as e:
        return f"SGLang is not installed here ({e}); run it in .venv-sglang (.ci/run-sglang builds it)"
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    ap.add_argument("--pages", type=int, default=256, help="pages per round (default 256 = 128 MiB)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch parent (default benchmarks/.scratch)")
    ap.add_argument("--disk-opts", default="", help="extra disk tier URL options, e.g. '&direct=false'")
    ap.add_argument("--quick", action="store_true", help="small run: 32 pages, 3 rounds")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<name>[.quick].json")
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parent
    if args.out is None:
        args.out = here / "results" / f"{NAME}{'.quick' if args.quick else ''}.json"
    if args.quick:
        args.pages, args.rounds = 32, 3
    skipped = have_sglang()
    if skipped is not None:
        result: dict[str, Any] = {"skipped": skipped}
        print(json.dumps(result))
        return result
    parent = args.dir if args.dir is not None else here / ".scratch"
    parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"benchmark": NAME, **run(args.pages, args.rounds, parent, args.disk_opts)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
