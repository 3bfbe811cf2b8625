"""The SGLang HiCache L3 backend (``kvbm_fs.integration.sglang``), driven the way SGLang drives it.

Two halves. The first runs everywhere (the core venv has no SGLang): the backend against host pools
built like SGLang 0.5.23's, with a plain stand-in for ``HiCacheStorageConfig``. The second needs SGLang
(``.ci/run-sglang`` installs it into ``.venv-sglang`` and sets ``KVBM_FS_REQUIRE_SGLANG=1`` so that a
missing SGLang fails instead of skipping): the real ``HiCacheStorage`` ABC, ``HiCacheStorageConfig``,
``StorageBackendFactory`` (the ``dynamic`` loader) and ``HiCacheFile``.

Host pools: SGLang's real ``MHATokenToKVPoolHost``/``MLATokenToKVPoolHost`` cannot be imported on this
CPU machine (their module imports SGLang's model configs, which need a CUDA torchvision), so the pools
here are stand-ins: the attributes and ``kv_buffer`` dims of SGLang 0.5.23's ``init_kv_buffer`` for
each layout. Where SGLang is installed, their ``get_data_page``, ``set_from_flat_data_page``,
``get_dummy_flat_data_page`` (and MLA's ``_storage_page_index``) are SGLang's own methods, compiled from
the installed source, so page addressing is SGLang's and not a copy of it.
"""

from __future__ import annotations
import __future__

import ast
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from kvbm_fs import ConfigError, IllegalTransitionError, LayoutMismatchError
from kvbm_fs.events import EventKind
from kvbm_fs.integration.sglang import KvbmFsHiCacheStorage, host_pages
from kvbm_fs.testing.sglang import storage_config
from kvbm_fs.tiers.disk import HEADER_PAGE, DiskTier

REQUIRE_SGLANG = bool(os.environ.get("KVBM_FS_REQUIRE_SGLANG"))
MODULE = "kvbm_fs.integration.sglang"


def have_sglang() -> bool:
    if REQUIRE_SGLANG:
        return True
    try:
        import sglang.srt.mem_cache.hicache_storage  # noqa: F401
    except ImportError:
        return False
    return True


SGLANG = have_sglang()


# ---- host pools --------------------------------------------------------------------------------------


