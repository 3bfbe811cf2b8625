"""The connector kit: store plumbing every engine connector needs, so connectors never walk ``store.tiers``.

Containment across tiers, write-through to the persistent tiers, deleting a namespace, verified
loads into engine rows and saves that report what they dropped (``load``, ``save``), and a
per-process registry that shares one store per engine and closes it at exit (engines rarely say
they are done, and closing is what persists host-tier blocks). See docs/architecture.md.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable, Collection, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from .keys import BlockKeys, Namespace
from .store import Store
from .tier import Medium, Tier

log = logging.getLogger("kvbm_fs")
T = TypeVar("T")


def present(store: Store, keys: BlockKeys, *, skip: Collection[Medium] = ()) -> np.ndarray:
    """Mask of ``keys`` held by some tier whose medium is not in ``skip``. Each tier is asked only
    about keys the faster tiers lack, and the walk stops once every key is found."""
    return locate(store, keys, skip=skip) >= 0


def write_targets(store: Store, write_through: bool) -> list[Tier]:
    """Where a save goes: the first tier, plus every later persistent tier when writing through."""
    first, *rest = store.tiers
    return [first, *(t for t in rest if t.persistent)] if write_through else [first]


def write_through(store: Store, keys: BlockKeys, rows: Any) -> int:
    """Put ``keys`` into every persistent tier after the first, without spilling; return the blocks
    dropped (a dead or full tier's put returns False for them rather than raising). Each is one
    ``Store.put`` (one SAVED event; the bytes go through ``transfer.put_rows``, as every save's do)."""
    dropped = 0
    for tier in write_targets(store, True)[1:]:
        kept = np.asarray(store.put(keys, rows, tier=tier.name, spill=False), bool)
        dropped += int((~kept).sum())
    return dropped


def delete_namespace(store: Store, ns: Namespace) -> int:
    """Delete every block of ``ns`` from every tier (other namespaces stay); return how many blocks
    went (``Store.delete`` takes a block out of every tier that holds it)."""
    n = 0
    for tier in store.tiers:
        for batch in list(tier.iter_keys()):
            if batch.ns == ns.id:
                n += int(np.asarray(store.delete(batch)).sum())
    return n


@dataclass
class Lease(Generic[T]):
    """One registry entry: the shared value and how many users hold it."""

    key: Hashable
    value: T
    refs: int = 0
    closed: bool = False  # by close_all: a later release closes nothing


class Registry(Generic[T]):
    """Values (stores, or engine state holding one) shared by key within one process. The last
    ``release`` closes a value; whatever is still held closes at interpreter exit, in a clean
    shutdown, because engines rarely tell a connector they are done."""

    def __init__(self, close: Callable[[T], None], what: str = "kvbm_fs") -> None:
        self._close, self._what = close, what
        self._held: dict[Hashable, Lease[T]] = {}
        self.lock = threading.RLock()  # callers may hold it to pick a key and acquire as one step
        atexit.register(self.close_all)

    def __contains__(self, key: Hashable) -> bool:
        with self.lock:
            return key in self._held

    def __len__(self) -> int:
        with self.lock:
            return len(self._held)

    def __iter__(self) -> Iterator[T]:
        with self.lock:
            return iter([lease.value for lease in self._held.values()])

    def acquire(self, key: Hashable, make: Callable[[], T], current: Callable[[T], bool] | None = None) -> Lease[T]:
        """The lease for ``key``, made with ``make()`` when there is none (or when ``current`` says the
        held value belongs to a stale key: an ``id()`` reused after its object died)."""
        with self.lock:
            lease = self._held.get(key)
            if lease is None or (current is not None and not current(lease.value)):
                lease = self._held[key] = Lease(key, make())
            lease.refs += 1
            return lease

    def release(self, lease: Lease[T]) -> None:
        """Drop one reference; the last one closes the value."""
        with self.lock:
            lease.refs -= 1
            if lease.refs > 0 or lease.closed:
                return
            lease.closed = True
            if self._held.get(lease.key) is lease:
                del self._held[lease.key]
        self._close(lease.value)

    def close_all(self) -> None:
        """Close every value still held (registered with atexit; safe to call twice)."""
        with self.lock:
            held = list(self._held.values())
            self._held.clear()
            for lease in held:
                lease.closed = True
        for lease in held:
            try:
                self._close(lease.value)
            except Exception:
                log.exception("%s: closing a store at exit failed", self._what)


def close_store(store: Store | None) -> None:
    """Close a store if there is one (closing persists host-tier blocks into the persistent tiers)."""
    if store is not None:
        store.close()


__all__ = ["Lease", "Registry", "close_store", "delete_namespace", "present", "write_targets", "write_through"]


# ---- load and save: what every engine does with a store --------------------------------------------------


def leading(mask: Any) -> int:
    """Length of the leading run of True in ``mask``: the blocks an engine that needs a contiguous
    prefix can use (one failed block cuts the prefix there)."""
    got = np.asarray(mask, bool)
    return int(got.size) if got.all() else int(np.argmin(got))


@dataclass(frozen=True)
class LoadResult:
    """What :func:`load` delivered: ``got`` is the mask of rows filled with verified blocks."""

    got: np.ndarray
    error: BaseException | None = None  # what a load with ``recover`` swallowed (then ``got`` is all False)

    @property
    def loaded(self) -> int:
        return int(np.count_nonzero(self.got))

    @property
    def failed(self) -> int:
        """Blocks asked for but not delivered: missing, failed verification, or a read that raised."""
        return int(self.got.size) - self.loaded

    @property
    def prefix(self) -> int:
        """Leading blocks delivered (:func:`leading`)."""
        return leading(self.got)


def load(
    store: Store, keys: BlockKeys, out: Any, match: Any = None, *, recover: bool = False, what: str = ""
) -> LoadResult:
    """``Store.get`` into an engine's staging rows (``out``: contiguous, KV-shaped or uint8 rows): every
    block is verified by the tier that reads it, and one that is missing or corrupt is a miss (False),
    never data (its row holds whatever the read left: copy only ``got``'s rows into the engine). With
    ``recover`` a read that raises is a miss of every block, logged, never raised into the engine.
    With ``what`` (the engine's name), failures are logged once, as a warning."""
    try:
        got = np.asarray(store.get(keys, out, match), bool)
    except Exception as e:
        if not recover:
            raise
        log.exception("%s: loading %d blocks failed; they are recomputed", what or "kvbm_fs", len(keys))
        return LoadResult(np.zeros(len(keys), bool), e)
    res = LoadResult(got)
    if what and res.failed:
        log.warning(
            "%s: %d of %d blocks failed to load (missing or failed verification); they are recomputed",
            what,
            res.failed,
            len(keys),
        )
    return res


@dataclass(frozen=True)
class SaveResult:
    """What :func:`save` (or :func:`fill`) did with each key; for ``save`` the counts add up to
    ``len(keys)``: ``skipped + saved + failed``."""

    stored: np.ndarray  # mask: the block is in the store now (held before, or put by this call)
    skipped: int = 0  # already held by some tier (not written again)
    saved: int = 0  # newly put
    failed: int = 0  # to be put but not stored: refused by every tier it could go to, or the put raised
    dropped: int = 0  # saved, but a persistent tier dropped it when writing through (dead, full)
    error: BaseException | None = None  # what a save with ``recover`` swallowed

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.dropped == 0


def save(
    store: Store,
    keys: BlockKeys,
    rows: Any,
    *,
    write_through: bool = False,
    skip_present: bool = True,
    skip: Collection[Medium] = (),
    tokens: Any = None,
    recover: bool = False,
    what: str = "",
) -> SaveResult:
    """Put the blocks of ``keys`` the store lacks (every block when not ``skip_present``; ``skip``:
    media not asked, e.g. remote tiers inside a forward) and, with ``write_through``, put them into
    every persistent tier too (:func:`write_through`). ``rows`` are the blocks' data, or a callable
    ``rows(idx)`` that copies out only rows ``idx`` (an int array), so held blocks cost no copy.
    ``tokens`` (``[len(keys), block_size]`` token ids) are noted for the new blocks before the put,
    for KV events. With ``recover`` a put that raises fails its blocks (logged) instead of raising."""
    n = len(keys)
    have = present(store, keys, skip=skip) if skip_present and n else np.zeros(n, bool)
    new = np.flatnonzero(~have)
    if not new.size:
        return SaveResult(have, skipped=n)
    every = new.size == n
    sub = keys if every else keys[new]
    try:
        data = rows(new) if callable(rows) else rows if every else rows[new]  # torch takes an int array too
        if tokens is not None and store.events.active:
            toks = np.asarray(tokens).reshape(n, -1)
            store.note_tokens(sub, toks if every else toks[new])
        put = np.asarray(store.put(sub, data), bool)
        dropped = _write_through(store, sub, data) if write_through else 0
    except Exception as e:
        if not recover:
            raise
        log.exception("%s: saving %d blocks failed; they are dropped", what or "kvbm_fs", int(new.size))
        return SaveResult(have, skipped=n - int(new.size), failed=int(new.size), error=e)
    stored = have.copy()
    stored[new] = put
    saved = int(np.count_nonzero(put))
    res = SaveResult(stored, n - int(new.size), saved, int(new.size) - saved, dropped)
    if what and not res.ok:
        log.warning(
            "%s: %d of %d new blocks were not saved, %d dropped by a persistent tier",
            what,
            res.failed,
            new.size,
            dropped,
        )
    return res


_write_through = write_through  # ``save``'s keyword shadows the function's name inside it


__all__ += ["LoadResult", "SaveResult", "leading", "load", "save"]


# ---- which tier: for logs and for readers that label blocks by tier ---------------------------------------


def tier_names(store: Store) -> list[str]:
    """The store's tier names, fastest first (the order ``locate`` indexes)."""
    return [t.name for t in store.tiers]


def locate(store: Store, keys: BlockKeys, *, skip: Collection[Medium] = ()) -> np.ndarray:
    """Per key, the index into ``tier_names(store)`` of the first tier holding it; -1 where none does
    (or only a tier whose medium is in ``skip``). Asked as ``present`` asks: each tier only about the
    keys the faster tiers lack."""
    where = np.full(len(keys), -1, np.int16)
    todo = np.arange(len(keys))
    for i, tier in enumerate(store.tiers):
        if not todo.size:
            break
        if tier.medium in skip:
            continue
        hit = np.asarray(tier.contains(keys if todo.size == len(keys) else keys[todo]), bool)
        where[todo[hit]] = i
        todo = todo[~hit]
    return where


__all__ += ["locate", "tier_names"]


# ---- layout siblings: the same model stored under another KV layout -------------------------------------


def model_family(model: str) -> str:
    """A namespace's model without the part that names the KV layout: vLLM's ``@vllm/<attention
    backend>`` suffix (the backend fixes a page's byte order). Other engines' names are kept whole."""
    head, sep, _ = model.partition("@vllm/")
    return head + "@vllm" if sep else model


def layout_siblings(store: Store, ns: Namespace) -> list[Namespace]:
    """Namespaces the store's persistent tiers describe for ``ns``'s model family, tenant, rank and
    hash scheme but another KV layout (block size, dtype, heads, backend): blocks prepopulated or served
    under a layout ``ns`` never matches. A connector calls this at start-up and warns (see
    :func:`warn_layout_siblings`); an unreadable tier is skipped, never raised."""
    from .catalog import namespace_descriptions  # the catalog reads tiers' namespace descriptions

    want = (model_family(ns.model), ns.tenant, ns.rank, ns.world_size, ns.hash_scheme)
    out: dict[int, Namespace] = {}
    for tier in store.tiers:
        if not tier.persistent:
            continue
        try:
            described = namespace_descriptions(tier)
        except Exception:
            log.debug("layout_siblings: cannot list namespaces of tier %s", tier.name, exc_info=True)
            continue
        for other in described.values():
            key = (model_family(other.model), other.tenant, other.rank, other.world_size, other.hash_scheme)
            if other.id != ns.id and key == want:
                out[other.id] = other
    return sorted(out.values(), key=lambda n: n.short_id)


def layout_difference(a: Namespace, b: Namespace) -> str:
    """What tells two sibling namespaces apart, e.g. ``block_size 32 != 64``."""
    da, db = a.layout.to_dict(), b.layout.to_dict()
    parts = [f"{k} {db.get(k)} != {da.get(k)}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]
    if a.model != b.model:
        parts.append(f"{b.model} != {a.model}")
    return ", ".join(parts) or "layout"


def warn_layout_siblings(store: Store, ns: Namespace, what: str = "kvbm_fs") -> list[Namespace]:
    """Log a warning naming each layout sibling of ``ns`` (what differs), so a prepopulation done with
    another block size or dtype than the server's cannot go unnoticed as zero hits; return them."""
    found = layout_siblings(store, ns)
    for other in found:
        log.warning(
            "%s: the tiers hold model %s under namespace %s, which differs from this engine's %s only in KV "
            "layout (%s): those blocks never match here; serve with the layout they were stored with, or "
            "prepopulate again with this one",
            what,
            model_family(ns.model),
            other.short_id,
            ns.short_id,
            layout_difference(ns, other),
        )
    return found


__all__ += ["layout_difference", "layout_siblings", "model_family", "warn_layout_siblings"]


# ---- fill: each write target gets the blocks it lacks ------------------------------------------------------


def fill(store: Store, keys: BlockKeys, rows: Any, *, write_through: bool = False) -> SaveResult:
    """Put into each of ``write_targets(store, write_through)`` the blocks it lacks, which ``save`` does
    not: a block held on disk but gone from the first tier goes into the first tier again, and one in
    the first tier but not on disk is written through (an L3 backend must be on disk). Without
    write-through what the first tier refuses spills down. ``rows`` as for :func:`save`. ``skipped``:
    blocks every target held; ``saved``: the most blocks one target took; ``failed``: blocks no
    target holds after the call; ``dropped``: blocks some target refused."""
    targets = write_targets(store, write_through)
    lacks = [~np.asarray(t.contains(keys), bool) for t in targets]
    stored = ~np.logical_and.reduce(lacks)  # already in some target tier
    todo = np.flatnonzero(np.logical_or.reduce(lacks))
    saved = dropped = 0
    if todo.size:
        sub = keys if todo.size == len(keys) else keys[todo]
        data = rows(todo) if callable(rows) else rows if todo.size == len(keys) else rows[todo]
        refused = np.zeros(len(keys), bool)
        for t, lack in zip(targets, lacks):
            sel = np.flatnonzero(lack[todo])
            if not sel.size:
                continue
            every = sel.size == todo.size
            put = np.asarray(
                store.put(sub if every else sub[sel], data if every else data[sel], t.name, len(targets) == 1)
            )
            stored[todo[sel]] |= put
            refused[todo[sel[~put]]] = True
            saved = max(saved, int(np.count_nonzero(put)))
        dropped = int(np.count_nonzero(refused & stored))
    return SaveResult(stored, len(keys) - int(todo.size), saved, int(np.count_nonzero(~stored)), dropped)


__all__ += ["fill"]
