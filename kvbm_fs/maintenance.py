"""Offline maintenance of persistent tiers: ``kvbm_fs.check(url)`` and ``kvbm-fs check URL``."""

from __future__ import annotations

import json
import os
from typing import Any

from .errors import ConfigError
from .registry import TierSpec


def check(url: str, fix: bool = False, deep: bool = False) -> dict[str, Any]:
    """Verify a disk tier's index against its segment files (``deep``: every payload checksum too).

    ``fix`` removes entries whose bytes fail and frees slots left by dead writers.
    The geometry comes from the tier's own ``kvbm_fs.json``, so no layout is needed.
    """
    from .tiers.disk import DiskTier

    spec = TierSpec.parse(url)
    if spec.scheme not in ("file", "disk"):
        raise ConfigError(f"check works on disk tiers (file:// or disk://), not {spec.scheme}://")
    meta_path = os.path.join(spec.location, "kvbm_fs.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{spec.location} is not a kvbm_fs disk tier ({meta_path}: {e})") from None
    tier = DiskTier(spec.location, int(meta["block_nbytes"]), int(meta["num_slots"]) * int(meta["slot_bytes"]))
    try:
        report = tier.check(fix=fix, deep=deep)
        report["tier"] = tier.stats()
        return report
    finally:
        tier.close()


def rebuild_index(url: str, deep: bool = False) -> dict[str, Any]:
    """Rebuild a disk tier's index from its segment files (``kvbm-fs check URL --rebuild-index``);
    the old index is moved aside. ``deep``: keep only blocks whose payload checksum verifies."""
    from .tiers.disk.rebuild import rebuild_index as rebuild

    spec = TierSpec.parse(url)
    if spec.scheme not in ("file", "disk"):
        raise ConfigError(f"--rebuild-index works on disk tiers (file:// or disk://), not {spec.scheme}://")
    return rebuild(spec.location, deep=deep)
