"""SGLang's ``HiCacheStorageConfig`` for tests and benchmarks that drive the kvbm_fs HiCache backend."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def storage_config(extra: dict[str, Any] | None = None, **kw: Any) -> Any:
    """A single-rank, page-first, non-MLA config (``kw`` overrides fields): SGLang's own class where
    it is installed, else a stand-in with the same fields and derived attributes."""
    fields: dict[str, Any] = dict(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=True,
        model_name="org/model-a",
        extra_config=extra,
    )
    fields.update(kw)
    try:
        from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    except ImportError:
        mla, tp_rank = fields["is_mla_model"], fields["tp_rank"]
        return SimpleNamespace(
            dcp_size=1, dcp_rank=0, should_split_heads=False, is_storage_writer=not mla or tp_rank == 0, **fields
        )
    return HiCacheStorageConfig(**fields)
