"""One small put/get of GPU blocks through a disk tier with a given GDS backend, in a folder.

Used by ``gpu_run.sh`` to find which (cuFile config, filesystem, NIXL backend) combinations move
bytes on a machine: ``python benchmarks/gds_try.py LABEL PARENT_DIR BACKEND`` prints one line
``RESULT LABEL PARENT_DIR BACKEND {json}`` (``loads``: blocks that came up through the engine).
Needs CUDA.
"""

from __future__ import annotations

import json
import sys

from kvbm_fs.gds_doctor import try_tier


def main() -> None:
    label, parent, backend = sys.argv[1:4]
    r = try_tier(parent, gds=backend, blocks=8, block_bytes=2 << 20)
    r["loads"] = r.pop("device_loads", 0)
    print("RESULT", label, parent, backend, json.dumps(r))


if __name__ == "__main__":
    main()
