"""TensorRT-LLM connector (``kvbm_fs.integration.trtllm``) driven the way TensorRT-LLM's PyExecutor drives it.

TensorRT-LLM does not import here (it needs CUDA), so these tests drive the connector against the signatures
of NVIDIA/TensorRT-LLM ``tensorrt_llm/_torch/pyexecutor/kv_cache_connector.py`` (commit 00fdcbff5ad8; the
same in ``connectors/kv_cache_connector.py`` at 035ab91cad04), which the module's stand-in bases carry.
:class:`Engine` makes the calls ``PyExecutor._executor_loop`` and ``KvCacheConnectorManager`` make, in their
order: ``get_num_new_matched_tokens`` and ``update_state_after_alloc`` (``KVCacheManager.prepare_resources``),
``build_connector_meta`` -> ``bind_connector_meta`` -> ``start_load_kv``, the forward with
``wait_for_layer_load(i)`` / ``save_kv_layer(i)`` around each layer, ``wait_for_save``, then
``request_finished`` and ``get_finished``. Requests are fakes with ``LlmRequest``'s attribute names; the KV
pool is a real torch tensor of TensorRT-LLM's pool shape ``[blocks, layers, 2, tokens * heads * head_dim]``.
The fake forward writes a KV that is a pure function of the token prefix, and before each layer checks the
prefix blocks it would attend to, so a wrong or late load fails. No timing asserts.
"""

from __future__ import annotations

import inspect
import os
import pickle
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from kvbm_fs import KVLayout, LayoutMismatchError
from kvbm_fs.integration import trtllm
from kvbm_fs.integration.trtllm import (
    KvbmFsTrtllmScheduler,
    KvbmFsTrtllmWorker,
    KvLoadError,
    RequestData,
    SchedulerOutput,
)

BS, LAYERS, HEADS, HEAD_DIM, NUM_BLOCKS = 16, 2, 2, 8, 48
ELEMS = BS * HEADS * HEAD_DIM
BLOCK_NBYTES = LAYERS * 2 * ELEMS * 2  # float16
CAP = "2MiB"


# ---- fakes with TensorRT-LLM's attribute names ---------------------------------------------------------
class FakeLlmArgs:
    """The parts of ``TorchLlmArgs`` the connector reads."""

    def __init__(self, model: str = "tiny-llama", tokens_per_block: int = BS) -> None:
        self.model = model
        self.kv_cache_config = SimpleNamespace(tokens_per_block=tokens_per_block)
        mapping = SimpleNamespace(rank=0, tp_rank=0, tp_size=1, world_size=1, pp_size=1)
        self.parallel_config = SimpleNamespace(to_mapping=lambda: mapping)


class FakeRequest:
    """The parts of ``LlmRequest`` the connector and the connector manager read."""

    def __init__(self, request_id: int, tokens: list[int], cache_salt: str | None = None) -> None:
        self.request_id = request_id
        self.py_request_id = request_id
        self.prompt_len = len(tokens)
        self._tokens = list(tokens)
        self.cache_salt = cache_salt
        self.lora_task_id = None
        self.multimodal_hashes: list[list[int]] | None = None
        self.is_generation_only_request = False
        self.context_current_position = 0

    def get_tokens(self, beam: int) -> list[int]:
        assert beam == 0
        return list(self._tokens)


def prompt(n_tokens: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 32_000, n_tokens).tolist()


