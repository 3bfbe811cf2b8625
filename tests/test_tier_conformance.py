"""Every tier shipped in this repo runs the shipped conformance suite unchanged."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from kvbm_fs.events import EventBus
from kvbm_fs.testing import TierTests
from kvbm_fs.tier import Tier
from kvbm_fs.tiers.disk import DiskTier
from kvbm_fs.tiers.gpu import GpuTier
from kvbm_fs.tiers.host import HostTier
from kvbm_fs.tiers.remote import RemoteTier


class TestHostTier(TierTests):
    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> Tier:
        stride = -(-block_nbytes // 4096) * 4096
        return HostTier(capacity_blocks * stride, block_nbytes, events=events)


class TestGpuTierOnCpu(TierTests):
    """The G1 pool on device="cpu" (CI has no GPU; the CUDA path is the same code plus streams)."""

    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> Tier:
        return GpuTier(capacity_blocks * block_nbytes, block_nbytes, device="cpu", events=events)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs in the GPU check)")
class TestGpuTierOnCuda(TierTests):
    """The G1 pool in GPU memory: copies on the tier's own stream, registration after the copy event."""

    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> Tier:
        return GpuTier(capacity_blocks * block_nbytes, block_nbytes, device="cuda", events=events)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs in the GPU check)")
class TestPinnedHostTier(TierTests):
    """G2 with its slab registered with CUDA (cudaHostRegister), as it runs beside a GPU."""

    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> Tier:
        stride = -(-block_nbytes // 4096) * 4096
        t = HostTier(capacity_blocks * stride, block_nbytes, events=events, pin=True)
        assert t.slab.pinned
        return t


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


class _RemoteTests(TierTests):
    """G4 through fsspec; each test gets its own prefix."""

    def base_url(self) -> str:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {}

    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> Tier:
        self.made = getattr(self, "made", 0) + 1
        self.url = f"{self.base_url()}/t{uuid.uuid4().hex[:8]}"
        return RemoteTier(self.url, block_nbytes, capacity_blocks * (128 + block_nbytes), events=events,
                          storage_options=self.options())  # fmt: skip

    def reopen(self, tier: Tier) -> Tier | None:
        assert isinstance(tier, RemoteTier)
        tier.close()
        return RemoteTier(self.url, tier.block_nbytes, tier.capacity_bytes, storage_options=self.options())


class TestRemoteTierFile(_RemoteTests):
    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.dir = tmp_path

    def base_url(self) -> str:
        return f"file://{self.dir}"


class TestRemoteTierMemory(_RemoteTests):
    def base_url(self) -> str:
        return "memory://kvbm-conformance"


class TestRemoteTierS3(_RemoteTests):
    """Against each real S3 server on 127.0.0.1 (moto, SeaweedFS) through s3fs."""

    state_machine_examples = 10

    @pytest.fixture(autouse=True)
    def _s3(self, s3_server: Any, s3_bucket: str) -> None:
        self.s3, self.bucket = s3_server, s3_bucket

    def base_url(self) -> str:
        return f"s3://{self.bucket}"

    def options(self) -> dict[str, Any]:
        return dict(self.s3.storage_options())
