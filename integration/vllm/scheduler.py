"""The scheduler's half of the connector: match prompts, plan each step's loads and saves, report hits.

It never moves bytes. It matches against the worker's store when it shares the worker's process, else
against the shareable tiers it opened plus a BlockDirectory of the workers' process-local tiers, kept
from the block events they ship back every step (so it only offers blocks a worker holds).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvbm_fs import BlockKeys, EventKind, Namespace, Store
from kvbm_fs import engine as engine_kit
from kvbm_fs.directory import BlockDirectory

from .metadata import Counters, KvbmFsMetadata, KvbmFsWorkerMeta, ShippedEvent, Transfer

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvbm_fs.integration.vllm")
SLOW_MEDIA = frozenset({"peer", "disk", "remote"})  # async_load "auto" loads these in the background


@dataclass
class _Req:
    request: Any
    hashes: np.ndarray  # Dynamo sequence hashes of the prompt's full blocks
    parents: np.ndarray
    stored: int = 0  # leading blocks known to be in the store (not saved again)
    load: tuple[int, int] | None = None  # block range planned for loading in the next step
    load_start: int = 0
    load_cap: int | None = None  # leading blocks it may still load: capped at its first failed load
    load_ids: list[int] = field(default_factory=list)  # engine blocks of the last load
    load_groups: list[tuple[int, int, int, list[int]]] = field(default_factory=list)  # (group, a, b, ids)
    load_async: bool = False  # the planned load runs in the background (load_kv_async)
    by_tier: dict[str, int] = field(default_factory=dict)


class SchedulerSide:
    """Per-request match state and step plans for every worker rank's namespace."""

    def __init__(
        self,
        namespaces: tuple[Namespace, ...],
        store: Store | None,
        shared: bool,
        stats: Counters,
        *,
        loads: bool,
        saves: bool,
        async_load: bool | str,
        save_tokens: bool,
        groups: list[tuple[int, tuple[Namespace, ...]]] | None = None,
        state_groups: frozenset[int] = frozenset(),
        primary: int = 0,
    ) -> None:
        self.namespaces, self.store, self.shared, self.stats = namespaces, store, shared, stats
        # KV-cache groups: (window blocks, per-rank namespaces); window 0 is full attention. A hybrid
        # model's loads all run in the background: vLLM maps a failed load of a multi-group request
        # back through failed_recving only (whole request recomputed), never through block ids
        self.groups = groups or [(0, namespaces)]
        self.hybrid = len(self.groups) > 1
        # Mamba groups (window 1: the state block at a prefix's end). Their blocks are saved from vLLM's
        # exact boundary-state hand-offs: an align-mode Mamba block table is not append-only
        self.state_groups = state_groups
        # the group whose blocks become vLLM KV events (with their tokens): the connector's choice
        # (layout.primary_group), the group its namespaces and store are named by
        self.primary = primary
        self.loads_enabled, self.saves_enabled, self.async_load = loads, saves, async_load
        self.save_tokens = save_tokens  # the worker's store publishes KV events: saves carry their token ids
        self.block_size = namespaces[0].layout.block_size
        self.directory = BlockDirectory()  # the workers' process-local tiers, when not shared
        self.kv_cache_manager: Any = None  # vLLM's, bound by the connector: engine block ids of a request
        self._reqs: dict[str, _Req] = {}
        self._refused: set[str] = set()
        self._lock = threading.Lock()
        self._events: list[ShippedEvent] = []  # for take_events
        self._event_tokens: dict[int, tuple[list[int], int | None, str | None]] = {}

    # ---- matching ------------------------------------------------------------------------------------
    def _keys(self, req: Request) -> _Req | None:
        st = self._reqs.get(req.request_id)
        if st is not None and st.request is req:
            return st
        why = None
        if getattr(req, "mm_features", None):
            why = "multimodal inputs (their blocks are not named by token ids alone)"
        elif req.prompt_token_ids is None or getattr(req, "prompt_embeds", None) is not None:
            why = "prompt embeddings"
        if why is not None:
            if req.request_id not in self._refused:
                self._refused.add(req.request_id)
                self.stats.count(refused=1)
                log.warning("kvbm_fs: request %s refused (%s): not matched, not saved", req.request_id, why)
            return None
        lora = getattr(req, "lora_request", None)
        keys = self.namespaces[0].keys_for_tokens(
            np.asarray(req.prompt_token_ids, dtype=np.int64),
            cache_salt=getattr(req, "cache_salt", None),
            lora_name=getattr(lora, "lora_name", None) if lora is not None else None,
        )
        st = self._reqs[req.request_id] = _Req(req, keys.hashes, keys.parents)
        return st

    def _locate(self, st: _Req, n: int) -> tuple[int, np.ndarray]:
        """The longest prefix of ``st`` (at most ``n`` blocks) that every group can serve: all its blocks
        for a full-attention group, the ``window`` blocks before its end for a sliding-window one; and
        the tier of each block (rank 0 of the first full-attention group)."""
        full = [ns for w, ns in self.groups if w == 0]
        length, names = self._locate_prefix(st, n, full[0]) if full else (n, np.full(n, "", object))
        for nss in full[1:]:
            length = min(length, self._locate_prefix(st, length, nss)[0])
        windowed = [(w, nss) for w, nss in self.groups if w > 0]
        if windowed and length > 0:
            good = np.ones(length + 1, bool)  # good[m]: every windowed group holds its window ending at m
            ends = np.arange(length + 1)
            for w, nss in windowed:
                miss = np.zeros(length, bool)
                for ns in nss:
                    miss |= self._where(BlockKeys(ns.id, st.hashes[:length], st.parents[:length])) == ""
                c = np.concatenate([[0], np.cumsum(miss)])
                good &= (c[ends] - c[np.maximum(0, ends - w)]) == 0
            good[0] = True
            length = int(np.flatnonzero(good)[-1])
        return length, names[:length]

    def _locate_prefix(self, st: _Req, n: int, nss: tuple[Namespace, ...]) -> tuple[int, np.ndarray]:
        """Leading blocks of ``st`` (at most ``n``) present for every rank, and the tier of each (rank 0)."""
        length, names0 = n, np.full(n, "", object)
        for r, ns in enumerate(nss):
            keys = BlockKeys(ns.id, st.hashes[:length], st.parents[:length])
            if self.shared and self.store is not None:
                m = self.store.match(keys)
                found = min(m.length, m.worth)  # the cost model may say the tail is faster to recompute
                names = np.full(len(keys), "", object)
                for name, a, b in m.runs:
                    names[a:b] = name
            else:
                names = self._where(keys)
                miss = np.flatnonzero(names == "")
                found = int(miss[0]) if miss.size else len(names)
            length = min(length, found)
            if r == 0:
                names0 = names
            if length == 0:
                break
        return length, names0[:length]

    def _where(self, keys: BlockKeys) -> np.ndarray:
        """Tier of each key: the workers' process-local tiers first (fastest medium first), then the
        shareable tiers this scheduler opened; ``""`` where none holds it."""
        names = self.directory.names(keys)
        todo = np.flatnonzero(names == "")
        if self.store is not None and todo.size:
            found = engine_kit.locate(self.store, keys[todo])
            names[todo] = np.array([*engine_kit.tier_names(self.store), ""], dtype=object)[found]
        return names

    def _medium(self, tier: str) -> str:
        medium = self.directory.medium(tier)
        if medium is not None:
            return medium
        if self.store is not None:
            try:
                return str(self.store.tier(tier).medium.value)
            except KeyError:
                pass
        return "disk"

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._keys(request)
        if st is None or not self.loads_enabled:
            return 0, False
        st.load, st.by_tier = None, {}
        usable = (len(request.prompt_token_ids) - 1) // self.block_size  # never the block of the last token
        if usable <= 0 or num_computed_tokens >= usable * self.block_size:
            return 0, False
        t0 = time.perf_counter()
        # a block that failed to load for this request is recomputed, not offered again: a tier that
        # matches but cannot deliver (a remote dying between HEAD and GET) would otherwise reschedule
        # the request into the same failing load forever
        limit = usable if st.load_cap is None else min(usable, st.load_cap)
        n, names = self._locate(st, limit) if limit > 0 else (0, np.full(0, "", object))
        st.stored = max(st.stored, n)
        start = num_computed_tokens // self.block_size
        ext = max(0, n * self.block_size - num_computed_tokens)
        self.stats.count(lookups=1, lookup_tokens=len(request.prompt_token_ids), match_s=time.perf_counter() - t0)
        if ext == 0:
            return 0, False
        st.load = (start, n)
        tiers, counts = np.unique(names[start:n], return_counts=True)
        st.by_tier = dict(zip(tiers.tolist(), counts.tolist()))
        slow = any(self._medium(name) in SLOW_MEDIA for name in st.by_tier)
        st.load_async = self.hybrid or self.async_load is True or (self.async_load == "auto" and slow)
        return ext, st.load_async

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        if num_external_tokens == 0:
            return {}
        st = self._reqs.get(request.request_id)
        out: dict[Any, int] = {}
        if st is not None and st.by_tier:
            for name, blocks in st.by_tier.items():
                medium = self._medium(name)
                src = (
                    CacheHitSource.HOST
                    if medium in ("gpu", "host")
                    else CacheHitSource.P2P
                    if medium == "peer"
                    else CacheHitSource.DISK
                )
                out[src] = out.get(src, 0) + blocks * self.block_size
        if sum(out.values()) != num_external_tokens:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        return out

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens <= 0 or st.load is None:
            st.load = None
            return
        # vLLM loads whole blocks counted back from the end of the planned range (a local sub-block
        # tail it keeps is rewritten with identical bytes)
        stop = st.load[1]
        start = max(0, stop - -(-num_external_tokens // self.block_size))
        ids = blocks.get_block_ids()[0]
        st.load, st.load_start = (start, stop), start
        st.load_ids = list(ids[start:stop])
        st.load_groups = []
        if self.hybrid or self.groups[0][0]:
            # per group: all planned blocks of a full-attention group, only the window before the
            # prefix's end of a sliding-window one (vLLM holds null blocks below it)
            for g, (w, _) in enumerate(self.groups):
                a = start if w == 0 else max(start, stop - w)
                row = blocks.blocks[g]
                keep = [i for i in range(a, stop) if not getattr(row[i], "is_null", False)]
                if keep:
                    st.load_groups.append((g, keep[0], keep[-1] + 1, [row[i].block_id for i in keep]))
        self.stats.count(hit_tokens=num_external_tokens)

    # ---- planning ------------------------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvbmFsMetadata:
        meta = KvbmFsMetadata(ns_ids=tuple(ns.id for ns in self.namespaces))
        for p in self._reqs.values():
            if p.load is not None and p.load_groups:
                for g, a, b, ids in p.load_groups:
                    rid = p.request.request_id
                    meta.loads.append(Transfer(rid, p.hashes[a:b], p.parents[a:b], ids, p.load_async, group=g))
                p.load, p.load_groups = None, []
            elif p.load is not None and p.load_ids:
                a, b = p.load
                t = Transfer(p.request.request_id, p.hashes[a:b], p.parents[a:b], list(p.load_ids), p.load_async)
                meta.loads.append(t)
                p.load = None
        if not self.saves_enabled:
            return meta
        if self.state_groups:
            self._plan_state_saves(scheduler_output, meta)
        sched = scheduler_output.num_scheduled_tokens
        steps = [(r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        steps += list(zip(cached.req_ids, cached.num_computed_tokens))
        for rid, before in steps:
            st = self._reqs.get(rid)
            if st is None:
                continue
            after = before + int(sched.get(rid, 0))
            lo = max(before // self.block_size, st.stored)
            hi = min(after // self.block_size, len(st.hashes))
            if hi <= lo:
                continue
            all_ids = self._block_ids(rid)
            if all_ids is None or any(len(ids) < hi for g, ids in enumerate(all_ids) if g not in self.state_groups):
                continue
            # a sliding-window group keeps only the windows that end at the prompt's usable end and at
            # its last full block: the prefixes a later request can load (docs/vllm.md, Hybrid models)
            usable = (len(st.request.prompt_token_ids) - 1) // self.block_size
            for g, (w, _) in enumerate(self.groups):
                a = lo if w == 0 else max(lo, usable - w)
                if a >= hi or g in self.state_groups:
                    continue
                toks = None
                # the store publishes KV events: they carry the blocks' tokens
                if self.save_tokens and g == self.primary:
                    toks = np.asarray(
                        st.request.prompt_token_ids[a * self.block_size : hi * self.block_size], np.uint32
                    )
                ids = list(all_ids[g][a:hi])
                meta.saves.append(Transfer(rid, st.hashes[a:hi], st.parents[a:hi], ids, tokens=toks, group=g))
            st.stored = hi
            self._remember_tokens(st, lo, hi)
        return meta

    def _plan_state_saves(self, scheduler_output: SchedulerOutput, meta: KvbmFsMetadata) -> None:
        """Mamba states vLLM hands off this step, each with the exact block that holds the state at a
        block boundary (computed by this step's forward), keyed by the prompt block ending there."""
        state = getattr(scheduler_output, "kv_connector_block_state", None)
        offloads = getattr(state, "boundary_state_offloads", None) or {}
        for rid, entries in offloads.items():
            st = self._reqs.get(rid)
            if st is None:
                continue
            for g, block_id, boundary in entries:
                i = boundary // self.block_size - 1
                if g in self.state_groups and boundary % self.block_size == 0 and 0 <= i < len(st.hashes):
                    meta.saves.append(Transfer(rid, st.hashes[i : i + 1], st.parents[i : i + 1], [block_id], group=g))

    def _block_ids(self, req_id: str) -> tuple[list[int], ...] | None:
        """The request's engine block ids, one list per KV-cache group."""
        mgr = self.kv_cache_manager
        if mgr is None:
            return None
        return tuple(mgr.get_block_ids(req_id))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        shipped = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(shipped, KvbmFsWorkerMeta) and shipped.events:
            self._apply_worker_events(shipped.events)
        for rid in getattr(connector_output, "failed_recving", None) or ():
            st = self._reqs.get(rid)  # a hybrid load that failed: vLLM recomputes the whole request
            if st is not None:
                st.stored = min(st.stored, st.load_start)
                st.load_cap = st.load_start if st.load_cap is None else min(st.load_cap, st.load_start)
        bad = connector_output.invalid_block_ids
        if bad:
            for st in self._reqs.values():  # blocks that failed to load are recomputed: save them again then
                for i, bid in enumerate(st.load_ids):
                    if bid in bad:
                        st.stored = min(st.stored, st.load_start + i)
                        cap = st.load_start + i
                        st.load_cap = cap if st.load_cap is None else min(st.load_cap, cap)
                        break

    def _apply_worker_events(self, events: list[ShippedEvent]) -> None:
        if not self.shared:
            for kind, tier, medium, shareable_tier, ns_id, hashes in events:
                if not shareable_tier:
                    self.directory.record(kind, tier, BlockKeys(ns_id, hashes), medium)
        with self._lock:
            self._events.extend(e for e in events if e[4] == self.groups[self.primary][1][0].id)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        self._refused.discard(request.request_id)
        return False, None  # saves complete inside the step that computes the blocks: nothing in flight

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])

    # ---- KV events -------------------------------------------------------------------------------------
    def _remember_tokens(self, st: _Req, lo: int, hi: int) -> None:
        if len(self._event_tokens) > 65536:
            self._event_tokens.clear()
        toks = st.request.prompt_token_ids
        lora = getattr(st.request, "lora_request", None)
        lora_name = getattr(lora, "lora_name", None) if lora is not None else None
        for i in range(lo, hi):
            parent = int(st.parents[i]) if i else None
            self._event_tokens[int(st.hashes[i])] = (
                list(toks[i * self.block_size : (i + 1) * self.block_size]),
                parent,
                lora_name,
            )

    def take_events(self) -> Iterable[Any]:
        """vLLM KV events for kvbm_fs blocks: BlockStored (blocks this scheduler planned, so with their
        tokens) and BlockRemoved, with medium GPU/CPU/STORAGE and ownership ``kvbm_fs:<tier>``."""
        with self._lock:
            evs, self._events = self._events, []
        if not evs:
            return ()
        from vllm.distributed.kv_events import MEDIUM_CPU, MEDIUM_GPU, MEDIUM_STORAGE, BlockRemoved, BlockStored

        media = {"gpu": MEDIUM_GPU, "host": MEDIUM_CPU}
        out: list[Any] = []
        for kind, tier, medium, _, _, hashes in evs:
            where, owner = media.get(medium, MEDIUM_STORAGE), f"kvbm_fs:{tier}"
            if kind in (EventKind.REMOVED.value, EventKind.EVICTED.value):
                out.append(BlockRemoved(block_hashes=[int(h) for h in hashes.tolist()], medium=where, ownership=owner))
                continue
            for h in hashes.tolist():
                known = self._event_tokens.get(int(h))
                if known is not None:
                    toks, parent, lora_name = known
                    out.append(
                        BlockStored(
                            block_hashes=[int(h)],
                            parent_block_hash=parent,
                            token_ids=toks,
                            block_size=self.block_size,
                            lora_id=None,
                            medium=where,
                            lora_name=lora_name,
                            ownership=owner,
                        )
                    )
        return out


__all__ = ["SchedulerSide"]
