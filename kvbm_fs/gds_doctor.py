"""``kvbm-fs gds DIR``: what the disk tier's GPU data path (tiers/disk/gds.py) would do for a folder,
and why: CUDA, the NIXL wheel and its GDS backends, O_DIRECT, nvidia-fs, the udev data cuFile reads,
and a trial put/get through a scratch tier.  Diagnostics only; the data path never imports this."""

from __future__ import annotations

from typing import Any


def diagnose(directory: str, trial: bool = True) -> dict[str, Any]:
    """What the disk tier's GPU data path would do for a tier in ``directory``, and why: the facts
    that decide it (CUDA, the NIXL wheel, its GDS backends, O_DIRECT, nvidia-fs, the udev data
    cuFile reads for the folder's block device) and, with ``trial``, one put/get of GPU blocks
    through a scratch tier there.  ``kvbm-fs gds DIR`` prints it."""
    import os

    from kvbm_fs.tiers.disk.blockio import probe_direct_io
    from kvbm_fs.tiers.disk.gds import open_device_io

    out: dict[str, Any] = {"directory": os.path.abspath(directory)}
    try:
        import torch

        out["cuda"] = bool(torch.cuda.is_available())
    except ImportError:
        out["cuda"] = False
    out["nixl"] = _nixl_package()
    out["o_direct"] = probe_direct_io(directory)
    out["nvidia_fs"] = os.path.exists("/proc/driver/nvidia-fs")
    out["udev_id_fs_usage"] = _udev_fs_usage(directory)
    out["gds_backend"] = None
    if out["cuda"] and out["nixl"]:
        engine, out["gds_backend"] = open_device_io("cuda", timeout=20)
        if engine is not None:
            engine.close()
        if trial:
            out["trial"] = try_tier(directory)
    out["verdict"] = _verdict(out)
    return out


def _nixl_package() -> str | None:
    from kvbm_fs.nixl_api import PACKAGES, api

    try:
        mod = api()
    except ImportError:
        return None
    return next((p for p in PACKAGES if mod.__name__.startswith(p)), mod.__name__)


def _udev_fs_usage(directory: str) -> bool | None:
    """Does udev's database describe the folder's block device (cuFile refuses files otherwise)?
    None when the folder is not on a block device (tmpfs, overlay)."""
    import os

    dev = os.stat(directory).st_dev
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        return None
    try:
        with open(f"/run/udev/data/b{major}:{minor}") as f:
            return "ID_FS_USAGE=" in f.read()
    except OSError:
        return False


def try_tier(directory: str, gds: str = "auto", blocks: int = 4, block_bytes: int = 1 << 20) -> dict[str, Any]:
    """One put and get of random GPU blocks through a scratch disk tier in ``directory``: did they
    come back whole, and how many loads went through the device engine?"""
    import shutil
    import tempfile

    import numpy as np
    import torch

    from kvbm_fs.keys import BlockKeys
    from kvbm_fs.tiers.disk import DiskTier

    root = tempfile.mkdtemp(prefix="kvbm-gds-", dir=directory)
    try:
        t = DiskTier(root, block_bytes, capacity=2 * blocks * (block_bytes + (8 << 10)), gds=gds)
        keys = BlockKeys.chain(1, np.arange(1, blocks + 1, dtype=np.uint64))
        src = torch.randint(0, 256, (blocks, block_bytes), dtype=torch.uint8, device="cuda")
        out = torch.zeros_like(src)
        ok = bool(t.put(keys, src).all() and t.get(keys, out).all() and torch.equal(out, src))
        s = t.stats()
        t.close()
        return dict(correct=ok, device_loads=s["device_loads"], host_loads=s["device_host_loads"], engine=s["gds"],
                    fd=s["gds_fd"], direct_io=s["direct_io"])  # fmt: skip
    except Exception as e:
        return dict(error=f"{type(e).__name__}: {e}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _verdict(d: dict[str, Any]) -> str:
    from kvbm_fs.tiers.disk.gds import DEVICE_BACKENDS

    if not d["cuda"]:
        return "host path: no CUDA device"
    if not d["nixl"]:
        return "host path: NIXL is not installed (pip install nixl-cu12, or nixl-cu13 with a CUDA 13 torch)"
    if not d["gds_backend"] or d["gds_backend"] not in DEVICE_BACKENDS:
        return f"host path: NIXL has no usable GDS backend ({d['gds_backend']})"
    trial = d.get("trial", {})
    if trial and not trial.get("device_loads"):
        why = "cuFile refused the files"
        if d["udev_id_fs_usage"] is False:
            why += "; udev has no ID_FS_USAGE for this block device (a VM or container without udev data)"
        elif d["udev_id_fs_usage"] is None:
            why += "; the folder is not on a block device (tmpfs or overlay)"
        return f"host path: {why}"
    mode = "true GPUDirect" if d["nvidia_fs"] else "cuFile compat mode (no nvidia-fs: bounce buffers)"
    return f"GDS loads through {d['gds_backend']}, {mode}"
