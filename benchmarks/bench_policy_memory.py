"""Memory per tracked block of each eviction policy: bytes of policy state per slot of the tier.

What it measures
    For every shipped eviction policy, a :class:`~kvbm_fs.lifecycle.SlotPool` of ``--slots`` slots
    (default 10M) is built with that policy, and the bytes of every numpy array the policy holds are
    summed (walking its attributes: ghost lists, prefix tree, count-min sketch, and for ``auto`` its
    two orders and two shadow pools), divided by the slot count.  Then ``--warm`` x slots blocks
    are stored (chains of 64, every 4th chain used again, all older blocks evicted) and the sum is
    taken again: the state is preallocated, so it must not grow (``grew``).  The pool's own arrays
    (states, pins, key index) are the same for every policy and are not counted.

Why
    Issue 18 asks that policies stay memory-bounded at millions of blocks.  Arrays only: no Python
    object per block exists in any policy, so the array bytes are the state (the process also holds
    the interpreter and the pool).  Nothing is timed.

Run ``python benchmarks/bench_policy_memory.py [--quick] [--slots N] [--warm X]``; prints one JSON
object and writes it to ``benchmarks/results/bench_policy_memory.json`` (``--quick``: 100k slots).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from _common import add_output_args, emit, results_path

from kvbm_fs.keys import BlockKeys
from kvbm_fs.lifecycle import SlotPool
from kvbm_fs.policy import POLICIES

NAME = "bench_policy_memory"


def array_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the numpy arrays reachable from ``obj`` through attributes, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes) if obj.base is None else 0
    if isinstance(obj, (list, tuple)):
        return sum(array_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(array_bytes(x, seen) for x in obj.values())
    if type(obj).__module__.startswith("kvbm_fs") and hasattr(obj, "__dict__"):
        return sum(array_bytes(v, seen) for k, v in vars(obj).items() if k not in ("events", "lock"))
    return 0


def policy_bytes(pool: SlotPool) -> int:
    """The policy's arrays, and for shadow pools everything they hold (their pools are the policy's)."""
    return array_bytes(pool.policy, {id(pool)})


def warm(pool: SlotPool, blocks: int) -> None:
    rng = np.random.default_rng(0)
    nxt, chains = 1, list[BlockKeys]()
    for _ in range(max(1, blocks // 64)):
        if chains and rng.random() < 0.25:
            keys = chains[int(rng.integers(len(chains)))]
        else:
            keys = BlockKeys.chain(7, np.arange(nxt, nxt + 64, dtype=np.uint64))
            nxt += 64
            chains = [*chains, keys][-1000:]
        slots = pool.acquire(keys)
        miss = np.flatnonzero(slots < 0)
        if miss.size:
            new = pool.allocate(miss.size)
            if new is not None:
                pool.complete(new)
                pool.release(pool.register(new, keys[miss]))
        pool.release(slots[slots >= 0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    add_output_args(ap, "100k slots")
    ap.add_argument("--slots", type=int, default=10_000_000)
    ap.add_argument("--warm", type=float, default=0.2, help="blocks stored after binding, x slots")
    args = ap.parse_args(argv)
    slots = 100_000 if args.quick else args.slots
    t0 = time.time()
    out: dict[str, Any] = {}
    for name in POLICIES:
        pool = SlotPool(slots, None, policy=name)
        bound = policy_bytes(pool)
        warm(pool, int(args.warm * slots))
        after = policy_bytes(pool)
        out[name] = {
            "bytes_per_slot": round(after / slots, 1),
            "bytes_per_slot_at_bind": round(bound / slots, 1),
            "grew": after > bound,
        }
        del pool
    res = {
        "benchmark": NAME,
        "quick": args.quick,
        "slots": slots,
        "warm_blocks": int(args.warm * slots),
        "policies": out,
        "method": "sum of numpy array bytes reachable from the policy object (shadow pools included), per slot",
        "wall_seconds": round(time.time() - t0, 1),
    }
    emit(res, args.out or results_path(NAME, args.quick))
    return res


if __name__ == "__main__":
    main()
