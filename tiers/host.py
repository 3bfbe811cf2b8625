"""G2: pinned host memory, one preallocated page-aligned slab of fixed-size slots.

The slab is anonymous mmap memory (page-aligned, huge pages advised), touched
first by several threads in parallel and only then page-locked with
``cudaHostRegister`` when CUDA is present: allocating 8 GiB with
``pin_memory=True`` in one call is ~3x slower (Dynamo #13710).  Slots are padded
to the page size so that every block starts page-aligned (O_DIRECT / GDS ready).
"""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kvbm_fs.errors import CapacityError, ConfigError
from kvbm_fs.events import EventBus
from kvbm_fs.policy import EvictionPolicy
from kvbm_fs.tier import Medium, SlotTier
from kvbm_fs.units import parse_size

PAGE = mmap.PAGESIZE


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class HostSlab:
    """Page-aligned host memory, first-touched in parallel, optionally page-locked for DMA."""

    def __init__(self, nbytes: int, *, pin: bool | None = None, threads: int | None = None) -> None:
        t0 = time.perf_counter()
        self.nbytes = nbytes
        self.mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        self.array = np.frombuffer(self.mm, dtype=np.uint8)
        self._first_touch(threads or min(8, os.cpu_count() or 1))
        self.pinned = self._register() if pin is not False else False
        if pin and not self.pinned:
            raise ConfigError("pinned host memory requested (pin=true) but CUDA is not available")
        self.alloc_seconds = time.perf_counter() - t0

    def _first_touch(self, threads: int) -> None:
        chunk = max(PAGE, round_up(-(-self.nbytes // threads), PAGE))
        starts = range(0, self.nbytes, chunk)
        with ThreadPoolExecutor(threads) as ex:  # numpy drops the GIL while filling
            list(ex.map(lambda s: self.array[s : s + chunk].fill(0), starts))

    def _register(self) -> bool:
        try:
            import torch
        except ImportError:
            return False
        if not torch.cuda.is_available():
            return False
        ptr = self.array.ctypes.data
        err = torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 0)
        return int(err) == 0

    def close(self) -> None:
        if self.pinned:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.array.ctypes.data)
            self.pinned = False


class HostTier(SlotTier):
    medium = Medium.HOST
    persistent = False

    def __init__(
        self,
        capacity: int | str,
        block_nbytes: int,
        *,
        name: str = "host",
        block_size: int | None = None,
        pin: bool | None = None,
        events: EventBus | None = None,
        policy: EvictionPolicy | str | None = None,
    ) -> None:
        cap = parse_size(capacity, "host capacity")
        if block_nbytes < 1:
            raise ConfigError(f"block_nbytes must be positive, got {block_nbytes}")
        self.slot_stride = round_up(block_nbytes, PAGE)
        slots = cap // self.slot_stride
        if slots < 1:
            raise CapacityError(f"host capacity {cap} B is smaller than one {self.slot_stride} B block slot")
        self.slab = HostSlab(slots * self.slot_stride, pin=pin)
        rows = np.lib.stride_tricks.as_strided(
            self.slab.array, shape=(slots, block_nbytes), strides=(self.slot_stride, 1), writeable=True
        )
        super().__init__(name, rows, block_size=block_size, events=events, policy=policy)

    @classmethod
    def from_options(cls, location: str, options: dict[str, Any], **common: Any) -> HostTier:
        pin = options.pop("pin", None)
        return cls(options.pop("capacity", "1GiB"), pin=_bool(pin) if pin is not None else None, **common, **options)

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s.update(pinned=self.slab.pinned, alloc_seconds=round(self.slab.alloc_seconds, 4), slot_stride=self.slot_stride)
        return s

    def close(self) -> None:
        super().close()
        self.slab.close()


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected a boolean, got {v!r}")
