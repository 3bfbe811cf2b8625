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

from kvbm_fs.tiers.peer.client import PeerTier
from kvbm_fs.tiers.peer.pool import PeerPool
from kvbm_fs.tiers.peer.server import PeerServer, serve_host_memory
from kvbm_fs.tiers.peer.wire import PeerAuthError, PeerUnavailableError

__all__ = ["PeerAuthError", "PeerPool", "PeerServer", "PeerTier", "PeerUnavailableError", "serve_host_memory"]
