"""One import point for NIXL's Python API.

The ``nixl-cu12`` wheel is what CI and CPU machines install; a CUDA 13 machine (torch built for
CUDA 13, cuFile 13) needs ``nixl-cu13`` so that NIXL's GDS plugin loads the same CUDA runtime as
torch.  Both wheels ship the same ``_api`` module under a different package name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

PACKAGES = ("nixl_cu12", "nixl_cu13")


def api() -> ModuleType:
    """NIXL's ``_api`` module from the first installed wheel; ImportError names both if neither is."""
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
