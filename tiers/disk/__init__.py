"""G3, the local disk tier: :class:`DiskTier` (tier.py) over an LMDB index (index.py, sealed by seal.py,
rebuilt from the segments by rebuild.py), preallocated segment files (files.py), block I/O engines
(blockio.py, nixl_io.py) and the GPU data path (device.py, gds.py).  docs/architecture.md 1.5-1.6."""

from kvbm_fs.tiers.disk.blockio import ALIGN
from kvbm_fs.tiers.disk.files import FORMAT, HEADER_PAGE, round_up
from kvbm_fs.tiers.disk.tier import DiskTier

__all__ = ["ALIGN", "FORMAT", "HEADER_PAGE", "DiskTier", "round_up"]
