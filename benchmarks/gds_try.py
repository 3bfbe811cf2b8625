"""One small put/get of GPU blocks through a disk tier with a given GDS backend, in a folder.

Used by ``gpu_run.sh`` to find which (cuFile config, filesystem, NIXL backend) combinations move
bytes on a machine: ``python benchmarks/gds_try.py LABEL PARENT_DIR BACKEND`` prints one line
``RESULT LABEL PARENT_DIR BACKEND {json}``.  Needs CUDA.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from typing import Any

import numpy as np


def main() -> None:
    import torch

    from kvbm_fs.keys import BlockKeys
    from kvbm_fs.tiers.disk import DiskTier

    label, parent, backend = sys.argv[1:4]
    root = tempfile.mkdtemp(dir=parent)
    r: dict[str, Any]
    try:
        t = DiskTier(root, 2 << 20, capacity="64MiB", gds=backend)
        keys = BlockKeys.chain(1, np.arange(1, 9, dtype=np.uint64))
        src = torch.randint(0, 256, (8, 2 << 20), dtype=torch.uint8, device="cuda")
        out = torch.zeros_like(src)
        ok = bool(t.put(keys, src).all() and t.get(keys, out).all() and torch.equal(out, src))
        s = t.stats()
        r = dict(ok=ok, state=s["gds"], loads=s["device_loads"], host=s["device_host_loads"], fd=s["gds_fd"],
                 direct=s["direct_io"])  # fmt: skip
        t.close()
    except Exception as e:
        r = dict(ok=False, error=f"{type(e).__name__}: {e}"[:300])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("RESULT", label, parent, backend, json.dumps(r))


if __name__ == "__main__":
    main()
