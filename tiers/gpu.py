"""G1: a block pool on a torch device, with batched gather/scatter to and from G2.

On CUDA, copies run on the tier's own stream after waiting for the caller's
current stream, and a put is only registered (made matchable) once its copy
event has completed, so no reader ever sees a block whose bytes are in flight.
On ``device="cpu"`` the same code runs without streams, which is what CI tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from kvbm_fs.errors import CapacityError, ConfigError
from kvbm_fs.events import EventBus
from kvbm_fs.policy import EvictionPolicy
from kvbm_fs.rows import copy_rows
from kvbm_fs.tier import Medium, SlotTier
from kvbm_fs.units import parse_size


def _torch() -> Any:
    import torch

    return torch


class GpuTier(SlotTier):
    medium = Medium.GPU
    persistent = False

    def __init__(
        self,
        capacity: int | str,
        block_nbytes: int,
        *,
        device: str | None = None,
        name: str = "gpu",
        block_size: int | None = None,
        events: EventBus | None = None,
        policy: EvictionPolicy | str | None = None,
    ) -> None:
        torch = _torch()
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"GPU tier asked for {dev} but CUDA is not available; use device=cpu")
        cap = parse_size(capacity, "gpu capacity")
        slots = cap // block_nbytes if block_nbytes > 0 else 0
        if slots < 1:
            raise CapacityError(f"gpu capacity {cap} B is smaller than one {block_nbytes} B block")
        buf = torch.empty((slots, block_nbytes), dtype=torch.uint8, device=dev)
        self.device = dev
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        super().__init__(name, buf, block_size=block_size, events=events, policy=policy)

    @classmethod
    def from_options(cls, location: str, options: dict[str, Any], **common: Any) -> GpuTier:
        device = options.pop("device", None) or location or None
        return cls(options.pop("capacity", "1GiB"), device=device, **common, **options)

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        """Run copies on the tier's stream, ordered after the caller's pending work."""
        if self.stream is None:
            yield
            return
        torch = _torch()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield

    def sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def copy_rows(self, dst: Any, dst_idx: np.ndarray, src: Any, src_idx: np.ndarray) -> None:
        with self.on_stream():
            copy_rows(dst, dst_idx, src, src_idx)

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s["device"] = str(self.device)
        return s
