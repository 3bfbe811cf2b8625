"""The placement daemon: keeps every tier under its high watermark and moves hot blocks up.

It runs as a background thread inside a store (``Store.start_daemon``) or standalone
(``kvbm-fs daemon --config ...``) over shared disk and remote tiers.  Per round:

1. **Promote / prefetch** (below), then **demote**, bottom-up: a tier above its high watermark hands its coldest blocks (by
   its policy, and retained ones only past their share, as its eviction would) to the next tier down in batches until
   it is below its low watermark.
   A block the next tier already holds is just dropped; one it cannot take stays.
   So a block leaves the store only through the bottom tier's own eviction, which
   picks the least valuable block there, the coldest in the store.
2. Promotion and prefetch: blocks a ``get`` served from a slow tier, and the rest of a
   matched chain that lives in slow tiers, are copied up to the promotion target.  The daemon
   learns of gets and matches from the store's event stream (``LOADED`` and ``MATCHED``), as every
   other observer does, and publishes its own moves there (``DEMOTED`` / ``PROMOTED`` with a Move).

Copies are whole before they become visible (tiers publish after the bytes land) and
the source copy is deleted only after that, so a stop at any moment leaves every block
complete in at least one tier.  Foreground loads and stores keep priority: the daemon
waits while they run and is rate-limited in bytes per second.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError, PinnedError
from .events import BlockEvent, EventKind, Move, StoreOp
from .keys import BlockKeys
from .tier import Tier
from .transfer import transfer

if TYPE_CHECKING:
    from .store import Match, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Watermarks:
    high: float = 0.90
    low: float = 0.75

    def __post_init__(self) -> None:
        if not (0.0 < self.low <= self.high <= 1.0):
            raise ConfigError(f"watermarks need 0 < low <= high <= 1, got low={self.low} high={self.high}")


@dataclass
class DaemonConfig:
    watermarks: dict[str, Watermarks] = field(default_factory=dict)  # by tier name; default for the rest
    default: Watermarks | None = None  # for every tier without its own; None: not set (0.90 / 0.75)
    batch: int = 64
    interval: float = 0.05
    rate_limit: float | None = None  # bytes per second of migration; None: unlimited
    promote: bool = True
    prefetch: bool = True
    promote_to: str | None = None  # tier name; default: the fastest tier
    first_sight: str | None = None  # "auto" or a tier name: puts land there, not in the first tier (placement.py)
    make_room: bool = False  # promotions demote the target's coldest blocks to fit, so the target runs full
    exclusive: bool = False  # a promoted block leaves its source tier (not the bottom one): no copy in two tiers

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DaemonConfig:
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known - {"high", "low"}
        if extra:
            raise ConfigError(f"unknown daemon option(s) {sorted(extra)}; known: {sorted(known | {'high', 'low'})}")
        given = "high" in d or "low" in d
        default = Watermarks(float(d.pop("high", 0.90)), float(d.pop("low", 0.75))) if given else None
        marks = {k: Watermarks(**v) if isinstance(v, dict) else v for k, v in dict(d.pop("watermarks", {})).items()}
        cfg = cls(watermarks=marks, default=default, **d)
        if cfg.batch < 1 or cfg.interval <= 0 or (cfg.rate_limit is not None and cfg.rate_limit <= 0):
            raise ConfigError("daemon batch must be >= 1, interval > 0 and rate_limit > 0 (or unset)")
        return cfg

    @classmethod
    def parse_options(cls, items: Iterable[str]) -> dict[str, Any]:
        """``["make_room=true", "batch=64"]`` (command-line form) -> options, checked by :meth:`from_dict`."""
        out: dict[str, Any] = {}
        for item in items:
            k, eq, v = item.partition("=")
            if not eq or not k.strip():
                raise ConfigError(f"daemon option {item!r} must look like NAME=VALUE, e.g. make_room=true")
            low = v.strip().lower()
            out[k.strip()] = None if low in ("none", "") else low == "true" if low in ("true", "false") else _num(v)
        cls.from_dict(out)
        return out

    def marks(self, tier: str) -> Watermarks:
        return self.watermarks.get(tier, self.default or Watermarks())


def _num(v: str) -> int | float | str:
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v.strip()


class PlacementDaemon:
    def __init__(self, store: Store, config: DaemonConfig | None = None) -> None:
        self.store = store
        self.config = config or DaemonConfig()
        unknown = set(self.config.watermarks) - {t.name for t in store.tiers}
        if unknown:
            raise ConfigError(f"watermarks for unknown tier(s) {sorted(unknown)}")
        self.target = store.tier(self.config.promote_to) if self.config.promote_to else store.tiers[0]
        self._work: queue.Queue[tuple[str, BlockKeys, str]] = queue.Queue(maxsize=4096)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._budget = 0.0
        self._budget_at = time.monotonic()
        self.counters = dict(rounds=0, demoted_blocks=0, dropped_blocks=0, promoted_blocks=0, prefetched_blocks=0,
                             demoted_bytes=0, promoted_bytes=0, kept_blocks=0)  # fmt: skip
        self._unsubscribe = store.events.subscribe(self._on_event)

    # ---- lifecycle -----------------------------------------------------------------------
    def attach(self) -> PlacementDaemon:
        """Take over placement without a thread (the caller runs ``run_once``): from now on only the
        bottom tier may drop blocks to take a put; the others refuse, and puts spill down."""
        for t in self.store.tiers[:-1]:
            t.evict_on_put = False
        if self.config.first_sight:
            from .placement import FirstSight

            self.store.placement = FirstSight(self.store, self.config.first_sight)
        return self

    def start(self) -> PlacementDaemon:
        if self._thread is not None and self._thread.is_alive():
            return self
        self.attach()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kvbm-daemon", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in flight, then stop. Nothing is ever half-moved."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def detach(self) -> None:
        """Stop listening to the store's events (no more promotions or prefetches queued); puts land in
        the first tier again, since nothing would promote them from where ``first_sight`` put them."""
        self._unsubscribe()
        if self.config.first_sight:
            self.store.placement = None

    def _halting(self) -> bool:
        """Stop asked, and we are the daemon thread (a caller's own run_once() always finishes)."""
        return self._stop.is_set() and threading.current_thread() is self._thread

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                moved = self.run_once()
            except Exception:  # the daemon must outlive any one bad round
                log.exception("placement daemon round failed")
                moved = 0
            if not moved:
                self._stop.wait(self.config.interval)

    # ---- one round -----------------------------------------------------------------------
    def run_once(self) -> int:
        """Serve queued promotions, then demote over-full tiers (bottom-up). Returns blocks moved."""
        self.counters["rounds"] += 1
        moved = self._drain_promotions()  # first, so that a round ends with every tier under its marks
        tiers = self.store.tiers
        for _ in range(len(tiers)):  # what one tier hands down can push the next one over: repeat
            step = sum(self._demote(tiers[i], tiers[i + 1]) for i in range(len(tiers) - 2, -1, -1))
            moved += step
            if not step or self._halting():
                break
        return moved

    def _marks(self, tier: Tier) -> Watermarks:
        """With ``make_room`` the promotion target makes room as it promotes: no watermark unless one is
        set (for it, or ``high``/``low`` for all), so it runs full rather than between the two marks."""
        cfg = self.config
        if cfg.make_room and tier is self.target and tier.name not in cfg.watermarks and cfg.default is None:
            return Watermarks(1.0, 1.0)
        return self.config.marks(tier.name)

    def _demote(self, upper: Tier, lower: Tier) -> int:
        marks = self._marks(upper)
        cap = upper.capacity_bytes
        if upper.used_bytes <= marks.high * cap:
            return 0
        moved = 0
        while not self._halting() and upper.used_bytes > marks.low * cap:
            n = min(self.config.batch, -(-(upper.used_bytes - int(marks.low * cap)) // upper.block_nbytes))
            batches = upper.coldest(n)
            if not batches:
                break
            done = sum(self._demote_batch(upper, lower, b) for b in batches)
            moved += done
            if done == 0:  # the lower tier takes nothing now: keep the blocks, try next round
                break
        return moved

    def _demote_batch(self, upper: Tier, lower: Tier, keys: BlockKeys) -> int:
        self._yield_to_foreground(len(keys) * upper.block_nbytes)
        have = lower.contains(keys)
        todo = np.flatnonzero(~have)
        copied = transfer(keys[todo], upper, lower, have=have[todo]) if todo.size else np.zeros(0, bool)
        safe = have.copy()
        safe[todo[copied]] = True  # the lower tier holds a complete copy of these
        kept = int((~safe).sum())
        gone = self._delete(upper, keys[np.flatnonzero(safe)])
        self.counters["kept_blocks"] += kept
        self.counters["dropped_blocks"] += int(have.sum())
        self.counters["demoted_blocks"] += int(copied.sum())
        self.counters["demoted_bytes"] += int(copied.sum()) * upper.block_nbytes
        if copied.any():
            move = Move("demote", upper.name, int(copied.sum()) * upper.block_nbytes)
            self.store.events.publish(EventKind.DEMOTED, lower.name, keys[todo[copied]], data=move)
        return gone

    @staticmethod
    def _delete(tier: Tier, keys: BlockKeys) -> int:
        if len(keys) == 0:
            return 0
        try:
            return int(tier.delete(keys).sum())
        except PinnedError:  # became in use meanwhile: delete the others one by one
            n = 0
            for i in range(len(keys)):
                try:
                    n += int(tier.delete(keys[i : i + 1]).sum())
                except PinnedError:
                    pass
            return n

    # ---- promotion and prefetch ----------------------------------------------------------
    def _on_event(self, ev: BlockEvent) -> None:
        if ev.kind is EventKind.LOADED and isinstance(ev.data, StoreOp):
            self.on_get(ev.keys, ev.data.where, ev.data.done)
        elif ev.kind is EventKind.MATCHED and ev.data is not None and ev.data.length:
            self.on_match(ev.data)

    def on_get(self, keys: BlockKeys, where: np.ndarray, got: np.ndarray) -> None:
        """A Store.get (its LOADED event): blocks served from a tier slower than the target move up."""
        if not self.config.promote:
            return
        t_idx = self.store.tiers.index(self.target)
        for i, tier in enumerate(self.store.tiers):
            if i <= t_idx:
                continue
            idx = np.flatnonzero((where == i) & got)
            if idx.size:
                self._enqueue("promote", keys[idx], tier.name)

    def on_match(self, m: Match) -> None:
        """A Store.match (its MATCHED event): pull the slow part of the matched chain up ahead of the load."""
        if not self.config.prefetch:
            return
        t_idx = self.store.tiers.index(self.target)
        for name, a, b in m.runs:
            if self.store.tiers.index(self.store.tier(name)) > t_idx:
                self._enqueue("prefetch", m.keys[a:b], name)

    def _enqueue(self, kind: str, keys: BlockKeys, src: str) -> None:
        try:
            self._work.put_nowait((kind, keys, src))
        except queue.Full:  # promotion is an optimisation: drop it rather than block the caller
            pass

    def _drain_promotions(self) -> int:
        moved = 0
        while not self._halting():
            try:
                kind, keys, src = self._work.get_nowait()
            except queue.Empty:
                break
            moved += self._promote(kind, keys, self.store.tier(src))
        return moved

    def _promote(self, kind: str, keys: BlockKeys, src: Tier) -> int:
        have = self.target.contains(keys)
        todo = np.flatnonzero(~have)
        if todo.size == 0:
            return 0
        self._yield_to_foreground(todo.size * src.block_nbytes)
        if self.config.make_room:
            self._make_room(todo.size)
        ok = transfer(keys[todo], src, self.target, have=have[todo])
        n = int(ok.sum())
        if n and self.config.exclusive and src is not self.store.tiers[-1]:
            self._delete(src, keys[todo[ok]])
        self.counters["prefetched_blocks" if kind == "prefetch" else "promoted_blocks"] += n
        self.counters["promoted_bytes"] += n * src.block_nbytes
        if n:
            move = Move(kind, src.name, n * src.block_nbytes)
            self.store.events.publish(EventKind.PROMOTED, self.target.name, keys[todo[ok]], data=move)
        return n

    def _make_room(self, n: int) -> int:
        """Demote the target's ``n - free`` coldest blocks (by its policy) to the tier below it."""
        tiers = self.store.tiers
        i = tiers.index(self.target)
        t = self.target
        need = n - (t.capacity_bytes - t.used_bytes) // t.block_nbytes
        if need <= 0 or i + 1 >= len(tiers):
            return 0
        return sum(self._demote_batch(t, tiers[i + 1], b) for b in t.coldest(int(need)))

    # ---- pacing --------------------------------------------------------------------------
    def _yield_to_foreground(self, nbytes: int) -> None:
        """Wait while engine loads/stores run, and stay under the migration rate limit."""
        deadline = time.monotonic() + 1.0
        while self.store.foreground_busy and time.monotonic() < deadline and not self._halting():
            time.sleep(0.001)
        rate = self.config.rate_limit
        if rate is None:
            return
        now = time.monotonic()
        self._budget = min(rate, self._budget + (now - self._budget_at) * rate) - nbytes
        self._budget_at = now
        if self._budget < 0:
            self._stop.wait(-self._budget / rate)

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "queued": self._work.qsize(), **self.counters}
