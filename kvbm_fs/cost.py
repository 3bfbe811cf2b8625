"""Load or recompute: a per-match decision from measured tier bandwidths and the engine's prefill rate.

A hit is only worth loading if fetching it is faster than recomputing it (SGLang #26305:
an L3 hit slower than prefill makes serving worse).  Each tier has a latency per
request and a bandwidth; the bandwidths start from defaults (or config) and follow what
``Store.get`` actually measures (an exponentially weighted average).

Recomputing block ``i`` of a prompt (tokens ``i*B .. i*B+B-1``) costs ``a + b*i`` seconds: per
token the linear layers cost ``2P`` FLOPs and attention ``4*L*d*t`` at position ``t``, so a block
costs ``(B/tps) * (1 + r*(B*i + (B-1)/2))`` with ``r = 2*L*d/P`` and ``tps`` the prefill rate at
short context (docs/architecture.md 1.12).  ``recompute_a``/``recompute_b`` override ``a``/``b``.
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
# Attention FLOPs per token of context over linear FLOPs per token, 2*L*d/P: Llama-3-8B (32 layers,
# d_model 4096, 8.0e9 parameters) gives 3.3e-5, so block 60 of 512-token blocks costs twice block 0.
ATTENTION_RATIO = 2 * 32 * 4096 / 8.0e9


@dataclass
class CostModel:
    prefill_tokens_per_s: float | None = None  # None: the engine's rate is unknown, so loading always wins
    latency: dict[str, float] = field(default_factory=dict)  # by tier name, overrides the defaults
    bandwidth: dict[str, float] = field(default_factory=dict)
    alpha: float = 0.2  # weight of a new measurement
    attention_ratio: float = ATTENTION_RATIO  # r in a + b*i (module docstring)
    recompute_a: float | None = None  # seconds to recompute block 0 (None: from the prefill rate)
    recompute_b: float | None = None  # extra seconds per block of position (None: from attention_ratio)

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s is not None and self.prefill_tokens_per_s <= 0:
            raise ConfigError(f"prefill_tokens_per_s must be > 0, got {self.prefill_tokens_per_s}")
        for k in ("attention_ratio", "recompute_a", "recompute_b"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"{k} must be a number >= 0, got {v!r}")
        self._lock = threading.Lock()

    def recompute_ab(self, block_size: int) -> tuple[float, float]:
        """(a, b): recomputing block i of a prompt takes a + b*i seconds; (0, 0) with no rate known."""
        if self.prefill_tokens_per_s is None and self.recompute_a is None:
            return 0.0, 0.0
        per = block_size / self.prefill_tokens_per_s if self.prefill_tokens_per_s else 0.0
        r = self.attention_ratio
        a = self.recompute_a if self.recompute_a is not None else per * (1 + r * (block_size - 1) / 2)
        b = self.recompute_b if self.recompute_b is not None else per * r * block_size
        return float(a), float(b)

    def recompute_s(self, start: int, n: int, block_size: int) -> np.ndarray:
        """Seconds to recompute blocks ``start .. start+n-1`` of a prompt, each."""
        a, b = self.recompute_ab(block_size)
        return a + b * np.arange(start, start + n, dtype=np.float64)

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
        if n == 0 or (self.prefill_tokens_per_s is None and self.recompute_a is None):
            return n
        costs = np.array([self.tier_cost(t) for t in tiers])  # [tiers, (latency, bandwidth)]
        load = block_nbytes / costs[where, 1]
        starts = np.concatenate(([True], where[1:] != where[:-1]))  # one request latency per run
        load = load + np.where(starts, costs[where, 0], 0.0)
        saving = np.cumsum(self.recompute_s(0, n, block_size) - load)
        k = int(np.argmax(saving))
        return k + 1 if saving[k] > 0 else 0
