"""Reference policies from the literature, simulated on the shared trace, beside Belady's optimum.

What it measures
    The hit ratio (longest resident prefix per request, as in ``bench_policies``) of policies
    kvbm_fs does not ship, each in a plain single-tier simulator over the trace's block
    reference stream, at 5% and 10% of its distinct blocks, and each one's ratio to Belady's MIN
    (:func:`kvbm_fs.replay.belady`) at the same capacity:

    - ``lru``, to check the simulator against the real replay's LRU in ``bench_policies.json``;
    - ``s3fifo`` (Yang et al., SOSP 2023): a small FIFO (10%), a main FIFO with a 2-bit
      frequency clock, and a ghost FIFO; a block leaves the small queue for the main one when it
      was hit at least ``threshold`` times there;
    - ``wtinylfu`` (Einziger et al., Caffeine's design): an LRU window (1%, 20% or 50%) in front of
      a segmented LRU (20% probation, 80% protected), admission by a frequency estimate that
      halves every 10 x capacity references (exact counts: an ideal sketch);
    - ``lirs`` (Jiang and Zhang, SIGMETRICS 2002): LIR blocks by inter-reference recency, 1% or
      10% of the space for resident HIR blocks, non-resident entries bounded at 2 x capacity.

    Beside them, under ``oracle_hints``, two policies that are *given* part of the future, which
    no online policy has; they bound what a better admission or frequency estimate could buy:

    - ``lru_oracle_bypass``: LRU that never admits a reference whose block is not used again
      (a perfect one-hit-wonder filter, the best any admission filter in front of LRU can do);
    - ``static_top_count``: the ``capacity`` blocks with the most references in the whole trace,
      each cached from its first use on and never evicted (perfect long-run frequency, no timing).

Why
    Issue 18's target 1: the default policy's hit ratio (``bench_policies.json``, the real store) must
    be at least 0.99 x the best of these classics on every trace and capacity; this file is what it
    is judged against (``default_over_best_baseline`` there).  Belady and the oracle hints are for
    orientation only (issue 5's 0.8-of-Belady target is withdrawn: policies given part of the future
    reach 0.49-0.65 on the shared trace, where most reuse lies far beyond the capacity).  Hit ratios
    are deterministic; nothing is timed and nothing passes or fails here.

Run ``python benchmarks/bench_policy_refs.py [--quick] [--trace PATH]``; prints one JSON object
and writes it to ``benchmarks/results/bench_policy_refs.json`` (``--quick``: the first 400
requests).  About a minute.
"""

from __future__ import annotations

import argparse
import heapq
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from _common import add_output_args, emit, results_path

from kvbm_fs.replay import Trace, belady, load_trace, saved_seconds
from kvbm_fs.testing.traces import SYNTHETIC

NAME = "bench_policy_refs"
TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "traces" / "synthetic_trace.jsonl"
CAPACITIES = (0.05, 0.1)


class Sim(Protocol):
    def has(self, h: int) -> bool: ...
    def hit(self, h: int) -> None: ...
    def miss(self, h: int) -> None: ...


def hit_ratio(requests: list[list[int]], sim: Sim) -> float:
    """Prefix hits over references; every block of a request is then touched or brought in, in order."""
    return hits_and_saved(requests, sim)[0]


def hits_and_saved(requests: list[list[int]], sim: Sim) -> tuple[float, float]:
    """(hit ratio, prefill seconds saved): each request's hit prefix loaded from host memory instead
    of recomputed, by :func:`kvbm_fs.replay.saved_seconds` (the replay's cost model)."""
    hits = refs = 0
    ks = []
    for req in requests:
        k = 0
        while k < len(req) and sim.has(req[k]):
            k += 1
        hits, refs = hits + k, refs + len(req)
        ks.append(k)
        for h in req:
            sim.hit(h) if sim.has(h) else sim.miss(h)
    return hits / max(refs, 1), saved_seconds(np.asarray(ks))


class LRU:
    def __init__(self, cap: int) -> None:
        self.cap, self.d = cap, OrderedDict[int, None]()

    def has(self, h: int) -> bool:
        return h in self.d

    def hit(self, h: int) -> None:
        self.d.move_to_end(h)

    def miss(self, h: int) -> None:
        if len(self.d) >= self.cap:
            self.d.popitem(last=False)
        self.d[h] = None


