"""Mooncake tier: a batch put and get of 64 x 2 MiB blocks through ``mooncake://``, against raw Mooncake
batch calls and against a ``PeerPool``, in one run.

What it measures
    A ``mooncake_master`` on 127.0.0.1 and a holder process (this script with ``--hold``) that lends
    the pool its DRAM twice over: a Mooncake client with a segment, and two ``PeerServer`` host tiers.
    This process joins the pool with no segment of its own, so every block lives in the holder, as
    in a pool of other machines' memory.  Side by side in interleaved rounds:

    - ``tier_put`` / ``tier_get``: ``MooncakeTier.put`` of 64 new blocks (header and xxh3-128 per
      block into registered staging rows, one ``batch_put_from``; the blocks are deleted untimed
      before every put) and ``MooncakeTier.get`` (one ``batch_get_into`` into staging rows, header
      and checksum checks of every block, copy into the caller's rows);
    - ``raw_put`` / ``raw_get``: ``MooncakeDistributedStore.batch_put_from`` / ``batch_get_into`` of
      the same number of objects of the same size, straight from and into registered rows (no header,
      no hashing, no copy): Mooncake's own speed;
    - ``pool_put`` / ``pool_get``: ``PeerPool.put`` / ``get`` over the holder's two peers (NIXL UCX).

    Ratios are medians of per-round paired ratios: ``get_fraction_of_raw`` / ``put_fraction_of_raw``
    (raw time / tier time: what the tier's verification and copy cost), ``get_vs_pool`` /
    ``put_vs_pool`` (pool time / tier time: above 1, Mooncake is faster).

Why
    Mooncake is the pool other engines already run; the tier must not waste what it moves, and users
    choosing between it and peers need both on the same machine.  2 cores, loopback, Mooncake over
    TCP (its RDMA path needs RDMA NICs); UCX picks shared memory between the peers.

Run ``python benchmarks/bench_mooncake.py [--quick]``; prints one JSON object and writes it to
``benchmarks/results/bench_mooncake.json`` (``--quick``: 8 blocks, 2 rounds, about 20 s).  About 1-2 minutes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import Case, add_output_args, bench_blocks, emit, env, gbps, interleave, paired_ratio, results_path, skip

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvbm_fs.codec import HEADER_SIZE  # noqa: E402

NAME = "bench_mooncake"


def hold(url: str, block: int, blocks: int) -> None:
    """The holder process: a Mooncake client lending a segment, and two peer servers; until stdin closes."""
    from kvbm_fs.registry import open_tier
    from kvbm_fs.tiers.peer import serve_host_memory

    seg = 3 * blocks * (block + HEADER_SIZE) + (64 << 20)
    t = open_tier(f"{url}&segment={seg}&staging={block + HEADER_SIZE}", block_nbytes=block)
    peers = [serve_host_memory(2 * blocks * block, block) for _ in range(2)]
    print("HOLD", ",".join(p.url.removeprefix("peer://") for p in peers), flush=True)
    sys.stdin.read()
    for p in peers:
        p.close()
        p.tier.close()
    t.close()


def run(blocks: int, block_mib: float, rounds: int) -> dict[str, Any]:
    from kvbm_fs.tiers.mooncake import MooncakeMaster
    from kvbm_fs.tiers.mooncake.client import key_strings
    from kvbm_fs.tiers.peer import PeerPool

    ns, keys, data, out = bench_blocks("bench-mooncake", blocks, block_mib)
    bn = ns.block_nbytes
    with MooncakeMaster() as m:
        url = m.url + "&local_buffer=16MiB"
        proc = subprocess.Popen([sys.executable, __file__, "--hold", url, str(bn), str(blocks)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert proc.stdout is not None
            line = next(x for x in proc.stdout if x.startswith("HOLD "))
            from kvbm_fs.registry import open_tier

            staging = blocks * (bn + HEADER_SIZE)
            t = open_tier(f"{url}&segment=0&staging={staging}", block_nbytes=bn, block_size=ns.layout.block_size)
            t.bind_namespace(ns)
            pool = PeerPool(line.split()[1].split(","), bn, staging=2 * blocks * (bn + 4096))
            pool.bind_namespace(ns)
            # raw Mooncake: the tier's own joined client, its own registered rows, objects of the same size
            raw = t.client.store  # type: ignore[attr-defined]
            obj = bn + HEADER_SIZE
            ptrs = t.client.get_rows.ptrs(blocks)  # type: ignore[attr-defined]
            raw_keys = key_strings("raw", ns.id, keys.hashes)
            assert all(c == 0 for c in raw.batch_put_from(raw_keys, ptrs, [obj] * blocks))
            assert t.put(keys, data).all() and pool.put(keys, data).all()
            cases = [
                Case("tier_get", lambda: t.get(keys, out)),
                Case("tier_put", lambda: t.put(keys, data), before=lambda: t.delete(keys)),
                Case("raw_get", lambda: raw.batch_get_into(raw_keys, ptrs, [obj] * blocks)),
                Case(
                    "raw_put",
                    lambda: raw.batch_put_from(raw_keys, ptrs, [obj] * blocks),
                    before=lambda: raw.batch_remove(raw_keys, True),
                ),
                Case("pool_get", lambda: pool.get(keys, out)),
                Case("pool_put", lambda: pool.put(keys, data), before=lambda: pool.delete(keys)),
            ]
            interleave(cases, rounds)
            out[:] = 0
            exact = bool(t.get(keys, out).all() and np.array_equal(out, data))
            raw_ok = all(c == obj for c in raw.batch_get_into(raw_keys, ptrs, [obj] * blocks))
            stats = t.stats()
            pool.close()
            t.close()
        finally:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(60)
    c = {x.name: x for x in cases}
    nbytes = blocks * bn
    res: dict[str, Any] = {"blocks": blocks, "block_bytes": bn, "rounds": rounds, "bytes_exact": exact,
                           "raw_complete": raw_ok, "protocol": "tcp"}  # fmt: skip
    res["gbps"] = {name: gbps(nbytes, x.times) for name, x in c.items()}
    res["ms"] = {name: round(x.median * 1e3, 2) for name, x in c.items()}
    for op in ("get", "put"):
        res[f"{op}_fraction_of_raw"] = round(paired_ratio(c[f"tier_{op}"].times, c[f"raw_{op}"].times), 3)
        res[f"{op}_vs_pool"] = round(paired_ratio(c[f"tier_{op}"].times, c[f"pool_{op}"].times), 3)
    res["tier_stats"] = {k: stats[k] for k in ("get_errors", "put_errors", "load_failures", "staging_retired")}
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--block-mib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--hold", nargs=3, help=argparse.SUPPRESS)
    add_output_args(ap, "8 blocks, 2 rounds (smoke tests)")
    args = ap.parse_args(argv)
    if args.hold:  # the holder process: serves until its stdin closes, then exits normally
        hold(args.hold[0], int(args.hold[1]), int(args.hold[2]))
        return {}
    import importlib.util

    if importlib.util.find_spec("mooncake") is None:  # not imported here: the tier sets Mooncake's log level first
        return skip("Mooncake is not installed (the mooncake extra)", benchmark=NAME)
    from kvbm_fs.nixl_api import available

    if not available():
        return skip("NIXL is not installed (the PeerPool side)", benchmark=NAME)
    blocks, rounds = (8, 2) if args.quick else (args.blocks, args.rounds)
    res = {"benchmark": NAME, "quick": args.quick, **run(blocks, args.block_mib, rounds)}
    res["env"] = env(numpy=np.__version__)
    emit(res, args.out or results_path(NAME, args.quick))
    return res


if __name__ == "__main__":
    main()