class MHAPool:
    """Attributes and ``kv_buffer`` of SGLang 0.5.23 ``MHATokenToKVPoolHost`` (page methods: see the module
    docstring; these fallbacks copy SGLang's for the core venv)."""

    DIMS: ClassVar[dict[str, Any]] = {
        "layer_first": lambda s: (2, s.layer_num, s.size, s.head_num, s.head_dim),
        "page_first": lambda s: (2, s.size, s.layer_num, s.head_num, s.head_dim),
        "page_first_direct": lambda s: (2, s.page_num, s.layer_num, s.page_size, s.head_num, s.head_dim),
        "page_head": lambda s: (2, s.page_num, s.head_num, s.page_size, s.layer_num, s.head_dim),
    }

    def __init__(
        self,
        layout: str = "page_first",
        layer_num: int = 2,
        head_num: int = 2,
        head_dim: int = 8,
        page_size: int = 4,
        page_num: int = 16,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.layout, self.layer_num, self.head_num, self.head_dim = layout, layer_num, head_num, head_dim
        self.v_head_dim, self.page_size, self.page_num, self.size = head_dim, page_size, page_num, page_num * page_size
        self.dtype, self.device, self.pin_memory, self.dcp_size, self.dcp_rank = dtype, "cpu", False, 1, 0
        self.kv_buffer = torch.zeros(self.DIMS[layout](self), dtype=dtype)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        if self.layout == "layer_first":
            page = self.kv_buffer[:, :, index : index + self.page_size]
        elif self.layout == "page_first":
            page = self.kv_buffer[:, index : index + self.page_size]
        else:
            page = self.kv_buffer[:, index // self.page_size : index // self.page_size + 1]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(
            (2, self.layer_num, self.page_size, self.head_num, self.head_dim), dtype=self.dtype
        ).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        self.get_data_page(index, flat=False).copy_(data_page.reshape(self.get_data_page(index, flat=False).shape))


class MLAPool:
    """Attributes and ``kv_buffer`` of SGLang 0.5.23 ``MLATokenToKVPoolHost`` (one latent row per token)."""

    DIMS: ClassVar[dict[str, Any]] = {
        "layer_first": lambda s: (s.layer_num, s.size, 1, s.kv_cache_dim),
        "page_first": lambda s: (s.size, s.layer_num, 1, s.kv_cache_dim),
        "page_first_direct": lambda s: (s.page_num, s.layer_num, s.page_size, 1, s.kv_cache_dim),
    }

    def __init__(
        self,
        layout: str = "page_first",
        layer_num: int = 2,
        kv_cache_dim: int = 24,
        page_size: int = 4,
        page_num: int = 16,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.layout, self.layer_num, self.kv_cache_dim = layout, layer_num, kv_cache_dim
        self.kv_lora_rank, self.qk_rope_head_dim = kv_cache_dim - 8, 8
        self.page_size, self.page_num, self.size = page_size, page_num, page_num * page_size
        self.dtype, self.device, self.pin_memory, self.dcp_size, self.dcp_rank = dtype, "cpu", False, 1, 0
        self.kv_buffer = torch.zeros(self.DIMS[layout](self), dtype=dtype)

    def _storage_page_index(self, index: int) -> int:
        return index

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        if self.layout == "layer_first":
            page = self.kv_buffer[:, index : index + self.page_size]
        elif self.layout == "page_first":
            page = self.kv_buffer[index : index + self.page_size]
        else:
            page = self.kv_buffer[index // self.page_size : index // self.page_size + 1]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros((self.layer_num, self.page_size, 1, self.kv_cache_dim), dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        self.get_data_page(index, flat=False).copy_(data_page.reshape(self.get_data_page(index, flat=False).shape))


PAGE_METHODS = ("get_data_page", "get_dummy_flat_data_page", "set_from_flat_data_page", "_storage_page_index")


def sglang_methods(source: str, cls: str) -> dict[str, Any]:
    """SGLang's own page methods of ``cls``, compiled from the installed ``pool_host/<source>`` (whose
    package cannot be imported here) so the stand-in pools address pages exactly as SGLang does."""
    import sglang

    path = Path(sglang.__file__).parent / "srt" / "mem_cache" / "pool_host" / source
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    funcs: list[ast.stmt] = [f for f in node.body if isinstance(f, ast.FunctionDef) and f.name in PAGE_METHODS]
    flags = __future__.annotations.compiler_flag
    code = compile(ast.Module(body=funcs, type_ignores=[]), str(path), "exec", flags=flags, dont_inherit=True)
    ns: dict[str, Any] = {"torch": torch}
    exec(code, ns)
    return {f.name: ns[f.name] for f in funcs if isinstance(f, ast.FunctionDef)}


if SGLANG:
    for _cls, _src, _name in ((MHAPool, "mha.py", "MHATokenToKVPoolHost"), (MLAPool, "mla.py", "MLATokenToKVPoolHost")):
        for _attr, _fn in sglang_methods(_src, _name).items():
            setattr(_cls, _attr, _fn)


def fill(pool: Any, seed: int = 0) -> None:
    """Random bytes everywhere (any bit pattern: comparisons are bytewise)."""
    g = torch.Generator().manual_seed(seed)
    raw = pool.kv_buffer.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, generator=g, dtype=torch.uint8))


def indices(pool: Any, pages: list[int]) -> torch.Tensor:
    """SGLang's host indices for whole pages: every token slot of each page, in order."""
    ps = pool.page_size
    return (
        torch.cat([torch.arange(p * ps, (p + 1) * ps) for p in pages]) if pages else torch.zeros(0, dtype=torch.int64)
    )


def page_bytes(pool: Any, page: int) -> bytes:
    return pool.get_data_page(page * pool.page_size, flat=True).contiguous().view(torch.uint8).numpy().tobytes()


def page_keys(n: int, seed: str = "doc") -> list[str]:
    """A chain of 64-hex page hashes, as SGLang's sha256-per-page keys look."""
    out, prev = [], seed.encode()
    for i in range(n):
        prev = hashlib.sha256(prev + i.to_bytes(4, "little")).digest()
        out.append(prev.hex())
    return out


# ---- storage config ------------------------------------------------------------------------------------


def extra(tmp: Path, host: bool = True, **kw: Any) -> dict[str, Any]:
    """What ``--hicache-storage-backend-extra-config`` carries: SGLang's loader keys plus kvbm_fs tiers."""
    tiers = ["host://?capacity=1MiB"] if host else []
    tiers.append(f"file://{tmp}?capacity=4MiB")
    return {
        "backend_name": "kvbm_fs",
        "module_path": MODULE,
        "class_name": "KvbmFsHiCacheStorage",
        "interface_v1": 1,
        "tiers": tiers,
        **kw,
    }


def backend(
    tmp: Path, pool: Any, host: bool = True, cfg_kw: dict[str, Any] | None = None, **kw: Any
) -> KvbmFsHiCacheStorage:
    """Construct and register as SGLang's cache controller does: ``cls(storage_config, kwargs)``, then the pool."""
    b = KvbmFsHiCacheStorage(storage_config(extra(tmp, host, **kw), **(cfg_kw or {})), {})
    b.register_mem_pool_host(pool)
    return b


@pytest.fixture
def closing() -> Any:
    opened: list[KvbmFsHiCacheStorage] = []
    yield opened
    for b in opened:
        b.close()


# ---- everywhere: the backend against SGLang-shaped host pools --------------------------------------------

POOLS = [("mha", lay) for lay in MHAPool.DIMS] + [("mla", lay) for lay in MLAPool.DIMS]


def make_pool(kind: str, layout: str, **kw: Any) -> Any:
    return MHAPool(layout, **kw) if kind == "mha" else MLAPool(layout, **kw)


@pytest.mark.parametrize(("kind", "layout"), POOLS)
def test_set_v1_then_get_v1_into_another_region_is_bit_exact(
    kind: str, layout: str, tmp_path: Path, closing: Any
) -> None:
    pool = make_pool(kind, layout)
    fill(pool)
    b = backend(tmp_path, pool)
    closing.append(b)
    keys = page_keys(4)
    src, dst = [1, 2, 5, 6], [9, 10, 12, 13]
    assert b.batch_set_v1(keys, indices(pool, src)) == [True] * 4
    want = [page_bytes(pool, p) for p in src]
    untouched = page_bytes(pool, 11)
    got = b.batch_get_v1(keys, indices(pool, dst))
    assert isinstance(got, list) and got == [True] * 4
    assert [page_bytes(pool, p) for p in dst] == want
    assert page_bytes(pool, 11) == untouched


@pytest.mark.parametrize(("kind", "layout"), POOLS)
def test_runs_of_consecutive_pages_copy_bit_exact(kind: str, layout: str, tmp_path: Path, closing: Any) -> None:
    """Long runs of host pages are copied a run at a time (slices), short ones with one indexed copy: both
    move the same bytes, in batch order, whatever the layout."""
    pool = make_pool(kind, layout, page_num=64)
    fill(pool, seed=2)
    b = backend(tmp_path, pool)
    closing.append(b)
    assert b.pages is not None
    src = [*range(20, 28), *range(2, 10)]  # two runs of 8, out of order
    dst = [*range(40, 44), *range(50, 62)]
    assert b.pages.runs(torch.tensor(src)) == [(0, 20, 8), (8, 2, 8)]
    assert b.pages.runs(torch.tensor([1, 3, 5])) is None
    keys = page_keys(16, "runs")
    assert b.batch_set_v1(keys, indices(pool, src)) == [True] * 16
    want = [page_bytes(pool, p) for p in src]
    untouched = page_bytes(pool, 44)
    assert b.batch_get_v1(keys, indices(pool, dst)) == [True] * 16
    assert [page_bytes(pool, p) for p in dst] == want
    assert page_bytes(pool, 44) == untouched
    assert b.batch_get_v1(keys[::2], indices(pool, list(range(30, 38)))) == [True] * 8  # via index_copy_
    assert [page_bytes(pool, p) for p in range(30, 38)] == want[::2]


@pytest.mark.parametrize(("kind", "layout"), [("mha", "page_first"), ("mha", "layer_first"), ("mla", "layer_first")])
def test_legacy_flat_pages_and_v1_name_the_same_bytes(kind: str, layout: str, tmp_path: Path, closing: Any) -> None:
    """SGLang without interface_v1 moves ``get_data_page(flat=True)`` tensors; they are the v1 rows."""
    pool = make_pool(kind, layout)
    fill(pool, seed=1)
    b = backend(tmp_path, pool)
    closing.append(b)
    keys = page_keys(3)
    assert b.batch_set_v1(keys[:2], indices(pool, [3, 4])) == [True, True]
    assert b.set(keys[2], pool.get_data_page(7 * pool.page_size, flat=True))
    targets = [pool.get_dummy_flat_data_page() for _ in keys]
    out = b.batch_get(keys, targets)
    assert all(o is t for o, t in zip(out, targets))
    assert [t.view(torch.uint8).numpy().tobytes() for t in targets] == [page_bytes(pool, p) for p in (3, 4, 7)]
    assert b.batch_get_v1(keys[2:], indices(pool, [0])) == [True]
    assert page_bytes(pool, 0) == page_bytes(pool, 7)
    assert b.get(page_keys(1, "other")[0]) is None
    assert b.exists(keys[2]) and not b.exists(page_keys(1, "other")[0])


def test_batch_exists_is_the_longest_present_prefix_in_one_store_call(tmp_path: Path, closing: Any) -> None:
    pool = MHAPool()
    fill(pool)
    b = backend(tmp_path, pool)
    closing.append(b)
    keys = page_keys(6)
    assert b.batch_set_v1([keys[i] for i in (0, 1, 2, 4, 5)], indices(pool, [0, 1, 2, 4, 5])) == [True] * 5
    assert b.store is not None
    before = b.store.counters["match_calls"]
    assert b.batch_exists(keys) == 3
    assert b.store.counters["match_calls"] == before + 1
    assert b.batch_exists(keys[:3]) == 3
    assert b.batch_exists(keys[3:]) == 0
    assert b.batch_exists([]) == 0


def test_batch_exists_probes_the_first_page_in_every_tier(tmp_path: Path, closing: Any) -> None:
    """A prompt whose first page is nowhere is answered by one probe (no match); one whose first page is
    only in a lower tier is still matched in full."""
    pool = MHAPool()
    fill(pool)
    b = backend(tmp_path, pool)
    closing.append(b)
    keys = page_keys(4)
    assert b.batch_set_v1(keys, indices(pool, [0, 1, 2, 3])) == [True] * 4
    assert b.store is not None and len(b.store.tiers) == 2
    b.store.tiers[0].delete(b.keys(keys[:1]))  # first page now only on disk
    before = b.store.counters["match_calls"]
    assert b.batch_exists(keys) == 4
    assert b.batch_exists(page_keys(4, "new") + keys) == 0
    assert b.store.counters["match_calls"] == before + 1
    assert b.stats()["exists_calls"] == 2 and b.stats()["exists_hits"] == 4


def disk_of(b: KvbmFsHiCacheStorage) -> DiskTier:
    assert b.store is not None
    return next(t for t in b.store.tiers if isinstance(t, DiskTier))


def flip_payload(b: KvbmFsHiCacheStorage, key: str) -> None:
    """XOR a byte in the middle of one page's payload in its disk segment file, behind the store's back."""
    disk = disk_of(b)
    keys = b.keys([key])
    rec = disk.index.records(keys.ns, keys.hashes)[0]
    assert rec is not None
    seg, off = disk._locate(rec.slot)
    fd = os.open(disk._segment_path(seg), os.O_RDWR)
    try:
        assert b.pages is not None
        at = off + HEADER_PAGE + b.pages.layout.block_nbytes // 2
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x5A]), at)
    finally:
        os.close(fd)