class S3FIFO:
    def __init__(self, cap: int, small: float = 0.1, threshold: int = 1) -> None:
        self.cs = max(1, int(cap * small))
        self.cm = max(1, cap - self.cs)
        self.threshold = threshold
        self.small, self.main, self.ghost = OrderedDict[int, None](), OrderedDict[int, None](), OrderedDict[int, None]()
        self.freq: dict[int, int] = {}

    def has(self, h: int) -> bool:
        return h in self.freq

    def hit(self, h: int) -> None:
        self.freq[h] = min(self.freq[h] + 1, 3)

    def _evict_main(self) -> None:
        while True:
            h, _ = self.main.popitem(last=False)
            if self.freq[h] > 0:
                self.freq[h] -= 1
                self.main[h] = None
            else:
                del self.freq[h]
                return

    def _evict_small(self) -> None:
        h, _ = self.small.popitem(last=False)
        if self.freq[h] >= self.threshold:
            if len(self.main) >= self.cm:
                self._evict_main()
            self.main[h], self.freq[h] = None, 0
            return
        del self.freq[h]
        self.ghost[h] = None
        if len(self.ghost) > self.cm:
            self.ghost.popitem(last=False)

    def miss(self, h: int) -> None:
        if h in self.ghost:
            del self.ghost[h]
            if len(self.main) >= self.cm:
                self._evict_main()
            self.main[h] = None
        else:
            if len(self.small) >= self.cs:
                self._evict_small()
            self.small[h] = None
        self.freq[h] = 0


