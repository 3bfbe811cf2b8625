"""The Tier conformance suite, shipped in the package (like zarr's ``StoreTests``).

Every tier, in this repo or a plug-in, subclasses :class:`TierTests`, implements
:meth:`TierTests.make_tier` (and :meth:`TierTests.reopen` if it persists), and
inherits every test unchanged::

    class TestMyTier(TierTests):
        def make_tier(self, capacity_blocks, block_nbytes, events):
            return MyTier(capacity=capacity_blocks * block_nbytes, block_nbytes=block_nbytes, events=events)

Requires pytest and hypothesis (the ``dev`` extra).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from ..errors import IllegalTransitionError, LayoutMismatchError, PinnedError
from ..events import EventBus, EventKind
from ..keys import BlockKeys, Namespace
from ..layout import KVLayout
from ..tier import Tier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, block_size=16, dtype="float16")  # 8 KiB blocks
NS_A = Namespace("conformance-model", LAYOUT, tenant="a")
NS_B = Namespace("conformance-model", LAYOUT, tenant="b")


def require_nixl() -> None:
    """Skip the calling test (or module) unless a NIXL wheel (nixl-cu12 or nixl-cu13) imports."""
    from ..nixl_api import available

    if not available():
        pytest.skip("NIXL is not installed", allow_module_level=True)


def block_bytes(ns: int, h: int, nbytes: int) -> np.ndarray:
    """Content-addressed test data: the bytes of a block are a function of its key."""
    return np.random.default_rng([ns & 0xFFFFFFFF, ns >> 32, h & 0xFFFFFFFF, h >> 32]).integers(
        0, 256, nbytes, dtype=np.uint8
    )


def blocks_for(keys: BlockKeys, nbytes: int) -> np.ndarray:
    out = np.empty((len(keys), nbytes), np.uint8)
    for i, h in enumerate(keys.hashes.tolist()):
        out[i] = block_bytes(keys.ns, h, nbytes)
    return out


def chain(ns: Namespace, n: int, start: int = 1) -> BlockKeys:
    return BlockKeys.chain(ns.id, np.arange(start, start + n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def keyset(keys: BlockKeys) -> set[tuple[int, int]]:
    """Keys as comparable ``(namespace, hash)`` pairs."""
    return {(keys.ns, h) for h in keys.hashes.tolist()}


class EventRecorder:
    """Collects the events of a bus, for tests that assert what a tier reported."""

    def __init__(self, bus: EventBus | None = None) -> None:
        self.bus = bus if bus is not None else EventBus()
        self.events: list[Any] = []
        self.bus.subscribe(self.events.append)

    def keys(self, kind: EventKind) -> set[tuple[int, int]]:
        return {pair for e in self.events if e.kind is kind for pair in keyset(e.keys)}


class TierTests:
    """Conformance tests every :class:`Tier` must pass unchanged."""

    capacity_blocks = 16
    block_nbytes = LAYOUT.block_nbytes
    state_machine_examples = 25  # slow (networked) tiers may lower it

    # ---- to implement ----------------------------------------------------------------------
    def make_tier(self, capacity_blocks: int, block_nbytes: int, events: EventBus) -> Tier:
        raise NotImplementedError

    def reopen(self, tier: Tier) -> Tier | None:
        """Close ``tier`` and open a new one on the same storage (persistent tiers only)."""
        return None

    # ---- helpers ---------------------------------------------------------------------------
    def _new(self, capacity_blocks: int | None = None) -> Tier:
        t = self.make_tier(capacity_blocks or self.capacity_blocks, self.block_nbytes, EventBus())
        t.bind_namespace(NS_A)
        t.bind_namespace(NS_B)
        return t

    @pytest.fixture
    def tier(self) -> Any:
        t = self._new()
        yield t
        t.close()

    def _put(self, t: Tier, keys: BlockKeys) -> np.ndarray:
        return t.put(keys, blocks_for(keys, t.block_nbytes))

    def _check(self, t: Tier, keys: BlockKeys) -> np.ndarray:
        """Get keys; every row found must hold exactly its key's bytes."""
        out = np.full((len(keys), t.block_nbytes), 0xAB, np.uint8)
        found = t.get(keys, out)
        want = blocks_for(keys, t.block_nbytes)
        for i in np.flatnonzero(found):
            assert np.array_equal(out[i], want[i]), f"row {i} holds wrong bytes"
        for i in np.flatnonzero(~found):
            assert (out[i] == 0xAB).all(), f"row {i} of a miss was written"
        return found

    # ---- tests -----------------------------------------------------------------------------
    def test_put_then_get_roundtrips_bytes(self, tier: Tier) -> None:
        keys = chain(NS_A, 8)
        assert self._put(tier, keys).all()
        assert self._check(tier, keys).all()

    def test_get_of_missing_keys_is_a_miss_and_leaves_rows_alone(self, tier: Tier) -> None:
        keys = chain(NS_A, 6)
        self._put(tier, keys[np.array([0, 2, 4])])
        found = self._check(tier, keys)
        assert found.tolist() == [True, False, True, False, True, False]

    def test_contains_and_prefix_len(self, tier: Tier) -> None:
        keys = chain(NS_A, 8)
        self._put(tier, keys[:5])
        self._put(tier, keys[6:7])
        assert tier.contains(keys).tolist() == [True] * 5 + [False, True, False]
        assert tier.prefix_len(keys) == 5
        assert tier.prefix_len(keys[5:]) == 0

    def test_namespaces_are_isolated(self, tier: Tier) -> None:
        a = chain(NS_A, 4)
        b = BlockKeys(NS_B.id, a.hashes)
        self._put(tier, a)
        assert not tier.contains(b).any()
        self._put(tier, b)
        assert self._check(tier, a).all() and self._check(tier, b).all()

    def test_delete_returns_what_was_present(self, tier: Tier) -> None:
        keys = chain(NS_A, 4)
        self._put(tier, keys[:2])
        assert tier.delete(keys).tolist() == [True, True, False, False]
        assert not tier.contains(keys).any()
        assert not self._check(tier, keys).any()
        assert not tier.delete(keys).any()

    def test_iter_keys_lists_every_stored_key(self, tier: Tier) -> None:
        a, b = chain(NS_A, 3), chain(NS_B, 2, start=100)
        self._put(tier, a)
        self._put(tier, b)
        got = {(k.ns, k.seq_hash) for k in tier.all_keys()}
        assert got == {(k.ns, k.seq_hash) for k in list(a) + list(b)}

    def test_capacity_and_usage(self, tier: Tier) -> None:
        assert tier.capacity_bytes >= self.capacity_blocks * tier.block_nbytes
        assert len(tier) == 0 and tier.used_bytes == 0
        self._put(tier, chain(NS_A, 3))
        assert len(tier) == 3
        assert tier.used_bytes >= 3 * tier.block_nbytes
        s = tier.stats()
        for field in ("name", "medium", "persistent", "blocks", "capacity_bytes", "used_bytes"):
            assert field in s
        assert s["blocks"] == 3

    def test_full_tier_evicts_or_refuses_but_never_corrupts(self, tier: Tier) -> None:
        keys = chain(NS_A, self.capacity_blocks * 3)
        for i in range(0, len(keys), 5):
            self._put(tier, keys[i : i + 5])
            assert tier.used_bytes <= tier.capacity_bytes
            assert len(tier) <= self.capacity_blocks
        present = tier.contains(keys)
        assert present.any()
        assert (self._check(tier, keys) == present).all()

    def test_put_never_reports_a_key_that_making_room_evicted(self, tier: Tier) -> None:
        keys = chain(NS_A, self.capacity_blocks + 2)
        self._put(tier, keys[: self.capacity_blocks])
        ok = self._put(tier, keys)
        assert ok[: self.capacity_blocks].any()
        assert not (ok & ~tier.contains(keys)).any(), "put reported keys as stored that are not there"
        assert (self._check(tier, keys) == tier.contains(keys)).all()

    def test_pinned_blocks_survive_pressure(self, tier: Tier) -> None:
        hot = chain(NS_A, 2, start=10_000)
        self._put(tier, hot)
        assert tier.pin(hot).all()
        for i in range(0, self.capacity_blocks * 3, 4):
            self._put(tier, chain(NS_A, 4, start=i + 1))
        assert self._check(tier, hot).all()
        tier.unpin(hot)

    def test_delete_of_pinned_raises_and_keeps_everything(self, tier: Tier) -> None:
        keys = chain(NS_A, 3)
        self._put(tier, keys)
        tier.pin(keys[1:2])
        with pytest.raises(PinnedError):
            tier.delete(keys)
        assert tier.contains(keys).all()
        tier.unpin(keys[1:2])
        assert tier.delete(keys).all()

    def test_unpin_without_pin_is_misuse(self, tier: Tier) -> None:
        keys = chain(NS_A, 1)
        self._put(tier, keys)
        with pytest.raises(IllegalTransitionError):
            tier.unpin(keys)

    def test_duplicate_put_keeps_one_copy(self, tier: Tier) -> None:
        keys = chain(NS_A, 3)
        self._put(tier, keys)
        assert self._put(tier, keys).all()
        assert len(tier) == 3
        assert self._check(tier, keys).all()

    def test_wrong_row_shape_or_dtype_raises_and_stores_nothing(self, tier: Tier) -> None:
        keys = chain(NS_A, 2)
        with pytest.raises(LayoutMismatchError):
            tier.put(keys, np.zeros((2, tier.block_nbytes + 1), np.uint8))
        with pytest.raises(LayoutMismatchError):
            tier.put(keys, np.zeros((2, tier.block_nbytes // 2), np.uint16))
        with pytest.raises(LayoutMismatchError):
            tier.put(keys, np.zeros((1, tier.block_nbytes), np.uint8))
        assert len(tier) == 0
        self._put(tier, keys)
        with pytest.raises(LayoutMismatchError):
            tier.get(keys, np.zeros((2, tier.block_nbytes), np.float32))

    def test_torch_buffers(self, tier: Tier) -> None:
        torch = pytest.importorskip("torch")
        keys = chain(NS_A, 4)
        src = torch.from_numpy(blocks_for(keys, tier.block_nbytes))
        assert tier.put(keys, src).all()
        out = torch.zeros_like(src)
        assert tier.get(keys, out).all()
        assert torch.equal(out, src)

    def test_empty_batches(self, tier: Tier) -> None:
        none = chain(NS_A, 0)
        empty = np.zeros((0, tier.block_nbytes), np.uint8)
        assert tier.put(none, empty).size == 0
        assert tier.get(none, empty).size == 0
        assert tier.contains(none).size == 0
        assert tier.prefix_len(none) == 0

    def test_stored_events_are_published(self, tier: Tier) -> None:
        seen: list[Any] = []
        tier.events.subscribe(seen.append)
        self._put(tier, chain(NS_A, 3))
        stored = [e for e in seen if e.kind is EventKind.STORED]
        assert sum(len(e.keys) for e in stored) == 3
        assert all(e.tier == tier.name for e in stored)

    def test_concurrent_puts_and_gets(self, tier: Tier) -> None:
        errors: list[BaseException] = []

        def work(start: int) -> None:
            try:
                for j in range(6):
                    keys = chain(NS_A, 2, start=start + 2 * j)
                    self._put(tier, keys)
                    self._check(tier, keys)
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(1000 * i + 1,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        assert len(tier) <= self.capacity_blocks

    def test_persistence_across_reopen(self) -> None:
        t = self._new()
        if not t.persistent:
            t.close()
            pytest.skip("tier does not persist")
        keys = chain(NS_A, 5)
        self._put(t, keys)
        t2 = self.reopen(t)
        assert t2 is not None, "a persistent tier must implement reopen()"
        try:
            t2.bind_namespace(NS_A)
            assert self._check(t2, keys).all()
        finally:
            t2.close()

    def test_state_machine_against_a_dict_model(self) -> None:
        suite = self

        class Machine(TierMachine):
            def __init__(self) -> None:
                super().__init__(suite._new(4))

        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=self.state_machine_examples,
                stateful_step_count=25,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            ),
        )


_UNIVERSE = [(ns, h) for ns in (NS_A.id, NS_B.id) for h in range(1, 9)]
_key_lists = st.lists(st.sampled_from(_UNIVERSE), min_size=1, max_size=5)


def _batch(keys: list[tuple[int, int]]) -> list[BlockKeys]:
    by_ns: dict[int, list[int]] = {}
    for ns, h in keys:
        by_ns.setdefault(ns, []).append(h)
    return [BlockKeys(ns, np.array(hs, np.uint64)) for ns, hs in by_ns.items()]


class TierMachine(RuleBasedStateMachine):
    """A tier must behave like a set of content-addressed blocks that only ``put`` may shrink (by eviction)."""

    def __init__(self, tier: Tier) -> None:
        super().__init__()
        self.tier = tier
        self.model: set[tuple[int, int]] = set()
        self.pins: dict[tuple[int, int], int] = {}
        self.cap = len(tier) + tier.capacity_bytes // tier.block_nbytes

    def _present(self) -> set[tuple[int, int]]:
        out: set[tuple[int, int]] = set()
        for b in _batch(_UNIVERSE):  # one batched call per namespace: remote tiers pay per round trip
            out |= {(b.ns, h) for h, hit in zip(b.hashes.tolist(), self.tier.contains(b).tolist()) if hit}
        return out

    @rule(keys=_key_lists)
    def put(self, keys: list[tuple[int, int]]) -> None:
        for b in _batch(keys):
            ok = self.tier.put(b, blocks_for(b, self.tier.block_nbytes))
            for h, stored in zip(b.hashes.tolist(), ok.tolist()):
                if stored:
                    self.model.add((b.ns, h))
        self.model &= self._present()

    @rule(keys=_key_lists)
    def get(self, keys: list[tuple[int, int]]) -> None:
        before = self._present()
        for b in _batch(keys):
            out = np.zeros((len(b), self.tier.block_nbytes), np.uint8)
            found = self.tier.get(b, out)
            want = blocks_for(b, self.tier.block_nbytes)
            for i, h in enumerate(b.hashes.tolist()):
                assert bool(found[i]) == ((b.ns, h) in self.model)
                if found[i]:
                    assert np.array_equal(out[i], want[i])
        assert self._present() == before

    @rule(keys=_key_lists)
    def delete(self, keys: list[tuple[int, int]]) -> None:
        for b in _batch(keys):
            pinned = any(self.pins.get((b.ns, h), 0) for h in b.hashes.tolist())
            if pinned:
                try:
                    self.tier.delete(b)
                except PinnedError:
                    continue
                raise AssertionError("delete of a pinned block did not raise")
            was = self.tier.delete(b)
            assert was.tolist() == [(b.ns, h) in self.model for h in b.hashes.tolist()]
            self.model -= {(b.ns, h) for h in b.hashes.tolist()}

    @rule(key=st.sampled_from(_UNIVERSE))
    def pin(self, key: tuple[int, int]) -> None:
        b = BlockKeys(key[0], np.array([key[1]], np.uint64))
        if self.tier.pin(b)[0]:
            assert key in self.model
            self.pins[key] = self.pins.get(key, 0) + 1

    @rule(key=st.sampled_from(_UNIVERSE))
    def unpin(self, key: tuple[int, int]) -> None:
        if self.pins.get(key, 0):
            self.tier.unpin(BlockKeys(key[0], np.array([key[1]], np.uint64)))
            self.pins[key] -= 1

    @invariant()
    def matches_model(self) -> None:
        assert self._present() == self.model
        assert len(self.tier) == len(self.model) <= self.cap
        assert all(k in self.model for k, n in self.pins.items() if n)

    def teardown(self) -> None:
        self.tier.close()
