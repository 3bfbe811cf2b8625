"""``mooncake://``: a tier on a Mooncake Store pool (the ``mooncake`` extra); see :mod:`.tier`."""

from kvbm_fs.tiers.mooncake.config import MooncakeConfig, MooncakeUnavailableError
from kvbm_fs.tiers.mooncake.master import MooncakeMaster, master_binary
from kvbm_fs.tiers.mooncake.tier import MooncakeTier

__all__ = ["MooncakeConfig", "MooncakeMaster", "MooncakeTier", "MooncakeUnavailableError", "master_binary"]
