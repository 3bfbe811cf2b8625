"""The serving side: :class:`PeerServer` exports a host tier's slab to peers."""

from __future__ import annotations

import hmac
import logging
import os
import socket
import threading
from collections import Counter
from typing import Any

import numpy as np

from kvbm_fs import codec
from kvbm_fs.errors import (
    ConfigError,
    IllegalTransitionError,
    TierClosedError,
)
from kvbm_fs.keys import BlockKeys, Namespace
from kvbm_fs.net import Listener
from kvbm_fs.tier import SlotTier
from kvbm_fs.tiers.peer.wire import (
    _PRESENT,
    _REFUSED,
    HDR,
    PROTOCOL,
    TOKEN_ENV,
    PeerAuthError,
    _keepalive,
    _keys,
    _nixl_agent,
    _recv,
    _send,
)

log = logging.getLogger(__name__)


class _Session:
    """What one client connection holds on the server: read leases, write reservations, pins."""

    def __init__(self) -> None:
        self.leases: dict[int, np.ndarray] = {}  # lease id -> pinned slots (lookups and reservations)
        self.writes: dict[int, tuple[BlockKeys, np.ndarray]] = {}  # lease id -> (keys, reserved slots)
        self.pins: Counter[int] = Counter()  # slot -> pins taken through Tier.pin
        self.next = 0
        self.authed = False