def test_a_corrupt_page_on_disk_is_false_and_never_served(tmp_path: Path, closing: Any) -> None:
    pool = MHAPool("page_first_direct")
    fill(pool)
    b = backend(tmp_path, pool, host=False)
    closing.append(b)
    keys = page_keys(4)
    assert b.batch_set_v1(keys, indices(pool, [0, 1, 2, 3])) == [True] * 4
    flip_payload(b, keys[2])
    sentinel = torch.full_like(pool.kv_buffer, 7).view(torch.uint8)
    pool.kv_buffer.view(torch.uint8)[:] = sentinel
    before = page_bytes(pool, 10)
    assert b.batch_get_v1(keys, indices(pool, [8, 9, 10, 11])) == [True, True, False, True]
    assert page_bytes(pool, 10) == before  # the slot is untouched, not half-written
    assert b.get(keys[2], pool.get_dummy_flat_data_page()) is None
    s = b.stats()
    assert s["failed_pages"] >= 1 and s["hit_pages"] == 3
    assert any(ev.kind is EventKind.LOAD_FAILED for ev in b.take_events())


def test_restart_on_the_same_disk_dir_finds_every_page(tmp_path: Path, closing: Any) -> None:
    pool = MHAPool("layer_first")
    fill(pool)
    keys = page_keys(5)
    a = backend(tmp_path, pool)
    assert a.batch_set_v1(keys, indices(pool, [0, 1, 2, 3, 4])) == [True] * 5
    want = [page_bytes(pool, p) for p in range(5)]
    live = backend(tmp_path, MHAPool("layer_first"))  # a second engine while the first runs: written through
    closing.append(live)
    assert live.batch_exists(keys) == 5
    a.close()
    fresh = MHAPool("layer_first")
    b = backend(tmp_path, fresh)
    closing.append(b)
    assert b.batch_exists(keys) == 5
    assert b.batch_get_v1(keys, indices(fresh, [11, 12, 13, 14, 15])) == [True] * 5
    assert [page_bytes(fresh, p) for p in range(11, 16)] == want


