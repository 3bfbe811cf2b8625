"""The slice of ``mooncake.store.MooncakeDistributedStore`` the tier uses: setup, registered staging
rows, string keys built per batch, and the status codes sorted into answers and failures.

Mooncake answers every call with integers, never exceptions: ``0`` (or a byte count) is success,
a negative number an ``ErrorCode`` from its ``types.h``.  Only the codes below matter here.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, ClassVar

import numpy as np

from kvbm_fs.tiers.mooncake.config import MooncakeConfig, MooncakeUnavailableError

OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
TRANSFER_FAIL = -800
RPC_FAIL = -900
RPC_TIMEOUT = -901


def down(codes: np.ndarray) -> bool:
    """Did the master fail to answer (RPC and HA errors, -900..-1099)? Every other code is an answer:
    success, not found, no space, a lease, or a transfer that failed at a segment's holder."""
    return bool(((codes <= RPC_FAIL) & (codes > -1100)).any())


def key_strings(prefix: str, ns: int, hashes: np.ndarray) -> list[str]:
    """``prefix/<ns:016x>/<hash:016x>`` for each hash, built in numpy (Mooncake takes a list of str)."""
    if hashes.size == 0:
        return []
    hexes = np.frombuffer(np.asarray(hashes, ">u8").tobytes().hex().encode(), "S16")
    return np.char.add(f"{prefix}/{ns:016x}/".encode(), hexes).astype(str).tolist()


def parse_keys(keys: list[str], prefix: str) -> dict[int, np.ndarray]:
    """Listed key strings under ``prefix`` -> {namespace id: hashes}; foreign shapes are skipped."""
    n = len(prefix) + 1
    out: dict[int, list[int]] = {}
    for k in keys:
        ns, _, h = k[n:].partition("/")
        if len(ns) == 16 and len(h) == 16:
            try:
                out.setdefault(int(ns, 16), []).append(int(h, 16))
            except ValueError:
                continue
    return {ns: np.array(sorted(hs), np.uint64) for ns, hs in out.items()}


class Staging:
    """Registered host rows ``[rows, object_bytes]`` for one direction, used under a lock.

    A transfer that failed may still land in its rows later (Mooncake's own connectors note this), so
    rows that saw a failed transfer are retired for good (left registered, never reused) and fresh
    ones are registered in their place."""

    def __init__(self, store: Any, rows: int, object_bytes: int) -> None:
        self.store, self.rows, self.object_bytes = store, rows, object_bytes
        self.lock = threading.Lock()
        self.retired: list[np.ndarray] = []
        self.buf = self._register()

    def _register(self) -> np.ndarray:
        from kvbm_fs.rows import aligned_rows

        buf = aligned_rows(self.rows, self.object_bytes)
        rc = self.store.register_buffer(buf.ctypes.data, buf.nbytes)
        if rc != 0:
            raise MooncakeUnavailableError(f"mooncake: registering {buf.nbytes} B of staging rows failed ({rc})")
        return buf

    def ptrs(self, n: int) -> list[int]:
        return (self.buf.ctypes.data + np.arange(n, dtype=np.int64) * self.object_bytes).tolist()

    def retire(self) -> None:
        self.retired.append(self.buf)
        self.buf = self._register()

    def release(self) -> None:
        for b in [self.buf, *self.retired]:
            self.store.unregister_buffer(b.ctypes.data)


