"""Peers: another process's host-memory tier, read and written over NIXL (UCX: shared memory,
TCP or RDMA, whichever UCX finds between the two).

A process *exports* one of its host tiers with :class:`PeerServer` (``Store.export_peer`` or
``kvbm-fs peer-serve``, a memory-only process that lends its DRAM).  Any process then mounts it as
``peer://HOST:PORT``: a :class:`PeerTier`, which passes the same conformance suite as every tier.

Two channels, as in vLLM's scheduler/worker split:

- **control** (a TCP connection, framed JSON plus a binary array): lookups, reservations, commits
  and bookkeeping.  The server answers from the exported tier's :class:`~kvbm_fs.lifecycle.SlotPool`
  and does no byte moving beyond hashing.
- **data** (NIXL UCX, one transfer per batch, posted by the client): the client READs header and
  payload rows out of the server's registered slab, or WRITEs payload rows into slots the server
  reserved for it.  The server's CPU never copies a block.

Correctness, because a peer is outside process memory:

- a lookup *pins* the found slots (a lease, tied to the connection) until the client has read
  them, so eviction can't reuse a slot mid-read; a client that dies drops its leases with its
  connection;
- next to its slab the server keeps one 128-byte :mod:`~kvbm_fs.codec` header per slot (key, length,
  xxh3-128 of the payload), made when a block is committed by a peer, or at the first lookup of a
  block the server stored itself; the client reads it with the payload and checks the key echo,
  the length and the checksum before a byte reaches the caller.  A failed check is a miss;
- a put is reserve -> WRITE -> commit: the client sends each block's xxh3-128 with the commit and
  the server re-hashes the slot before it registers the key, so a torn or misdirected write is
  never matchable; uncommitted reservations go back to the free list.

Faults (dead peer, refused connection, a transfer error or a stall past ``timeout``) are misses for
reads and dropped blocks for puts, counted, published as events, and behind a circuit breaker that
probes the peer again after ``breaker_cooldown`` seconds (and reconnects, so a restarted peer is
picked up).  Misuse (wrong layout, unpin without pin, delete of a pinned block) raises on the
client exactly as it would on the peer's own tier.

Access: with a token (``token=``, or ``KVBM_FS_PEER_TOKEN`` on both sides) a client must present it
in its first message before anything else is answered, the NIXL metadata included (without which
UCX can't address the slab).  The token never appears in a URL's repr, stats or errors.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, NoReturn

import numpy as np
import xxhash

from kvbm_fs import codec
from kvbm_fs.errors import (
    ConfigError,
    IllegalTransitionError,
    KvbmError,
    LayoutMismatchError,
    PinnedError,
    TierClosedError,
)
from kvbm_fs.events import VERIFY, EventBus, EventKind
from kvbm_fs.keys import BlockKeys, Namespace
from kvbm_fs.net import Listener
from kvbm_fs.policy import EvictionPolicy
from kvbm_fs.resilience import CircuitBreaker
from kvbm_fs.rows import copy_rows, is_torch
from kvbm_fs.tier import Medium, SlotTier, Tier
from kvbm_fs.units import parse_size

log = logging.getLogger(__name__)

PROTOCOL = 1
SPIN_S = 0.05  # a transfer polled without pause for this long (64 x 2 MiB takes ~8 ms on loopback)
TOKEN_ENV = "KVBM_FS_PEER_TOKEN"  # shared secret both sides read when no token is passed
HDR = codec.HEADER_SIZE
_FRAME = struct.Struct("!II")
_MAX_JSON = 1 << 20
_MAX_BLOB = 1 << 30
_PRESENT, _REFUSED = -2, -1  # reserve's answer per key, beside a slot number to write
_names = itertools.count()


class PeerUnavailableError(KvbmError, ConnectionError):
    """The peer could not be reached when the tier was opened."""


class PeerAuthError(KvbmError, PermissionError):
    """The peer refused this client's token (or the client spoke before saying hello)."""


# errors a peer answers with that are the caller's doing: raised on the client as on the peer.  Any
# other (the peer's tier closed under it, a bug there) is the peer failing: a miss on the client.
_ERRORS: dict[str, type[Exception]] = {
    c.__name__: c for c in (ConfigError, IllegalTransitionError, PinnedError, LayoutMismatchError, PeerAuthError)
}


class _Down(Exception):
    """The control connection or a transfer failed: a miss, not an error for the caller."""


# ---- wire ---------------------------------------------------------------------------------------
def _send(sock: socket.socket, doc: dict[str, Any], blob: bytes | memoryview = b"") -> None:
    j = json.dumps(doc).encode()
    sock.sendall(_FRAME.pack(len(j), len(blob)) + j)
    if len(blob):
        sock.sendall(blob)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return buf