class WTinyLFU:
    def __init__(self, cap: int, window: float = 0.01, protected: float = 0.8) -> None:
        self.cw = max(1, int(cap * window))
        main = max(2, cap - self.cw)
        self.cp = int(main * protected)
        self.cb = main - self.cp
        self.win, self.prob, self.prot = OrderedDict[int, None](), OrderedDict[int, None](), OrderedDict[int, None]()
        self.counts: dict[int, int] = {}
        self.samples, self.reset_at = 0, 10 * cap

    def _record(self, h: int) -> None:
        self.counts[h] = self.counts.get(h, 0) + 1
        self.samples += 1
        if self.samples >= self.reset_at:  # aging: halve every count
            self.counts = {k: v // 2 for k, v in self.counts.items() if v > 1}
            self.samples //= 2

    def has(self, h: int) -> bool:
        return h in self.win or h in self.prob or h in self.prot

    def hit(self, h: int) -> None:
        self._record(h)
        if h in self.win:
            self.win.move_to_end(h)
        elif h in self.prot:
            self.prot.move_to_end(h)
        else:
            del self.prob[h]
            self.prot[h] = None
            if len(self.prot) > self.cp:
                x, _ = self.prot.popitem(last=False)
                self.prob[x] = None

    def miss(self, h: int) -> None:
        self._record(h)
        self.win[h] = None
        if len(self.win) <= self.cw:
            return
        cand, _ = self.win.popitem(last=False)
        if len(self.prob) + len(self.prot) < self.cb + self.cp:
            self.prob[cand] = None
            return
        victims = self.prob if self.prob else self.prot
        victim = next(iter(victims))
        if self.counts.get(cand, 0) > self.counts.get(victim, 0):
            del victims[victim]
            self.prob[cand] = None


class LIRS:
    def __init__(self, cap: int, hir: float = 0.01) -> None:
        self.cap = cap
        self.lir_cap = max(1, cap - max(1, int(cap * hir)))
        self.stack = OrderedDict[int, None]()  # recency stack S, bottom first
        self.queue = OrderedDict[int, None]()  # resident HIR blocks Q, oldest first
        self.nonres = OrderedDict[int, None]()  # non-resident HIR blocks still in S
        self.lir: set[int] = set()

    def has(self, h: int) -> bool:
        return h in self.lir or h in self.queue

    def _prune(self) -> None:
        while self.stack:
            b = next(iter(self.stack))
            if b in self.lir:
                return
            del self.stack[b]
            self.nonres.pop(b, None)

    def _to_top(self, h: int) -> None:
        self.stack[h] = None
        self.stack.move_to_end(h)

    def _promote(self, h: int) -> None:
        """h becomes LIR; the bottom LIR block becomes a resident HIR block."""
        self.lir.add(h)
        self._to_top(h)
        bottom = next(iter(self.stack))
        if bottom == h:
            return
        self.lir.discard(bottom)
        del self.stack[bottom]
        self.queue[bottom] = None
        self._prune()

    def hit(self, h: int) -> None:
        if h in self.lir:
            was_bottom = next(iter(self.stack)) == h
            self._to_top(h)
            if was_bottom:
                self._prune()
        elif h in self.stack:
            del self.queue[h]
            self._promote(h)
        else:
            self._to_top(h)
            self.queue.move_to_end(h)

    def miss(self, h: int) -> None:
        if len(self.lir) < self.lir_cap:
            self.lir.add(h)
            self._to_top(h)
            return
        if len(self.lir) + len(self.queue) >= self.cap and self.queue:
            out, _ = self.queue.popitem(last=False)
            if out in self.stack:
                self.nonres[out] = None
        if h in self.nonres:
            del self.nonres[h]
            self._promote(h)
        else:
            self._to_top(h)
            self.queue[h] = None
        while len(self.nonres) > 2 * self.cap:
            old, _ = self.nonres.popitem(last=False)
            del self.stack[old]
        self._prune()


class LRU2:
    """LRU-2 (O'Neil et al.): evict the block whose second-to-last reference is oldest; blocks seen once
    go first, least recent first.  Reference history survives eviction for ``cap`` further blocks."""

    def __init__(self, cap: int) -> None:
        self.cap, self.t = cap, 0
        self.res: dict[int, tuple[int, int]] = {}  # resident: (penultimate, last); -1 = none
        self.hist = OrderedDict[int, tuple[int, int]]()  # evicted blocks' history
        self.heap: list[tuple[int, int, int]] = []

    def has(self, h: int) -> bool:
        return h in self.res

    def _ref(self, h: int, prev: tuple[int, int]) -> None:
        self.t += 1
        k = (prev[1], self.t)
        self.res[h] = k
        heapq.heappush(self.heap, (k[0], k[1], h))

    def hit(self, h: int) -> None:
        self._ref(h, self.res[h])

    def miss(self, h: int) -> None:
        if len(self.res) >= self.cap:
            while True:
                a, b, x = heapq.heappop(self.heap)
                if self.res.get(x) == (a, b):
                    break
            self.hist[x] = self.res.pop(x)
            if len(self.hist) > self.cap:
                self.hist.popitem(last=False)
        self._ref(h, self.hist.pop(h, (-1, -1)))


class ARC:
    """ARC (Megiddo and Modha, FAST 2003): T1/T2 with ghosts B1/B2 of one cache's worth, self-tuning ``p``."""

    def __init__(self, cap: int) -> None:
        self.c, self.p = cap, 0.0
        self.t1, self.t2 = OrderedDict[int, None](), OrderedDict[int, None]()
        self.b1, self.b2 = OrderedDict[int, None](), OrderedDict[int, None]()

    def has(self, h: int) -> bool:
        return h in self.t1 or h in self.t2

    def hit(self, h: int) -> None:
        self.t1.pop(h, None)
        self.t2[h] = None
        self.t2.move_to_end(h)

    def _replace(self, in_b2: bool) -> None:
        if self.t1 and (len(self.t1) > self.p or (in_b2 and len(self.t1) == int(self.p))):
            x, _ = self.t1.popitem(last=False)
            self.b1[x] = None
        elif self.t2:
            x, _ = self.t2.popitem(last=False)
            self.b2[x] = None
        else:
            x, _ = self.t1.popitem(last=False)
            self.b1[x] = None

    def miss(self, h: int) -> None:
        c = self.c
        if h in self.b1:
            self.p = min(c, self.p + max(len(self.b2) / len(self.b1), 1))
            del self.b1[h]
            self._replace(False)
            self.t2[h] = None
            return
        if h in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1))
            del self.b2[h]
            self._replace(True)
            self.t2[h] = None
            return
        l1 = len(self.t1) + len(self.b1)
        if l1 == c:
            if len(self.t1) < c:
                self.b1.popitem(last=False)
                self._replace(False)
            else:
                self.t1.popitem(last=False)
        elif l1 < c and l1 + len(self.t2) + len(self.b2) >= c:
            if l1 + len(self.t2) + len(self.b2) >= 2 * c and self.b2:
                self.b2.popitem(last=False)
            self._replace(False)
        self.t1[h] = None


class LFUAging:
    """LFU with dynamic aging (GDSF with unit size and cost): priority = clock + frequency; the clock
    rises to each evicted block's priority, so old frequency counts fade; ties go least recent first."""

    def __init__(self, cap: int) -> None:
        self.cap, self.clock, self.t = cap, 0, 0
        self.res: dict[int, tuple[int, int]] = {}  # (frequency, priority)
        self.heap: list[tuple[int, int, int]] = []

    def has(self, h: int) -> bool:
        return h in self.res

    def _set(self, h: int, f: int) -> None:
        self.t += 1
        self.res[h] = (f, self.clock + f)
        heapq.heappush(self.heap, (self.clock + f, self.t, h))

    def hit(self, h: int) -> None:
        self._set(h, self.res[h][0] + 1)

    def miss(self, h: int) -> None:
        if len(self.res) >= self.cap:
            while True:
                pr, _, x = heapq.heappop(self.heap)
                if x in self.res and self.res[x][1] == pr:
                    break
            del self.res[x]
            self.clock = pr
        self._set(h, 1)


