"""Batched row copies between 2-D uint8 buffers (numpy or torch, any device).

A row is one block.  Copies are grouped into runs where both source and
destination rows are consecutive, so contiguous ranges move as one large copy and
scattered rows cost one vectorised gather/scatter, not one Python call per block.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def host_rows(data: Any, n: int) -> np.ndarray:
    """The first ``n`` rows of ``data`` (numpy, or a torch tensor on any device) as contiguous host rows."""
    if is_torch(data):
        return np.ascontiguousarray(data[:n].detach().cpu().numpy())
    return np.ascontiguousarray(data[:n])


def aligned_rows(n: int, nbytes: int) -> np.ndarray:
    """Page-aligned uint8 rows (anonymous mmap): lets disk tiers use O_DIRECT and NIXL register them."""
    import mmap

    mm = mmap.mmap(-1, max(mmap.PAGESIZE, n * nbytes))
    return np.frombuffer(mm, np.uint8, n * nbytes).reshape(n, nbytes)


def runs(src_idx: np.ndarray, dst_idx: np.ndarray) -> np.ndarray:
    """[(src_start, dst_start, length)] of maximal runs where both indices advance by one."""
    n = src_idx.size
    if n == 0:
        return np.zeros((0, 3), np.int64)
    brk = np.flatnonzero((np.diff(src_idx) != 1) | (np.diff(dst_idx) != 1)) + 1
    starts = np.concatenate(([0], brk))
    lens = np.diff(np.concatenate((starts, [n])))
    return np.stack([src_idx[starts], dst_idx[starts], lens], axis=1)


def copy_rows(dst: Any, dst_idx: np.ndarray, src: Any, src_idx: np.ndarray) -> None:
    """dst[dst_idx[i]] = src[src_idx[i]] for all i, with no intermediate copy where avoidable."""
    if src_idx.size == 0:
        return
    if not _on_gpu(dst) and not _on_gpu(src):
        _copy_np(_as_numpy(dst), dst_idx, _as_numpy(src), src_idx)
    else:
        _copy_torch(_as_torch(dst), dst_idx, _as_torch(src), src_idx)


def _on_gpu(x: Any) -> bool:
    return is_torch(x) and x.device.type != "cpu"


def _as_numpy(x: Any) -> np.ndarray:
    """CPU tensors go through numpy: torch's CPU gathers lose up to 2x under load (benchmarks/bench_host.py)."""
    return x.detach().numpy() if is_torch(x) else x


def _contig(idx: np.ndarray) -> bool:
    return bool(idx[-1] - idx[0] == idx.size - 1 and (idx.size < 2 or np.all(np.diff(idx) == 1)))


def _copy_np(dst: np.ndarray, dst_idx: np.ndarray, src: np.ndarray, src_idx: np.ndarray) -> None:
    if _contig(dst_idx):
        d0 = int(dst_idx[0])
        out = dst[d0 : d0 + dst_idx.size]
        if _contig(src_idx):
            s0 = int(src_idx[0])
            np.copyto(out, src[s0 : s0 + src_idx.size])
        elif np.may_share_memory(out, src):
            np.take(src, src_idx, axis=0, out=out)  # overlapping: let numpy buffer
        else:
            # mode="raise" (the default) always copies through a temporary buffer: 2 passes, ~0.27x memcpy
            if int(src_idx.min()) < 0 or int(src_idx.max()) >= src.shape[0]:
                raise IndexError(f"row index out of range for {src.shape[0]} rows")
            np.take(src, src_idx, axis=0, out=out, mode="clip")
    elif _contig(src_idx):
        s0 = int(src_idx[0])
        dst[dst_idx] = src[s0 : s0 + src_idx.size]
    else:
        for s, d, n in runs(src_idx, dst_idx).tolist():
            dst[d : d + n] = src[s : s + n]


def _as_torch(x: Any) -> Any:
    if is_torch(x):
        return x
    import torch

    return torch.from_numpy(x)


def _copy_torch(dst: Any, dst_idx: np.ndarray, src: Any, src_idx: np.ndarray) -> None:
    import torch

    if dst.device == src.device:
        di = torch.from_numpy(dst_idx).to(dst.device)
        si = torch.from_numpy(src_idx).to(src.device)
        if _contig(dst_idx):
            d0 = int(dst_idx[0])
            torch.index_select(src, 0, si, out=dst[d0 : d0 + dst_idx.size])
        else:
            dst.index_copy_(
                0,
                di,
                src.index_select(0, si)
                if not _contig(src_idx)
                else src[int(src_idx[0]) : int(src_idx[0]) + src_idx.size],
            )
        return
    # Across devices: one async copy per run; pinned host memory makes these DMA transfers.
    nb = dst.is_cuda or src.is_cuda
    for s, d, n in runs(src_idx, dst_idx).tolist():
        dst[d : d + n].copy_(src[s : s + n], non_blocking=nb)