def truth(tokens: list[int], b: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The KV a real forward would write for block ``b``: a function of the token prefix only."""
    seed = zlib.crc32(np.asarray(tokens[: (b + 1) * BS], np.int64).tobytes())
    g = torch.Generator().manual_seed(seed)
    return torch.randn((LAYERS, 2, ELEMS), generator=g).to(dtype)


def connector_classes(options: Mapping[str, Any]) -> tuple[type[Any], type[Any]]:
    """Connector options ride on a subclass's ``config`` (KvCacheConnectorConfig has no field for them)."""
    sched = type("Sched", (KvbmFsTrtllmScheduler,), {"config": dict(options)})
    work = type("Work", (KvbmFsTrtllmWorker,), {"config": dict(options)})
    return sched, work


class Engine:
    """One TensorRT-LLM engine's connector calls, in PyExecutor's order, around a fake forward."""

    def __init__(
        self,
        options: Mapping[str, Any],
        first_block: int = 0,
        dtype: torch.dtype = torch.float16,
        tokens_per_block: int = BS,
    ) -> None:
        sched_cls, work_cls = connector_classes(options)
        self.args = FakeLlmArgs(tokens_per_block=tokens_per_block)
        self.dtype = dtype
        # py_executor_creator builds the worker on every rank and the scheduler on rank 0; PyExecutor then
        # registers the pool (kv_cache_manager.get_unique_primary_pool()) before the first request
        self.worker = work_cls(self.args)
        self.sched = sched_cls(self.args)
        elems = tokens_per_block * HEADS * HEAD_DIM
        self.kv = torch.zeros((NUM_BLOCKS, LAYERS, 2, elems), dtype=dtype)
        try:
            self.worker.register_kv_caches(self.kv)
        except BaseException:
            self.close()
            raise
        self.free = list(range(first_block, NUM_BLOCKS))

    def serve(self, req: FakeRequest) -> tuple[int, list[int]]:
        """Prefill one request; returns (tokens the connector supplied, the request's block ids)."""
        tokens, rid = req.get_tokens(0), req.request_id
        matched, parked = self.sched.get_num_new_matched_tokens(req, 0)
        req.context_current_position = matched
        ids = [self.free.pop(0) for _ in range(-(-len(tokens) // BS))]
        self.sched.update_state_after_alloc(req, ids)
        computed_position = 0  # the manager leaves the connector's tokens out of a new request's position
        if parked:  # taken out of the batch until get_finished reports it loaded
            self._step(SchedulerOutput(), None)
            self._until(lambda: rid in self.worker.get_finished([], [rid] if not self._asked(rid) else [])[1])
            computed_position = matched  # external_loads was consumed in the parked step
        data = RequestData(rid, tokens, ids, computed_position, len(tokens) - matched)
        self._step(SchedulerOutput(new_requests=[data]), (tokens, ids, matched))
        if self.sched.request_finished(req, ids):  # blocks held until the saves are reported done
            self._until(lambda: rid in self.worker.get_finished([rid] if not self._asked(-rid) else [], [])[0])
        return matched, ids

    _asked_ids: set[int]

    def _asked(self, key: int) -> bool:
        """get_finished gets an id once; later calls only poll."""
        seen = self.__dict__.setdefault("_asked_ids", set())
        if key in seen:
            return True
        seen.add(key)
        return False

    def _until(self, done: Any) -> None:
        for _ in range(50):
            self.worker.flush()
            if done():
                return
        raise AssertionError("get_finished never reported the request")

    def _step(self, out: Any, batch: tuple[list[int], list[int], int] | None) -> None:
        meta = self.sched.build_connector_meta(out)
        self.worker.bind_connector_meta(meta)
        self.worker.start_load_kv(None)
        if batch is not None:
            self.forward(*batch)
        self.worker.wait_for_save(None)

    def forward(self, tokens: list[int], ids: list[int], start: int) -> None:
        for layer in range(LAYERS):
            self.worker.wait_for_layer_load(layer, None)
            for b in range(start // BS):  # attention reads the prefix's KV of this layer
                assert torch.equal(self.kv[ids[b], layer], truth(tokens, b, self.dtype)[layer]), (b, layer)
            for b in range(start // BS, len(ids)):
                self.kv[ids[b], layer] = truth(tokens, b, self.dtype)[layer]
            self.worker.save_kv_layer(layer, None)

    def assert_kv(self, tokens: list[int], ids: list[int]) -> None:
        for b in range(len(tokens) // BS):
            assert torch.equal(self.kv[ids[b]], truth(tokens, b, self.dtype)), b

    def close(self) -> None:
        self.worker.shutdown()
        self.sched.shutdown()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("KVBM_FS_"):
            monkeypatch.delenv(k)


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for e in made:
        e.close()


def disk_options(root: Path, **extra: Any) -> dict[str, Any]:
    return {"tiers": ["host://?capacity=256KiB", f"file://{root}?capacity={CAP}"], "model": "tiny-llama", **extra}


def corrupt(root: Path, ns: Any, tokens: list[int], b: int) -> None:
    """Flip payload bytes of block ``b`` of ``tokens`` in the disk tier at ``root``."""
    from disk_helpers import corrupt_payload

    from kvbm_fs.tiers.disk import DiskTier

    keys = ns.keys_for_tokens(np.asarray(tokens, np.int64))
    tier = DiskTier(root, ns.block_nbytes, CAP)
    try:
        corrupt_payload(tier, keys[b : b + 1])
    finally:
        tier.close()


# ---- tests --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("async_load,async_save", [(False, True), (True, False)], ids=["layerwise", "parked"])
def test_engine2_loads_engine1_blocks_bit_exact(
    tmp_path: Path, engines: list[Engine], async_load: bool, async_save: bool
) -> None:
    opts = disk_options(tmp_path / "disk", async_load=async_load, async_save=async_save)
    a, b = prompt(5 * BS + 3, seed=1), prompt(5 * BS + 3, seed=1)[: 3 * BS] + prompt(40, seed=2)
    e1 = Engine(opts)
    matched, ids1 = e1.serve(FakeRequest(1, a))
    assert matched == 0
    e1.assert_kv(a, ids1)
    assert e1.worker.stats()["saved_blocks"] == 5
    kv1 = e1.kv.clone()
    e1.close()  # the store persists its host tier to disk on close

    e2 = Engine(opts, first_block=20)
    engines.append(e2)
    matched, ids2 = e2.serve(FakeRequest(7, a))
    assert matched == 5 * BS
    assert set(ids2).isdisjoint(ids1)
    for i in range(5):
        assert torch.equal(e2.kv[ids2[i]], kv1[ids1[i]]), i  # bit-exact, at other block ids
    e2.assert_kv(a, ids2)
    matched, ids3 = e2.serve(FakeRequest(8, b))  # shares a's first three blocks
    assert matched == 3 * BS
    e2.assert_kv(b, ids3)
    assert e2.serve(FakeRequest(9, a[: 4 * BS]))[0] == 3 * BS  # all full blocks: the last is never claimed
    assert e2.serve(FakeRequest(10, a, cache_salt="other-tenant"))[0] == 0
    w, s = e2.worker.stats(), e2.sched.stats()
    assert w["loaded_blocks"] == 5 + 3 + 3 and w["loaded_bytes"] == 11 * BLOCK_NBYTES and w["load_failed_blocks"] == 0
    assert s["hits"] == 3 and s["misses"] == 1 and s["hit_tokens"] == 11 * BS and s["unverified_blocks"] == 0


def test_corrupt_blocks_are_not_served_the_engine_recomputes(tmp_path: Path, engines: list[Engine]) -> None:
    root = tmp_path / "disk"
    a = prompt(5 * BS + 3, seed=3)
    e1 = Engine(disk_options(root))
    e1.serve(FakeRequest(1, a))
    ns = e1.worker.namespace
    e1.close()
    corrupt(root, ns, a, 2)

    e2 = Engine(disk_options(root), first_block=10)
    engines.append(e2)
    matched, ids = e2.serve(FakeRequest(2, a))
    assert matched == 2 * BS, "the claim stops before the block that failed verification"
    e2.assert_kv(a, ids)  # blocks 2.. were recomputed, not loaded
    s, w = e2.sched.stats(), e2.worker.stats()
    assert s["unverified_blocks"] == 1 and w["load_failed_blocks"] == 0 and w["loaded_blocks"] == 2
    assert w["saved_blocks"] == 1 and w["save_skipped_blocks"] == 2  # the corrupt block is stored again
    assert e2.serve(FakeRequest(3, a))[0] == 5 * BS  # and then served


def test_block_lost_after_the_claim_fails_the_step_instead_of_serving(tmp_path: Path, engines: list[Engine]) -> None:
    root = tmp_path / "disk"
    opts = {"tiers": [f"file://{root}?capacity={CAP}"], "model": "tiny-llama"}
    a = prompt(4 * BS + 1, seed=4)
    e1 = Engine(opts)
    e1.serve(FakeRequest(1, a))
    e1.close()

    e2 = Engine(opts, first_block=10)
    engines.append(e2)
    req = FakeRequest(2, a)
    matched, parked = e2.sched.get_num_new_matched_tokens(req, 0)
    assert (matched, parked) == (4 * BS, False)  # verified now
    ids = e2.free[:5]
    e2.sched.update_state_after_alloc(req, ids)
    meta = e2.sched.build_connector_meta(SchedulerOutput(new_requests=[RequestData(2, a, ids, 0, 1)]))
    meta = pickle.loads(pickle.dumps(meta))  # as broadcast to a rank in another process: no staged bytes
    assert meta.loads and meta.loads[0].staged is None
    assert e2.worker.namespace is not None
    corrupt(root, e2.worker.namespace, a, 1)  # lost between the scheduler's check and this rank's read
    e2.worker.bind_connector_meta(meta)
    e2.worker.start_load_kv(None)
    with pytest.raises(KvLoadError, match="could not be loaded"):
        e2.worker.wait_for_layer_load(0, None)
    assert isinstance(KvLoadError("x"), RuntimeError)
    assert e2.worker.stats()["load_failed_blocks"] == 1


def test_wrong_layout_or_dtype_is_refused_or_never_matched(tmp_path: Path, engines: list[Engine]) -> None:
    root = tmp_path / "disk"
    pinned = KVLayout(LAYERS, HEADS, HEAD_DIM, BS, "float16", order="LKTHD")
    opts = disk_options(root, layout=pinned.to_dict())
    a = prompt(3 * BS + 2, seed=5)
    e1 = Engine(opts)
    assert e1.worker.namespace.layout == pinned
    e1.serve(FakeRequest(1, a))
    e1.close()

    with pytest.raises(LayoutMismatchError, match="does not match this engine's KV pool"):
        Engine(opts, dtype=torch.bfloat16)
    with pytest.raises(LayoutMismatchError, match=str(root)):  # the disk tier holds other-sized blocks
        Engine(disk_options(root), tokens_per_block=2 * BS)
    e3 = Engine(disk_options(root), dtype=torch.bfloat16)  # nothing pinned: another namespace, a miss
    engines.append(e3)
    assert e3.worker.namespace.layout.dtype == "bfloat16"
    matched, ids = e3.serve(FakeRequest(2, a))
    assert matched == 0
    e3.assert_kv(a, ids)


def test_dead_remote_tier_gives_misses_and_serving_continues(moto_s3: Any, bucket: str, engines: list[Engine]) -> None:
    pytest.importorskip("s3fs")
    from kvbm_fs.testing.proxy import FaultProxy

    proxy = FaultProxy(moto_s3.port)
    tier = {"url": f"s3://{bucket}/trtllm", "storage_options": moto_s3.storage_options(proxy.endpoint),
            "timeout": 5, "retries": 0, "backoff": 0.01, "breaker_threshold": 2, "breaker_cooldown": 60}  # fmt: skip
    try:
        e = Engine({"tiers": [tier], "model": "tiny-llama"})
        engines.append(e)
        a = prompt(3 * BS + 5, seed=6)
        assert e.serve(FakeRequest(1, a))[0] == 0
        assert e.serve(FakeRequest(2, a))[0] == 3 * BS  # served from S3
        proxy.close()  # the endpoint is gone: connection refused
        matched, ids = e.serve(FakeRequest(3, a))
        assert matched == 0
        e.assert_kv(a, ids)
        b = prompt(2 * BS + 1, seed=7)
        matched, ids = e.serve(FakeRequest(4, b))  # saves fail quietly, the request completes
        assert matched == 0
        e.assert_kv(b, ids)
        assert e.sched.stats()["misses"] >= 2
        assert e.worker.stats()["save_failed_blocks"] >= 2
    finally:
        proxy.close()


def test_refused_requests_are_never_matched_or_saved(tmp_path: Path, engines: list[Engine]) -> None:
    e = Engine(disk_options(tmp_path / "disk"))
    engines.append(e)
    a = prompt(3 * BS + 1, seed=8)
    req = FakeRequest(1, a)
    req.multimodal_hashes = [[1, 2, 3, 4]]
    assert e.serve(req)[0] == 0
    assert e.worker.stats()["saved_blocks"] == 0 and e.sched.stats()["refused"] >= 1
    assert e.serve(FakeRequest(2, a))[0] == 0


# ---- the API --------------------------------------------------------------------------------------------------
# Parameter names of every connector method in TensorRT-LLM's kv_cache_connector.py (see the module docstring).
TRTLLM_SIGNATURES = {
    "build_connector_meta": ["self", "scheduler_output"],
    "get_num_new_matched_tokens": ["self", "request", "num_computed_tokens"],
    "update_state_after_alloc": ["self", "request", "block_ids"],
    "request_finished": ["self", "request", "cache_block_ids"],
    "register_kv_caches": ["self", "kv_cache_tensor"],
    "start_load_kv": ["self", "stream"],
    "wait_for_layer_load": ["self", "layer_idx", "stream"],
    "save_kv_layer": ["self", "layer_idx", "stream"],
    "wait_for_save": ["self", "stream"],
    "get_finished": ["self", "finished_gen_req_ids", "started_loading_req_ids"],
    "bind_connector_meta": ["self", "metadata"],
    "get_connector_meta": ["self"],
    "register_forward_pass_callable": ["self"],
}
EXTRAS = {"stats", "shutdown", "flush"}


def _params(fn: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize(
    "cls,base", [(KvbmFsTrtllmScheduler, trtllm.SchedulerBase), (KvbmFsTrtllmWorker, trtllm.WorkerBase)]
)
def test_every_public_method_matches_the_base_signature(cls: type, base: type) -> None:
    assert issubclass(cls, base)
    assert not getattr(cls, "__abstractmethods__", None), "every abstract method is implemented"
    init = "__init__"
    assert _params(getattr(cls, init)) == _params(getattr(base, init))
    base_methods = {n for n, f in inspect.getmembers(base, inspect.isfunction) if not n.startswith("_")}
    own = {n for n, f in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}
    assert own - base_methods <= EXTRAS, own - base_methods - EXTRAS
    for name in base_methods:
        assert _params(getattr(cls, name)) == _params(getattr(base, name)), name
        assert [p[0] for p in _params(getattr(cls, name))] == TRTLLM_SIGNATURES[name], name
    if not trtllm.HAVE_TRTLLM:
        assert base in (trtllm.StandInScheduler, trtllm.StandInWorker)


def test_request_finished_holds_blocks_until_get_finished_reports_the_save(
    tmp_path: Path, engines: list[Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    e = Engine(disk_options(tmp_path / "disk"))
    engines.append(e)
    gate = threading.Event()
    store_rows = e.worker._store_rows

    def slow(*args: Any) -> None:
        gate.wait()
        store_rows(*args)

    monkeypatch.setattr(e.worker, "_store_rows", slow)
    a = prompt(2 * BS + 3, seed=9)
    req = FakeRequest(1, a)
    assert e.sched.get_num_new_matched_tokens(req, 0) == (0, False)
    ids = e.free[:3]
    e.sched.update_state_after_alloc(req, ids)
    e._step(SchedulerOutput(new_requests=[RequestData(1, a, ids, 0, len(a))]), (a, ids, 0))
    assert e.sched.request_finished(req, ids) is True  # the save is still in flight: keep the blocks
    assert e.worker.get_finished([1], []) == ([], [])
    gate.set()
    e.worker.flush()
    assert e.worker.get_finished([], []) == ([1], [])  # reported once, after it was handed in
    assert e.worker.get_finished([], []) == ([], [])
    assert e.worker.stats()["saved_blocks"] == 2


def test_saves_publish_kv_events_with_the_requests_tokens(tmp_path: Path) -> None:
    """With ``events`` in the options, the scheduler's save plans carry the prompt's token ids (pickled with
    the metadata to every rank) and the worker notes them before its put: BlockStored has them, on the
    host tier and again on disk when the store persists at close."""
    pytest.importorskip("zmq")
    from zmq_sub import subscribe

    from kvbm_fs.kv_events import AllBlocksCleared, BlockStored, publisher_of

    events = {"endpoint": "tcp://127.0.0.1:0", "bind": True}
    e = Engine(disk_options(tmp_path / "disk", events=events))
    a = prompt(5 * BS + 3, seed=30)
    pub = publisher_of(e.worker.store)
    assert pub is not None
    with subscribe(pub) as sub:
        try:
            bind = e.worker.bind_connector_meta  # as mpi_broadcast delivers it to other ranks: pickled
            e.worker.bind_connector_meta = lambda m: bind(pickle.loads(pickle.dumps(m)))
            e.serve(FakeRequest(1, a))
            e.worker.flush()
        finally:
            e.close()  # the store persists its host tier to disk, announces it, then the clear
        evs = sub.read_upto(pub)
    assert isinstance(evs[-1], AllBlocksCleared)
    keys = e.worker.namespace.keys_for_tokens(np.asarray(a, np.int64))
    for medium in ("CPU", "STORAGE"):
        per_block = {
            h: ev.token_ids[j * BS : (j + 1) * BS]
            for ev in evs
            if isinstance(ev, BlockStored) and ev.medium == medium
            for j, h in enumerate(ev.block_hashes)
        }
        assert [t for h in keys.hashes.tolist() for t in per_block[h]] == a[: 5 * BS], medium
