"""TensorRT-LLM's connector base classes where ``tensorrt_llm`` imports, else stand-ins with their signatures."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# ---- TensorRT-LLM base classes ----------------------------------------------------------------------
# Stand-ins with the exact signatures of NVIDIA/TensorRT-LLM tensorrt_llm/_torch/pyexecutor/
# kv_cache_connector.py (commit 00fdcbff5ad82a6438b3e0c9dbc5480b6ee52bdc; unchanged in 3277953654b9 and in
# connectors/kv_cache_connector.py at 035ab91cad04). Used only where tensorrt_llm does not import.


class StandInWorker(ABC):
    """``KvCacheConnectorWorker`` as TensorRT-LLM defines it (signatures only, plus its metadata slot)."""

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args
        self._metadata: object = None
        super().__init__()

    def bind_connector_meta(self, metadata: object) -> None:
        self._metadata = metadata

    def get_connector_meta(self) -> object:
        return self._metadata

    def _clear_connector_meta(self) -> None:
        self._metadata = None

    def register_forward_pass_callable(self) -> Callable[..., Any] | None:
        """Called at the end of the forward pass when a connector returns a callable; the base returns None."""
        return None

    @abstractmethod
    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None: ...

    @abstractmethod
    def start_load_kv(self, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def save_kv_layer(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_save(self, stream: Any) -> None: ...

    @abstractmethod
    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]: ...


class StandInScheduler(ABC):
    """``KvCacheConnectorScheduler`` as TensorRT-LLM defines it (signatures only)."""

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args
        super().__init__()

    @abstractmethod
    def build_connector_meta(self, scheduler_output: Any) -> Any: ...

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]: ...

    @abstractmethod
    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool: ...

    @abstractmethod
    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None: ...


@dataclass
class StandInRequestData:
    """``RequestData``: one inflight request in a ``SchedulerOutput`` (the fields every version has)."""

    request_id: int
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int


@dataclass
class StandInSchedulerOutput:
    """``SchedulerOutput``: requests scheduled this step, first-timers in ``new_requests``."""

    new_requests: list[Any] = field(default_factory=list)
    cached_requests: list[Any] = field(default_factory=list)


def _trtllm_api() -> tuple[Any, Any, Any, Any, bool]:
    """The real bases where tensorrt_llm imports (newer layout first), else the stand-ins."""
    for name in (
        "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector",
        "tensorrt_llm._torch.pyexecutor.kv_cache_connector",
    ):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        return mod.KvCacheConnectorScheduler, mod.KvCacheConnectorWorker, mod.RequestData, mod.SchedulerOutput, True
    return StandInScheduler, StandInWorker, StandInRequestData, StandInSchedulerOutput, False


SchedulerBase: Any
WorkerBase: Any
RequestData: Any
SchedulerOutput: Any
SchedulerBase, WorkerBase, RequestData, SchedulerOutput, HAVE_TRTLLM = _trtllm_api()
