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
from typing import Any

from .nixl_io import NixlPosixIO, _file_state

DEVICE_BACKENDS = ("GDS_MT", "GDS")


class NixlDeviceIO(NixlPosixIO):
    name = "nixl-device"

    def __init__(self, device: Any, backend: str = "auto", *, timeout_s: float = 10.0, min_rate: float = 50e6) -> None:
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
            state = self._run(kind, local, fds, remote, files, nb * len(row_idx), rows, self.device_id)
        if state == "DONE":
            self.counters["nixl_ops"] += len(row_idx)
            return "done"
        return "retry" if state == "RETRY" else "failed"

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
