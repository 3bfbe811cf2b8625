"""Helpers the remote-tier test modules share (s3fs and NIXL data paths, cross-process sharing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kvbm_fs.codec import HEADER_SIZE
from kvbm_fs.keys import BlockKeys
from kvbm_fs.testing import LAYOUT, NS_A, blocks_for
from kvbm_fs.tiers.remote import RemoteTier

REPO = Path(__file__).resolve().parents[1]
BN = NS_A.block_nbytes
# The breaker stays out of the way unless asked. The timeout is one no healthy request on a loaded
# 2-core CI box comes near; tests that stall requests set short ones themselves.
FAST: dict[str, Any] = dict(timeout=5, retries=2, backoff=0.01, breaker_threshold=1000, breaker_cooldown=0.5)


def cool_down(breaker: Any) -> None:
    """End an open circuit breaker's cool-down now. Breaker tests set a long one, so that "open" holds
    however slow a busy machine is between two checks, and end it here instead of sleeping through a
    short one (which a stall longer than the cool-down would also end, too early)."""
    if breaker.opened_at is not None:
        breaker.opened_at = time.monotonic() - breaker.cooldown


def object_name(root: str, keys: BlockKeys, i: int) -> str:
    """Where the documented layout puts block ``i``: <root>/<ns:016x>/<hash>>56:02x>/<hash:016x>."""
    h = int(keys.hashes[i])
    return f"{root}/{keys.ns:016x}/{h >> 56:02x}/{h:016x}"


def untouched_misses(t: RemoteTier, keys: BlockKeys) -> np.ndarray:
    """get(); every row it did not find must still hold the 0xAB fill, every row found its own bytes."""
    out = np.full((len(keys), BN), 0xAB, np.uint8)
    found = t.get(keys, out)
    want = blocks_for(keys, BN)
    for i in range(len(keys)):
        assert np.array_equal(out[i], want[i]) if found[i] else (out[i] == 0xAB).all(), f"row {i}"
    return found


def _flip(at: int) -> Callable[[bytes], bytes]:
    def f(b: bytes) -> bytes:
        ba = bytearray(b)
        ba[at] ^= 0x10
        return bytes(ba)

    return f


# ways a stored block object can be damaged behind the tier's back
DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "payload bit flip": _flip(HEADER_SIZE + BN // 3),
    "header bit flip": _flip(40),
    "payload truncated": lambda b: b[: HEADER_SIZE + BN // 2],
    "header truncated": lambda b: b[:60],
    "empty": lambda b: b"",
}


def write_config(path: Path, tier: dict[str, Any]) -> Path:
    """A TOML store config: model, layout and one tier table (nested tables for storage options)."""

    def table(name: str, d: dict[str, Any]) -> list[str]:
        out = [f"[{name}]", *(f"{k} = {json.dumps(v)}" for k, v in d.items() if not isinstance(v, dict))]
        for k, v in d.items():
            if isinstance(v, dict):
                out += table(f"{name}.{k}", v)
        return out

    lines = ["model = 'shared-model'", *table("layout", LAYOUT.to_dict()), "[[tiers]]", *table("tiers", tier)[1:]]
    path.write_text("\n".join(lines) + "\n")
    return path


# Process A: mount the config, put N blocks derived from a seed, report what it stored, the keys it
# computed and its tier's data path.
WRITER = """
import json, sys
import numpy as np
from kvbm_fs import mount
cfg, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = mount(config=cfg, env={})
keys = store.keys(np.random.default_rng(seed).integers(0, 50_000, n * 16))
data = np.random.default_rng(seed + 1).integers(0, 256, (n, store.default_namespace.block_nbytes), dtype=np.uint8)
ok = store.put(keys, data)
tier = store.stats()["tiers"][0]
print(json.dumps({"stored": int(ok.sum()), "hashes": [int(h) for h in keys.hashes.tolist()], "io": tier.get("io")}))
store.close()
"""


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports kvbm_fs from this checkout."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def writer_report(cfg: Path, n: int, seed: int) -> dict[str, Any]:
    """Run WRITER in another process; its JSON report."""
    a = run_python(WRITER, str(cfg), str(n), str(seed))
    assert a.returncode == 0, a.stderr[-3000:]
    out: dict[str, Any] = json.loads(a.stdout.strip().splitlines()[-1])
    return out
