"""Admission filters (one ``tier.Admission`` for every tier: host slots, disk, remote): a block offered
once is not written; one that keeps coming back is. This is how a G3/G4 avoids the write churn of
storing every one-off prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm_fs import mount
from kvbm_fs.events import EventKind
from kvbm_fs.registry import TierSpec
from kvbm_fs.testing import NS_A, blocks_for, chain
from kvbm_fs.tiers.disk import DiskTier
from kvbm_fs.tiers.host import HostTier
from kvbm_fs.tiers.remote import RemoteTier

NB = NS_A.block_nbytes
SLOT = 4096 + -(-NB // 4096) * 4096


def _disk(path: Path, policy: str, slots: int = 16) -> DiskTier:
    t = DiskTier(path, NB, slots * SLOT, policy=policy)
    t.bind_namespace(NS_A)
    return t


def _remote(path: Path, policy: str) -> RemoteTier:
    t = RemoteTier(f"file://{path}", NB, policy=policy)
    t.bind_namespace(NS_A)
    return t


@pytest.fixture(params=["host", "disk", "remote"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    def build(policy: str) -> Any:
        if request.param == "host":
            return HostTier(16 * NB, NB, policy=policy)
        return _disk(tmp_path / "d", policy) if request.param == "disk" else _remote(tmp_path / "r", policy)

    return build


def test_count2_writes_a_chain_on_its_second_offer(make: Any) -> None:
    t = make("lru+count2")
    keys = chain(NS_A, 4)
    data = blocks_for(keys, NB)
    assert t.put(keys, data).tolist() == [False] * 4  # first offer: refused, nothing written
    assert not t.contains(keys).any() and len(list(t.iter_keys())) == 0
    assert t.put(keys, data).all()
    out = np.zeros_like(data)
    assert t.get(keys, out).all() and np.array_equal(out, data)
    t.close()


def test_a_read_counts_as_an_access(make: Any) -> None:
    t = make("lru+count2")
    keys = chain(NS_A, 3)
    assert not t.get(keys, np.zeros((3, NB), np.uint8)).any()  # a miss: someone wanted these blocks
    assert t.put(keys, blocks_for(keys, NB)).all()
    t.close()


def test_a_refused_parent_ends_the_chain(make: Any) -> None:
    t = make("lru+count2")
    keys = chain(NS_A, 4)
    t.put(keys[2:], blocks_for(keys[2:], NB))  # the tail was offered before; the head was not
    got = t.put(keys, blocks_for(keys, NB))
    assert got.tolist() == [False] * 4  # block 0 is refused, so its descendants are not written either
    t.close()


def test_a_refusal_is_one_event_naming_the_refused_tail(make: Any) -> None:
    t = make("lru+count2")
    keys = chain(NS_A, 4)
    t.put(keys[:2], blocks_for(keys[:2], NB))  # the head was offered before; the tail was not
    t.put(keys[:2], blocks_for(keys[:2], NB))  # ... and is stored on its second offer
    seen: list[Any] = []
    t.events.subscribe(seen.append)
    assert t.put(keys, blocks_for(keys, NB)).tolist() == [True, True, False, False]
    refused = [e for e in seen if e.kind is EventKind.REFUSED]
    assert len(refused) == 1 and refused[0].tier == t.name and refused[0].keys == keys[2:]
    t.close()


def test_without_admission_every_offer_is_written(make: Any) -> None:
    t = make("lru")
    keys = chain(NS_A, 4)
    assert t.put(keys, blocks_for(keys, NB)).all()
    t.close()


def test_tinylfu_on_a_full_disk_keeps_hot_blocks_from_one_off_ones(tmp_path: Path) -> None:
    t = _disk(tmp_path / "d", "lru+tinylfu", slots=4)
    hot = chain(NS_A, 4)
    assert t.put(hot, blocks_for(hot, NB)).all()
    for _ in range(3):
        t.get(hot, np.zeros((4, NB), np.uint8))
    for seed in range(1, 6):  # one-off chains against a full tier of hot blocks: none displaces them
        cold = chain(NS_A, 2, start=100 * seed)
        assert not t.put(cold, blocks_for(cold, NB)).any()
    assert t.contains(hot).all()
    t.close()


def test_policy_with_admission_parses_from_a_url(tmp_path: Path) -> None:
    spec = TierSpec.parse(f"file://{tmp_path}/d?policy=lru+count2")
    assert spec.options["policy"] == "lru+count2"
    st = mount(f"file://{tmp_path}/d?capacity=1MiB&policy=lru+count2", layout=NS_A.layout, model=NS_A.model, env={})
    try:
        keys = st.keys(np.arange(NS_A.layout.block_size * 2))
        data = blocks_for(keys, NB)
        assert not st.put(keys, data).any()
        assert st.put(keys, data).all()
    finally:
        st.close()
