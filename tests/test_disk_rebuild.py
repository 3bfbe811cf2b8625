"""What an index rebuilt from the segments holds: deleted blocks stay deleted, evicted intact blocks may
return (correct, verified), every namespace description comes back, and old indexes do not pile up."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from kvbm_fs import cli, mount
from kvbm_fs.keys import BlockKeys, Namespace
from kvbm_fs.testing import LAYOUT, NS_A, NS_B, blocks_for, chain
from kvbm_fs.tiers.disk import HEADER_PAGE, DiskTier
from kvbm_fs.tiers.disk.rebuild import KEEP_ASIDE, read_namespaces, rebuild_index

BN = NS_A.block_nbytes
SLOT = HEADER_PAGE + BN


def open_tier(root: Path, slots: int = 32) -> DiskTier:
    return DiskTier(root, BN, slots * SLOT, segment_bytes=8 * SLOT)


def found(t: DiskTier, keys: BlockKeys) -> np.ndarray:
    """get ``keys``; every block delivered must hold its own bytes."""
    out = np.zeros((len(keys), BN), np.uint8)
    got = t.get(keys, out)
    assert (out[got] == blocks_for(keys, BN)[got]).all(), "a wrong byte was served"
    return got


def test_deleted_blocks_stay_deleted_after_a_rebuild(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    t = open_tier(root)
    keys = chain(NS_A, 10)
    assert t.put(keys, blocks_for(keys, BN)).all()
    gone = keys[np.array([1, 4, 5, 9])]
    assert t.delete(gone).all()
    t.close()
    rep = rebuild_index(str(root))
    assert rep["blocks"] == 6 and rep["empty_slots"] >= 4  # the deleted slots' header pages are zeros
    t = open_tier(root)
    try:
        assert not t.contains(gone).any() and not found(t, gone).any()
        keep = keys[np.array([0, 2, 3, 6, 7, 8])]
        assert found(t, keep).all() and len(t) == 6
        assert t.check(deep=True)["bad"] == 0
    finally:
        t.close()


def test_a_block_deleted_through_the_store_stays_deleted_and_its_slot_is_reused(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/tier?capacity={8 * SLOT}"
    keys = chain(NS_A, 8)
    with mount(url, layout=LAYOUT, model=NS_A.model, tenant=NS_A.tenant, env={}) as s:
        assert s.put(keys, blocks_for(keys, BN)).all()
        assert s.delete(keys[:3]).all()
        more = chain(NS_A, 2, start=100)  # the tier is full but for the 3 freed slots: no eviction
        assert s.put(more, blocks_for(more, BN)).all()
        assert s.tier("disk").stats()["evictions"] == 0
    rebuild_index(f"{tmp_path}/tier")
    t = DiskTier(tmp_path / "tier", BN, 8 * SLOT)
    try:
        assert not t.contains(keys[:3]).any()
        assert found(t, keys[3:]).all() and found(t, more).all() and len(t) == 7
    finally:
        t.close()


def test_an_evicted_intact_block_may_come_back_after_a_rebuild_with_its_own_bytes(tmp_path: Path) -> None:
    """Documented behaviour (spec 7.6): eviction does not erase a slot, it is overwritten by the next
    write; a slot freed by ``evict`` and not reused yet still holds its block, intact and verified."""
    root = tmp_path / "tier"
    t = open_tier(root, slots=8)
    keys = chain(NS_A, 6)
    assert t.put(keys, blocks_for(keys, BN)).all()
    assert t.evict(2) == 2
    evicted = keys[~t.contains(keys)]
    assert len(evicted) == 2
    t.close()
    rebuild_index(str(root))
    t = open_tier(root, slots=8)
    try:
        assert found(t, keys).all()  # the evicted two are back, bit-exact
    finally:
        t.close()


def test_kvbm_fs_rm_then_verify_rebuild_index_keeps_the_namespace_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"file://{tmp_path}/disk"
    t = DiskTier(tmp_path / "disk", BN, 64 * SLOT)
    a, b = chain(NS_A, 6), chain(NS_B, 4)
    for ns, keys in ((NS_A, a), (NS_B, b)):
        t.bind_namespace(ns)
        assert t.put(keys, blocks_for(keys, BN)).all()
    t.close()

    def run(*argv: str) -> dict[str, object]:
        capsys.readouterr()
        assert cli.main([*argv, "--json"]) == 0
        out: dict[str, object] = json.loads(capsys.readouterr().out)
        return out

    assert run("rm", url, "--namespace", NS_A.short_id)["removed"] == 6
    out = run("verify", url, "--rebuild-index")
    assert out["rebuilt"][0]["blocks"] == 4 and out["entries"] == 4 and out["bad"] == 0  # type: ignore[index]
    rows = {r["namespace"]: r["blocks"] for r in run("ls", url)["namespaces"]}  # type: ignore[attr-defined]
    assert rows == {NS_A.short_id: 0, NS_B.short_id: 4}  # A is still described, but holds nothing


def _all_digit_namespace() -> Namespace:
    """A namespace whose 16 hex digits are all 0-9 (about 1 in 1,900): read base 10, its id would be wrong."""
    for i in range(200_000):
        ns = Namespace(NS_A.model, LAYOUT, tenant=f"digits-{i}")
        if ns.short_id.isdigit():
            return ns
    raise AssertionError("no all-digit namespace id found")


def test_namespace_files_round_trip_through_a_rebuild(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    digits = _all_digit_namespace()
    assert any(c in "abcdef" for c in NS_A.short_id)
    spaces = [NS_A, NS_B, digits]
    for ns in spaces:  # the file form: the content plus "id" as 16 hex digits
        assert Namespace.from_dict({**ns.to_dict(), "id": ns.short_id}) == ns
    t = open_tier(root)
    for i, ns in enumerate(spaces):
        t.bind_namespace(ns)
        keys = chain(ns, 2, start=1 + 10 * i)
        assert t.put(keys, blocks_for(keys, BN)).all()
    t.close()
    assert set(read_namespaces(str(root))) == {ns.id for ns in spaces}
    (root / "index" / "data.mdb").write_bytes(b"\x00" * 8192)  # damaged: rebuilt at the next open
    rep = rebuild_index(str(root))
    assert sorted(rep["namespaces_restored"]) == sorted(ns.short_id for ns in spaces)
    assert rep["namespaces_missing"] == []
    t = open_tier(root)
    try:
        assert t.namespaces() == {ns.id: ns for ns in spaces}
        for ns in spaces:
            with t.index.read() as txn:
                assert txn.get(b"ns/%016x" % ns.id, db=t.index.meta) == ns.canonical_bytes()
    finally:
        t.close()


def test_only_the_newest_moved_aside_indexes_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    t = open_tier(root)
    keys = chain(NS_A, 3)
    assert t.put(keys, blocks_for(keys, BN)).all()
    t.close()
    moved = []
    for _ in range(KEEP_ASIDE + 2):
        moved.append(rebuild_index(str(root))["moved_aside"])
        time.sleep(0.01)  # distinct change times
    (root / "index" / "damaged").write_text("test")
    t = open_tier(root)  # rebuilt at open: moved aside as damaged, kept apart from the old ones
    t.close()
    olds = sorted(str(p) for p in root.glob("index.old-*"))
    assert olds == sorted(moved[-KEEP_ASIDE:])
    assert len(list(root.glob("index.damaged-*"))) == 1
    t = open_tier(root)
    try:
        assert found(t, keys).all()
    finally:
        t.close()