@pytest.mark.parametrize(
    ("what", "pool_kw", "cfg_kw"),
    [
        ("tp_rank", {}, {"tp_rank": 1, "tp_size": 2}),
        ("tp_size", {}, {"tp_size": 2}),
        ("pp_rank", {}, {"pp_rank": 1, "pp_size": 2}),
        ("model", {}, {"model_name": "org/model-b"}),
        ("dtype", {"dtype": torch.float16}, {}),
        ("page layout", {"layout": "page_head"}, {}),
        ("heads", {"head_num": 4, "head_dim": 4}, {}),
    ],
)
def test_pages_never_match_across_namespaces(
    what: str, pool_kw: dict, cfg_kw: dict, tmp_path: Path, closing: Any
) -> None:
    pool = MHAPool()
    fill(pool)
    keys = page_keys(3)
    a = backend(tmp_path, pool)
    closing.append(a)
    assert a.batch_set_v1(keys, indices(pool, [0, 1, 2])) == [True] * 3
    other_pool = MHAPool(**{"layout": "page_first", **pool_kw})
    other = backend(tmp_path, other_pool, cfg_kw=cfg_kw)
    closing.append(other)
    assert other.namespace != a.namespace, what
    assert other.batch_exists(keys) == 0, what
    assert other.batch_get_v1(keys, indices(other_pool, [4, 5, 6])) == [False] * 3, what


