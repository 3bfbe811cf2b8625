"""Synthetic request traces of known character, to judge placement policies beyond one real trace.

Each generator returns a :class:`~kvbm_fs.replay.Trace` whose block ids follow the Mooncake
convention: equal ids mean equal content *and* equal prefix (a chain), so a request's ids form its
prefix chain.  They are seeded and deterministic; ``scale`` multiplies their request counts.  What each one rewards:

- ``system_prompts``: a few shared system prompts (Zipf popularity) before per-request blocks
  that are never seen again.  A policy must keep the shared prefixes while one-off blocks stream
  past (frequency and scan resistance).
- ``multi_turn``: interleaved chat sessions; each turn resends the session's history and adds a
  few blocks.  Reuse is by recency; frequency counts mislead (every block is used once per turn).
- ``zipf_documents``: document QA over a corpus with Zipf popularity; each request is a whole
  document chain plus one question block.  Popular documents should stay.
- ``scan_mix``: half the requests read a small hot set of documents, half are long one-off
  scans.  LRU lets every scan flush the hot set; ARC-like policies should not.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..replay import Trace, trace_from_lists

_FRESH = 1 << 40  # ids of never-repeated blocks start here, far from structured ids


class _Ids:
    """Chain ids: ``chain(owner, j)`` for block ``j`` of a shared chain; ``fresh()`` for one-off blocks."""

    def __init__(self) -> None:
        self.next_fresh = _FRESH

    @staticmethod
    def chain(owner: int, j: int) -> int:
        return owner * 4096 + j

    def fresh(self, n: int) -> list[int]:
        out = list(range(self.next_fresh, self.next_fresh + n))
        self.next_fresh += n
        return out


def _n(full: int, scale: float) -> int:
    return max(4, round(full * scale))


def _zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return np.asarray(w / w.sum())


def system_prompts(scale: float = 1.0, prompts: int = 300, prompt_blocks: int = 16, seed: int = 1) -> Trace:
    rng, ids, requests = np.random.default_rng(seed), _Ids(), _n(2000, scale)
    pick = rng.choice(prompts, size=requests, p=_zipf_weights(prompts, 1.1))
    reqs = [[ids.chain(int(p), j) for j in range(prompt_blocks)] + ids.fresh(int(rng.integers(4, 41))) for p in pick]
    return trace_from_lists(reqs, "system_prompts")


def multi_turn(scale: float = 1.0, seed: int = 2) -> Trace:
    """Sessions of 2-12 turns, 2-6 new blocks a turn, arriving in random interleaved order."""
    rng, sessions = np.random.default_rng(seed), _n(400, scale)
    turns = rng.integers(2, 13, size=sessions)
    order = rng.permutation(np.repeat(np.arange(sessions), turns))
    length = np.zeros(sessions, np.int64)
    reqs = []
    for s in order.tolist():
        length[s] += int(rng.integers(2, 7))
        reqs.append([_Ids.chain(s, j) for j in range(int(length[s]))])
    return trace_from_lists(reqs, "multi_turn")


def zipf_documents(scale: float = 1.0, seed: int = 3) -> Trace:
    rng, ids, requests, documents = np.random.default_rng(seed), _Ids(), _n(2000, scale), _n(1500, scale)
    lengths = rng.integers(8, 49, size=documents)
    pick = rng.choice(documents, size=requests, p=_zipf_weights(documents, 0.9))
    reqs = [[ids.chain(int(d), j) for j in range(int(lengths[d]))] + ids.fresh(1) for d in pick]
    return trace_from_lists(reqs, "zipf_documents")


def scan_mix(scale: float = 1.0, hot: int = 40, hot_blocks: int = 12, scan_blocks: int = 64, seed: int = 4) -> Trace:
    rng, ids, requests = np.random.default_rng(seed), _Ids(), _n(2000, scale)
    reqs = []
    for _ in range(requests):
        if rng.random() < 0.5:
            d = int(rng.integers(hot))
            reqs.append([ids.chain(d, j) for j in range(hot_blocks)] + ids.fresh(1))
        else:
            reqs.append(ids.fresh(scan_blocks))
    return trace_from_lists(reqs, "scan_mix")


# name -> generator(scale): scale 1 gives about 2,000 requests and 50k-80k block references
SYNTHETIC: dict[str, Callable[[float], Trace]] = {
    "system_prompts": system_prompts,
    "multi_turn": multi_turn,
    "zipf_documents": zipf_documents,
    "scan_mix": scan_mix,
}
