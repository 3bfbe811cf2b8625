"""The disk tier's public operator API (check with progress, verified raw reads, namespaces), its
STORED events (parents included, for routers) and its answer to a buffer that is not an array."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvbm_fs import codec, mount
from kvbm_fs.errors import CorruptBlockError, LayoutMismatchError
from kvbm_fs.events import BlockEvent, EventKind
from kvbm_fs.keys import BlockKeys
from kvbm_fs.testing import LAYOUT, NS_A, NS_B, blocks_for, chain
from kvbm_fs.tiers.disk import HEADER_PAGE, DiskTier
from kvbm_fs.tiers.host import HostTier

BN = NS_A.block_nbytes
SLOT = HEADER_PAGE + BN


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[DiskTier]:
    t = DiskTier(tmp_path / "tier", BN, 64 * SLOT, segment_bytes=16 * SLOT, block_size=LAYOUT.block_size)
    yield t
    t.close()


def test_check_reports_progress_per_batch_and_finds_a_bad_block(tier: DiskTier) -> None:
    keys = chain(NS_A, 20)
    assert tier.put(keys, blocks_for(keys, BN)).all()
    seen: list[tuple[int, int]] = []
    rep = tier.check(deep=True, batch=8, progress=lambda done, total: seen.append((done, total)))
    assert (rep["entries"], rep["bad"]) == (20, 0)
    assert seen == [(8, 20), (16, 20), (20, 20)]
    (rec,) = tier.index.records(keys.ns, keys.hashes[3:4])
    assert rec is not None
    seg, off = tier._locate(rec.slot)
    with open(tier._segment_path(seg), "r+b") as f:  # one payload byte flipped
        f.seek(off + HEADER_PAGE + 7)
        b = f.read(1)[0]
        f.seek(off + HEADER_PAGE + 7)
        f.write(bytes([b ^ 0x40]))
    rep = tier.check(deep=True, fix=True)
    assert (rep["bad"], rep["fixed"]) == (1, 1) and len(tier) == 19


def test_read_canonical_returns_the_verified_stored_bytes(tier: DiskTier) -> None:
    keys = chain(NS_A, 5)
    data = blocks_for(keys, BN)
    assert tier.put(keys, data).all()
    asked = BlockKeys(keys.ns, np.concatenate([keys.hashes, [np.uint64(12345)]]))
    got = tier.read_canonical(asked, LAYOUT.block_size)
    for i in range(5):
        raw = got[i]
        assert isinstance(raw, bytes) and len(raw) == codec.HEADER_SIZE + BN
        assert bytes(codec.verify(raw, keys[i], BN, LAYOUT.block_size)) == data[i].tobytes()
        assert raw == codec.encode(keys[i], int(keys.parents[i]), LAYOUT.block_size, data[i])
    assert isinstance(got[5], FileNotFoundError)
    bad = tier.read_canonical(keys[:1], LAYOUT.block_size + 1)  # another token count: refused, kept
    assert isinstance(bad[0], CorruptBlockError) and tier.contains(keys[:1]).all()
    (rec,) = tier.index.records(keys.ns, keys.hashes[2:3])
    assert rec is not None
    seg, off = tier._locate(rec.slot)
    with open(tier._segment_path(seg), "r+b") as f:
        f.seek(off + HEADER_PAGE + BN - 1)
        b = f.read(1)[0]
        f.seek(off + HEADER_PAGE + BN - 1)
        f.write(bytes([b ^ 1]))
    again = tier.read_canonical(keys, LAYOUT.block_size)
    assert isinstance(again[2], CorruptBlockError) and "checksum" in str(again[2])
    assert all(isinstance(r, bytes) for i, r in enumerate(again) if i != 2)
    assert len(tier) == 5  # a raw read removes nothing


def test_namespaces_lists_every_bound_namespace(tier: DiskTier) -> None:
    assert tier.namespaces() == {}
    tier.bind_namespace(NS_A)
    tier.bind_namespace(NS_B)
    assert tier.namespaces() == {NS_A.id: NS_A, NS_B.id: NS_B}


def test_disk_stored_events_carry_the_chain_parents(tmp_path: Path) -> None:
    events: list[BlockEvent] = []
    with mount(f"file://{tmp_path}/tier?capacity=1MiB", layout=LAYOUT, model="m", env={}) as s:
        s.events.subscribe(events.append)
        keys = s.keys(np.arange(6 * LAYOUT.block_size))
        data = np.random.default_rng(0).integers(0, 256, (6, BN), dtype=np.uint8)
        assert s.put(keys[:2], data[:2]).all()  # block by block, as a connector saves a growing chain
        assert s.put(keys[2:], data[2:]).all()
    stored = [e.keys for e in events if e.kind == EventKind.STORED and e.tier == "disk"]
    assert len(stored) == 2
    hashes = np.concatenate([k.hashes for k in stored])
    parents = np.concatenate([k.parents for k in stored])
    assert (hashes == keys.hashes).all() and (parents == keys.parents).all()
    assert parents[0] == 0 and (parents[1:] == keys.hashes[:-1]).all()


@pytest.mark.parametrize("kind", ["disk", "host"])
def test_a_python_list_given_to_a_tier_is_a_layout_mismatch(tmp_path: Path, kind: str) -> None:
    t = DiskTier(tmp_path / "tier", BN, 8 * SLOT) if kind == "disk" else HostTier(8 * BN, BN)
    keys = chain(NS_A, 2)
    try:
        for op in (t.put, t.get):
            with pytest.raises(LayoutMismatchError, match=r"list; need a numpy array or torch tensor .*uint8 rows"):
                op(keys, [[0] * BN, [1] * BN])
        assert not t.contains(keys).any()
    finally:
        t.close()