def test_mla_only_rank0_writes_and_every_rank_reads_it(tmp_path: Path, closing: Any) -> None:
    mla = {"is_mla_model": True, "tp_size": 2}
    pool0, pool1 = MLAPool(), MLAPool()
    fill(pool0, seed=3)
    fill(pool1, seed=4)
    r0 = backend(tmp_path, pool0, cfg_kw={**mla, "tp_rank": 0})
    r1 = backend(tmp_path, pool1, cfg_kw={**mla, "tp_rank": 1})
    closing += [r0, r1]
    assert r0.namespace == r1.namespace and r0.is_writer and not r1.is_writer
    keys = page_keys(3)
    assert r1.batch_set_v1(keys, indices(pool1, [0, 1, 2])) == [True] * 3  # a no-op that SGLang treats as done
    assert r0.batch_exists(keys) == 0 and r1.stats()["skipped_pages"] == 3
    assert r0.batch_set_v1(keys, indices(pool0, [0, 1, 2])) == [True] * 3
    assert r1.batch_exists(keys) == 3
    assert r1.batch_get_v1(keys, indices(pool1, [5, 6, 7])) == [True] * 3
    assert [page_bytes(pool1, p) for p in (5, 6, 7)] == [page_bytes(pool0, p) for p in (0, 1, 2)]


def test_mha_ranks_each_write_their_own_shard(tmp_path: Path, closing: Any) -> None:
    keys = page_keys(2)
    pools = [MHAPool(), MHAPool()]
    ranks = []
    for r, pool in enumerate(pools):
        fill(pool, seed=10 + r)
        ranks.append(backend(tmp_path, pool, cfg_kw={"tp_rank": r, "tp_size": 2}))
        assert ranks[-1].is_writer
        assert ranks[-1].batch_set_v1(keys, indices(pool, [0, 1])) == [True, True]
    closing += ranks
    for r, pool in enumerate(pools):
        assert ranks[r].batch_get_v1(keys, indices(pool, [2, 3])) == [True, True]
        assert page_bytes(pool, 2) == page_bytes(pool, 0)
    assert page_bytes(pools[0], 2) != page_bytes(pools[1], 2)


def test_stats_count_pages_and_bytes(tmp_path: Path, closing: Any) -> None:
    pool = MHAPool()
    fill(pool)
    b = backend(tmp_path, pool)
    closing.append(b)
    keys = page_keys(4)
    b.batch_set_v1(keys[:2], indices(pool, [0, 1]))
    b.batch_set_v1(keys[:2], indices(pool, [0, 1]))  # already stored: nothing rewritten
    b.batch_get_v1(keys, indices(pool, [4, 5, 6, 7]))
    b.batch_exists(keys)
    s = b.stats()
    nbytes = host_pages(pool).layout.block_nbytes
    assert (s["written_pages"], s["present_pages"], s["written_bytes"]) == (2, 2, 2 * nbytes)
    assert (s["hit_pages"], s["miss_pages"], s["read_bytes"]) == (2, 2, 2 * nbytes)
    assert (s["exists_calls"], s["exists_hits"]) == (1, 2)
    m = b.get_stats()
    assert m.prefetch_pgs == [4] and m.backup_pgs == [2, 2]
    assert b.get_stats().backup_pgs == []  # drained per interval, as SGLang's collector expects
    assert {ev.kind for ev in b.take_events()} >= {EventKind.STORED}


