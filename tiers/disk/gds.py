"""The disk tier's device data path: payloads move between tensor rows and segment files in one
NIXL transfer per batch, through GDS_MT or GDS (cuFile) for CUDA tensors.

Why a separate engine: :class:`~.nixl_io.NixlPosixIO` moves host buffers described as
``IoOp`` memoryviews; GDS moves GPU memory that Python cannot view.  This engine takes tensor
rows instead and reuses the POSIX engine's transfer driver (registration, deadline, cancel,
stuck-transfer handling).  On a CPU tensor it runs the same code through NIXL's POSIX backend,
which is how CI exercises this path without a GPU.

Every transfer is all or nothing: ``"done"``; ``"retry"`` when nothing is in flight and the
caller should use the host path instead; or ``"failed"`` when a transfer could not be cancelled
(NIXL is then off for good and the rows must be treated as lost).  Verification is the caller's
(the disk tier checks each block's dsum128 on the device before it counts as found).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from kvbm_fs.tiers.disk.nixl_io import NixlPosixIO, _file_state, _merge

DEVICE_BACKENDS = ("GDS_MT", "GDS")


class NixlDeviceIO(NixlPosixIO):
    name = "nixl-device"

    def __init__(
        self,
        device: Any,
        backend: str = "auto",
        *,
        timeout_s: float = 10.0,
        min_rate: float = 50e6,
        cache_bytes: int = 8 << 30,
    ) -> None:
        import torch

        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.empty(1, device=self.device)  # GDS needs a live CUDA context when the agent is made
        order = (DEVICE_BACKENDS if cuda else ("POSIX",)) if backend == "auto" else (backend,)
        errors = []
        for name in order:
            try:
                super().__init__(backend=name, mem="VRAM" if cuda else "DRAM", timeout_s=timeout_s, min_rate=min_rate)
                break
            except Exception as e:
                errors.append(f"{name}: {e}")
        else:
            raise RuntimeError("no NIXL device backend: " + "; ".join(errors))
        self.backend = name
        self.device_id = (self.device.index or 0) if cuda else 0
        self.cache_bytes = int(cache_bytes)
        self._regions: OrderedDict[tuple[int, int], tuple[Any, Any]] = OrderedDict()  # (base, size) -> (storage, reg)
        self._seen: OrderedDict[tuple[int, int], None] = OrderedDict()  # storages used once (no reference held)
        self._pinned: dict[tuple[int, int], tuple[Any, Any]] = {}  # register(): held until unregister/close
        self.counters.update(cached_regions=0, region_registrations=0)

    def move(self, kind: str, rows: Any, row_idx: list[int], fds: list[int], offsets: list[int]) -> str:
        """``kind`` ("READ" or "WRITE") the rows ``rows[row_idx[k]]`` of a contiguous ``(n, nbytes)``
        uint8 tensor from or to ``(fds[k], offsets[k])``."""
        if not row_idx:
            return "done"
        if self._broken or self._closed:
            return "retry"
        nb = int(rows.shape[1])
        base, stride = rows.data_ptr(), int(rows.stride(0))
        files = {fd: _file_state(fd) for fd in set(fds)}
        if any(isinstance(st, int) for st in files.values()):
            return "retry"
        local = [(base + i * stride, nb) for i in row_idx]
        remote = [(off, nb, fd) for fd, off in zip(fds, offsets)]
        with self._lock:
            cached = self._cached(rows)
            state = self._run(kind, local, fds, remote, files, nb * len(row_idx), rows, self.device_id, cached)
        if state == "DONE":
            self.counters["nixl_ops"] += len(row_idx)
            return "done"
        return "retry" if state == "RETRY" else "failed"

    def register(self, tensor: Any) -> bool:
        """Register the storage under ``tensor`` (an engine's KV cache) for the engine's lifetime, so
        loads into it skip per-call registration.  False if the backend refused it."""
        st = tensor.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        with self._lock:
            if key not in self._pinned:
                reg = self._register(key)
                if reg is None:
                    return False
                self._pinned[key] = (st, reg)
        return True

    def unregister(self, tensor: Any) -> None:
        st = tensor.untyped_storage()
        with self._lock:
            got = self._pinned.pop((st.data_ptr(), st.nbytes()), None)
            if got is not None:
                self._deregister(got[1])

    def _cached(self, rows: Any) -> bool:
        """Is the storage under ``rows`` registered for good?  Registered ones (:meth:`register`) are;
        a storage seen a second time is registered whole and kept, with a reference that keeps its
        memory from being freed and reused while registered, up to ``cache_bytes`` (least recently
        used released first).  Why: registering GPU memory with cuFile cost 30 ms per 128 MiB load on
        an H200 (23% of it), and an engine loads into the same buffers over and over.  A storage used
        once is registered per call and not held."""
        st = rows.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key in self._pinned:
            return True
        if key in self._regions:
            self._regions.move_to_end(key)
            return True
        if key not in self._seen or key[1] > self.cache_bytes:
            self._seen[key] = None
            if len(self._seen) > 64:
                self._seen.popitem(last=False)
            return False
        while self._regions and sum(k[1] for k in self._regions) + key[1] > self.cache_bytes:
            _, (_, old) = self._regions.popitem(last=False)
            self._deregister(old)
        reg = self._register(key)
        if reg is None:
            return False
        self._regions[key] = (st, reg)
        self.counters["cached_regions"] = len(self._regions)
        return True

    def _register(self, key: tuple[int, int]) -> Any:
        try:
            reg = self._agent.register_memory(_merge([key], self.device_id), self._mem, backends=self._backends)
        except Exception:
            return None
        self.counters["region_registrations"] += 1
        return reg

    def close(self) -> None:
        """Release the kept registrations, unless a transfer could not be cancelled: it may still
        use them, and leaking a registration (and the memory it holds) beats a device fault."""
        with self._lock:
            regions = [*self._regions.values(), *self._pinned.values()]
            self._regions, self._pinned = OrderedDict(), {}
            if self._stuck:
                self._leaked = regions  # referenced for the life of this object
            else:
                for _, reg in regions:
                    self._deregister(reg)
        super().close()

    def stats(self) -> dict[str, Any]:
        return dict(super().stats(), backend=self.backend, device=str(self.device))


def open_device_io(device: Any, backend: str = "auto", timeout: float = 10.0) -> tuple[NixlDeviceIO | None, str]:
    """A device engine, or None and why not.  Never hangs: creating cuFile's driver can stall on a
    broken install, so the engine is made in a daemon thread and abandoned after ``timeout``."""
    box: list[NixlDeviceIO | str] = []

    def attempt() -> None:
        try:
            box.append(NixlDeviceIO(device, backend))
        except Exception as e:
            box.append(f"{type(e).__name__}: {e}")

    th = threading.Thread(target=attempt, daemon=True, name="kvbm-gds-open")
    th.start()
    th.join(timeout)
    if not box:
        return None, f"opening the device engine timed out after {timeout:.0f}s"
    got = box[0]
    return (got, got.backend) if isinstance(got, NixlDeviceIO) else (None, got)
