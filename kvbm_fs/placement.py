"""Write placement for a daemon-run store: where a new block lands, so the fast tier holds re-seen blocks.

With the placement daemon, a block reaches the fast tier (host memory) two ways: a put, and a
promotion when a get or match finds it lower down.  Most blocks of a prompt are never seen again
(on the shared Mooncake trace 64% of references are to blocks seen before, but most distinct blocks
are seen once), so when every put lands in the fast tier, one-off blocks fill it and push out the
blocks that do come back.  :class:`FirstSight` sends puts to a lower tier instead: the fast tier then
holds only blocks referenced at least twice, which the daemon promotes on their second reference.
docs/architecture.md 1.12 has the measurements.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError
from .tier import Medium

if TYPE_CHECKING:
    from .keys import BlockKeys
    from .store import Store


class FirstSight:
    """Puts that name no tier start at ``tier`` (a tier below the first) instead of the first tier;
    what it refuses spills further down as usual.  Explicit ``Store.put(tier=...)`` is untouched."""

    def __init__(self, store: Store, tier: str = "auto") -> None:
        self.index = self.resolve(store, tier)

    @staticmethod
    def resolve(store: Store, tier: str) -> int:
        """``auto``: the first local disk tier below the first tier (puts into a remote tier would make
        the second reference a slow remote load); 0 when there is none, so the rule does nothing."""
        if tier == "auto":
            return next((i for i, t in enumerate(store.tiers) if i and t.medium is Medium.DISK), 0)
        names = [t.name for t in store.tiers]
        if tier not in names[1:]:
            raise ConfigError(f"first_sight: {tier!r} is not a tier below the first; tiers: {names}")
        return names.index(tier)

    def start(self, keys: BlockKeys) -> int:
        """Index of the tier a put of ``keys`` starts at."""
        return self.index
