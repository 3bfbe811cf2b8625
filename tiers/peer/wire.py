"""The peer protocol both sides speak: framed JSON plus a binary array over TCP (control), the
NIXL UCX agent (data), the errors a peer answers with, and small helpers both sides share."""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
from typing import Any

import numpy as np

from kvbm_fs import codec
from kvbm_fs.errors import (
    ConfigError,
    IllegalTransitionError,
    KvbmError,
    LayoutMismatchError,
    PinnedError,
)
from kvbm_fs.keys import BlockKeys
from kvbm_fs.rows import is_torch

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