def _recv(
    sock: socket.socket, max_json: int = _MAX_JSON, max_blob: int = _MAX_BLOB
) -> tuple[dict[str, Any], bytearray]:
    jn, bn = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if jn > max_json or bn > max_blob:
        raise ConnectionError(f"peer frame too large ({jn} + {bn} bytes)")
    doc = json.loads(_recv_exact(sock, jn))
    if not isinstance(doc, dict):
        raise ConnectionError("peer sent a malformed frame")
    return doc, _recv_exact(sock, bn)


def _keys(doc: dict[str, Any], blob: bytearray) -> BlockKeys:
    a = np.frombuffer(blob, np.uint64)
    n = int(doc.get("n", a.size))
    if a.size not in (n, 2 * n):
        raise ValueError("peer frame: key array has the wrong length")
    return BlockKeys(int(doc["ns"]), a[:n].copy(), a[n:].copy() if a.size == 2 * n else None)


def _key_blob(keys: BlockKeys, parents: bool = False) -> bytes:
    return (np.concatenate((keys.hashes, keys.parents)) if parents else keys.hashes).tobytes()


def _nixl_agent(prefix: str) -> Any:
    """A UCX agent without NIXL's progress thread, which spins a whole core even when idle
    (measured: 1.0 CPU-s/s).  Clients progress UCX by polling their own transfers; the server
    runs :meth:`PeerServer._pump` instead."""
    from kvbm_fs.nixl_api import api, quiet_logger

    nixl = api()
    conf = nixl.nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
    with quiet_logger():
        agent = nixl.nixl_agent(f"{prefix}-{os.getpid()}-{next(_names)}", conf)
    if "UCX" not in agent.get_plugin_list():
        raise ConfigError("this NIXL build has no UCX plugin, which peer tiers need")
    return agent


# ---- server -------------------------------------------------------------------------------------
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
        if t.admission is not None:
            t.admission.record(keys)
        held = t.acquire(keys)  # pins what is already here, so making room cannot evict it
        try:
            code = np.where(held >= 0, _PRESENT, _REFUSED).astype(np.int64)
            todo = np.flatnonzero(held < 0)
            if todo.size and t.admission is not None:
                todo = todo[: t._admitted(keys[todo])]
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


# ---- client -------------------------------------------------------------------------------------
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


