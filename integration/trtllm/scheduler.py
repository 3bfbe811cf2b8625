"""Scheduler side (rank 0): matches and verifies prompts' blocks before claiming them, plans loads and saves."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvbm_fs import BlockKeys, ConfigError, Namespace, Store
from kvbm_fs import engine as engine_kit

from .api import SchedulerBase
from .layout import store_config
from .state import KvbmFsTrtllmMeta, Transfer, _Counters, _engines, _Side

log = logging.getLogger("kvbm_fs.integration.trtllm")

REFUSED_ATTRS = ("multimodal_hashes", "multimodal_positions", "prompt_embedding_table")


SCHEDULER_STATS = (
    "lookups",
    "lookup_tokens",
    "hits",
    "misses",
    "hit_tokens",
    "unverified_blocks",
    "refused",
    "match_s",
)


def _present(v: Any) -> bool:
    if v is None:
        return False
    try:
        return len(v) > 0
    except TypeError:
        return True


@dataclass
class _Req:
    request: Any
    hashes: np.ndarray
    parents: np.ndarray
    prompt_len: int
    stored: int = 0  # leading blocks known to be in the store (not saved again)
    done: int = 0  # tokens computed or loaded once the first step has run
    block_ids: list[int] = field(default_factory=list)
    seen_ids: list[int] = field(default_factory=list)  # cumulative RequestData.new_block_ids
    load: Transfer | None = None  # claimed in get_num_new_matched_tokens, block ids filled at alloc
    load_start: int = 0
    saves: int = 0


class KvbmFsTrtllmScheduler(SchedulerBase, _Side):
    """Scheduler side (rank 0): matches and verifies prompts' blocks, plans loads and saves."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self._setup(llm_args)
        self.async_load = bool(self.options.get("async_load", False)) and self.world == 1
        if self.options.get("async_load") and self.world > 1:
            log.warning("kvbm_fs trtllm: async_load needs every rank's bytes staged; with TP>1 loads stay synchronous")
        self.async_save = bool(self.options.get("async_save", True))
        self._save_tokens = store_config(self.options).events is not None  # saves carry their token ids
        self._reqs: dict[int, _Req] = {}
        self._loads: list[Transfer] = []
        self._counters = _Counters(SCHEDULER_STATS)
        self._bound = False
        self._closed = False

    def stats(self) -> dict[str, float]:
        """Cumulative lookup counters of this scheduler."""
        return self._counters.snapshot()

    def _store(self) -> tuple[Store, tuple[Namespace, ...]]:
        eng = self.engine
        if eng.store is None:
            pinned = store_config(self.options).layout
            if pinned is None:
                raise ConfigError(
                    "kvbm_fs trtllm: no store yet: the worker registers the KV pool (naming its layout) before"
                    " the first request; pin a `layout` to use the scheduler without a worker in this process"
                )
            eng.open(pinned, 0, self.world)
        assert eng.store is not None
        if not self._bound:
            for ns in eng.namespaces:  # the scheduler matches every rank's blocks
                eng.store.add_namespace(ns)
            self._bound = True
        return eng.store, eng.namespaces

    def _state(self, request: Any) -> _Req | None:
        rid = int(request.request_id)
        st = self._reqs.get(rid)
        if st is not None:
            return st
        why = next((a for a in REFUSED_ATTRS if _present(getattr(request, a, None))), None)
        if why is not None:
            self._counters.add(refused=1)
            log.warning("kvbm_fs trtllm: request %s refused (%s): not matched, not saved", rid, why)
            return None
        _, nss = self._store()
        tokens = list(request.get_tokens(0))
        prompt = tokens[: int(getattr(request, "prompt_len", 0) or 0) or len(tokens)]
        salt = getattr(request, "cache_salt", None)
        lora = getattr(request, "lora_task_id", None)
        keys = nss[0].keys_for_tokens(
            np.asarray(prompt, dtype=np.int64),
            cache_salt=None if salt is None else str(salt),
            lora_name=None if lora is None else f"lora-task-{lora}",
        )
        st = self._reqs[rid] = _Req(request, keys.hashes, keys.parents, len(prompt))
        return st

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        st = self._state(request)
        if st is None:
            return 0, False
        st.load, st.done = None, num_computed_tokens
        usable = (st.prompt_len - 1) // self.block_size  # never the block of the prompt's last token
        if num_computed_tokens % self.block_size or num_computed_tokens >= usable * self.block_size:
            return 0, False  # nothing past the device prefix, or it ends inside a block
        t0 = time.perf_counter()
        start = num_computed_tokens // self.block_size
        stop, staged = self._verified(st, start, usable)
        self._counters.add(lookups=1, lookup_tokens=st.prompt_len, match_s=time.perf_counter() - t0)
        if stop <= start:
            self._counters.add(misses=1)
            return 0, False
        ids_unknown: list[int] = []
        st.load = Transfer(int(request.request_id), st.hashes[start:stop], st.parents[start:stop], ids_unknown, staged)
        st.load.parked, st.load_start = self.async_load, start
        tokens = (stop - start) * self.block_size
        st.done = num_computed_tokens + tokens
        self._counters.add(hits=1, hit_tokens=tokens)
        return tokens, self.async_load

    def _verified(self, st: _Req, start: int, usable: int) -> tuple[int, torch.Tensor | None]:
        """End of the leading run of blocks from ``start`` that every rank holds and that pass verification
        (read now, so that nothing is claimed that cannot be served), and rank 0's verified rows."""
        store, nss = self._store()
        m = store.match(BlockKeys(nss[0].id, st.hashes[:usable], st.parents[:usable]))
        want = min(m.length, m.worth)  # the cost model may say the tail is faster to recompute
        stop, staged = want, None
        for r, ns in enumerate(nss):
            if stop <= start:
                break
            keys = BlockKeys(ns.id, st.hashes[start:stop], st.parents[start:stop])
            rows = torch.empty((len(keys), ns.block_nbytes), dtype=torch.uint8)
            res = engine_kit.load(store, keys, rows)
            lead = res.prefix
            self._counters.add(unverified_blocks=res.failed)
            stop = start + lead
            if r == 0:
                staged = rows[:lead]
        st.stored = m.length if stop >= want else stop  # blocks that failed are gone: save them again
        return stop, staged

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        st = self._reqs.get(int(request.request_id))
        if st is None:
            return
        st.block_ids = list(block_ids)
        t, st.load = st.load, None
        if t is None:
            return
        a = st.load_start
        t.block_ids = st.block_ids[a : a + len(t.hashes)]
        if len(t.block_ids) == len(t.hashes):
            self._loads.append(t)
        else:
            log.warning("kvbm_fs trtllm: request %s got %d blocks, fewer than planned", t.req_id, len(block_ids))

    def build_connector_meta(self, scheduler_output: Any) -> KvbmFsTrtllmMeta:
        _, nss = self._store()
        meta = KvbmFsTrtllmMeta(ns_ids=tuple(ns.id for ns in nss), loads=self._loads)
        self._loads = []
        for rd in scheduler_output.new_requests:
            self._plan_save(rd, True, meta)
        for rd in scheduler_output.cached_requests:
            self._plan_save(rd, False, meta)
        return meta

    def _plan_save(self, rd: Any, new: bool, meta: KvbmFsTrtllmMeta) -> None:
        """Save the prompt blocks this step completes (and any earlier ones the store lacks)."""
        st = self._reqs.get(int(rd.request_id))
        if st is None:
            return
        st.seen_ids.extend(rd.new_block_ids)
        # a new request's computed_position leaves out the tokens the connector loads: count them back in
        before = max(int(rd.computed_position), st.done) if new else int(rd.computed_position)
        hi = min((before + int(rd.num_scheduled_tokens)) // self.block_size, len(st.hashes))
        ids = st.seen_ids if len(st.seen_ids) >= len(st.block_ids) else st.block_ids
        lo = st.stored
        if hi <= lo or len(ids) < hi:
            return
        toks = None
        if self._save_tokens:  # the store publishes KV events: they carry the saved blocks' tokens
            toks = np.asarray(list(st.request.get_tokens(0))[lo * self.block_size : hi * self.block_size], np.uint32)
        meta.saves.append(
            Transfer(int(rd.request_id), st.hashes[lo:hi], st.parents[lo:hi], list(ids[lo:hi]), tokens=toks)
        )
        st.stored, st.saves = hi, st.saves + 1

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        st = self._reqs.pop(int(request.request_id), None)
        if st is None or st.saves == 0 or not self.async_save:
            return False
        # hold the blocks until get_finished reports the saves done on every rank; with one rank (the
        # worker in this process) only while they are still in flight
        return self.world > 1 or self.engine.saves_in_flight(int(request.request_id)) > 0

    def shutdown(self) -> None:
        """Drop this scheduler's hold on the engine's store (closed when the worker lets go too)."""
        if not self._closed:
            self._closed = True
            _engines.release(self._lease)


__all__ = ["KvbmFsTrtllmScheduler"]
