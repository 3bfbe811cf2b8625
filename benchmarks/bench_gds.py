"""G3 <-> G1: disk tier loads into and stores from GPU memory, GDS path against the host path.

Measured side by side in one run (cases interleaved per round, page cache dropped before each
read), 64 blocks of 2 MiB on the same filesystem, source and destination a CUDA tensor:

- ``get_gds``: ``DiskTier.get`` with ``gds=auto`` (GDS_MT/GDS read into the tensor, header pages
  on the host, dsum128 verified on the GPU); ``get_host``: the same tier with ``gds=off`` (pread into
  host staging, xxh3 on the CPU, one copy to the GPU).
- ``raw_gds_read``: the same 64 payload reads through the device engine with no verification
  (the ceiling the tier's GDS get can reach); ``dd_read``: ``dd iflag=direct`` of as many bytes.
- ``put_gds_write``: the same put with ``gds_write=true`` (payloads by GDS from the tensor).
- ``put_dsum`` / ``put_plain``: ``DiskTier.put`` from the tensor with and without the dsum128
  (what recording it costs a store); ``raw_gds_write``: payload writes straight from the GPU, beside
  ``raw_host_write``, the same writes with ``pwritev`` from pinned host rows (is a GDS put worth it?).
- ``dsum_gpu`` against ``xxh3_cpu``: checksum throughput over the same 128 MiB.

Every get is checked against the source bytes.  Without CUDA or NIXL it prints ``{"skipped": ...}``.
Run on the GPU machine as ``python benchmarks/bench_gds.py --dir <folder on a real disk>``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import _common
import numpy as np
from _common import Caches, emit, gbps, interleave, paired_ratio, results_path, scratch_dir, scratch_parent, skip
from bench_disk import Case, dd, dd_read_args

from kvbm_fs import dsum
from kvbm_fs.keys import BlockKeys
from kvbm_fs.tiers.disk import HEADER_PAGE, DiskTier
from kvbm_fs.tiers.disk.blockio import IoOp, PosixIO, is_aligned

NAME = "bench_gds"
MiB = 1 << 20


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(root: str, block: int, n: int, rounds: int, device: str = "cuda", mode: str = "auto") -> dict[str, Any]:
    import torch

    caches = Caches()
    cap = 2 * n * (block + 2 * HEADER_PAGE)
    gds = DiskTier(os.path.join(root, "gds"), block, capacity=cap, gds=mode if device == "cuda" else "posix")
    host = DiskTier(os.path.join(root, "host"), block, capacity=cap, gds="off")
    gdsw = DiskTier(
        os.path.join(root, "gdsw"), block, capacity=cap, gds=mode if device == "cuda" else "posix", gds_write=True
    )
    src = torch.randint(0, 256, (n, block), dtype=torch.uint8, device=device)
    out = torch.empty_like(src)
    out_once = torch.empty_like(src)  # loaded into with the registration cache off: cuFile registration per call
    keys = BlockKeys.chain(3, np.arange(1, n + 1, dtype=np.uint64))
    put_keys = BlockKeys.chain(4, np.arange(1, n + 1, dtype=np.uint64))
    assert gds.put(keys, src).all() and host.put(keys, src).all()
    engine = gds.device.engine
    res: dict[str, Any] = {"gds": gds.device.state, "direct_io": gds.direct, "mount": _common.mount_of(root)}
    if engine is None:
        return res | {"skipped": f"no GDS engine: {gds.device.state}"}
    assert gds.get(keys, out).all() and torch.equal(out, src)  # settles which descriptors cuFile takes
    if gds.stats()["device_loads"] == 0:
        return res | {"skipped": "the GDS engine opened but moved nothing", "tier_stats": gds.stats()}
    recs = gds.index.records(3, keys.hashes)
    fds, offs = gds.device._places([r.slot for r in recs if r is not None], gds.device.direct_fds and device == "cuda")
    dd_file = os.path.join(root, "dd.bin")
    with open(dd_file, "wb") as f:
        f.write(os.urandom(n * block))
    bad: list[str] = []

    def check(name: str) -> Any:
        def after() -> None:
            if not torch.equal(out, src):
                bad.append(name)
            out.zero_()

        return after

    def get(t: DiskTier, dst: Any = None) -> Any:
        def fn() -> None:
            assert t.get(keys, out if dst is None else dst).all()
            _sync()

        return fn

    def cache(on: bool, then: Any = None) -> Any:
        def fn() -> None:
            if then is not None:
                then()
            engine.cache_bytes = (8 << 30) if on else 0

        return fn

    def check_once() -> None:
        cache(True)()
        if not torch.equal(out_once, src):
            bad.append("get_gds_percall")
        out_once.zero_()

    def raw(kind: str) -> Any:
        def fn() -> None:
            buf = out if kind == "READ" else src
            assert engine.move(kind, buf, list(range(n)), fds, offs) == "done"

        return fn

    def put(t: DiskTier) -> Any:
        def fn() -> None:
            assert t.put(put_keys, src).all()

        return fn

    def unput(t: DiskTier) -> Any:
        return lambda: t.delete(put_keys)

    host_rows = (src.cpu().pin_memory() if device == "cuda" else src).numpy()
    posix = PosixIO()
    host_ops = [IoOp(fd if is_aligned(memoryview(r)) else gds.segs.fd(gds.segs.locate(rec.slot)[0])[1], off, [memoryview(r)])
                for fd, off, r, rec in zip(fds, offs, host_rows, recs) if rec is not None]  # fmt: skip

    def raw_host_write() -> None:
        assert all(k == block for k in posix.write(host_ops))

    cases = [
        Case("get_gds", get(gds), before=caches.drop, after=check("get_gds")),
        Case("get_host", get(host), before=caches.drop, after=check("get_host")),
        Case("get_gds_percall", get(gds, out_once), before=cache(False, caches.drop), after=check_once),
        Case("raw_gds_read", raw("READ"), before=caches.drop, after=check("raw_gds_read")),
        Case("dd_read", lambda: dd(dd_read_args(dd_file, True)), before=caches.drop),
        Case("put_dsum", put(gds), after=unput(gds)),
        Case("put_plain", put(host), after=unput(host)),
        Case("put_gds_write", put(gdsw), after=unput(gdsw)),
        Case("raw_gds_write", raw("WRITE"), after=os.sync),
        Case("raw_host_write", raw_host_write, after=os.sync),
        Case("dsum_gpu", lambda: _dsum(src)),
        Case("xxh3_cpu", lambda: _xxh3(host_rows)),
    ]
    interleave(cases, rounds)
    t = {c.name: c.times for c in cases}
    nbytes = n * block
    res |= {f"{k}_gbps": gbps(nbytes, v) for k, v in t.items()}
    res |= {
        "get_gds_vs_get_host": round(paired_ratio(t["get_gds"], t["get_host"]), 3),
        "get_gds_vs_get_gds_percall": round(paired_ratio(t["get_gds"], t["get_gds_percall"]), 3),
        "get_gds_percall_vs_get_host": round(paired_ratio(t["get_gds_percall"], t["get_host"]), 3),
        "get_gds_vs_raw_gds_read": round(paired_ratio(t["get_gds"], t["raw_gds_read"]), 3),
        "get_gds_vs_dd_read": round(paired_ratio(t["get_gds"], t["dd_read"]), 3),
        "put_dsum_vs_put_plain": round(paired_ratio(t["put_dsum"], t["put_plain"]), 3),
        "put_gds_write_vs_put_dsum": round(paired_ratio(t["put_gds_write"], t["put_dsum"]), 3),
        "raw_gds_write_vs_put_plain": round(paired_ratio(t["raw_gds_write"], t["put_plain"]), 3),
        "raw_gds_write_vs_raw_host_write": round(paired_ratio(t["raw_gds_write"], t["raw_host_write"]), 3),
        "dsum_gpu_vs_xxh3_cpu": round(paired_ratio(t["dsum_gpu"], t["xxh3_cpu"]), 3),
        "mismatches": bad,
        "cache_drops_worked": caches.all_worked,
        "tier_stats": {k: v for k, v in gds.stats().items() if k.startswith(("gds", "device", "dsum"))},
    }
    res["gds_write_stores"] = gdsw.stats()["device_stores"]
    gds.close()
    host.close()
    gdsw.close()
    posix.close()
    return res


def _xxh3(rows: np.ndarray) -> None:
    import xxhash

    for r in rows:
        xxhash.xxh3_128_intdigest(r)


def _dsum(rows: Any) -> None:
    dsum.rows(rows)
    _sync()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    _common.add_output_args(ap, "4 blocks, 2 rounds")
    _common.add_scratch_arg(ap)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the same code through NIXL POSIX")
    ap.add_argument("--gds", default="auto", help="the tier's gds mode on CUDA (auto, GDS_MT, GDS)")
    a = ap.parse_args()
    try:
        import torch

        if a.device == "cuda" and not torch.cuda.is_available():
            skip("no CUDA device")
            return
        from kvbm_fs.nixl_api import api

        api()
    except ImportError as e:
        skip(f"needs torch and NIXL: {e}")
        return
    with scratch_dir(scratch_parent(a.dir), "gds-") as root:
        res = run(str(root), 2 * MiB, 4 if a.quick else 64, 2 if a.quick else a.rounds, a.device, a.gds)
    res["device"] = torch.cuda.get_device_name() if a.device == "cuda" else "cpu (dry run through NIXL POSIX)"
    res["env"] = _common.env(torch=torch.__version__, cuda=torch.version.cuda)
    res["load_average"] = _common.load_average()
    res["median_note"] = "GB/s of the median round; ratios paired within a round (>1: first is faster)"
    emit(res, a.out or results_path(NAME, a.quick))


if __name__ == "__main__":
    main()
