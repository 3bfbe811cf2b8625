"""Property-based state machine: a two-tier Store behaves like a dict model of content-addressed blocks.

The model tracks, per tier, which keys may be present. Only operations that write
into a tier (put, copy) may make it lose keys (LRU eviction); nothing else may.
Every block read back equals the bytes of its key; match is the longest prefix of
keys present in any tier; pinned keys are never lost and never deleted.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbm_fs import BlockKeys, KVLayout, PinnedError, Pins, mount
from kvbm_fs.testing import blocks_for

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=32, block_size=16, dtype="float16")  # 2 KiB blocks
TIERS = ("gpu", "host")
N = 10  # universe: one chain of N blocks


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        nb = LAYOUT.block_nbytes
        self.store = mount(f"gpu://cpu?capacity={3 * nb}", f"host://?capacity={5 * 4096}", layout=LAYOUT, env={})
        ns = self.store.default_namespace
        assert ns is not None
        self.keys = BlockKeys.chain(ns.id, np.arange(1, N + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        self.data = blocks_for(self.keys, nb)
        self.model: dict[str, set[int]] = {t: set() for t in TIERS}
        self.pins: list[tuple[Pins, set[tuple[str, int]]]] = []

    def _present(self, tier: str) -> set[int]:
        return {int(i) for i in np.flatnonzero(self.store.tier(tier).contains(self.keys))}

    def _pinned(self) -> set[tuple[str, int]]:
        return set().union(*(held for _, held in self.pins)) if self.pins else set()

    def _after_write(self, tier: str, new: set[int]) -> None:
        now = self._present(tier)
        assert new <= now, "a key reported stored is missing"
        assert now <= self.model[tier] | new, "a key appeared from nowhere"
        self.model[tier] = now
        for t, i in self._pinned():
            assert i in self.model[t], "a pinned block was evicted"

    @rule(tier=st.sampled_from(TIERS), lo=st.integers(0, N - 1), n=st.integers(1, 4))
    def put(self, tier: str, lo: int, n: int) -> None:
        hi = min(N, lo + n)
        ok = self.store.put(self.keys[lo:hi], self.data[lo:hi], tier=tier, spill=False)
        self._after_write(tier, {lo + int(i) for i in np.flatnonzero(ok)})

    @rule(src=st.sampled_from(TIERS), dst=st.sampled_from(TIERS), lo=st.integers(0, N - 1), n=st.integers(1, 4))
    def copy(self, src: str, dst: str, lo: int, n: int) -> None:
        if src == dst:
            return
        hi = min(N, lo + n)
        before_src = set(self.model[src])
        ok = self.store.copy(self.keys[lo:hi], src, dst)
        got = {lo + int(i) for i in np.flatnonzero(ok)}
        assert got <= before_src | self.model[dst]
        self._after_write(dst, got)
        assert self._present(src) == before_src, "copying must not change the source"

    @rule(lo=st.integers(0, N - 1), n=st.integers(1, N))
    def match_and_get(self, lo: int, n: int) -> None:
        keys = self.keys[lo : lo + n]
        m = self.store.match(keys)
        anywhere = self.model["gpu"] | self.model["host"]
        want = 0
        while want < len(keys) and lo + want in anywhere:
            want += 1
        assert m.length == want
        for name, a, b in m.runs:
            assert all(lo + i in self.model[name] for i in range(a, b))
        out = np.zeros((len(keys), LAYOUT.block_nbytes), np.uint8)
        got = self.store.get(keys, out, m)
        for i in range(len(keys)):
            assert bool(got[i]) == (lo + i in anywhere)
            if got[i]:
                assert np.array_equal(out[i], self.data[lo + i])

    @rule(lo=st.integers(0, N - 1), n=st.integers(1, 3))
    def delete(self, lo: int, n: int) -> None:
        idx = set(range(lo, min(N, lo + n)))
        if any(i in idx for _, i in self._pinned()):
            try:
                self.store.delete(self.keys[lo : lo + n])
            except PinnedError:
                return
            raise AssertionError("delete of a pinned block did not raise")
        was = self.store.delete(self.keys[lo : lo + n])
        assert {lo + int(i) for i in np.flatnonzero(was)} == idx & (self.model["gpu"] | self.model["host"])
        for t in TIERS:
            self.model[t] -= idx

    @rule(lo=st.integers(0, N - 1), n=st.integers(1, 3))
    def pin(self, lo: int, n: int) -> None:
        keys = self.keys[lo : lo + n]
        pins = self.store.pin(keys)
        held = {(t, lo + i) for t in TIERS for i in range(len(keys)) if lo + i in self.model[t]}
        assert pins.mask.tolist() == [any((t, lo + i) in held for t in TIERS) for i in range(len(keys))]
        self.pins.append((pins, held))

    @precondition(lambda self: bool(self.pins))
    @rule()
    def unpin(self) -> None:
        pins, _ = self.pins.pop(0)
        self.store.unpin(pins)

    @invariant()
    def model_matches_tiers(self) -> None:
        for t in TIERS:
            assert self._present(t) == self.model[t]
            tier = self.store.tier(t)
            assert tier.used_bytes <= tier.capacity_bytes

    def teardown(self) -> None:
        self.store.close()


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
)
