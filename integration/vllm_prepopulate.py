"""``kvbm-fs prepopulate --engine vllm``: vLLM's offline engine as the prepopulation engine.

The engine runs with the kvbm_fs connector as ``kv_both`` and ``write_through`` (every saved block
reaches the persistent tiers at once, so a killed run loses at most the step in flight), and each
batch is one ``generate`` with ``max_tokens=1``: a prefix already stored loads instead of being
recomputed, and the rest is computed and saved. The namespace is the connector's own, derived from
the same model and engine arguments the servers use. The engine core runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the driver can match against the connector's store.
"""

from __future__ import annotations

import argparse
import gc
import os
from typing import Any

import numpy as np

from kvbm_fs import ConfigError, Namespace, Store

ARG_FLAGS = ("model", "dtype", "block_size", "tensor_parallel_size", "kv_cache_dtype", "max_model_len")


def engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM engine arguments: the ``--engine-args`` YAML, then the flags given on the command line."""
    out: dict[str, Any] = {}
    if getattr(args, "engine_args", None):
        import yaml

        with open(args.engine_args) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.engine_args}: expected a mapping of vLLM engine arguments")
        out.update({k.replace("-", "_"): v for k, v in loaded.items()})
    for k in ARG_FLAGS:
        v = getattr(args, k, None)
        if v is not None:
            out[k] = v
    out.setdefault("skip_tokenizer_init", True)  # prompts arrive as token ids
    return out


def kv_transfer_config(args: argparse.Namespace) -> dict[str, Any]:
    extra: dict[str, Any] = {"write_through": True}
    if args.tiers:
        extra["tiers"] = list(args.tiers)
    if args.config:
        extra["config"] = args.config
    if args.name:
        extra["model"] = args.name
    return {
        "kv_connector": "KvbmFsConnector",
        "kv_connector_module_path": "kvbm_fs.integration.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


class VllmEngine:
    name = "vllm"

    def __init__(self, llm: Any) -> None:
        from vllm import SamplingParams

        from kvbm_fs.integration.vllm import live_connectors

        self.llm = llm
        engine_id = llm.llm_engine.vllm_config.kv_transfer_config.engine_id
        mine = [c for c in live_connectors() if c.engine_id == engine_id]
        by_role = {c.role.name: c for c in mine}
        self.scheduler, self.worker = by_role.get("SCHEDULER"), by_role.get("WORKER")
        if self.scheduler is None or self.scheduler.store is None:
            raise ConfigError("kvbm-fs prepopulate: the engine's kvbm_fs connector has no store to match against")
        self.store: Store = self.scheduler.store
        self.namespaces: list[Namespace] = list(self.scheduler.namespaces)
        self.sampling = SamplingParams(max_tokens=1, temperature=0.0)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> VllmEngine:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the connector's store in this process
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the report / --json lines
        from vllm import LLM

        return cls(LLM(**engine_args(args), kv_transfer_config=kv_transfer_config(args)))

    def prefill(self, batch: list[np.ndarray]) -> None:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=p.tolist()) for p in batch]
        self.llm.generate(prompts, self.sampling, use_tqdm=False)
        if self.worker is not None:
            self.worker.flush()  # the batch's saves are final before the driver checks them

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in (self.scheduler, self.worker):
            if c is not None:
                for k, v in dict(c.totals.reduce()).items():
                    out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        """Shut the engine down: the connectors release the store, which closes (and persists)."""
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
