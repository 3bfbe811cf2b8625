"""Peer tier: a batch get (and put) of 64 x 2 MiB blocks from another process's host tier over NIXL UCX.

What it measures
    A peer process (this script with ``--serve``: a HostTier served by ``PeerServer``, plus a plain
    TCP block server over the same slab) and, in this process, side by side in interleaved rounds:

    - ``peer_get``: ``PeerTier.get`` of 64 blocks (lookup and lease, one UCX READ of headers and
      payloads, release, key echo + xxh3-128 check of every block, copy into the caller's rows);
      ``peer_put``: ``PeerTier.put`` of 64 new blocks (reserve, copy and hash, one UCX WRITE, commit:
      the peer re-hashes every slot before registering it); the blocks are deleted untimed before
      every put;
    - ``raw_ucx_read`` / ``raw_ucx_write``: the same slots moved by one NIXL UCX transfer and nothing
      else (no control round trips, no hashing, no copy): the data path's own speed;
    - ``tcp_per_block``: a naive client of the peer's TCP block server, one request and one 2 MiB
      reply per block (what a simple RPC cache client does), unverified, received into the caller's
      rows with ``recv_into``;
    - ``tcp_batch``: a good TCP client: one request for all 64, the replies streamed back;
      ``tcp_batch_put``: the same for writes (one request, 64 rows streamed, one acknowledgement);
    - ``memcpy``: ``np.copyto`` of the same 128 MiB inside this process, the ceiling of any byte move.

    Ratios are medians of per-round paired ratios: ``get_vs_tcp_per_block`` and ``get_vs_tcp_batch``
    (how many times faster the peer tier is than each TCP client), ``put_vs_tcp_batch``,
    ``get_fraction_of_raw_ucx`` (what the control round trips and verification cost),
    ``get_fraction_of_memcpy``, and the same for puts.  The TCP cases neither hash nor verify.

Why
    Reading a peer's memory only pays if it is much faster than recomputing, which means running near
    the transport's speed while still checking every block (a peer is outside process memory).
    The peer runs in its own process so that its CPU and GIL are its own, as on a real machine.
    2 cores, loopback: UCX picks shared-memory transports here, not RDMA.

Run ``python benchmarks/bench_peer.py [--quick]``; prints one JSON object and writes it to
``benchmarks/results/bench_peer.json`` (``--quick``: 8 blocks, 2 rounds).  About 20 s.
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
from _common import Case, add_output_args, bench_blocks, emit, env, gbps, interleave, paired_ratio, results_path, skip

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


NAME = "bench_peer"
MiB = 1 << 20
_REQ = struct.Struct("!qqq")  # (0 get / 1 put, first slot, count) for the TCP block server


def serve(capacity: int, block: int) -> None:
    """The peer process: the served host tier, and a TCP block server over the same slab."""
    from kvbm_fs.tiers.peer import serve_host_memory

    srv = serve_host_memory(capacity, block)
    buf = srv.tier.buf
    tcp = socket.create_server(("127.0.0.1", 0))

    def answer(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                try:
                    req = conn.recv(_REQ.size, socket.MSG_WAITALL)
                except OSError:
                    return
                if len(req) < _REQ.size:
                    return
                op, first, n = _REQ.unpack(req)
                for s in range(first, first + n):
                    if op == 0:
                        conn.sendall(memoryview(buf[s]))
                    else:
                        _recv_row(conn, buf[s])
                if op == 1:
                    conn.sendall(b"k")

    def accept() -> None:
        while True:
            conn, _ = tcp.accept()
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print("SERVE", srv.url, tcp.getsockname()[1], flush=True)
    sys.stdin.read()
    srv.close()
    srv.tier.close()


def _recv_row(sock: socket.socket, row: np.ndarray) -> None:
    view, got = row.data.cast("B"), 0
    while got < row.nbytes:
        got += sock.recv_into(view[got:])


def _tcp_get(sock: socket.socket, out: np.ndarray, slots: np.ndarray, batched: bool) -> None:
    if batched:
        sock.sendall(_REQ.pack(0, int(slots[0]), len(slots)))  # slots of a fresh tier are consecutive
        for i in range(len(slots)):
            _recv_row(sock, out[i])
        return
    for i, s in enumerate(slots.tolist()):
        sock.sendall(_REQ.pack(0, s, 1))
        _recv_row(sock, out[i])


def _tcp_put(sock: socket.socket, data: np.ndarray, slots: np.ndarray) -> None:
    """A good TCP writer: one request, the rows streamed, one acknowledgement (no hashing)."""
    sock.sendall(_REQ.pack(1, int(slots[0]), len(slots)))
    for i in range(len(slots)):
        sock.sendall(memoryview(data[i]))
    assert sock.recv(1) == b"k"


def run(blocks: int, block_mib: float, rounds: int) -> dict[str, Any]:
    from kvbm_fs.tiers.peer import PeerTier

    ns, keys, data, out = bench_blocks("bench-peer", blocks, block_mib)
    bn = ns.block_nbytes
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(4 * blocks * bn), str(bn)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = next(x for x in proc.stdout if x.startswith("SERVE "))
        url, tcp_port = line.split()[1], int(line.split()[2])
        t = PeerTier(url, bn, staging=2 * blocks * (bn + 4096))
        t.bind_namespace(ns)
        assert t.put(keys, data).all()
        slots = np.arange(blocks)  # a fresh tier hands out slots 0.. in order
        sock = socket.create_connection(("127.0.0.1", tcp_port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw_read = t._rows_at(slots, True)
        raw_write = t._rows_at(slots, False)
        cases = [
            Case("peer_get", lambda: t.get(keys, out)),
            Case("peer_put", lambda: t.put(keys, data), before=lambda: t.delete(keys)),
            Case("raw_ucx_read", lambda: t._transfer("READ", *raw_read)),
            Case("raw_ucx_write", lambda: t._transfer("WRITE", *raw_write)),
            Case("tcp_per_block", lambda: _tcp_get(sock, out, slots, False)),
            Case("tcp_batch", lambda: _tcp_get(sock, out, slots, True)),
            Case("tcp_batch_put", lambda: _tcp_put(sock, data, slots)),
            Case("memcpy", lambda: np.copyto(out, data)),
        ]
        interleave(cases, rounds)
        t.get(keys, out)
        exact = bool(np.array_equal(out, data))
        stats = t.stats()
        t.close()
        sock.close()
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(30)
    c = {x.name: x for x in cases}
    nbytes = blocks * bn
    res: dict[str, Any] = {"blocks": blocks, "block_bytes": bn, "rounds": rounds, "bytes_exact": exact}
    res["gbps"] = {name: gbps(nbytes, x.times) for name, x in c.items()}
    res["ms"] = {name: round(x.median * 1e3, 2) for name, x in c.items()}
    for op, raw in (("get", "raw_ucx_read"), ("put", "raw_ucx_write")):
        res[f"{op}_fraction_of_raw_ucx"] = round(paired_ratio(c[f"peer_{op}"].times, c[raw].times), 3)
        res[f"{op}_fraction_of_memcpy"] = round(paired_ratio(c[f"peer_{op}"].times, c["memcpy"].times), 3)
    res["get_vs_tcp_per_block"] = round(paired_ratio(c["peer_get"].times, c["tcp_per_block"].times), 2)
    res["get_vs_tcp_batch"] = round(paired_ratio(c["peer_get"].times, c["tcp_batch"].times), 2)
    res["put_vs_tcp_batch"] = round(paired_ratio(c["peer_put"].times, c["tcp_batch_put"].times), 2)
    res["tier_stats"] = {k: stats[k] for k in ("bytes_read", "bytes_written", "load_failures", "transfer_errors")}
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--block-mib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--serve", nargs=2, type=int, help=argparse.SUPPRESS)
    add_output_args(ap, "8 blocks, 2 rounds (smoke tests)")
    args = ap.parse_args(argv)
    if args.serve:  # the peer process: serves until its stdin closes, then exits normally
        serve(*args.serve)
        return {}
    from kvbm_fs.nixl_api import available

    if not available():
        return skip("NIXL is not installed", benchmark=NAME)
    blocks, rounds = (8, 2) if args.quick else (args.blocks, args.rounds)
    res = {"benchmark": NAME, "quick": args.quick, **run(blocks, args.block_mib, rounds)}
    res["env"] = env(numpy=np.__version__)
    emit(res, args.out or results_path(NAME, args.quick))
    return res


if __name__ == "__main__":
    main()