def test_default_tiers_are_host_plus_a_disk_under_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closing: Any
) -> None:
    for k in ("KVBM_FS_TIERS", "KVBM_FS_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("KVBM_FS_SGLANG_DIR", str(tmp_path / "l3"))
    b = KvbmFsHiCacheStorage(storage_config({"interface_v1": 1}), {})
    assert [str(t).split("?")[0] for t in b.config.tiers] == ["host://", f"file://{tmp_path / 'l3'}"]
    b.register_mem_pool_host(MHAPool())
    closing.append(b)
    assert b.store is not None and [t.medium.value for t in b.store.tiers] == ["host", "disk"]


def test_a_config_file_supplies_the_tiers(tmp_path: Path, closing: Any) -> None:
    cfg = tmp_path / "kvbm.toml"
    cfg.write_text(f'tiers = ["file://{tmp_path / "d"}?capacity=2MiB"]\n')
    b = KvbmFsHiCacheStorage(storage_config({"config": str(cfg), "write_through": False}), {})
    b.register_mem_pool_host(MHAPool())
    closing.append(b)
    assert b.store is not None and [t.medium.value for t in b.store.tiers] == ["disk"] and not b.write_through


@pytest.mark.parametrize(
    ("extra_config", "error"),
    [
        ({"tiers": ["nope://x"]}, ConfigError),
        ({"tiers": 5}, ConfigError),
        ({"write_through": "yes"}, ConfigError),
        ({"config": "/nonexistent/kvbm.toml"}, ConfigError),
        ({"policy": 3}, ConfigError),
    ],
)
def test_bad_config_is_a_config_error(extra_config: dict, error: type, tmp_path: Path) -> None:
    with pytest.raises(error):
        KvbmFsHiCacheStorage(storage_config(extra_config), {})


def test_misuse_raises_builtin_subclasses(tmp_path: Path, closing: Any) -> None:
    b = KvbmFsHiCacheStorage(storage_config(extra(tmp_path)), {})
    with pytest.raises(RuntimeError) as e:
        b.batch_exists(page_keys(1))
    assert isinstance(e.value, IllegalTransitionError)
    with pytest.raises(ValueError, match="not supported"):
        b.register_mem_pool_host(SimpleNamespace(kv_buffer=torch.zeros(4), layout="page_unified", page_size=4))
    pool = MHAPool()
    b.register_mem_pool_host(pool)
    closing.append(b)
    with pytest.raises(LayoutMismatchError):  # not whole pages
        b.batch_set_v1(page_keys(1), torch.arange(1, 5))
    with pytest.raises(LayoutMismatchError):  # too few indices for the keys
        b.batch_get_v1(page_keys(2), indices(pool, [0]))
    with pytest.raises(LayoutMismatchError):  # outside the pool
        b.batch_get_v1(page_keys(1), indices(pool, [pool.page_num]))
    with pytest.raises(LayoutMismatchError):  # a flat page of the wrong size
        b.set(page_keys(1)[0], torch.zeros(3, dtype=torch.bfloat16))
    assert b.batch_set_v1([], indices(pool, [])) == [] and b.batch_get_v1([], indices(pool, [])) == []


def test_a_pinned_layout_that_the_pool_does_not_have_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "kvbm.toml"
    cfg.write_text(
        'tiers = ["host://?capacity=1MiB"]\n[layout]\nnum_layers = 2\nnum_kv_heads = 2\nhead_dim = 8\n'
        'block_size = 8\ndtype = "bfloat16"\norder = "KTLHD"\n'
    )
    b = KvbmFsHiCacheStorage(storage_config({"config": str(cfg)}), {})
    with pytest.raises(LayoutMismatchError):
        b.register_mem_pool_host(MHAPool(page_size=4))


def test_non_hex_keys_are_accepted_and_distinct(tmp_path: Path, closing: Any) -> None:
    """SGLang's unified key scheme appends a coordinate (``{hash}_{digest}_L0-31``) to the page hash."""
    pool = MHAPool()
    fill(pool)
    b = backend(tmp_path, pool)
    closing.append(b)
    keys = [f"{k}_abcd_L0-1" for k in page_keys(2)]
    assert b.batch_set_v1(keys, indices(pool, [0, 1])) == [True, True]
    assert b.batch_exists(keys) == 2 and b.batch_exists(page_keys(2)) == 0


def test_clear_deletes_only_this_namespace(tmp_path: Path, closing: Any) -> None:
    keys = page_keys(2)
    a, other = MHAPool(), MHAPool()
    fill(a)
    fill(other)
    ba = backend(tmp_path, a)
    bo = backend(tmp_path, other, cfg_kw={"model_name": "org/other"})
    closing += [ba, bo]
    ba.batch_set_v1(keys, indices(a, [0, 1]))
    bo.batch_set_v1(keys, indices(other, [0, 1]))
    assert ba.clear() is True
    assert ba.batch_exists(keys) == 0 and bo.batch_exists(keys) == 2


# ---- with SGLang installed: its real ABC, config, loader and file backend ---------------------------------


@pytest.fixture
def sglang() -> Any:
    if not REQUIRE_SGLANG:
        pytest.importorskip(
            "sglang.srt.mem_cache.hicache_storage", reason="SGLang is not installed (see .ci/run-sglang)"
        )
    import sglang.srt.mem_cache.hicache_storage as hs

    return hs


def test_subclasses_sglangs_real_hicache_storage_abc(sglang: Any) -> None:
    assert issubclass(KvbmFsHiCacheStorage, sglang.HiCacheStorage)
    assert not getattr(KvbmFsHiCacheStorage, "__abstractmethods__", None)


def test_sglangs_dynamic_loader_builds_it_and_the_controller_sequence_works(
    sglang: Any, tmp_path: Path, closing: Any
) -> None:
    """What ``HiCacheController.attach_storage_backend`` and its prefetch/backup threads do, in order:
    ``StorageBackendFactory.create_backend("dynamic", config, pool)``, ``register_mem_pool_host``,
    ``on_host_pools_registered``; backup: ``all(batch_set_v1(hashes, host_indices, extra_info))``;
    prefetch: ``batch_exists(batch, extra_info)``, then ``batch_get_v1`` into freshly allocated slots."""
    from sglang.srt.mem_cache.storage import StorageBackendFactory

    pool = MHAPool("page_first")
    fill(pool)
    cfg = storage_config(extra(tmp_path))
    b = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    closing.append(b)
    assert isinstance(b, KvbmFsHiCacheStorage)
    b.register_mem_pool_host(pool)
    b.on_host_pools_registered()
    keys = page_keys(6)
    info = sglang.HiCacheStorageExtraInfo(prefix_keys=None)
    assert all(b.batch_set_v1(keys[:4], indices(pool, [0, 1, 2, 3]), info))
    info2 = sglang.HiCacheStorageExtraInfo(prefix_keys=keys[:4])
    assert all(b.batch_set_v1(keys[4:], indices(pool, [4, 5]), info2))
    hit = b.batch_exists(keys, sglang.HiCacheStorageExtraInfo(prefix_keys=None))
    assert hit == 6
    results = b.batch_get_v1(keys[:hit], indices(pool, [10, 11, 12, 13, 14, 15]), None)
    assert results == [True] * 6
    assert [page_bytes(pool, p) for p in range(10, 16)] == [page_bytes(pool, p) for p in range(6)]


def test_reads_what_sglangs_hicache_file_reads_on_the_same_pages(sglang: Any, tmp_path: Path, closing: Any) -> None:
    """Both backends store the same pages from one pool; each reads back SGLang's own flat page bytes."""
    pool = MHAPool("page_first")
    fill(pool)
    keys = page_keys(4)
    hf = sglang.HiCacheFile(storage_config({}), file_path=str(tmp_path / "hf"))
    assert hf.batch_set(keys, [pool.get_data_page(p * pool.page_size) for p in range(4)])
    kv = backend(tmp_path / "kv", pool)
    closing.append(kv)
    assert kv.batch_set_v1(keys, indices(pool, [0, 1, 2, 3])) == [True] * 4
    assert hf.batch_exists(keys) == kv.batch_exists(keys) == 4
    from_file = hf.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    from_kv = kv.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    assert [t.view(torch.uint8).numpy().tobytes() for t in from_file] == [
        t.view(torch.uint8).numpy().tobytes() for t in from_kv if t is not None
    ]


def test_the_mla_writer_is_the_rank_sglangs_config_names(sglang: Any, tmp_path: Path) -> None:
    for rank, writer in ((0, True), (1, False)):
        cfg = storage_config(extra(tmp_path), is_mla_model=True, tp_rank=rank, tp_size=2)
        assert cfg.is_storage_writer is writer
        assert KvbmFsHiCacheStorage(cfg, {}).is_writer is writer


def test_page_rows_are_sglangs_flat_pages() -> None:
    """The row kvbm_fs stores for a page is byte for byte SGLang's ``get_data_page(flat=True)``."""
    for kind, layout in POOLS:
        pool = make_pool(kind, layout)
        fill(pool, seed=5)
        hp = host_pages(pool)
        rows = hp.gather(torch.tensor([2, 5]))
        assert rows[0].numpy().tobytes() == page_bytes(pool, 2), (kind, layout)
        assert rows[1].numpy().tobytes() == page_bytes(pool, 5), (kind, layout)
        assert np.array_equal(rows.shape, (2, hp.layout.block_nbytes))


def test_a_dead_remote_tier_gives_misses_and_serving_continues(
    moto_s3: Any, bucket: str, tmp_path: Path, closing: Any
) -> None:
    """An S3 tier (moto behind a fault proxy) that goes away mid-serving: exists/get become misses and
    sets are refused (False), quickly, and nothing raises into SGLang's prefetch or backup threads."""
    pytest.importorskip("s3fs")
    from kvbm_fs.testing.proxy import FaultProxy

    proxy = FaultProxy(moto_s3.port)
    tier = {"url": f"s3://{bucket}/sglang", "storage_options": moto_s3.storage_options(proxy.endpoint),
            "timeout": 5, "retries": 0, "backoff": 0.01, "breaker_threshold": 2, "breaker_cooldown": 60}  # fmt: skip
    try:
        pool = MHAPool("page_first")
        fill(pool)
        b = backend(tmp_path, pool, tiers=[tier])
        closing.append(b)
        keys = page_keys(4, seed="remote")
        assert b.batch_set_v1(keys, indices(pool, [0, 1, 2, 3])) == [True] * 4
        assert b.batch_exists(keys) == 4
        want = page_bytes(pool, 1)
        assert b.batch_get_v1(keys[:2], indices(pool, [8, 9])) == [True, True]
        assert page_bytes(pool, 9) == want  # served from S3
        proxy.close()  # the endpoint is gone: connection refused
        assert b.batch_exists(keys) == 0
        before = page_bytes(pool, 10)
        assert b.batch_get_v1(keys, indices(pool, [10, 11, 12, 13])) == [False] * 4
        assert page_bytes(pool, 10) == before  # nothing half-written into the host pool
        assert b.batch_set_v1(page_keys(2, seed="later"), indices(pool, [4, 5])) == [False, False]
        assert b.stats()["miss_pages"] >= 4
    finally:
        proxy.close()


def test_two_sglang_instances_share_pages_through_a_peer(closing: Any) -> None:
    """Two HiCache backends (two serving instances) whose only L3 tier is one peer's DRAM: pages one
    writes, the other finds with ``batch_exists`` and loads bit-exact."""
    from kvbm_fs.testing import require_nixl

    require_nixl()
    from kvbm_fs.tiers.host import HostTier
    from kvbm_fs.tiers.peer import PeerServer

    pools = [MHAPool(), MHAPool()]
    fill(pools[0], seed=1)
    fill(pools[1], seed=2)
    nbytes = host_pages(pools[0]).layout.block_nbytes
    with PeerServer(HostTier(16 * -(-nbytes // 4096) * 4096, nbytes, name="pool")) as srv:  # page-padded slots
        backends = []
        for pool in pools:
            cfg = {**extra(Path("unused")), "tiers": [srv.url]}
            b = KvbmFsHiCacheStorage(storage_config(cfg), {})
            b.register_mem_pool_host(pool)
            closing.append(b)
            backends.append(b)
        keys = page_keys(4, seed="shared")
        assert backends[0].batch_set_v1(keys, indices(pools[0], [0, 1, 2, 3])) == [True] * 4
        assert backends[1].batch_exists(keys) == 4
        assert backends[1].batch_get_v1(keys, indices(pools[1], [4, 5, 6, 7])) == [True] * 4
        assert [page_bytes(pools[1], p) for p in (4, 5, 6, 7)] == [page_bytes(pools[0], p) for p in range(4)]
        for b in backends:
            b.close()
        closing.clear()
        srv.tier.close()


def test_events_in_the_extra_config_publish_pages_without_tokens(tmp_path: Path, closing: Any) -> None:
    """HiCache keys are opaque page hashes: BlockStored names them, with no token ids to give."""
    pytest.importorskip("zmq")
    from zmq_sub import subscribe

    from kvbm_fs.kv_events import BlockStored, publisher_of

    pool = MHAPool()
    b = backend(tmp_path, pool, events={"endpoint": "tcp://127.0.0.1:0", "bind": True})
    closing.append(b)
    assert b.store is not None
    pub = publisher_of(b.store)
    assert pub is not None
    with subscribe(pub) as sub:
        assert b.batch_set_v1(page_keys(2), indices(pool, [0, 1])) == [True, True]
        evs = sub.read_upto(pub)
    stored = [e for e in evs if isinstance(e, BlockStored)]
    assert sum(len(e.block_hashes) for e in stored if e.medium == "CPU") == 2
    assert all(e.token_ids == [] for e in stored)
