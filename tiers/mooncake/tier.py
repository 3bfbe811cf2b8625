"""``mooncake://``: blocks in a Mooncake Store pool, the distributed DRAM pool SGLang HiCache, vLLM
and LMCache use (docs/tiers.md#mooncake: URL, options, when to use it rather than peers).

One Mooncake object per block, key ``<prefix>/<namespace id:016x>/<hash:016x>``, value the codec
header and the payload, written and read whole by ``batch_put_from`` / ``batch_get_into`` through
registered staging rows: one call per batch (per staging-full of blocks), never one per block.
Every block read is verified; a block that fails is a miss, counted, published and removed.

Mooncake evicts on its own (a high watermark on its segments), so any block may vanish: a miss.
Where this process wrote the block and did not delete it, that miss is published as EVICTED.
With ``capacity=`` the tier also bounds its prefix itself (oldest written first, never a pinned
block), as the remote tier bounds a bucket; without it, Mooncake's pool is the bound.

Faults never raise into the engine: a dead master or a dead segment holder gives misses and refused
puts (False), and a circuit breaker stops calling a master that failed ``breaker_threshold``
batches in a row until its probe finds it back (clients re-join a restarted master by themselves).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from kvbm_fs import codec
from kvbm_fs.errors import ConfigError, PinnedError, TierClosedError
from kvbm_fs.events import VERIFY, EventBus, EventKind
from kvbm_fs.index import KeyIndex
from kvbm_fs.keys import BlockKeys
from kvbm_fs.policy import make_policy
from kvbm_fs.resilience import CircuitBreaker
from kvbm_fs.rows import copy_rows, host_rows
from kvbm_fs.tier import (
    DEFAULT_RETAIN_SHARE,
    Admission,
    KeyPinnedTier,
    KeyPins,
    Medium,
    check_share,
    retain_budget,
    retention_victims,
)
from kvbm_fs.tiers.mooncake.client import (
    OBJECT_ALREADY_EXISTS,
    OBJECT_NOT_FOUND,
    RPC_TIMEOUT,
    TRANSFER_FAIL,
    Client,
    Staging,
    down,
    key_strings,
    parse_keys,
)
from kvbm_fs.tiers.mooncake.config import MooncakeConfig
from kvbm_fs.tiers.mooncake.master import list_keys

log = logging.getLogger(__name__)
UNBOUNDED = 1 << 62
LOG_MAX = 1 << 22  # keys of this process's writes remembered (eviction order, EVICTED events)
INVALID_PARAMS = -600  # Mooncake's answer to a soft-pin TTL over the master's maximum
MARK = b"KVRETN01"  # value of a retain mark, <prefix>/retain/<ns:016x>: this, then the share (f64)


class MooncakeTier(KeyPinnedTier):
    medium = Medium.PEER  # other machines' DRAM, as peers: the cost model's latency and bandwidth
    persistent = False
    shareable = True

    def __init__(
        self,
        cfg: MooncakeConfig,
        block_nbytes: int,
        *,
        name: str = "mooncake",
        block_size: int | None = None,
        events: EventBus | None = None,
    ) -> None:
        self.cfg, self.name, self.block_nbytes, self.block_size = cfg, name, int(block_nbytes), block_size
        self.events = events or EventBus()
        self.url = cfg.url
        self.object_bytes = codec.HEADER_SIZE + self.block_nbytes
        if cfg.capacity is not None and cfg.capacity < self.object_bytes:
            from kvbm_fs.errors import CapacityError

            raise CapacityError(f"mooncake capacity {cfg.capacity} B is smaller than one {self.object_bytes} B block")
        self.breaker = CircuitBreaker(cfg.breaker_threshold, cfg.breaker_cooldown)
        self.policy = make_policy(cfg.policy)
        cap_blocks = None if cfg.capacity is None else cfg.capacity // self.object_bytes
        self.admission = Admission(self.policy, cap_blocks)  # a filter in front of the pool (policy=...+tinylfu)
        self.counters = dict(get_errors=0, put_errors=0, exist_errors=0, load_failures=0, corrupt_removed=0,
                             evicted_seen=0, evictions=0, skipped_open_breaker=0, list_errors=0,
                             staging_retired=0)  # fmt: skip
        self._lock = threading.Lock()
        self._room = threading.Lock()
        self._pins = KeyPins()
        self._written = KeyIndex()  # (ns, hash) -> write sequence, for this process's writes
        self._seq = 0
        self._closed = False
        self.client = Client(cfg, self.object_bytes)
        self._count = -1
        if cfg.capacity is not None:
            try:
                self._count = sum(h.size for h in self._listed().values())
            except BaseException:
                self.close()
                raise

    @classmethod
    def from_options(cls, location: str, options: dict[str, Any], **common: Any) -> MooncakeTier:
        return cls(MooncakeConfig.parse(location, options), **common)

    def __repr__(self) -> str:
        return f"MooncakeTier({self.url!r}, name={self.name!r})"

    # ---- helpers --------------------------------------------------------------------------
    def _live(self) -> None:
        if self._closed:
            raise TierClosedError(f"tier {self.name!r} is closed")

    def _keys(self, ns: int, hashes: np.ndarray) -> list[str]:
        return key_strings(self.cfg.prefix, ns, hashes)

    def _allow(self) -> bool:
        if self.breaker.allow():
            return True
        self.counters["skipped_open_breaker"] += 1
        return False

    def _heard(self, codes: np.ndarray, stage: Staging | None = None) -> bool:
        """Tell the breaker whether the master answered; retire staging rows a failed transfer touched."""
        ok = not down(codes)
        self.breaker.record(ok)
        if stage is not None and ((codes == TRANSFER_FAIL) | (codes == RPC_TIMEOUT)).any():
            stage.retire()
            self.counters["staging_retired"] += 1
        return ok

    def _remember(self, ns: int, hashes: np.ndarray) -> None:
        with self._lock:
            _, where = self._written.find(ns, hashes)
            self._seq += 1
            self._written.val[where[where >= 0]] = self._seq
            new = np.unique(hashes[where < 0])
            self._written.insert(ns, new, np.full(new.size, self._seq, np.int64))
            if len(self._written) > LOG_MAX:  # keep the newer half
                kns, kh, kv = self._written.items()
                keep = kv >= np.median(kv)
                self._written = KeyIndex(int(keep.sum()))
                for n in np.unique(kns[keep]).tolist():
                    m = keep & (kns == n)
                    self._written.insert(int(n), kh[m], kv[m])

    def _forget(self, ns: int, hashes: np.ndarray) -> np.ndarray:
        """Drop keys from the write log; mask of those it held."""
        with self._lock:
            _, where = self._written.find(ns, hashes)
            self._written.remove_at(where)
        return where >= 0

    def _vanished(self, keys: BlockKeys, absent: np.ndarray) -> None:
        """Blocks this process wrote, did not delete, and Mooncake no longer has: it evicted them."""
        if not absent.any():
            return
        gone = keys[np.flatnonzero(absent)]
        was = self._forget(gone.ns, gone.hashes)
        if was.any():
            self.counters["evicted_seen"] += int(was.sum())
            if self._count >= 0:
                with self._lock:
                    self._count = max(0, self._count - int(was.sum()))
            self.events.publish(EventKind.EVICTED, self.name, gone[np.flatnonzero(was)], "evicted by mooncake")

    # ---- Tier primitives ------------------------------------------------------------------
    def contains(self, keys: BlockKeys) -> np.ndarray:
        self._live()
        if len(keys) == 0 or not self._allow():
            return np.zeros(len(keys), bool)
        codes = self.client.exist(self._keys(keys.ns, keys.hashes))
        self._heard(np.where(codes < 0, -900, codes))  # -1: the lookup failed
        self.counters["exist_errors"] += int((codes < 0).sum())
        self._vanished(keys, codes == 0)
        return codes == 1

    def put(self, keys: BlockKeys, data: Any) -> np.ndarray:
        self._check_rows(keys, data, "put")
        self._live()
        n = len(keys)
        if n == 0:
            return np.zeros(0, bool)
        rows = host_rows(data, n)
        self.admission.seen(keys)
        _, first = np.unique(keys.hashes, return_index=True)
        todo = np.sort(first)
        have = np.zeros(n, bool)
        if self._count >= 0 or self.admission.filter is not None:  # count (and filter) only new blocks
            have = self.contains(keys)
            todo = todo[~have[todo]]
        if self.admission.filter is not None:
            cap = self.capacity_bytes // self.object_bytes
            todo = self.admission.trim(self, keys, todo, cap - self._count if self._count >= 0 else todo.size)
        if self._count >= 0:  # bounded: make room for the new blocks first
            with self._room:
                room = self._make_room(todo.size, keys[np.flatnonzero(have)])
                todo = todo[:room]
                with self._lock:
                    self._count += todo.size
        stored = np.zeros(todo.size, bool)
        why = "mooncake put refused"
        if todo.size and not self._allow():
            why = "mooncake master unreachable"
        elif todo.size:
            stage = self.client.put_rows
            for a in range(0, todo.size, stage.rows):
                idx = todo[a : a + stage.rows]
                with stage.lock:
                    self._stage_blocks(stage, keys, rows, idx)
                    codes = self.client.put(self._keys(keys.ns, keys.hashes[idx]), stage, idx.size)
                    up = self._heard(codes, stage)
                stored[a : a + idx.size] = (codes == 0) | (codes == OBJECT_ALREADY_EXISTS)
                if not up:
                    break
        self._account_puts(keys, todo, stored, why)
        out = have.copy()
        out[todo[stored]] = True
        out |= np.isin(keys.hashes, keys.hashes[out])  # repeated keys in the batch
        return out

    def _stage_blocks(self, stage: Staging, keys: BlockKeys, rows: np.ndarray, idx: np.ndarray) -> None:
        """Header and payload of each block into consecutive staging rows (one copy of the payloads;
        the codec hashes each payload once, from the staging row)."""
        m = idx.size
        buf = stage.buf
        buf[:m, codec.HEADER_SIZE :] = rows[idx]
        tokens = self.block_size or 0
        heads = b"".join(
            codec.encode_header(keys[int(i)], int(keys.parents[i]), tokens, buf[j, codec.HEADER_SIZE :])
            for j, i in enumerate(idx.tolist())
        )
        buf[:m, : codec.HEADER_SIZE] = np.frombuffer(heads, np.uint8).reshape(m, codec.HEADER_SIZE)

    def _account_puts(self, keys: BlockKeys, todo: np.ndarray, stored: np.ndarray, why: str) -> None:
        if self._count >= 0 and not stored.all():
            with self._lock:
                self._count -= int((~stored).sum())  # give back what was reserved but not written
        if stored.any():
            done = keys[todo[stored]]
            self._remember(done.ns, done.hashes)
            self.events.publish(EventKind.STORED, self.name, done)
        if not stored.all():
            self.counters["put_errors"] += int((~stored).sum())
            self.events.publish(EventKind.STORE_FAILED, self.name, keys[todo[~stored]], why)

    def get(self, keys: BlockKeys, out: Any) -> np.ndarray:
        self._check_rows(keys, out, "get")
        self._live()
        n = len(keys)
        found = np.zeros(n, bool)
        if n == 0:
            return found
        self.admission.seen(keys)
        if not self._allow():
            self.events.publish(EventKind.LOAD_FAILED, self.name, keys, "mooncake master unreachable")
            return found
        _, first, inv = np.unique(keys.hashes, return_index=True, return_inverse=True)
        pos = np.sort(first)  # each object is read once; repeats are copied from its row
        stage = self.client.get_rows
        codes = np.full(n, OBJECT_NOT_FOUND, np.int64)
        bad = np.zeros(n, bool)
        reason = ""
        for a in range(0, pos.size, stage.rows):
            p = pos[a : a + stage.rows]
            with stage.lock:
                c = self.client.get(self._keys(keys.ns, keys.hashes[p]), stage, p.size)
                codes[p] = c
                up = self._heard(c, stage)
                got = np.flatnonzero(c == self.object_bytes)
                bad[p[(c >= 0) & (c != self.object_bytes)]] = True  # an object of another size under this key
                if got.size:
                    ok, why = self._verify(stage, keys, p[got], got)
                    bad[p[got[~ok]]] = True
                    reason = reason or (why or "")
                    copy_rows(out, p[got[ok]], stage.buf[:, codec.HEADER_SIZE :], got[ok])
                    found[p[got[ok]]] = True
            if not up:
                break
        if pos.size < n:
            src = first[inv]  # the row each key's object was read into
            dup = np.flatnonzero((src != np.arange(n)) & found[src])
            copy_rows(out, dup, out, src[dup])
            found[dup] = True
            codes, bad = codes[src], bad[src]
        self._account_gets(keys, codes, found, bad, reason or "object of the wrong size")
        return found

    def _verify(
        self, stage: Staging, keys: BlockKeys, at: np.ndarray, got: np.ndarray
    ) -> tuple[np.ndarray, str | None]:
        """Check staging rows ``got`` against the keys at positions ``at`` (vectorised headers)."""
        buf = stage.buf
        payloads = [buf[i, codec.HEADER_SIZE :] for i in got.tolist()]
        return codec.verify_batch(buf[got, : codec.HEADER_SIZE], keys.ns, keys.hashes[at], payloads, self.block_nbytes)

    def _account_gets(self, keys: BlockKeys, codes: np.ndarray, found: np.ndarray, bad: np.ndarray, why: str) -> None:
        self._vanished(keys, codes == OBJECT_NOT_FOUND)
        failed = ~found & ~bad & (codes != OBJECT_NOT_FOUND)
        if failed.any():  # the master or a segment holder did not answer: misses the engine recomputes
            self.counters["get_errors"] += int(failed.sum())
            self.events.publish(EventKind.LOAD_FAILED, self.name, keys[np.flatnonzero(failed)], "mooncake read failed")
        if bad.any():
            idx = np.flatnonzero(bad)
            self.counters["load_failures"] += idx.size
            self.events.publish(EventKind.LOAD_FAILED, self.name, keys[idx], why, VERIFY)
            hs = np.unique(keys.hashes[idx])
            gone = self.client.remove(self._keys(keys.ns, hs))
            self.counters["corrupt_removed"] += int((gone == 0).sum())
            self._forget(keys.ns, hs)
            if self._count >= 0:
                with self._lock:
                    self._count = max(0, self._count - int((gone == 0).sum()))

    def delete(self, keys: BlockKeys) -> np.ndarray:
        self._live()
        with self._lock:
            if any((keys.ns, h) in self._pins for h in keys.hashes.tolist()):
                raise PinnedError(f"{self.name}: cannot delete pinned blocks")
        n = len(keys)
        if n == 0:
            return np.zeros(0, bool)
        _, first = np.unique(keys.hashes, return_index=True)
        codes = self.client.remove(self._keys(keys.ns, keys.hashes[first]))
        self._heard(codes)
        gone = first[codes == 0]
        self._forget(keys.ns, keys.hashes[gone])
        if self._count >= 0:
            with self._lock:
                self._count = max(0, self._count - gone.size)
        self.events.publish(EventKind.REMOVED, self.name, keys[gone])
        return np.isin(keys.hashes, keys.hashes[gone])

    # ---- listing, capacity and eviction ---------------------------------------------------
    def _listed(self) -> dict[int, np.ndarray]:
        """{namespace: hashes} of every block under this prefix, from the master's admin server."""
        return parse_keys(self._list_keys(), self.cfg.prefix)

    def _list_keys(self) -> list[str]:
        """Every key under this prefix (blocks and retain marks), from the master's admin server."""
        try:
            return list_keys(self.cfg.admin, self.cfg.prefix)
        except OSError as e:
            if not self.counters["list_errors"]:
                log.warning("%s: cannot list keys at admin %s: %s", self.url, self.cfg.admin, e)
            self.counters["list_errors"] += 1
            if self._count < 0 and self.cfg.capacity is not None:  # opening a bounded tier needs the count
                raise ConfigError(
                    f"{self.url}: the master's admin server {self.cfg.admin} is unreachable: {e}"
                ) from None
            return []

    def _make_room(self, n: int, keep: BlockKeys) -> int:
        """Evict this prefix's blocks by :meth:`_victims` (oldest written first), never one the current
        put counts as stored (``keep``). Returns how many of ``n`` now fit."""
        assert self.cfg.capacity is not None
        cap = self.cfg.capacity // self.object_bytes
        if self._count + n <= cap:
            return n
        keys, listed = self._recount()
        over = self._count + n - cap
        if over <= 0 or not self.evict_on_put or not listed:  # no eviction: the daemon demotes (coldest)
            return max(0, min(n, cap - self._count))
        evicted = 0
        for victims in self._victims(over, keep, keys, listed):
            codes = self.client.remove(self._keys(victims.ns, victims.hashes))
            gone = victims.hashes[(codes == 0) | (codes == OBJECT_NOT_FOUND)]
            self._forget(victims.ns, gone)
            evicted += gone.size
            self.events.publish(EventKind.EVICTED, self.name, BlockKeys(victims.ns, gone))
        self.counters["evictions"] += evicted
        with self._lock:
            self._count -= evicted
            return max(0, min(n, cap - self._count))

    def coldest(self, n: int) -> list[BlockKeys]:
        """The next ``n`` blocks eviction on put would take (:meth:`_victims`), without removing them:
        what the placement daemon demotes from a bounded tier that no longer evicts on put. Without
        ``capacity=`` none: the tier has no watermark to pass (Mooncake's pool is the bound)."""
        self._live()
        if self._count < 0 or n <= 0:
            return []
        with self._room:
            keys, listed = self._recount()
        return self._victims(n, None, keys, listed)

    def _recount(self) -> tuple[list[str], dict[int, np.ndarray]]:
        """One listing: every key under the prefix, and the blocks among them, which become the count
        (Mooncake may have evicted some; a failed listing names none and keeps the count). Callers
        hold ``_room``."""
        errors = self.counters["list_errors"]
        keys = self._list_keys()
        listed = parse_keys(keys, self.cfg.prefix)
        if self.counters["list_errors"] == errors:
            with self._lock:
                self._count = sum(h.size for h in listed.values())
        return keys, listed

    def _victims(
        self, n: int, keep: BlockKeys | None, keys: list[str], listed: dict[int, np.ndarray]
    ) -> list[BlockKeys]:
        """The ``n`` listed blocks eviction takes next, per namespace: oldest written first (unknown
        writers' first), never a pinned one nor one in ``keep``; retained (soft-pinned) ones by the
        retention rule (:func:`retention_victims`). Eviction on put and demotion share it."""
        if not listed:
            return []
        with self._lock:
            pins: dict[int, list[int]] = {}
            for pn, ph in self._pins:
                pins.setdefault(pn, []).append(ph)
        marks = self._marks(keys)  # retained blocks go after every ordinary one, within their share
        parts = []
        for ns, hs in listed.items():
            with self._lock:
                seq, _ = self._written.find(ns, hs)  # -1: written by another process, goes first
            free = ~np.isin(hs, np.array(pins.get(ns, []), np.uint64))
            if keep is not None and ns == keep.ns:
                free &= ~np.isin(hs, keep.hashes)
            ret = np.isin(hs, marks[ns][1]) if ns in marks else np.zeros(hs.size, bool)
            parts.append((np.full(hs.size, ns, np.uint64), hs, seq, free, ret))
        bns, bh, seq, free, ret = (np.concatenate(c) for c in zip(*parts))
        budget = self._retain_budget(sh for sh, _ in marks.values())
        by_key = np.lexsort((bh, bns))  # ties in write order go by key
        pick = by_key[retention_victims(seq[by_key], ret[by_key], n, budget, free[by_key])]
        order = list(dict.fromkeys(bns[pick].tolist()))  # namespaces in the order of their first victim
        return [BlockKeys(ns, bh[pick][bns[pick] == np.uint64(ns)]) for ns in order]

    # ---- retain (Mooncake soft pins) -------------------------------------------------------
    def retain(self, ns: int, share: float | None = DEFAULT_RETAIN_SHARE, hashes: np.ndarray | None = None) -> int:
        """Soft-pin the blocks ``hashes`` of ``ns`` (default: all this prefix holds; blocks stored later
        are ordinary): Mooncake's master evicts soft-pinned objects only when nothing else can go, and
        a pin lapses ``retain_ttl`` after the block's last use. At most ``share`` of this tier's
        capacity (``capacity=``, else the segment this process lends) is pinned, the first blocks
        given first. ``None`` unpins every block the namespace's mark names. Each block is read,
        verified and written back (Mooncake sets pins on write); the mark, a key holding the share and
        the pinned hashes, lets every instance's ``capacity=`` bound spare them too. Returns blocks
        (un)pinned."""
        self._live()
        if share is not None:
            share = check_share(share)
        key = self._mark_key(ns)
        prev = self._read_mark(key)[1]
        prev = prev[self.contains(BlockKeys(ns, prev))] if prev.size else prev
        if share is None:
            n = int(self._repin(ns, prev, False).size)
            self.client.store.remove(key, True)
            return n
        if hashes is None:
            want = self._listed().get(ns, np.zeros(0, np.uint64))
        else:
            want = np.asarray(hashes, np.uint64)
            _, first = np.unique(want, return_index=True)
            want = want[np.sort(first)]
            want = want[self.contains(BlockKeys(ns, want))]
        # the budget is kept here, at mark time, as well as at eviction (_make_room): Mooncake's master
        # evicts soft-pinned objects last with no notion of a share, and without capacity= it alone evicts
        want = want[~np.isin(want, prev)][: max(0, self._retain_budget([share]) - prev.size)]
        pinned = self._repin(ns, want, True)
        value = MARK + np.float64(share).tobytes() + np.union1d(prev, pinned).astype("<u8").tobytes()
        if self.client.store.upsert(key, value, self.client.pin_config(True)) != 0:
            raise ConfigError(f"{self.url}: cannot write the retain mark of {ns:016x}; run it again")
        return int(pinned.size)

    def _mark_key(self, ns: int) -> str:
        return f"{self.cfg.prefix}/retain/{ns:016x}"

    def _read_mark(self, key: str) -> tuple[float, np.ndarray]:
        """(share, pinned hashes) of a mark key; (0, none) when absent or not a mark."""
        raw = bytes(self.client.store.get(key) or b"")
        if len(raw) < 16 or raw[:8] != MARK or (len(raw) - 16) % 8:
            return 0.0, np.zeros(0, np.uint64)
        return float(np.frombuffer(raw[8:16], np.float64)[0]), np.frombuffer(raw[16:], "<u8").astype(np.uint64)

    def _marks(self, listed: list[str] | None = None) -> dict[int, tuple[float, np.ndarray]]:
        """{namespace: (share, pinned hashes)} of every mark under this prefix (none if unlisted), from
        the keys ``listed`` (default: list them now)."""
        head = f"{self.cfg.prefix}/retain/"
        try:
            keys = list_keys(self.cfg.admin, self.cfg.prefix) if listed is None else listed
        except OSError:
            return {}
        out = {}
        for k in (k for k in keys if k.startswith(head)):
            try:
                ns = int(k[len(head) :], 16)
            except ValueError:
                continue
            share, hs = self._read_mark(k)
            if share:
                out[ns] = (share, hs)
        return out

    def _retain_budget(self, shares: Iterable[float]) -> int:
        return retain_budget(shares, (self.cfg.capacity or self.cfg.segment) // self.object_bytes)

    def _repin(self, ns: int, hashes: np.ndarray, pin: bool) -> np.ndarray:
        """Read each block into staging, verify it, write it back with the soft pin set (or cleared);
        the hashes written."""
        config = self.client.pin_config(pin)
        stage = self.client.get_rows
        done: list[np.ndarray] = []
        for a in range(0, hashes.size, stage.rows):
            hs = hashes[a : a + stage.rows]
            with stage.lock:
                codes = self.client.get(self._keys(ns, hs), stage, hs.size)
                if not self._heard(codes, stage):
                    break
                got = np.flatnonzero(codes == self.object_bytes)
                ok, _ = self._verify(stage, BlockKeys(ns, hs), got, got) if got.size else (np.zeros(0, bool), None)
                rows = got[ok]
                stage.buf[: rows.size] = stage.buf[rows]
                wrote = self.client.upsert(self._keys(ns, hs[rows]), stage, rows.size, config) if rows.size else rows
                self._heard(np.asarray(wrote, np.int64), stage)
            if pin and (np.asarray(wrote) == INVALID_PARAMS).any():
                raise ConfigError(
                    f"{self.url}: the master refused soft pins of retain_ttl={self.cfg.retain_ttl:g} s: above its "
                    "--max_kv_soft_pin_ttl (24 h by default)?"
                )
            done.append(hs[rows][np.asarray(wrote) == 0])
        return np.concatenate(done) if done else np.zeros(0, np.uint64)

    def retained(self) -> dict[str, Any]:
        """The retain marks ({namespace id: share}), how many blocks they pin and may pin."""
        marks = self._marks()
        shares = {ns: share for ns, (share, _) in marks.items()}
        return {"marks": shares, "blocks": sum(hs.size for _, hs in marks.values()),
                "budget": self._retain_budget(shares.values())}  # fmt: skip

    def iter_keys(self) -> Iterator[BlockKeys]:
        self._live()
        for ns, hs in self._listed().items():
            yield BlockKeys(ns, hs)

    @property
    def capacity_bytes(self) -> int:
        return UNBOUNDED if self.cfg.capacity is None else self.cfg.capacity

    @property
    def used_bytes(self) -> int:
        return len(self) * self.object_bytes

    def __len__(self) -> int:
        return self._count if self._count >= 0 else sum(h.size for h in self._listed().values())

    def usage(self) -> tuple[int, int] | None:
        n = self._count  # unbounded: unknown without listing the master's keys
        return None if n < 0 else (n, n * self.object_bytes)

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = {"name": self.name, "medium": self.medium.value, "persistent": False}
        if self._count >= 0:
            s = super().stats()
        s.update(url=self.url, breaker=self.breaker.state, breaker_trips=self.breaker.trips, **self.counters)
        return s

    def close(self) -> None:
        """Release this tier's staging rows; the process leaves the pool (its segment and the blocks
        on it go) when its last tier on that pool closes."""
        if self._closed:
            return
        self._closed = True
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
