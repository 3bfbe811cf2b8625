"""The disk tier's path for blocks that live in device (GPU) memory.

Loads: header pages are read on the host and checked there (magic, key echo, length, the
index's checksum); payloads of blocks whose header carries a dsum128 go file -> GPU in one
GDS transfer, straight into the caller's rows, and are verified on the GPU before they count.
Blocks written without a dsum128 (from host memory) take the host path: read, xxh3, copy up.

Stores: a block written from a GPU tensor gets its dsum128 computed on the GPU and recorded in
its header beside the xxh3-128.  The payload itself still goes through the host: the xxh3 that
CPU readers (G2 promotion, ``check``, other processes) verify needs a host copy anyway, and
with O_DIRECT the host path is the same DMA.  See docs/architecture.md 1.6.

``gds`` modes: ``auto`` (GDS_MT/GDS when a CUDA device and cuFile work, else the host path),
``on`` (the same, but a tier that cannot use it is a ConfigError), ``GDS_MT`` / ``GDS`` (``on``
with that backend), ``off``, and ``posix``: CPU tensors take this path through NIXL's POSIX
backend, so CI runs the same code without a GPU.  Segment files are handed to cuFile through their
O_DIRECT descriptor; if cuFile refuses it, through the buffered one (``gds_fd`` in the stats).
"""

from __future__ import annotations

import contextlib
import errno
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from kvbm_fs import codec, dsum
from kvbm_fs.errors import ConfigError, CorruptBlockError
from kvbm_fs.keys import BlockKeys
from kvbm_fs.rows import aligned_rows, host_rows, is_torch
from kvbm_fs.tiers.disk.blockio import ALIGN, aligned_buffer
from kvbm_fs.tiers.disk.check import check_header
from kvbm_fs.tiers.disk.gds import NixlDeviceIO, open_device_io

if TYPE_CHECKING:
    from kvbm_fs.tiers.disk.index import Record
    from kvbm_fs.tiers.disk.tier import DiskTier

MODES = ("auto", "on", "off", "posix", "GDS_MT", "GDS")  # the last two: "on" with that NIXL backend
STAGE_MAX = 1 << 30


