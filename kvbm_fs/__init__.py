"""kvbm_fs: a tiered, content-addressed KV-cache block store for LLM serving.

Blocks are named by Dynamo-compatible prefix-chain hashes inside a namespace
(model, KV layout, rank, tenant) and live in tiers from GPU memory down to object
storage.  Start with :func:`mount`.
"""

from .codec import BlockHeader
from .errors import (
    CapacityError,
    ConfigError,
    CorruptBlockError,
    ForeignBlockError,
    FormatVersionError,
    IllegalTransitionError,
    IndexCorruptError,
    KvbmError,
    LayoutMismatchError,
    PinnedError,
    TierClosedError,
    TruncatedBlockError,
    UnknownSchemeError,
)
from .events import BlockEvent, EventBus, EventKind
from .keys import BlockKey, BlockKeys, Namespace
from .layout import KVLayout
from .lifecycle import BlockState, SlotPool
from .maintenance import check
from .mount import mount
from .registry import register_tier
from .store import Match, Pins, Store
from .tier import Medium, SlotTier, Tier

__version__ = "0.1.0"

__all__ = [
    "BlockEvent",
    "BlockHeader",
    "BlockKey",
    "BlockKeys",
    "BlockState",
    "CapacityError",
    "ConfigError",
    "CorruptBlockError",
    "EventBus",
    "EventKind",
    "ForeignBlockError",
    "FormatVersionError",
    "IllegalTransitionError",
    "IndexCorruptError",
    "KVLayout",
    "KvbmError",
    "LayoutMismatchError",
    "Match",
    "Medium",
    "Namespace",
    "PinnedError",
    "Pins",
    "SlotPool",
    "SlotTier",
    "Store",
    "Tier",
    "TierClosedError",
    "TruncatedBlockError",
    "UnknownSchemeError",
    "check",
    "mount",
    "register_tier",
]
