"""Every tier shipped in this repo runs the shipped conformance suite unchanged."""

from __future__ import annotations

from kvbm_fs.events import EventBus
from kvbm_fs.testing import TierTests
from kvbm_fs.tier import Tier
from kvbm_fs.tiers.gpu import GpuTier
from kvbm_fs.tiers.host import HostTier


class TestHostTier(TierTests):
    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> Tier:
        stride = -(-block_nbytes // 4096) * 4096
        return HostTier(capacity_blocks * stride, block_nbytes, events=events)


class TestGpuTierOnCpu(TierTests):
    """The G1 pool on device="cpu" (CI has no GPU; the CUDA path is the same code plus streams)."""

    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> Tier:
        return GpuTier(capacity_blocks * block_nbytes, block_nbytes, device="cpu", events=events)
