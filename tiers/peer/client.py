"""The client side: :class:`PeerTier`, a peer's host tier mounted as ``peer://HOST:PORT``."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import numpy as np

from kvbm_fs import codec
from kvbm_fs.errors import (
    ConfigError,
    KvbmError,
    LayoutMismatchError,
    TierClosedError,
)
from kvbm_fs.events import VERIFY, EventBus, EventKind
from kvbm_fs.keys import BlockKeys, Namespace
from kvbm_fs.policy import EvictionPolicy
from kvbm_fs.resilience import CircuitBreaker
from kvbm_fs.rows import copy_rows
from kvbm_fs.tier import Medium, Tier
from kvbm_fs.tiers.peer.wire import (
    _ERRORS,
    _PRESENT,
    HDR,
    PROTOCOL,
    SPIN_S,
    TOKEN_ENV,
    PeerUnavailableError,
    _Down,
    _host_rows,
    _key_blob,
    _nixl_agent,
    _parse_address,
    _recv,
    _send,
    _xxh128,
)
from kvbm_fs.units import parse_size


class PeerTier(Tier):
    """A peer's exported host tier, as a tier of this process (``peer://HOST:PORT``)."""

    medium = Medium.PEER
    persistent = False
    shareable = True  # any number of processes may open it at once (vLLM's scheduler does, beside its workers)

    def __init__(
        self,
        address: str,
        block_nbytes: int,
        *,
        name: str = "peer",
        block_size: int | None = None,
        events: EventBus | None = None,
        policy: EvictionPolicy | str | None = None,
        timeout: float = 5.0,
        staging: int | str = "256MiB",
        breaker_threshold: int = 3,
        breaker_cooldown: float = 5.0,
        token: str | None = None,
        lazy: bool = False,
    ) -> None:
        self.name, self.block_nbytes, self.block_size = name, int(block_nbytes), block_size
        self._token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.events = events or EventBus()
        self.addr = _parse_address(address)
        if not (0 < timeout < 3600):
            raise ConfigError(f"peer tier: timeout must be seconds in (0, 3600), got {timeout!r}")
        self.timeout = float(timeout)
        self.breaker = CircuitBreaker(int(breaker_threshold), float(breaker_cooldown))
        stage = parse_size(staging, "peer staging")
        self.rows = max(1, stage // (self.block_nbytes + HDR))
        self.counters = dict(rpc_errors=0, transfer_errors=0, load_failures=0, dropped_puts=0, reconnects=0,
                             skipped_open_breaker=0, bytes_read=0, bytes_written=0)  # fmt: skip
        self._lock = threading.RLock()
        self._namespaces: dict[int, dict[str, Any]] = {}
        self._sock: socket.socket | None = None
        self._owed = 0  # answers to requests sent without waiting, still to be read
        self._remote: str | None = None
        self._info: dict[str, Any] = {}
        self._closed = False
        self._stuck: list[Any] | None = None  # what a transfer that could not be cancelled may still touch
        self.agent = _nixl_agent("kvbm-peer")
        self._stage = np.zeros((self.rows, HDR + self.block_nbytes), np.uint8)
        self._stage_reg = self.agent.register_memory(
            [(int(self._stage.ctypes.data), self._stage.nbytes, 0, "")], "DRAM"
        )
        try:
            self._connect()
        except KvbmError:  # refused token, wrong layout (PeerAuthError is an OSError too)
            self.close()
            raise
        except (_Down, OSError) as e:
            if lazy:  # a pool member: a miss until the breaker's probe finds it up
                self.breaker.record(False)
                self._disconnect()
                return
            self.close()
            raise PeerUnavailableError(f"peer tier {name!r}: cannot reach peer {self.url}: {e}") from None
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_options(cls, location: str, options: dict[str, Any], **common: Any) -> Tier:
        for k, conv in (("timeout", float), ("breaker_threshold", int), ("breaker_cooldown", float)):
            if k in options:
                try:
                    options[k] = conv(options[k])
                except ValueError:
                    raise ConfigError(f"peer tier option {k}={options[k]!r} is not a number") from None
        if "," in location:
            from kvbm_fs.tiers.peer.pool import PeerPool  # the pool is made of PeerTiers

            return PeerPool(location.split(","), **common, **options)
        return cls(location, **common, **options)

    @property
    def url(self) -> str:
        return f"peer://{self.addr[0]}:{self.addr[1]}"

    def __repr__(self) -> str:
        return f"PeerTier({self.url!r}, name={self.name!r})"

    # ---- connection -----------------------------------------------------------------------
    def _connect(self) -> None:
        """(Re)open the control connection and learn the peer's slab; a restarted peer has a new one."""
        self._disconnect()
        try:
            sock = socket.create_connection(self.addr, timeout=self.timeout)
        except OSError as e:
            raise _Down(str(e)) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        try:  # a connection is kept only once the whole handshake succeeded
            info, md = self._call({"op": "hello", "protocol": PROTOCOL, "token": self._token})
            if int(info["block_nbytes"]) != self.block_nbytes:
                raise LayoutMismatchError(
                    f"peer {self.url} holds {info['block_nbytes']}-byte blocks; tier {self.name!r} needs {self.block_nbytes}"
                )
            try:
                self._remote = self.agent.add_remote_agent(bytes(md))
            except Exception as e:  # NIXL could not load the peer's metadata
                raise _Down(f"NIXL refused the peer's metadata: {e}") from None
            self._info = info
            for doc in self._namespaces.values():
                self._call({"op": "bind", "namespace": doc})
        except BaseException:
            self._disconnect()
            raise

    def _disconnect(self) -> None:
        self._owed = 0
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._remote is not None:
            try:
                self.agent.remove_remote_agent(self._remote)
            except Exception:  # the peer is gone either way
                pass
            self._remote = None

    def _call(self, doc: dict[str, Any], blob: bytes = b"", wait: bool = True) -> tuple[dict[str, Any], bytearray]:
        """One request and its answer; _Down if the peer can't be talked to, misuse re-raised.
        ``wait=False`` sends without waiting: its answer is read (and dropped) before the next one,
        since the peer answers a connection's requests in order (saves a round trip per release)."""
        if self._sock is None:
            raise _Down("not connected")
        try:
            _send(self._sock, doc, blob)
            if not wait:
                self._owed += 1
                return {}, bytearray()
            while self._owed:
                _recv(self._sock)
                self._owed -= 1
            reply, out = _recv(self._sock)
        except (OSError, ValueError) as e:
            self._disconnect()
            raise _Down(str(e) or type(e).__name__) from None
        if "error" in reply:
            misuse = _ERRORS.get(str(reply["error"]))
            if misuse is None:  # the peer failed (or didn't understand): not the caller's doing
                raise _Down(f"peer error {reply['error']}: {reply.get('msg', '')}")
            raise misuse(f"peer {self.url}: {reply.get('msg', '')}")
        return reply, out

    def _rpc(self, doc: dict[str, Any], blob: bytes = b"") -> tuple[dict[str, Any], bytearray]:
        """_call behind the breaker, reconnecting if the last call lost the connection."""
        self._live()
        if not self.breaker.allow():
            self.counters["skipped_open_breaker"] += 1
            raise _Down("circuit breaker open")
        try:
            if self._sock is None:
                self.counters["reconnects"] += 1
                try:
                    self._connect()
                except KvbmError as e:  # e.g. a restarted peer with another token: a miss, not a raise
                    raise _Down(str(e)) from None
            out = self._call(doc, blob)
        except _Down:
            self.counters["rpc_errors"] += 1
            self.breaker.record(False)
            raise
        except KvbmError:
            self.breaker.record(True)  # the peer answered: it is up, the request was wrong
            raise
        self.breaker.record(True)
        return out

    def _keys_rpc(self, op: str, keys: BlockKeys, **extra: Any) -> tuple[dict[str, Any], bytearray]:
        return self._rpc({"op": op, "ns": keys.ns, "n": len(keys), **extra}, _key_blob(keys, op == "reserve"))

    # ---- data path ------------------------------------------------------------------------
    def _transfer(self, op: str, local: np.ndarray, remote: np.ndarray) -> None:
        """One NIXL transfer, polled to a deadline; _Down if it fails or stalls."""
        a = self.agent
        try:
            h = a.initialize_xfer(op, a.get_xfer_descs(local, "DRAM"), a.get_xfer_descs(remote, "DRAM"), self._remote)
        except Exception as e:  # NIXL raises its own types
            self._transfer_failed(f"{op} refused: {e}")
        try:
            state = a.transfer(h)
            t0 = time.monotonic()
            deadline = t0 + self.timeout
            while state not in ("DONE", "ERR") and (now := time.monotonic()) < deadline:
                if now - t0 > SPIN_S:  # past a normal batch's time: poll gently, don't burn a core
                    time.sleep(1e-4)
                state = a.check_xfer_state(h)
        except Exception:  # NIXL raises for some failures (a peer that died: nixlRemoteDisconnectError)
            state = "ERR"
        if state != "DONE":
            self._abandon(h, state)
        a.release_xfer_handle(h)

    def _abandon(self, handle: Any, state: str) -> None:
        """A failed or stalled transfer: the staging buffer may still be written, so take a new one."""
        try:
            self.agent.release_xfer_handle(handle)
        except Exception:  # can't cancel: leave buffers and registrations to it
            self._stuck = [] if self._stuck is None else self._stuck
            self._stuck.append((handle, self._stage, self._stage_reg))
            self._stage = np.zeros_like(self._stage)
            self._stage_reg = self.agent.register_memory(
                [(int(self._stage.ctypes.data), self._stage.nbytes, 0, "")], "DRAM"
            )
        self._transfer_failed("transfer " + ("timed out" if state != "ERR" else "failed"))

    def _transfer_failed(self, why: str) -> NoReturn:
        self.counters["transfer_errors"] += 1
        self.breaker.record(False)
        self._disconnect()  # the peer may have restarted: reconnect (and re-learn its memory) next time
        raise _Down(why)

    def _rows_at(
        self, slots: np.ndarray, with_header: bool, rows: np.ndarray | None = None, at: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Descriptor arrays ``[k, 3]`` (address, length, device) for ``slots``: headers to/from
        staging rows, payloads to/from staging rows or, given host ``rows``, straight to/from
        ``rows[at]`` (no staging copy); with headers, each block's header comes before its payload."""
        s = slots.astype(np.uint64)
        n = s.size
        me, width = np.uint64(self._stage.ctypes.data), np.uint64(self._stage.shape[1])
        stage_rows = me + np.arange(n, dtype=np.uint64) * width
        if rows is not None and at is not None:
            payload = np.uint64(rows.ctypes.data) + at.astype(np.uint64) * np.uint64(rows.strides[0])
        else:
            payload = stage_rows + np.uint64(HDR)
        remote_payload = np.uint64(self._info["base"]) + s * np.uint64(self._info["stride"])
        k = 2 if with_header else 1
        local, remote = np.zeros((n * k, 3), np.uint64), np.zeros((n * k, 3), np.uint64)
        local[k - 1 :: k, 0], local[k - 1 :: k, 1] = payload, self.block_nbytes
        remote[k - 1 :: k, 0], remote[k - 1 :: k, 1] = remote_payload, self.block_nbytes
        if with_header:
            local[0::2, 0], local[0::2, 1] = stage_rows, HDR
            remote[0::2, 0], remote[0::2, 1] = np.uint64(self._info["hdr"]) + s * np.uint64(HDR), HDR
        return local, remote

    @contextmanager
    def _registered(self, rows: np.ndarray | None) -> Iterator[None]:
        """The caller's rows registered with NIXL for one transfer (UCX caches it: ~µs after the first)."""
        if rows is None or len(rows) == 0:
            yield
            return
        span = rows.strides[0] * (rows.shape[0] - 1) + rows.shape[1]
        reg = self.agent.register_memory([(int(rows.ctypes.data), span, 0, "")], "DRAM")
        try:
            yield
        finally:
            if self._stuck is None:
                self.agent.deregister_memory(reg)
            else:  # a transfer that could not be cancelled may still touch these rows
                self._stuck.append(reg)

    def get(self, keys: BlockKeys, out: Any) -> np.ndarray:
        self._check_rows(keys, out, "get")
        return self.get_rows(keys, out, np.arange(len(keys)))

    def get_rows(self, keys: BlockKeys, out: Any, rows: np.ndarray) -> np.ndarray:
        """get, with key ``i`` landing in ``out[rows[i]]`` (a pool hands each peer its share of rows)."""
        return self._chunked(keys, rows, lambda k, r: self._get_chunk(k, out, r), None)

    def _chunked(
        self,
        keys: BlockKeys,
        rows: np.ndarray,
        fn: Callable[[BlockKeys, np.ndarray], np.ndarray],
        on_down: Callable[[BlockKeys, _Down], None] | None,
    ) -> np.ndarray:
        """``fn`` over staging-sized chunks under the lock; a chunk the peer fails is all False."""
        done = np.zeros(len(keys), bool)
        with self._lock:
            for lo in range(0, len(keys), self.rows):
                part = keys[lo : lo + self.rows]
                try:
                    done[lo : lo + len(part)] = fn(part, rows[lo : lo + len(part)])
                except _Down as e:
                    if on_down is not None:
                        on_down(part, e)
        return done

    def _get_chunk(self, keys: BlockKeys, out: Any, rows: np.ndarray) -> np.ndarray:
        reply, blob = self._keys_rpc("lookup", keys)
        slots = np.frombuffer(blob, np.int64)
        idx = np.flatnonzero(slots >= 0)
        direct = _host_rows(out)  # payloads land in the caller's rows; a row that fails its check is
        at = rows[idx]  # a miss with unspecified content (the Tier contract), as on disk tiers
        try:
            if idx.size:
                with self._registered(direct):
                    self._transfer("READ", *self._rows_at(slots[idx], True, direct, at))
                self.counters["bytes_read"] += int(idx.size) * (self.block_nbytes + HDR)
        finally:
            self._release([int(reply["lease"])])
        payloads = [direct[r] for r in at.tolist()] if direct is not None else list(self._stage[: idx.size, HDR:])
        ok = self._verified(keys[idx], payloads)
        if direct is None:
            copy_rows(out, at[ok], self._stage[:, HDR:], np.flatnonzero(ok))
        found = np.zeros(len(keys), bool)
        found[idx[ok]] = True
        return found

    def _release(self, leases: list[int]) -> None:
        if self._sock is None:
            return  # the connection is gone, and the peer dropped its leases with it
        try:
            self._call({"op": "release", "leases": leases}, wait=False)
        except _Down:
            pass  # the peer drops a dead connection's leases itself

    def _verified(self, keys: BlockKeys, payloads: list[np.ndarray]) -> np.ndarray:
        n = len(payloads)
        ok, why = codec.verify_batch(self._stage[:n, :HDR], keys.ns, keys.hashes, payloads, self.block_nbytes)
        if why is not None:
            self.counters["load_failures"] += int((~ok).sum())
            self.events.publish(EventKind.LOAD_FAILED, self.name, keys[np.flatnonzero(~ok)], why, VERIFY)
        return ok

    def put(self, keys: BlockKeys, data: Any) -> np.ndarray:
        self._check_rows(keys, data, "put")
        return self.put_rows(keys, data, np.arange(len(keys)))

    def put_rows(self, keys: BlockKeys, data: Any, rows: np.ndarray) -> np.ndarray:
        """put, with key ``i``'s bytes taken from ``data[rows[i]]``."""

        def dropped(part: BlockKeys, e: _Down) -> None:
            self.counters["dropped_puts"] += len(part)
            self.events.publish(EventKind.STORE_FAILED, self.name, part, f"peer write dropped: {e}")

        return self._chunked(keys, rows, lambda k, r: self._put_chunk(k, data, r), dropped)

    def _put_chunk(self, keys: BlockKeys, data: Any, rows_of: np.ndarray) -> np.ndarray:
        reply, blob = self._keys_rpc("reserve", keys)
        code = np.frombuffer(blob, np.int64)
        done = code == _PRESENT
        w = np.flatnonzero(code >= 0)
        if w.size == 0:
            return done
        lease = int(reply["lease"])
        direct, at = _host_rows(data), rows_of[w]
        try:
            if direct is None:
                copy_rows(self._stage[:, HDR:], np.arange(w.size), data, at)
            rows = [direct[r] for r in at.tolist()] if direct is not None else list(self._stage[: w.size, HDR:])
            sums = np.array([_xxh128(r) for r in rows], np.uint64).reshape(-1, 2)
            with self._registered(direct):
                self._transfer("WRITE", *self._rows_at(code[w], False, direct, at))
            self.counters["bytes_written"] += int(w.size) * self.block_nbytes
        except BaseException:
            self._release([lease])
            raise
        _, okb = self._rpc({"op": "commit", "lease": lease}, sums.tobytes())
        ok = np.frombuffer(okb, bool)
        done[w[ok]] = True
        if (~ok).any():
            self.counters["dropped_puts"] += int((~ok).sum())
            self.events.publish(EventKind.STORE_FAILED, self.name, keys[w[~ok]], "peer rejected a torn write")
        if ok.any():
            self.events.publish(EventKind.STORED, self.name, keys[w[ok]])
        return done

    # ---- bookkeeping ------------------------------------------------------------------------
    def _mask(self, op: str, keys: BlockKeys) -> np.ndarray:
        if len(keys) == 0:
            return np.zeros(0, bool)
        with self._lock:
            try:
                return np.frombuffer(self._keys_rpc(op, keys)[1], bool).copy()
            except _Down:
                return np.zeros(len(keys), bool)

    def contains(self, keys: BlockKeys) -> np.ndarray:
        return self._mask("contains", keys)

    def pinned(self, keys: BlockKeys) -> np.ndarray:
        return self._mask("pinned", keys)

    def delete(self, keys: BlockKeys) -> np.ndarray:
        done = self._mask("delete", keys)
        if done.any():
            self.events.publish(EventKind.REMOVED, self.name, keys[done])
        return done

    def pin(self, keys: BlockKeys) -> np.ndarray:
        return self._mask("pin", keys)

    def unpin(self, keys: BlockKeys) -> None:
        if len(keys):
            with self._lock:
                try:
                    self._keys_rpc("unpin", keys)
                except _Down:
                    pass  # the peer dropped this connection's pins with it

    def prefix_len(self, keys: BlockKeys) -> int:
        if len(keys) == 0:
            return 0
        with self._lock:
            try:
                return int(self._keys_rpc("prefix", keys)[0]["n"])
            except _Down:
                return 0

    def iter_keys(self) -> Iterator[BlockKeys]:
        with self._lock:
            try:
                pairs = np.frombuffer(self._rpc({"op": "keys"})[1], np.uint64).reshape(-1, 2)
            except _Down:
                return iter(())
        return iter([BlockKeys(int(ns), pairs[pairs[:, 0] == ns, 1].copy()) for ns in np.unique(pairs[:, 0]).tolist()])

    def bind_namespace(self, ns: Namespace) -> None:
        super().bind_namespace(ns)
        with self._lock:
            self._namespaces[ns.id] = ns.to_dict()
            try:
                self._rpc({"op": "bind", "namespace": ns.to_dict()})
            except _Down:
                pass  # bound again on reconnect

    def _remote_stats(self) -> dict[str, Any]:
        with self._lock:
            try:
                return self._rpc({"op": "stats"})[0]
            except _Down:
                return {}

    @property
    def capacity_bytes(self) -> int:
        return int(self._info.get("slots", 0)) * self.block_nbytes

    @property
    def used_bytes(self) -> int:
        return int(self._remote_stats().get("used_bytes", 0))

    def __len__(self) -> int:
        return int(self._remote_stats().get("blocks", 0))

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s.update(url=self.url, breaker=self.breaker.state, connected=self._sock is not None, **self.counters)
        return s

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._disconnect()
            try:
                self.agent.deregister_memory(self._stage_reg)
            except Exception:  # best effort at shutdown
                pass

    def _live(self) -> None:
        if self._closed:
            raise TierClosedError(f"tier {self.name!r} is closed")
