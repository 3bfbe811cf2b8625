"""G4, the remote tier: :class:`RemoteTier` (tier.py), any fsspec URL, one object per block; how it
reaches its store (fs.py); the NIXL OBJ data path for S3 (nixl_obj.py).  docs/architecture.md 1.11."""

from kvbm_fs.tiers.remote.tier import FORMAT, RemoteTier, open_remote

__all__ = ["FORMAT", "RemoteTier", "open_remote"]
