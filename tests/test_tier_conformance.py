"""Every tier shipped in this repo runs the shipped conformance suite unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbm_fs.events import EventBus
from kvbm_fs.testing import TierTests
from kvbm_fs.tier import Tier
from kvbm_fs.tiers.disk import DiskTier
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


class TestDiskTier(TierTests):
    """G3 on the local filesystem, through whichever data path the probe picks."""

    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.dir = tmp_path

    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> Tier:
        slot = 4096 + -(-block_nbytes // 4096) * 4096
        self.made = getattr(self, "made", 0) + 1
        return DiskTier(
            self.dir / f"tier{self.made}", block_nbytes, capacity_blocks * slot, events=events, segment_bytes=4 * slot
        )

    def reopen(self, tier: Tier) -> Tier | None:
        assert isinstance(tier, DiskTier)
        tier.close()
        return DiskTier(tier.root, tier.block_nbytes, tier.capacity_bytes, segment_bytes=4 * tier.slot_bytes)
