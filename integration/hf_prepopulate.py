"""``kvbm-fs prepopulate --engine hf``: a local transformers model as the prepopulation engine.

Batches are prefilled right-padded in one forward and every full block is saved (the transformers
integration's own prefill and save), into the namespace ``mount_model`` gives the model.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from kvbm_fs import Namespace, Store
from kvbm_fs.integration import transformers as kt


class HFEngine:
    name = "hf"

    def __init__(self, model: Any, store: Store) -> None:
        self.model, self.store = model, store
        assert store.default_namespace is not None
        self.namespaces: list[Namespace] = [store.default_namespace]
        kt.check_model(model, self.namespaces[0])
        self._saved = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HFEngine:
        dtype = getattr(torch, args.dtype) if args.dtype else "auto"
        hf = kt._hf()
        model = hf.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype)
        model = model.to(args.device).eval()
        opts = {"name": args.name, "weights": args.weights, "config": args.config}
        store = kt.mount_model(model, *(args.tiers or ()), block_size=args.block_size or kt.DEFAULT_BLOCK_SIZE, **opts)
        return cls(model, store)

    def prefill(self, batch: list[np.ndarray]) -> None:
        for ids, kv in kt._prefill(self.model, sorted(batch, key=len)):
            self._saved += kt.save_prefill(self.store, ids, kv, namespace=self.namespaces[0])

    def counters(self) -> dict[str, float]:
        return {"saved_blocks": self._saved}

    def close(self) -> None:
        self.store.close()
