"""Retained namespaces on a disk tier: a prepopulation's blocks outlive everyday traffic within a share."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm_fs import ConfigError, Store, mount
from kvbm_fs import prepopulate as pp
from kvbm_fs.catalog import Catalog
from kvbm_fs.keys import BlockKeys, Namespace
from kvbm_fs.testing import NS_A, NS_B, blocks_for, chain
from kvbm_fs.tiers.disk import DiskTier

NB = NS_A.block_nbytes
SLOT = 4096 + -(-NB // 4096) * 4096
SLOTS = 20


def _tier(path: Path) -> DiskTier:
    t = DiskTier(path, NB, SLOTS * SLOT)
    t.bind_namespace(NS_A)
    t.bind_namespace(NS_B)
    return t


def _put(t: DiskTier, keys: BlockKeys) -> np.ndarray:
    return t.put(keys, blocks_for(keys, NB))


def _churn(t: DiskTier, n: int = 3 * SLOTS, seed: int = 1, ns: Namespace = NS_A) -> BlockKeys:
    """Everyday traffic: ``n`` single-block puts; returns their keys."""
    keys = chain(ns, n, start=1000 * seed)
    for i in range(n):
        assert _put(t, keys[i : i + 1]).all()  # the tier keeps taking new blocks
    return keys


@pytest.mark.parametrize("ns", [NS_A, NS_B], ids=["other-namespace", "same-namespace"])
def test_retained_blocks_survive_churn_within_the_share(tmp_path: Path, ns: Namespace) -> None:
    t = _tier(tmp_path / "d")
    warm = chain(NS_B, 6)
    _put(t, warm)
    assert t.retain(NS_B.id, 0.3, warm.hashes[:5]) == 5  # budget: 6 of 20 slots
    assert t.get(warm[:5], np.empty((5, NB), np.uint8)).all()
    t.flush()  # a hit re-ranks a block: it stays retained
    everyday = _churn(t, ns=ns)  # the warmed model's own traffic is everyday traffic too
    assert t.contains(warm).tolist() == [True] * 5 + [False]  # the unmarked block was ordinary
    assert len(t) == SLOTS
    assert t.contains(everyday[-(SLOTS - 5) :]).all()  # the rest of the tier serves everyday traffic
    assert t.retained()["blocks"] == 5
    cold = np.concatenate([b.hashes for b in t.coldest(SLOTS)])
    assert cold.size == SLOTS - 5 and not np.isin(warm.hashes[:5], cold).any()  # the daemon does not demote them
    assert t.evict(SLOTS) == 0  # nor can it evict that many: exactly n or none
    t.close()


def test_beyond_the_share_the_oldest_retained_blocks_go_first(tmp_path: Path) -> None:
    t = _tier(tmp_path / "d")
    warm = chain(NS_B, 10)
    for i in range(10):  # in chain order: block 0 is the oldest
        _put(t, warm[i : i + 1])
    t.retain(NS_B.id, 0.3)
    _churn(t, ns=NS_B)
    assert t.contains(warm).tolist() == [False] * 4 + [True] * 6
    assert t.retained()["blocks"] == 6
    t.close()


def test_beyond_the_share_a_read_keeps_a_retained_block_longer(tmp_path: Path) -> None:
    """Oldest retained = lowest in the tier's eviction order (kvbm_fs.tier.retention_victims): on disk the
    policy's rank, which a read raises."""
    t = _tier(tmp_path / "d")
    warm = chain(NS_B, 10)
    for i in range(10):
        _put(t, warm[i : i + 1])
    assert t.get(warm[:1], np.empty((1, NB), np.uint8)).all()  # the oldest written, read since
    t.flush()
    t.retain(NS_B.id, 0.3)  # budget: 6 of 20 slots, 4 over
    _churn(t)
    assert t.contains(warm).tolist() == [True] + [False] * 4 + [True] * 5
    t.close()


def test_unmarking_makes_them_ordinary(tmp_path: Path) -> None:
    t = _tier(tmp_path / "d")
    warm = chain(NS_B, 5)
    _put(t, warm)
    t.retain(NS_B.id, 0.3)
    assert t.retain(NS_B.id, None) == 5
    _churn(t)
    assert not t.contains(warm).any()
    assert t.retained() == {"marks": {}, "blocks": 0, "budget": 0}
    t.close()