class Client:
    """One ``MooncakeDistributedStore`` joined to the pool, with a staging area per direction.

    Tiers of one process on the same pool (same master, metadata, address and segment settings)
    share one joined store, so a process lends one segment however many tiers it mounts, and
    joining and leaving (about 2 s, Mooncake's heartbeat) happen once; each tier has its own
    staging rows."""

    _joined: ClassVar[dict[tuple[Any, ...], list[Any]]] = {}  # join key -> [store, ReplicateConfig class, users]
    _join_lock = threading.Lock()

    def __init__(self, cfg: MooncakeConfig, object_bytes: int) -> None:
        self.cfg, self.object_bytes = cfg, object_bytes
        self._key = (cfg.master, cfg.metadata, cfg.hostname, cfg.protocol, cfg.rdma_devices, cfg.segment,
                     cfg.local_buffer)  # fmt: skip
        with self._join_lock:
            entry = self._joined.get(self._key)
            if entry is None:
                entry = self._joined[self._key] = [*_join(cfg), 0]
            entry[2] += 1
        self.store = entry[0]
        self.replicate = entry[1]()
        self.replicate.replica_num = cfg.replicas
        rows = max(1, (cfg.staging or 64 * object_bytes) // object_bytes)
        try:
            self.put_rows = Staging(self.store, rows, object_bytes)
            self.get_rows = Staging(self.store, rows, object_bytes)
        except BaseException:
            self._leave()
            raise

    def healthy(self) -> bool:
        """False once the client's heartbeat has found the master gone (a local check, no round trip)."""
        return int(self.store.health_check()) != 2

    def put(self, keys: list[str], stage: Staging, n: int) -> np.ndarray:
        return np.asarray(
            self.store.batch_put_from(keys, stage.ptrs(n), [self.object_bytes] * n, self.replicate), np.int64
        )

    def upsert(self, keys: list[str], stage: Staging, n: int, config: Any) -> np.ndarray:
        """Write the first ``n`` staging rows over the objects ``keys`` (with ``config``'s soft pin)."""
        return np.asarray(self.store.batch_upsert_from(keys, stage.ptrs(n), [self.object_bytes] * n, config), np.int64)

    def pin_config(self, pin: bool) -> Any:
        """A ReplicateConfig that soft-pins (for ``retain_ttl`` after each use) or unpins what it writes.
        Mooncake 0.3.13 says it with ``soft_pin_action``; older wheels with ``with_soft_pin``."""
        rc = type(self.replicate)()
        rc.replica_num = self.cfg.replicas
        if hasattr(rc, "soft_pin_action"):
            from mooncake.store import SoftPinAction

            rc.soft_pin_action = SoftPinAction.ENABLE if pin else SoftPinAction.DISABLE
            if pin:
                rc.soft_pin_ttl_ms = max(1, int(self.cfg.retain_ttl * 1000))
        else:
            rc.with_soft_pin = pin
        return rc

    def get(self, keys: list[str], stage: Staging, n: int) -> np.ndarray:
        return np.asarray(self.store.batch_get_into(keys, stage.ptrs(n), [self.object_bytes] * n), np.int64)

    def exist(self, keys: list[str]) -> np.ndarray:
        return np.asarray(self.store.batch_is_exist(keys), np.int64)

    def remove(self, keys: list[str]) -> np.ndarray:
        """Remove even under a read lease: a reader racing a delete fails verification, a clean miss."""
        return np.asarray(self.store.batch_remove(keys, True), np.int64)

    def close(self) -> None:
        for s in (getattr(self, "put_rows", None), getattr(self, "get_rows", None)):
            if s is not None:
                s.release()
        self._leave()

    def _leave(self) -> None:
        with self._join_lock:
            entry = self._joined[self._key]
            entry[2] -= 1
            if entry[2]:
                return
            del self._joined[self._key]
        entry[0].close()


def _join(cfg: MooncakeConfig) -> tuple[Any, Any]:
    """Set up a client in the pool; a master that does not answer fails in seconds, not after
    Mooncake's 20 set-up retries (about 90 s)."""
    from kvbm_fs.nixl_api import pin_system_rdma

    host, _, port = cfg.master.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise MooncakeUnavailableError(f"mooncake: the master at {cfg.master} does not answer ({e})") from None
    # Mooncake's INFO log is a page per client; the transfer engine advertises the first active
    # interface unless told the address to use. Both only where the environment says nothing.
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
    if cfg.protocol == "tcp":
        os.environ.setdefault("MC_TCP_BIND_ADDRESS", cfg.hostname)
    pin_system_rdma()  # before Mooncake's libibverbs: the exit crash NIXL's UCX had (kvbm_fs.nixl_api)
    try:
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig
    except ImportError as e:
        raise ImportError(f"the mooncake tier needs the mooncake extra (pip install 'kvbm-fs[mooncake]'): {e}") from e
    store = MooncakeDistributedStore()
    rc = store.setup(cfg.hostname, cfg.metadata, cfg.segment, cfg.local_buffer, cfg.protocol, cfg.rdma_devices,
                     cfg.master)  # fmt: skip
    if rc != 0:
        raise MooncakeUnavailableError(
            f"mooncake: cannot join the pool at {cfg.master} (metadata {cfg.metadata}, setup returned {rc})"
        )
    return store, ReplicateConfig
