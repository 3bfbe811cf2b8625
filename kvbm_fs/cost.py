"""Load or recompute: a per-match decision from measured tier bandwidths and the engine's prefill rate.

A hit is only worth loading if fetching it is faster than recomputing it (SGLang #26305:
an L3 hit slower than prefill makes serving worse).  Each tier has a latency per
request and a bandwidth; the bandwidths start from defaults (or config) and follow what
``Store.get`` actually measures (an exponentially weighted average).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError
from .tier import Medium, Tier

# (latency s, bandwidth B/s) by medium: conservative figures for one request into host memory.
DEFAULTS: dict[Medium, tuple[float, float]] = {
    Medium.GPU: (5e-6, 100e9),
    Medium.HOST: (10e-6, 12e9),
    Medium.DISK: (200e-6, 1.5e9),
    Medium.REMOTE: (30e-3, 0.3e9),
    Medium.PEER: (50e-6, 5e9),
}


@dataclass
class CostModel:
    prefill_tokens_per_s: float | None = None  # None: the engine's rate is unknown, so loading always wins
    latency: dict[str, float] = field(default_factory=dict)  # by tier name, overrides the defaults
    bandwidth: dict[str, float] = field(default_factory=dict)
    alpha: float = 0.2  # weight of a new measurement

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s is not None and self.prefill_tokens_per_s <= 0:
            raise ConfigError(f"prefill_tokens_per_s must be > 0, got {self.prefill_tokens_per_s}")
        self._lock = threading.Lock()

    def tier_cost(self, tier: Tier) -> tuple[float, float]:
        lat, bw = DEFAULTS[tier.medium]
        return self.latency.get(tier.name, lat), self.bandwidth.get(tier.name, bw)

    def observe(self, tier: Tier, nbytes: int, seconds: float) -> None:
        """Fold a measured transfer into the tier's bandwidth (only large ones say anything)."""
        if nbytes < (1 << 20) or seconds <= 0:
            return
        lat, bw = self.tier_cost(tier)
        measured = nbytes / max(seconds - lat, 1e-9)
        with self._lock:
            self.bandwidth[tier.name] = (1 - self.alpha) * bw + self.alpha * measured

    def worth(self, where: np.ndarray, tiers: Sequence[Tier], block_nbytes: int, block_size: int) -> int:
        """The prefix length (in blocks) whose loading saves the most time against recomputing; 0 if none.

        ``where[i]`` is the tier index holding block i (the matched prefix only)."""
        n = where.size
        if n == 0 or self.prefill_tokens_per_s is None:
            return n
        costs = np.array([self.tier_cost(t) for t in tiers])  # [tiers, (latency, bandwidth)]
        load = block_nbytes / costs[where, 1]
        starts = np.concatenate(([True], where[1:] != where[:-1]))  # one request latency per run
        load = load + np.where(starts, costs[where, 0], 0.0)
        saving = np.cumsum(block_size / self.prefill_tokens_per_s - load)
        k = int(np.argmax(saving))
        return k + 1 if saving[k] > 0 else 0