def test_the_mark_survives_reopen_and_an_index_rebuild(tmp_path: Path) -> None:
    from kvbm_fs.tiers.disk.rebuild import rebuild_index

    t = _tier(tmp_path / "d")
    warm = chain(NS_B, 5)
    _put(t, warm)
    t.retain(NS_B.id, 0.25)
    t.close()
    t = _tier(tmp_path / "d")
    assert t.retained()["marks"] == {NS_B.id: 0.25}
    _churn(t)
    assert t.contains(warm).all()
    t.close()
    rebuild_index(str(tmp_path / "d"))  # the index forgets ranks; namespaces/<id>.retain keeps the share
    t = _tier(tmp_path / "d")
    assert t.retained() == {"marks": {NS_B.id: 0.25}, "blocks": 0, "budget": 5}
    assert t.retain(NS_B.id, 0.25, warm.hashes) == 5  # what a rerun of prepopulate --retain does
    _churn(t, seed=2)
    assert t.contains(warm).all()
    t.close()


def test_rm_of_the_namespace_removes_the_mark(tmp_path: Path) -> None:
    t = _tier(tmp_path / "d")
    _put(t, chain(NS_B, 5))
    t.retain(NS_B.id, 0.3)
    t.close()
    with Catalog.open(f"file://{tmp_path / 'd'}") as cat:
        row = next(r for r in cat.ls() if r["namespace"] == f"{NS_B.id:016x}")
        assert list(row["retained"].values()) == [0.3]  # what `kvbm-fs ls` shows
        assert cat.remove(cat.select(NS_B.short_id, None, None))["removed"] == 5
    t = _tier(tmp_path / "d")
    assert t.retained() == {"marks": {}, "blocks": 0, "budget": 0}
    assert not (tmp_path / "d" / "namespaces" / f"{NS_B.id:016x}.retain").exists()
    t.close()


@pytest.mark.parametrize("share", [0, 1, 1.5, -0.1, math.nan, True, "0.3"])
def test_bad_shares_are_config_errors(tmp_path: Path, share: object) -> None:
    t = _tier(tmp_path / "d")
    with pytest.raises(ConfigError, match="retain share"):
        t.retain(NS_B.id, share)  # type: ignore[arg-type]
    assert t.retained()["marks"] == {}
    t.close()


def test_prepopulate_refuses_a_bad_share_first(capsys: pytest.CaptureFixture[str]) -> None:
    rc = pp.main(["x.jsonl", "--retain", "--retain-share", "1.5"])  # x.jsonl does not exist: it is not read
    assert rc == 2 and "retain share" in capsys.readouterr().err  # before the corpus or an engine


def test_prepopulate_retain_marks_and_no_retain_unmarks(tmp_path: Path) -> None:
    from test_prepopulate import LAYOUT, FakeEngine, corpus

    def store() -> Store:
        return mount(f"file://{tmp_path / 'p'}?capacity=1MiB", layout=LAYOUT, model="fake", env={})

    eng = FakeEngine(store())
    rep = pp.run(eng, corpus(list(range(40))), retain=True, retain_share=0.2)
    disk = eng.store.tiers[-1]
    assert isinstance(disk, DiskTier)
    ns = eng.namespaces[0]
    assert rep.retained == {disk.name: 10} and disk.retained()["marks"] == {ns.id: 0.2}
    eng.prefill([np.arange(100, 140)])  # serving traffic after the run: ordinary blocks
    assert disk.retained()["blocks"] == 10
    assert pp.run(eng, corpus(list(range(40))), retain=True).retained == {disk.name: 0}  # a rerun: marked already
    eng.close()
    eng = FakeEngine(store())
    out = io.StringIO()
    pp.print_table(rep, out)
    assert "10 blocks re-ranked" in out.getvalue()
    pp.run(eng, corpus(list(range(40))), retain=False)
    disk = eng.store.tiers[-1]
    assert isinstance(disk, DiskTier)
    assert disk.retained() == {"marks": {}, "blocks": 0, "budget": 0}
    eng.close()


def test_marking_many_blocks_takes_bounded_transactions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvbm_fs.tiers.disk.tier as dt

    t = _tier(tmp_path / "d")
    warm = chain(NS_B, 7)
    _put(t, warm)
    monkeypatch.setattr(dt, "RETAIN_BATCH", 2)
    writes: list[object] = []
    real = t.index.write

    def write(fn: Any) -> Any:
        writes.append(fn)
        return real(fn)

    monkeypatch.setattr(t.index, "write", write)
    assert t.retain(NS_B.id, 0.4) == 7  # every block the namespace holds, two a transaction
    assert len(writes) == 1 + 4 and t.retained()["blocks"] == 7  # the share, then 4 batches
    writes.clear()
    assert t.retain(NS_B.id, None) == 7 and len(writes) == 1 + 4
    assert t.retained() == {"marks": {}, "blocks": 0, "budget": 0}
    t.close()