class PeerServer:
    """Serve one host-memory :class:`SlotTier` to peers until :meth:`close`.

    The tier stays fully usable by its own process; peers see what it holds, and what they put
    is matchable here too.  ``host`` is where the control port listens (``0.0.0.0`` to serve other
    machines: UCX then picks a network transport for the data)."""

    def __init__(
        self,
        tier: SlotTier,
        host: str = "127.0.0.1",
        port: int = 0,
        progress_s: float = 0.001,
        token: str | None = None,
    ) -> None:
        buf = tier.buf
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 2:
            raise ConfigError(f"tier {tier.name!r}: only host-memory tiers (numpy slabs) can be served to peers")
        self.tier = tier
        self._token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.slots, self.block_nbytes = int(buf.shape[0]), int(buf.shape[1])
        self.stride = int(buf.strides[0])
        self.base = int(buf.ctypes.data)
        self.hdr = np.zeros((self.slots, HDR), np.uint8)
        self.hdr_key = np.zeros((self.slots, 2), np.uint64)  # (ns, hash) each header row was made for
        self.hdr_ok = np.zeros(self.slots, bool)
        self.agent = _nixl_agent("kvbm-peer-srv")
        span = self.stride * (self.slots - 1) + self.block_nbytes
        self._reg = self.agent.register_memory(
            [(self.base, span, 0, ""), (int(self.hdr.ctypes.data), self.hdr.nbytes, 0, "")], "DRAM"
        )
        self.metadata = bytes(self.agent.get_agent_metadata())  # fixed from here on; the agent is the pump's
        self.progress_s = float(progress_s)
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.counters = dict(connections=0, lookups=0, reads_leased=0, commits=0, commit_rejected=0, headers_made=0)
        self._listener = Listener(host, port, self._serve, name="kvbm-peer", nodelay=True)
        self.host, self.port = host, self._listener.port
        self._pumper = threading.Thread(target=self._pump, daemon=True, name=f"kvbm-peer-ucx-{self.port}")
        self._pumper.start()

    def _pump(self) -> None:
        """Progress UCX every ``progress_s``: transports that emulate one-sided reads and writes
        (TCP, shared memory) need the target to progress before a transfer completes.  At 1 ms it
        costs about 2% of a core idle, and a 64 MiB READ still ran at 17 GB/s on loopback."""
        while not self._stop.wait(self.progress_s):
            self.agent.get_new_notifs()

    @property
    def url(self) -> str:
        """Where clients reach this server: a wildcard listen address is advertised as this host's name."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return f"peer://{host}:{self.port}"

    def _serve(self, conn: socket.socket) -> None:
        _keepalive(conn)
        s = _Session()
        with self._lock:
            self._conns.add(conn)
            self.counters["connections"] += 1
        try:
            while True:
                # before hello, a stranger gets no large buffers out of us
                doc, blob = _recv(conn) if s.authed else _recv(conn, 4096, 0)
                try:
                    reply, out = self._op(doc, blob, s)
                except Exception as e:  # misuse, a malformed request, or a bug here: the client decides
                    reply, out = {"error": type(e).__name__, "msg": str(e)}, b""
                _send(conn, reply, out)
        except (OSError, ValueError):
            pass  # the client went away (or spoke nonsense): drop what it held
        finally:
            self._drop(s)
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _drop(self, s: _Session) -> None:
        held = [*s.leases.values(), *(sl for _, sl in s.writes.values())]
        held.append(np.fromiter(s.pins.elements(), np.int64))
        for slots in held:
            try:
                self.tier.release(slots)
            except (IllegalTransitionError, TierClosedError):
                pass

    def _op(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        op = doc.get("op")
        fn = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
        if fn is None:
            raise ValueError(f"unknown peer operation {op!r}")
        if op != "hello" and not s.authed:
            raise PeerAuthError("say hello (with the token) first")
        result: tuple[dict[str, Any], bytes] = fn(doc, blob, s)
        return result

    # ---- operations (each answers (doc, blob)) ---------------------------------------------
    def _op_hello(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        if doc.get("protocol") != PROTOCOL:
            raise ConfigError(f"peer speaks protocol {PROTOCOL}, client {doc.get('protocol')!r}")
        if self._token is not None and not hmac.compare_digest(str(doc.get("token") or ""), self._token):
            raise PeerAuthError("the peer refused this client's token (KVBM_FS_PEER_TOKEN / ?token=)")
        s.authed = True
        info = dict(protocol=PROTOCOL, name=self.tier.name, slots=self.slots, block_nbytes=self.block_nbytes,
                    stride=self.stride, base=self.base, hdr=int(self.hdr.ctypes.data))  # fmt: skip
        return info, self.metadata

    def _op_bind(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        self.tier.bind_namespace(Namespace.from_dict(doc["namespace"]))
        return {}, b""

    def _lease(self, s: _Session, slots: np.ndarray) -> int:
        s.next += 1
        s.leases[s.next] = slots
        return s.next

    def _op_lookup(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        keys = _keys(doc, blob)
        slots = self.tier.acquire(keys)
        self.counters["lookups"] += 1
        hit = np.flatnonzero(slots >= 0)
        self.counters["reads_leased"] += int(hit.size)
        self._headers(keys[hit], slots[hit])
        return {"lease": self._lease(s, slots[hit])}, slots.astype(np.int64).tobytes()

    def _headers(self, keys: BlockKeys, slots: np.ndarray) -> None:
        """Make the header rows a reader checks, for pinned slots whose row is for another key."""
        mine = self.hdr_ok[slots] & (self.hdr_key[slots, 0] == keys.ns) & (self.hdr_key[slots, 1] == keys.hashes)
        for i in np.flatnonzero(~mine).tolist():
            slot = int(slots[i])
            self._write_header(slot, keys[i], int(keys.parents[i]))

    def _write_header(self, slot: int, key: Any, parent: int, checksum: int | None = None) -> None:
        head = codec.encode_header(key, parent, 0, self.tier.buf[slot], checksum=checksum)
        self.hdr[slot] = np.frombuffer(head, np.uint8)
        self.hdr_key[slot] = (key.ns, key.seq_hash)
        self.hdr_ok[slot] = True
        self.counters["headers_made"] += 1

    def _op_release(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        for lease in doc["leases"]:
            slots = s.leases.pop(int(lease), None)
            if slots is not None:
                self.tier.release(slots)
            w = s.writes.pop(int(lease), None)
            if w is not None:
                self.tier.release(w[1])
        return {}, b""

    def _op_reserve(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        """SlotTier.put up to the copy: present keys, admission, then as many slots as fit."""
        keys = _keys(doc, blob)
        t = self.tier
        t.admission.seen(keys)
        held = t.acquire(keys)  # pins what is already here, so making room cannot evict it
        try:
            code = np.where(held >= 0, _PRESENT, _REFUSED).astype(np.int64)
            todo = t.admission.trim(t, keys, np.flatnonzero(held < 0), t.pool.num_free)
            slots = t.reserve(todo.size) if todo.size else None
            if todo.size and slots is None:
                room = t.pool.num_free + (t.pool.num_evictable if t.evict_on_put else 0)
                slots = t.reserve(min(todo.size, room)) if room else None
        finally:
            t.release(held)
        lease = 0
        if slots is not None and slots.size:
            todo = todo[: slots.size]
            code[todo] = slots
            s.next += 1
            lease = s.next
            s.writes[lease] = (keys[todo], slots)
        return {"lease": lease}, code.tobytes()

    def _op_commit(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        """Register the reserved slots whose bytes hash to what the writer sent; free the others."""
        keys, slots = s.writes.pop(int(doc["lease"]))
        want = np.frombuffer(blob, np.uint64).reshape(-1, 2)
        if want.shape[0] != slots.size:
            self.tier.release(slots)
            raise ValueError("commit: one checksum per reserved slot")
        ok = np.zeros(slots.size, bool)
        sums = []
        for i, slot in enumerate(slots.tolist()):
            c = codec.payload_checksum(self.tier.buf[slot])
            sums.append(c)
            ok[i] = (c & 0xFFFFFFFFFFFFFFFF) == int(want[i, 0]) and (c >> 64) == int(want[i, 1])
        self.counters["commits"] += int(ok.sum())
        self.counters["commit_rejected"] += int((~ok).sum())
        if (~ok).any():
            self.tier.release(slots[~ok])
        for i in np.flatnonzero(ok).tolist():  # headers first, while the slots are still this writer's:
            key = keys[i]  # made from the checksum just verified, and without touching the policy
            self._write_header(int(slots[i]), key, int(keys.parents[i]), sums[i])
        if ok.any():
            self.tier.publish(slots[ok], keys[ok])
        return {}, ok.tobytes()

    def _op_contains(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        return {}, self.tier.contains(_keys(doc, blob)).tobytes()

    def _op_pinned(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        return {}, self.tier.pinned(_keys(doc, blob)).tobytes()

    def _op_prefix(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        return {"n": self.tier.prefix_len(_keys(doc, blob))}, b""

    def _op_delete(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        return {}, self.tier.delete(_keys(doc, blob)).tobytes()

    def _op_pin(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        slots = self.tier.acquire(_keys(doc, blob))
        s.pins.update(slots[slots >= 0].tolist())
        return {}, (slots >= 0).tobytes()

    def _op_unpin(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        slots = self.tier.pool.lookup(_keys(doc, blob))
        need = Counter(slots.tolist())
        if -1 in need or any(s.pins[k] < v for k, v in need.items()):
            raise IllegalTransitionError(f"{self.tier.name}: unpin of blocks this client did not pin")
        s.pins.subtract(need)
        self.tier.release(slots)
        return {}, b""

    def _op_keys(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        batches = self.tier.pool.registered_keys()
        pairs = [np.stack((np.full(len(b), b.ns, np.uint64), b.hashes), 1) for b in batches]
        out = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.uint64)
        return {}, out.tobytes()

    def _op_stats(self, doc: dict[str, Any], blob: bytearray, s: _Session) -> tuple[dict[str, Any], bytes]:
        t = self.tier
        return {"blocks": len(t), "capacity_bytes": t.capacity_bytes, "used_bytes": t.used_bytes}, b""

    def close(self) -> None:
        """Stop serving: refuse new connections, cut the open ones (their leases are dropped)."""
        self._stop.set()
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._pumper.join(5)
        try:
            self.agent.deregister_memory(self._reg)
        except Exception:  # best effort at shutdown
            log.warning("peer server: deregistering memory failed", exc_info=True)

    def __enter__(self) -> PeerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_host_memory(
    capacity: int | str,
    block_nbytes: int,
    host: str = "127.0.0.1",
    port: int = 0,
    policy: str | None = None,
    token: str | None = None,
) -> PeerServer:
    """A host tier of ``capacity`` served to peers: a process that only lends its DRAM."""
    from kvbm_fs.tiers.host import HostTier

    return PeerServer(HostTier(capacity, block_nbytes, name="peer-pool", policy=policy), host, port, token=token)
