"""The one byte path (kvbm_fs/transfer.py): caller rows into a chain of tiers, slot-to-slot copies,
and staged moves that verify what they read and report refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm_fs import Store
from kvbm_fs.events import EventKind, StoreOp
from kvbm_fs.testing import NS_A, blocks_for, chain
from kvbm_fs.tiers.host import HostTier
from kvbm_fs.tiers.remote import RemoteTier
from kvbm_fs.transfer import move, put_rows, transfer

NB = NS_A.block_nbytes


def _host(blocks: int, name: str = "host") -> HostTier:
    return HostTier(blocks * NB, NB, name=name)


def _remote(path: Path) -> RemoteTier:
    t = RemoteTier(f"file://{path}", NB, name="remote")
    t.bind_namespace(NS_A)
    return t


def _read(t: Any, keys: Any) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(keys), NB), np.uint8)
    return t.get(keys, out), out


def test_put_rows_spills_what_a_tier_refuses_to_the_next_one_down() -> None:
    a, b = _host(2, "a"), _host(8, "b")
    keys = chain(NS_A, 4)
    data = blocks_for(keys, NB)
    p = put_rows(keys, data, [a, b])
    assert p.ok.all() and p.where.tolist() == [0, 0, 1, 1]  # a batch larger than a: its leading blocks there
    assert (p.asked, p.took) == ([4, 2], [2, 2]) and min(p.seconds) >= 0
    got, out = _read(b, keys[2:])
    assert got.all() and np.array_equal(out, data[2:])


def test_put_rows_without_spill_asks_one_tier_only() -> None:
    a, b = _host(2, "a"), _host(8, "b")
    keys = chain(NS_A, 4)
    p = put_rows(keys, blocks_for(keys, NB), [a, b], first=0, spill=False)
    assert p.ok.tolist() == [True, True, False, False] and p.where.tolist() == [0, 0, -1, -1]
    assert p.seconds[1] == -1.0 and p.asked == [4, 0] and len(b) == 0


def test_store_put_publishes_one_saved_event_built_from_the_placement() -> None:
    store = Store([_host(2, "a"), _host(8, "b")], NS_A)
    seen: list[Any] = []
    store.events.subscribe(seen.append, [EventKind.SAVED])
    keys = chain(NS_A, 4)
    assert store.put(keys, blocks_for(keys, NB)).all()
    assert len(seen) == 1
    op = seen[0].data
    assert isinstance(op, StoreOp) and op.tiers == ("a", "b") and op.where.tolist() == [0, 0, 1, 1]
    assert (list(op.asked), list(op.done_by)) == ([4, 2], [2, 2])
    store.close(persist=False)


def test_two_slot_tiers_copy_between_their_buffers_without_a_get() -> None:
    src, dst = _host(8, "src"), _host(8, "dst")
    keys = chain(NS_A, 5)
    data = blocks_for(keys, NB)
    assert src.put(keys, data).all() and dst.put(keys[:1], data[:1]).all()

    def no_get(*a: Any) -> Any:
        raise AssertionError("a slot-to-slot copy must not stage through get")

    src.get = no_get  # type: ignore[method-assign,assignment]
    assert transfer(keys, src, dst).all()
    got, out = _read(dst, keys)
    assert got.all() and np.array_equal(out, data) and src.contains(keys).all()  # the source keeps its copy


def test_a_staged_transfer_verifies_what_it_reads(tmp_path: Path) -> None:
    remote, host = _remote(tmp_path / "r"), _host(8)
    keys = chain(NS_A, 4)
    data = blocks_for(keys, NB)
    assert remote.put(keys, data).all()
    path = Path(remote._path(keys.ns, int(keys.hashes[2])).removeprefix("file://"))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # one flipped payload byte
    path.write_bytes(bytes(raw))
    assert transfer(keys, remote, host).tolist() == [True, True, False, True]  # the corrupt block is a miss
    got, out = _read(host, keys)
    assert got.tolist() == [True, True, False, True] and np.array_equal(out[[0, 1, 3]], data[[0, 1, 3]])
    assert transfer(keys[:2], host, remote).all()  # already there: nothing to move


def test_move_tells_read_failures_from_refusals() -> None:
    src, dst = _host(8, "src"), _host(2, "dst")
    keys = chain(NS_A, 4)
    data = blocks_for(keys, NB)
    assert src.put(keys[:3], data[:3]).all()  # the last block is not in the source
    dst.evict_on_put = False
    read, stored = move(keys, src, dst, np.zeros((8, NB), np.uint8))
    assert read.tolist() == [True, True, True, False] and stored.tolist() == [True, True, False, False]
    got, out = _read(dst, keys[:2])
    assert got.all() and np.array_equal(out, data[:2])


@pytest.mark.parametrize("nblocks", [0, 3])
def test_transfer_of_nothing_or_of_blocks_already_there_moves_nothing(nblocks: int) -> None:
    src, dst = _host(4, "src"), _host(4, "dst")
    keys = chain(NS_A, nblocks)
    data = blocks_for(keys, NB)
    src.put(keys, data)
    dst.put(keys, data)
    assert transfer(keys, src, dst).tolist() == [True] * nblocks and len(dst) == nblocks


def _asking(t: Any) -> tuple[list[int], list[int]]:
    """Wrap ``t``'s contains and put: the hashes each is asked about / given (a remote tier's contains
    is a HEAD per block)."""
    asked: list[int] = []
    written: list[int] = []
    contains, put = t.contains, t.put

    def counted_contains(keys: Any) -> Any:
        asked.extend(keys.hashes.tolist())
        return contains(keys)

    def counted_put(keys: Any, rows: Any) -> Any:
        written.extend(keys.hashes.tolist())
        return put(keys, rows)

    t.contains, t.put = counted_contains, counted_put
    return asked, written


def test_copy_and_persist_ask_the_destination_once_per_block(tmp_path: Path) -> None:
    """Store.copy and Store.persist ask a remote destination what it holds once (they passed it on to
    transfer, which asked again); what it already holds is still not written again."""
    host, remote = _host(8), _remote(tmp_path / "r")
    store = Store([host, remote], NS_A)
    seen: list[Any] = []
    store.events.subscribe(seen.append, [EventKind.DEMOTED])
    keys = chain(NS_A, 6)
    data = blocks_for(keys, NB)
    assert host.put(keys, data).all() and remote.put(keys[:1], data[:1]).all()
    asked, written = _asking(remote)
    assert store.copy(keys[:4], "host", "remote").all()
    assert sorted(asked) == sorted(keys.hashes[:4].tolist())  # once each, not twice
    assert written == keys.hashes[1:4].tolist()  # the block it held is not re-written
    assert [e.keys.hashes.tolist() for e in seen] == [keys.hashes[1:4].tolist()]  # only the new ones
    del asked[:], written[:]
    assert store.persist() == 2  # the two blocks only the host tier holds
    assert sorted(asked) == sorted(keys.hashes.tolist()) and written == keys.hashes[4:].tolist()
    got, out = _read(remote, keys)
    assert got.all() and np.array_equal(out, data)
    store.close(persist=False)
