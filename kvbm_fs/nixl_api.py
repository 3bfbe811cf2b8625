"""One import point for NIXL's Python API.

The ``nixl-cu12`` wheel is what CI and CPU machines install; a CUDA 13 machine (torch built for
CUDA 13, cuFile 13) needs ``nixl-cu13`` so that NIXL's GDS plugin loads the same CUDA runtime as
torch.  Both wheels ship the same ``_api`` module under a different package name.

:func:`api` first pins the host's own rdma-core libraries (docs/architecture.md, "NIXL and the host's
rdma-core"): without that, every process that made a UCX agent segfaults at exit on a host with
``libibverbs1`` installed.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
from types import ModuleType

PACKAGES = ("nixl_cu12", "nixl_cu13")

# The host's copies of what the wheels bundle under auditwheel-renamed names, in dependency order.
SYSTEM_RDMA_LIBS = ("libnl-3.so.200", "libnl-route-3.so.200", "libibverbs.so.1")
_pinned: list[ctypes.CDLL] | None = None


def pin_system_rdma() -> list[str]:
    """Load the host's libnl and libibverbs, each in its own scope (RTLD_LOCAL), before NIXL's UCX.

    UCX's EFA module links the host's ``libefa``, which pulls the host's libibverbs and libnl into a
    dlopen scope where the wheel's renamed copies come first: the host's libnl-route then binds to
    the wheel's libnl, registers its ops in that copy's lists, and ``_dl_fini`` crashes in
    ``rtnl_tc_unregister``.  Loaded here first, the host's copies bind to each other and are reused
    as they are; the wheel's copies still bind to themselves, and every UCX module (ib, mlx5, efa)
    loads as before.  Idempotent; returns the names pinned (none where rdma-core is absent)."""
    global _pinned
    if _pinned is None:
        _pinned = []
        for name in SYSTEM_RDMA_LIBS:
            try:
                _pinned.append(ctypes.CDLL(name, mode=os.RTLD_LOCAL))
            except OSError:  # not installed: nothing for UCX to collide with
                pass
    return [lib._name for lib in _pinned]


def api() -> ModuleType:
    """NIXL's ``_api`` module from the first installed wheel; ImportError names both if neither is."""
    pin_system_rdma()
    errors = []
    for name in PACKAGES:
        try:
            return importlib.import_module(f"{name}._api")
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise ImportError("NIXL is not installed (pip install nixl-cu12): " + "; ".join(errors))


def available() -> bool:
    try:
        api()
    except ImportError:
        return False
    return True


class quiet_logger:
    """NIXL's Python logger prints INFO lines to stdout when an agent or backend is made."""

    def __enter__(self) -> None:
        self._log = logging.getLogger("nixl")
        self._level = self._log.level
        if not os.environ.get("NIXL_LOG_LEVEL"):
            self._log.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        self._log.setLevel(self._level)
