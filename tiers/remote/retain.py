"""Retain marks of a remote tier: which blocks a prepopulation warmed, kept as objects beside them,
and the eviction order they set (:func:`victims`).

    <root>/<ns id:016x>/retain/<time ns:020d>-<uuid:12>.retain   b"KVRETN01", share (f64), hashes (u64...)

Plain objects, written whole and never changed, so every S3 server (moto, SeaweedFS, AWS) and
every fsspec backend keeps them, every instance on the bucket reads them from the listing it
makes anyway to evict, and they outlive restarts.  A marking writes new objects (at most
:data:`CHUNK` hashes each), so concurrent markers (``--shard``) never overwrite each other; a
namespace's share is that of its newest object; unmarking deletes them all.  Readers cache
objects by name (immutable), so a listing costs GETs only for marks they have not seen; an object
that is not a mark is remembered by name and version (ETag, size, time) and read again only once
it changes.
"""

from __future__ import annotations

import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping

import numpy as np

from kvbm_fs.tier import retention_victims

MAGIC = b"KVRETN01"
HEAD = struct.Struct("<8sd")
CHUNK = 1 << 20  # hashes per mark object (8 MiB)
DIR = "retain"
SUFFIX = ".retain"


def mark_path(root: str, ns: int) -> str:
    return f"{root}/{ns:016x}/{DIR}/{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{SUFFIX}"


def parse_path(path: str) -> int | None:
    """The namespace of a mark object's path, or None when the path is not one."""
    parts = path.rstrip("/").split("/")
    if len(parts) < 3 or parts[-2] != DIR or not parts[-1].endswith(SUFFIX) or len(parts[-3]) != 16:
        return None
    try:
        return int(parts[-3], 16)
    except ValueError:
        return None


def encode(share: float, hashes: np.ndarray) -> bytes:
    return HEAD.pack(MAGIC, share) + np.asarray(hashes, "<u8").tobytes()


def decode(raw: bytes) -> tuple[float, np.ndarray]:
    """(share, hashes) of a mark object; ValueError when it is not one."""
    if len(raw) < HEAD.size or (len(raw) - HEAD.size) % 8:
        raise ValueError("not a retain mark object")
    magic, share = HEAD.unpack_from(raw)
    if magic != MAGIC or not 0.0 < share < 1.0:
        raise ValueError("not a retain mark object")
    return share, np.frombuffer(raw, "<u8", offset=HEAD.size).astype(np.uint64)


class Marks:
    """The marks a tier has read, by object path (objects never change, so each is read once);
    thread-safe (puts evict while another thread marks)."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[int, float, np.ndarray]] = {}  # path -> (ns, share, hashes)
        self.bad: dict[str, str] = {}  # path -> version of a listed object that is not a mark
        self.lock = threading.Lock()
        self._merged: dict[int, np.ndarray] | None = None  # hashes(), until the objects change

    def missing(self, listed: Mapping[str, str]) -> list[str]:
        """Forget objects no longer listed; the listed ones (path -> version) not read yet, less those
        known not to be marks at the version listed."""
        with self.lock:
            for p in [p for p in self.objects if p not in listed]:
                del self.objects[p]
                self._merged = None
            for p in [p for p, v in self.bad.items() if listed.get(p) != v]:
                del self.bad[p]
            return [p for p in listed if p not in self.objects and p not in self.bad]

    def reject(self, path: str, version: str) -> None:
        """``path`` at ``version`` is not a mark object: not read again until it changes."""
        with self.lock:
            self.bad[path] = version

    def add(self, path: str, raw: bytes) -> None:
        ns = parse_path(path)
        if ns is not None:
            share, hs = decode(raw)
            with self.lock:
                self.objects[path] = (ns, share, hs)
                self._merged = None

    def shares(self) -> dict[int, float]:
        """{namespace: share of its newest mark object} (names sort by write time)."""
        with self.lock:
            items = sorted(self.objects.items(), key=lambda kv: kv[0].rsplit("/", 1)[-1])
        return {ns: share for _, (ns, share, _) in items}

    def hashes(self) -> dict[int, np.ndarray]:
        """{namespace: its marked hashes, sorted and unique}; merged once per change of the objects,
        not at every eviction (callers must not modify the arrays)."""
        with self.lock:
            if self._merged is None:
                parts: dict[int, list[np.ndarray]] = {}
                for ns, _, hs in self.objects.values():
                    parts.setdefault(ns, []).append(hs)
                self._merged = {ns: np.unique(np.concatenate(p)) for ns, p in parts.items()}
            return dict(self._merged)

    def paths(self, ns: int) -> list[str]:
        with self.lock:
            return [p for p, (n, _, _) in self.objects.items() if n == ns]


def victims(
    blocks: list[tuple[int, int, float]], rank: Callable[[int, int], int], marked: dict[int, np.ndarray],
    budget: int, n: int, pinned: set[tuple[int, int]],
) -> list[tuple[int, int]]:  # fmt: skip
    """The ``n`` listed objects (ns, hash, write time) a remote tier evicts next, by the retention rule
    (:func:`kvbm_fs.tier.retention_victims`): least recently written first (object stores keep no
    atime; ties by key; ``rank``: the tier policy's rank of a write time in µs), never a ``pinned``
    one; ``marked`` ones (``{ns: hashes}``) after every ordinary one while they number at most
    ``budget``, past it the oldest of them first."""
    if not blocks:
        return []
    ns = np.array([b[0] for b in blocks], np.uint64)
    hs = np.array([b[1] for b in blocks], np.uint64)
    mtime = np.array([b[2] for b in blocks], np.float64)
    by_key = np.lexsort((hs, ns))
    ns, hs, mtime = ns[by_key], hs[by_key], mtime[by_key]
    times, at = np.unique((mtime * 1e6).astype(np.int64), return_inverse=True)  # the policy once per time
    order = np.array([rank(t, 0) for t in times.tolist()], np.int64)[at.reshape(-1)]
    free = None
    if pinned:
        pins: dict[int, list[int]] = {}
        for pn, ph in pinned:
            pins.setdefault(pn, []).append(ph)
        free = ~_member(ns, hs, {k: np.array(v, np.uint64) for k, v in pins.items()})
    pick = retention_victims(order, _member(ns, hs, marked), n, budget, free)
    return list(zip(ns[pick].tolist(), hs[pick].tolist()))


def _member(ns: np.ndarray, hs: np.ndarray, sets: dict[int, np.ndarray]) -> np.ndarray:
    """Mask of the blocks (``ns``, ``hs``) whose hash is in ``sets[ns]``: one ``isin`` per namespace."""
    out = np.zeros(hs.size, bool)
    for k, members in sets.items():
        at = np.flatnonzero(ns == np.uint64(k))
        out[at] = np.isin(hs[at], members)
    return out