class PeerPool(Tier):
    """Several peers as one tier (``peer://h1:7000,h2:7000,...``): a pool of machines' DRAM.

    Each block lives on the peer that rendezvous hashing picks for its key, so the pool holds the
    sum of the peers' capacities, a chain's blocks spread over all of them (a batch moves from every
    peer at once, one thread each), and adding or removing a peer moves only that peer's share of
    keys.  A dead peer's share is misses and dropped puts while the rest serve on; its breaker probes
    it back.  Every operation is the members' own, so verification and leases are unchanged."""

    medium = Medium.PEER
    persistent = False
    shareable = True

    def __init__(self, addresses: list[str], block_nbytes: int, *, name: str = "peer", **opts: Any) -> None:
        addrs = [_parse_address(a) for a in addresses]
        if len(set(addrs)) != len(addrs) or not addrs:
            raise ConfigError(f"peer pool: addresses must be distinct HOST:PORTs, got {addresses!r}")
        self.name, self.block_nbytes, self.block_size = name, int(block_nbytes), opts.get("block_size")
        self.events = opts.pop("events", None) or EventBus()
        self.members: list[PeerTier] = []
        try:
            for a in addresses:
                self.members.append(PeerTier(a, block_nbytes, name=name, events=self.events, lazy=True, **opts))
        except BaseException:
            self.close()
            raise
        if not any(m._sock is not None for m in self.members):
            self.close()
            raise PeerUnavailableError(f"peer pool {name!r}: none of {len(addrs)} peers can be reached")
        self._seeds = np.array([xxhash.xxh64_intdigest(f"{h}:{p}".encode()) for h, p in addrs], np.uint64)
        self._threads = ThreadPoolExecutor(len(self.members), thread_name_prefix=f"kvbm-{name}")

    def shard(self, keys: BlockKeys) -> np.ndarray:
        """The member each key lives on: the highest mix(hash ^ member seed) (rendezvous hashing)."""
        return rendezvous(keys.hashes, self._seeds)

    def _each(
        self, keys: BlockKeys, fn: Callable[[PeerTier, BlockKeys, np.ndarray], Any]
    ) -> list[tuple[np.ndarray, Any]]:
        owner = self.shard(keys) if len(keys) else np.zeros(0, np.int64)
        parts = [(m, np.flatnonzero(owner == i)) for i, m in enumerate(self.members)]
        parts = [(m, idx) for m, idx in parts if idx.size]
        if len(parts) == 1:
            m, idx = parts[0]
            return [(idx, fn(m, keys[idx], idx))]
        futs = [(idx, self._threads.submit(fn, m, keys[idx], idx)) for m, idx in parts]
        return [(idx, f.result()) for idx, f in futs]

    def _mask(self, keys: BlockKeys, fn: Callable[[PeerTier, BlockKeys, np.ndarray], np.ndarray]) -> np.ndarray:
        out = np.zeros(len(keys), bool)
        for idx, res in self._each(keys, fn):
            out[idx] = res
        return out

    def get(self, keys: BlockKeys, out: Any) -> np.ndarray:
        self._check_rows(keys, out, "get")
        return self._mask(keys, lambda m, k, idx: m.get_rows(k, out, idx))

    def put(self, keys: BlockKeys, data: Any) -> np.ndarray:
        self._check_rows(keys, data, "put")
        return self._mask(keys, lambda m, k, idx: m.put_rows(k, data, idx))

    def contains(self, keys: BlockKeys) -> np.ndarray:
        return self._mask(keys, lambda m, k, idx: m.contains(k))

    def pinned(self, keys: BlockKeys) -> np.ndarray:
        return self._mask(keys, lambda m, k, idx: m.pinned(k))

    def pin(self, keys: BlockKeys) -> np.ndarray:
        return self._mask(keys, lambda m, k, idx: m.pin(k))

    def unpin(self, keys: BlockKeys) -> None:
        self._each(keys, lambda m, k, idx: m.unpin(k))

    def delete(self, keys: BlockKeys) -> np.ndarray:
        if self.pinned(keys).any():  # refuse before any member deletes anything
            raise PinnedError(f"{self.name}: delete of pinned blocks")
        return self._mask(keys, lambda m, k, idx: m.delete(k))

    def prefix_len(self, keys: BlockKeys) -> int:
        miss = np.flatnonzero(~self.contains(keys))
        return int(miss[0]) if miss.size else len(keys)

    def iter_keys(self) -> Iterator[BlockKeys]:
        return itertools.chain.from_iterable(m.iter_keys() for m in self.members)

    def bind_namespace(self, ns: Namespace) -> None:
        super().bind_namespace(ns)
        for m in self.members:
            m.bind_namespace(ns)

    @property
    def capacity_bytes(self) -> int:
        return sum(m.capacity_bytes for m in self.members)

    @property
    def used_bytes(self) -> int:
        return sum(m.used_bytes for m in self.members)

    def __len__(self) -> int:
        return sum(len(m) for m in self.members)

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s["members"] = [m.stats() for m in self.members]
        return s

    def close(self) -> None:
        for m in self.members:
            m.close()
        if hasattr(self, "_threads"):
            self._threads.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"PeerPool({[m.url for m in self.members]!r}, name={self.name!r})"


def rendezvous(hashes: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Index of the seed with the highest mix(mix(hash) ^ seed) per hash (highest random weight)."""
    return np.argmax(_mix64(_mix64(hashes)[:, None] ^ seeds[None, :]), axis=1)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _keepalive(conn: socket.socket, idle_s: int = 30, interval_s: int = 5, probes: int = 3) -> None:
    """TCP keepalive on a client's connection: a client whose machine died (no FIN) is found within
    about ``idle_s + interval_s * probes`` seconds, and its leases and pins are dropped with it."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, v in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", interval_s), ("TCP_KEEPCNT", probes)):
        if hasattr(socket, opt):  # Linux; other systems keep their defaults
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), v)


def _host_rows(x: Any) -> np.ndarray | None:
    """``x`` as numpy rows NIXL can address directly (host memory, contiguous within each row), or None."""
    if is_torch(x):
        if x.device.type != "cpu":
            return None
        x = x.detach().numpy()
    if isinstance(x, np.ndarray) and x.ndim == 2 and x.strides[1] == 1 and x.strides[0] >= x.shape[1]:
        return x
    return None


def _xxh128(row: np.ndarray) -> tuple[int, int]:
    c = codec.payload_checksum(row)
    return c & 0xFFFFFFFFFFFFFFFF, c >> 64


def _parse_address(address: str) -> tuple[str, int]:
    loc = str(address).removeprefix("peer://").split("?", 1)[0].rstrip("/")
    host, sep, port = loc.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"peer address {address!r} must be HOST:PORT (peer://127.0.0.1:7000)")
    return host.strip("[]"), int(port)


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


__all__ = ["PeerAuthError", "PeerPool", "PeerServer", "PeerTier", "PeerUnavailableError", "serve_host_memory"]
