"""Helpers the disk-tier tests of several modules share."""

from __future__ import annotations

import os

from kvbm_fs.keys import BlockKeys
from kvbm_fs.tiers.disk import HEADER_PAGE, DiskTier


def corrupt_payload(tier: DiskTier, keys: BlockKeys) -> None:
    """Flip payload bytes of every block of ``keys`` (all held by ``tier``), behind the tier's back: the
    header stays whole, so only the checksum can tell."""
    for rec in tier.index.records(keys.ns, keys.hashes):
        assert rec is not None, "corrupt_payload: a block the tier does not hold"
        seg, off = tier._locate(rec.slot)
        fd = os.open(tier._segment_path(seg), os.O_RDWR)
        try:
            for pos in (7, 300, 1500):
                at = off + HEADER_PAGE + pos
                os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x5A]), at)
        finally:
            os.close(fd)