class OracleBypassLRU(LRU):
    """LRU that is told, at each miss, whether the block is referenced again (the future)."""

    def __init__(self, cap: int, counts: dict[int, int]) -> None:
        super().__init__(cap)
        self.left = dict(counts)  # references still to come, this one included

    def hit(self, h: int) -> None:
        self.left[h] -= 1
        super().hit(h)

    def miss(self, h: int) -> None:
        self.left[h] -= 1
        if self.left[h] > 0:
            super().miss(h)


class StaticTopCount:
    """The ``cap`` most-referenced blocks of the whole trace, kept from first use (perfect frequency)."""

    def __init__(self, cap: int, counts: dict[int, int]) -> None:
        self.keep = {h for h, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:cap]}
        self.d: set[int] = set()

    def has(self, h: int) -> bool:
        return h in self.d

    def hit(self, h: int) -> None:
        pass

    def miss(self, h: int) -> None:
        if h in self.keep:
            self.d.add(h)


ORACLES: dict[str, Callable[[int, dict[int, int]], Sim]] = {
    "lru_oracle_bypass": OracleBypassLRU,
    "static_top_count": StaticTopCount,
}

POLICIES: dict[str, Callable[[int], Sim]] = {
    "lru": LRU,
    "lru2": LRU2,
    "arc": ARC,
    "lfu_aging": LFUAging,
    "s3fifo": lambda c: S3FIFO(c, 0.1, 1),
    "s3fifo_threshold2": lambda c: S3FIFO(c, 0.1, 2),
    "wtinylfu_window1pct": lambda c: WTinyLFU(c, 0.01),
    "wtinylfu_window20pct": lambda c: WTinyLFU(c, 0.2),
    "wtinylfu_window50pct": lambda c: WTinyLFU(c, 0.5),
    "lirs_hir1pct": lambda c: LIRS(c, 0.01),
    "lirs_hir10pct": lambda c: LIRS(c, 0.1),
}


def run(trace: Trace) -> dict[str, Any]:
    requests = [r.tolist() for r in trace.requests]
    out: dict[str, Any] = {"requests": len(requests), "references": trace.references, "distinct_blocks": trace.distinct}
    ratios: dict[str, dict[str, float]] = {}
    hit: dict[str, dict[str, float]] = {}
    saved: dict[str, dict[str, float]] = {}
    best: dict[str, Any] = {}
    hints: dict[str, dict[str, dict[str, float]]] = {}
    counts = Counter(h for r in requests for h in r)
    for frac in CAPACITIES:
        cap = max(1, round(trace.distinct * frac))  # as the replay sizes its tier
        opt = belady(trace, cap)
        out.setdefault("belady", {})[str(frac)] = round(opt, 4)
        for name, make in POLICIES.items():
            hr, sv = hits_and_saved(requests, make(cap))
            hit.setdefault(name, {})[str(frac)] = round(hr, 4)
            saved.setdefault(name, {})[str(frac)] = round(sv, 1)
            ratios.setdefault(name, {})[str(frac)] = round(hr / opt, 3) if opt else 0.0
        name = max(POLICIES, key=lambda n: ratios[n][str(frac)])
        best[str(frac)] = {"policy": name, "ratio_to_belady": ratios[name][str(frac)]}
        for name, oracle in ORACLES.items():
            hr = hit_ratio(requests, oracle(cap, counts))
            hints.setdefault(name, {})[str(frac)] = {
                "hit_ratio": round(hr, 4),
                "ratio_to_belady": round(hr / opt, 3) if opt else 0.0,
            }
    out.update(hit_ratio=hit, prefill_s_saved=saved, ratio_to_belady=ratios, best=best, oracle_hints=hints)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    ap.add_argument("--trace", type=Path, default=TRACE, help=f"Mooncake-format JSONL (default {TRACE})")
    add_output_args(ap, "first 400 requests only (smoke tests)")
    args = ap.parse_args(argv)
    args.out = args.out or results_path(NAME, args.quick)
    trace = load_trace(args.trace, limit=400 if args.quick else None)
    res = {"benchmark": NAME, "quick": args.quick, "trace": args.trace.name, **run(trace)}
    scale = 0.05 if args.quick else 1.0  # every generator of kvbm_fs.testing.traces, as bench_policies
    res["synthetic"] = {"scale": scale, "traces": {n: run(make(scale)) for n, make in SYNTHETIC.items()}}
    res["method"] = ("single-tier simulators over the block reference stream; hit = longest resident prefix; "
                     "Belady = kvbm_fs.replay.belady at the same capacity")  # fmt: skip
    emit(res, args.out)
    return res


if __name__ == "__main__":
    main()