class DevicePath:
    def __init__(self, tier: DiskTier, mode: str, gds_write: bool = False) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown gds mode {mode!r}; use {', '.join(MODES)}")
        self.tier = tier
        self.mode = mode
        self.gds_write = bool(gds_write)
        self.engine: NixlDeviceIO | None = None
        self.state = "off" if mode == "off" else "not probed"
        self.direct_fds = True  # hand cuFile the O_DIRECT descriptors until it refuses them
        self._stage = threading.local()  # per thread: pinned host rows for puts from GPU tensors (see staged)
        self.counters = dict(device_loads=0, device_host_loads=0, device_retries=0, dsum_failures=0, dsum_stores=0,
                             device_stores=0)  # fmt: skip
        if mode not in ("auto", "off") or _cuda_ready():
            self._open()

    def _open(self) -> None:
        device = "cpu" if self.mode == "posix" else "cuda"
        self.engine, self.state = open_device_io(device, self.mode if self.mode in ("GDS_MT", "GDS") else "auto")
        if self.engine is None and self.mode not in ("auto", "posix"):
            raise ConfigError(f"disk tier {self.tier.root}: gds={self.mode} but GDS is unavailable ({self.state})")

    def applies(self, t: Any) -> bool:
        """Does a put from / get into ``t`` take this path?"""
        if self.mode == "off" or not is_torch(t) or not dsum.eligible(self.tier.block_nbytes):
            return False
        if (t.device.type == "cpu") != (self.mode == "posix"):
            return False
        if self.state == "not probed":
            self._open()
        return t.is_contiguous()

    def loads(self, t: Any) -> bool:
        """Does a get into ``t`` go through the device engine?  Only with an engine on ``t``'s device;
        otherwise the tier's plain path (one read, one batched copy up) is cheaper."""
        if not self.applies(t) or self.engine is None:
            return False
        return t.device.type == "cpu" or (t.device.index or 0) == self.engine.device_id

    def register(self, tensor: Any) -> bool:
        return self.loads(tensor) and self.engine is not None and self.engine.register(tensor)

    def unregister(self, tensor: Any) -> None:
        if self.engine is not None:
            self.engine.unregister(tensor)

    # ---- stores ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def staged(self, data: Any, n: int) -> Iterator[np.ndarray]:
        """Host rows of ``data[:n]`` for the write: GPU rows come down in one copy into a pinned
        buffer this thread reuses (3.4x the bandwidth of a pageable copy on an H200).  Batches over
        STAGE_MAX bytes take a pageable copy rather than pin that much host memory for good."""
        need = n * int(data.shape[1]) if is_torch(data) else 0
        if not (is_torch(data) and data.device.type == "cuda") or need > STAGE_MAX:
            yield host_rows(data, n)
            return
        import torch

        buf = getattr(self._stage, "buf", None)
        if buf is None or buf.numel() < need:
            self._stage.buf = None
            buf = self._stage.buf = torch.empty(need, dtype=torch.uint8, pin_memory=True)
        view = buf[:need].view(n, -1)
        view.copy_(data[:n])
        yield view.numpy()

    def sums(self, data: Any, idx: np.ndarray) -> list[int]:
        """dsum128 of ``data[idx]``, computed where the rows are."""
        import torch

        rows = data[torch.as_tensor(idx, device=data.device)]
        self.counters["dsum_stores"] += len(idx)
        return dsum.to_ints(dsum.rows(rows))

    def write_payloads(self, data: Any, idx: np.ndarray, slots: list[int], rows: np.ndarray) -> list[bool]:
        """Payloads ``data[idx[k]]`` into ``slots[k]`` in one GDS transfer (``gds_write``); a refused
        transfer is redone from the host ``rows`` already staged for the checksum."""
        n = len(slots)
        state = "retry"
        if self.engine is not None:
            direct = self.direct_fds and data.device.type == "cuda"
            state = self.engine.move("WRITE", data, [int(i) for i in idx[:n]], *self._places(slots, direct))
        if state == "done":
            self.counters["device_stores"] += n
            return [True] * n
        if state == "failed":
            return [False] * n
        self.counters["device_retries"] += 1
        ops = [self.tier._op(s, None, rows[i]) for s, i in zip(slots, idx[:n].tolist())]
        moved = iter(self.tier.io.write([op for op in ops if op is not None]))
        return [op is not None and next(moved) == op.nbytes for op in ops]

    # ---- loads -----------------------------------------------------------------------------
    def read(self, keys: BlockKeys, recs: list[Record], idx: np.ndarray, out: Any) -> np.ndarray:
        t = self.tier
        n = len(recs)
        hdr = np.frombuffer(aligned_buffer(n * ALIGN), np.uint8).reshape(n, ALIGN)
        ops = [t._op(r.slot, hdr[j], hdr[j][:0]) for j, r in enumerate(recs)]  # header pages only
        got = iter(t.io.read([op for op in ops if op is not None]))
        good = np.zeros(n, bool)
        bad: list[tuple[int, int, str]] = []
        direct: list[tuple[int, codec.BlockHeader]] = []  # headers verified, payload checkable on the device
        host: list[tuple[int, codec.BlockHeader]] = []
        for j, (op, r, i) in enumerate(zip(ops, recs, idx.tolist())):
            got_n = next(got) if op is not None else -errno.ENOENT
            why, h = check_header(t, keys[i], r, hdr[j], got_n, op)
            if h is None:
                bad.append((int(keys.hashes[i]), r.slot, why or "bad header"))
            else:
                (direct if h.dsum is not None else host).append((j, h))
        host += self._load_direct(keys, recs, idx, out, direct, good, bad)
        if host:
            self._load_host(keys, recs, idx, out, host, good, bad)
        if bad:
            t._drop_bad(keys.ns, bad)
        return good

    def _load_direct(
        self, keys: BlockKeys, recs: list[Record], idx: np.ndarray, out: Any,
        direct: list[tuple[int, codec.BlockHeader]], good: np.ndarray, bad: list[tuple[int, int, str]],
    ) -> list[tuple[int, codec.BlockHeader]]:  # fmt: skip
        """GDS-read the payloads of ``direct`` into their rows and verify them on the device.
        Returns the ones to redo through the host path."""
        import torch

        if not direct or self.engine is None:
            return direct
        rows = [int(idx[j]) for j, _ in direct]
        state = self._move(out, rows, [recs[j].slot for j, _ in direct])
        if state == "retry":
            self.counters["device_retries"] += 1
            return direct
        if state == "failed":
            bad.extend((int(keys.hashes[idx[j]]), recs[j].slot, "device read failed") for j, _ in direct)
            return []
        sums = dsum.to_ints(dsum.rows(out[torch.as_tensor(rows, device=out.device)]))
        for (j, h), have in zip(direct, sums):
            if have == h.dsum:
                good[j] = True
            else:
                self.counters["dsum_failures"] += 1
                bad.append((int(keys.hashes[idx[j]]), recs[j].slot, "payload dsum128 mismatch"))
        self.counters["device_loads"] += int(good.sum())
        return []

    def _move(self, out: Any, rows: list[int], slots: list[int]) -> str:
        """One device read of ``slots``' payloads into ``out[rows]``.  If cuFile refuses the O_DIRECT
        descriptors (some filesystems), once more with the buffered ones, kept from then on if that works."""
        assert self.engine is not None
        direct = self.direct_fds and out.device.type == "cuda"
        state = self.engine.move("READ", out, rows, *self._places(slots, direct))
        if state == "retry" and direct:
            state = self.engine.move("READ", out, rows, *self._places(slots, False))
            self.direct_fds = state != "done"
        return state

    def _places(self, slots: list[int], direct: bool) -> tuple[list[int], list[int]]:
        """(fd, file offset) of each slot's payload, which follows the slot's header page."""
        fds, offs = [], []
        for s in slots:
            seg, off = self.tier.segs.locate(s)
            dfd, bfd = self.tier.segs.fd(seg)
            fds.append(dfd if direct and dfd >= 0 else bfd)
            offs.append(off + ALIGN)
        return fds, offs

    def _load_host(
        self, keys: BlockKeys, recs: list[Record], idx: np.ndarray, out: Any,
        todo: list[tuple[int, codec.BlockHeader]], good: np.ndarray, bad: list[tuple[int, int, str]],
    ) -> None:  # fmt: skip
        """Payloads of blocks whose headers were read and checked already: read into host rows,
        checked against the header's xxh3-128, and copied up in one batch."""
        import torch

        t = self.tier
        stage = aligned_rows(len(todo), t.block_nbytes)
        ops = [t._op(recs[j].slot, None, stage[k]) for k, (j, _) in enumerate(todo)]
        got = iter(t.io.read([op for op in ops if op is not None]))
        ok = np.zeros(len(todo), bool)
        for k, ((j, h), op) in enumerate(zip(todo, ops)):
            n = next(got) if op is not None else -errno.ENOENT
            try:
                if op is None or n != op.nbytes:
                    raise CorruptBlockError(f"payload read failed or short ({n} bytes)")
                codec.verify_payload(h, stage[k])
                ok[k] = True
            except CorruptBlockError as e:
                bad.append((int(keys.hashes[idx[j]]), recs[j].slot, str(e)))
        if ok.any():
            rows = idx[[j for (j, _), o in zip(todo, ok) if o]]
            out[torch.as_tensor(rows, device=out.device)] = torch.from_numpy(stage[ok]).to(out.device)
            good[[j for (j, _), o in zip(todo, ok) if o]] = True
        self.counters["device_host_loads"] += int(ok.sum())

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = dict(gds=self.state, gds_mode=self.mode, gds_write=self.gds_write,
                                 gds_fd="direct" if self.direct_fds else "buffered")  # fmt: skip
        s.update(self.counters)
        if self.engine is not None:
            s["gds_engine"] = self.engine.stats()
        return s

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def dest_rows(out: Any, n: int) -> tuple[np.ndarray, Any]:
    """Host rows for a host-path read into ``out``, and a function copying the good ones up (GPU ``out`` only)."""
    if not is_torch(out):
        return out, None
    if out.device.type == "cpu":
        return out.detach().numpy(), None
    stage = np.empty((n, out.shape[1]), np.uint8)

    def back(rows: np.ndarray) -> None:
        import torch

        if rows.size:
            at = torch.as_tensor(rows, device=out.device)
            out[at] = torch.from_numpy(stage[rows]).to(out.device)

    return stage, back


def _cuda_ready() -> bool:
    """CUDA is usable and torch is already imported (a host-only user never pays for importing it)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())
