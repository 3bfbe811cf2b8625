"""A :class:`~.blockio.BlockIO` engine that moves a whole batch through NIXL's POSIX backend.

One call to :meth:`NixlPosixIO.read` / :meth:`NixlPosixIO.write` becomes one NIXL transfer
(one per ``max_descs`` descriptors: the backend queues at most 65536 I/Os) with one descriptor
per buffer.  The caller's memory is registered as DRAM for the duration of the call, adjacent
buffers merged into one region first (measured: ~3 µs for a 64-block batch, against ~15 µs for
128 separate regions); segment files are registered once per open descriptor as FILE (kept
while the descriptor names the same inode).  The transfer is polled until it finishes or a
deadline passes.  NIXL POSIX costs about 15 µs per transfer against about 1 µs for a
``pwrite``, so batches with fewer than ``min_ops`` operations go straight to ``os.pwritev``.

The contract is the one :class:`~.blockio.PosixIO` keeps: per operation the bytes moved or
``-errno``, never an exception for an I/O error, never an unbounded wait.

- Before a batch every file is ``fstat``-ed: a bad descriptor gives ``-EBADF`` (or whatever
  ``fstat`` says) for its operations, and a read that runs past the end of its file is done
  with ``os.preadv`` so that it reports the short count instead of a failure.
- Operations NIXL cannot do as asked (an ``O_DIRECT`` file with an unaligned buffer, offset
  or length) go to ``os.preadv``/``os.pwritev`` too, so that one of them does not fail the
  batch; a negative offset gives ``-EINVAL``, a read into read-only memory ``-EFAULT``.
- If NIXL refuses or fails a transfer, the whole batch is redone with ``os.preadv``/
  ``os.pwritev`` (rewriting or rereading the same bytes is harmless), which also finds out
  which operation was at fault.
- If a transfer does not finish by its deadline (``timeout_s`` plus ``nbytes / min_rate``) it is
  cancelled and redone the same way.  If NIXL cannot cancel a timed-out or failed transfer, the
  batch reports ``-ETIMEDOUT`` (or ``-EIO``) instead of racing the kernel, the engine keeps the
  handle, registration and buffers alive, and stops using NIXL: every later batch goes through
  ``os.preadv``/``os.pwritev``.  (``transfer`` itself is not bounded: with a buffered file libaio
  submits synchronously, like a ``pwritev``.)

Only the POSIX backend is created (``backends=[]``, no progress or listener thread): a process
that created NIXL's UCX backend can crash at interpreter exit.  NIXL's Python logger prints
INFO lines to stdout while an agent and backend are created; they are muted for that moment
unless ``NIXL_LOG_LEVEL`` is set.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvbm_fs.tiers.disk.blockio import ALIGN, IoOp, PosixIO, address

BACKEND = "POSIX"
_FILE_CACHE_MAX = 4096
_names = itertools.count()


class NixlPosixIO:
    """Batched vectored file I/O through NIXL POSIX (libaio by default; ``queue="URING"`` or
    ``"POSIXAIO"`` pick the others).  Raises at construction if NIXL or its POSIX plugin is
    unavailable, so that :func:`tiers.disk.blockio.make_io` can say so (``io=nixl``; ``auto`` is
    :class:`~.blockio.PosixIO`)."""

    name = "nixl-posix"

    def __init__(
        self,
        *,
        queue: str | None = None,
        min_ops: int = 2,
        max_descs: int = 16384,
        timeout_s: float = 10.0,
        min_rate: float = 50e6,
        fallback_threads: int | None = None,
        backend: str = BACKEND,
        mem: str = "DRAM",
    ) -> None:
        from kvbm_fs.nixl_api import api, quiet_logger

        nixl = api()
        nixl_agent, nixl_agent_config = nixl.nixl_agent, nixl.nixl_agent_config

        self.min_ops = max(1, int(min_ops))
        self.max_descs = max(1, int(max_descs))  # per transfer; the backend's queue holds 65536 by default
        self.timeout_s = float(timeout_s)
        self.min_rate = float(min_rate)  # the deadline grows by nbytes / min_rate
        params: dict[str, str] = {}
        if queue:
            params = {"use_aio": "false", "use_uring": "false", "use_posix_aio": "false"}
            key = {"AIO": "use_aio", "URING": "use_uring", "POSIXAIO": "use_posix_aio"}.get(queue.upper())
            if key is None:
                raise ValueError(f"unknown NIXL POSIX queue {queue!r}; use AIO, URING or POSIXAIO")
            params[key] = "true"
        self._agent_name = f"kvbm-disk-{os.getpid()}-{next(_names)}"
        with quiet_logger():
            conf = nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=[])
            agent = nixl_agent(self._agent_name, conf)
            if backend not in agent.get_plugin_list():
                raise RuntimeError(f"NIXL has no {backend} plugin")
            agent.create_backend(backend, params)
        self._agent = agent
        self._backends = [backend]
        self._mem = mem
        self._lock = threading.Lock()  # the agent is created without internal locking
        self._files: dict[int, tuple[int, int, Any]] = {}  # fd -> (st_dev, st_ino, FILE registration)
        self._posix = PosixIO(fallback_threads)
        self._broken: str | None = None  # set when a transfer could not be cancelled: NIXL is off
        self._stuck: list[tuple[Any, Any, Any]] = []  # (xfer handle, registration, buffers)
        self._closed = False
        self.counters = dict(
            transfers=0, nixl_ops=0, posix_ops=0, past_eof_ops=0, failed_transfers=0, timeouts=0,
            register_seconds=0.0, transfer_seconds=0.0,
        )  # fmt: skip

    # ---- BlockIO -------------------------------------------------------------------------
    def read(self, ops: Sequence[IoOp]) -> list[int]:
        return self._batch("READ", ops)

    def write(self, ops: Sequence[IoOp]) -> list[int]:
        return self._batch("WRITE", ops)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            still = []
            for entry in self._stuck:
                handle, reg, _ = entry
                try:
                    handle.release()
                except Exception:
                    still.append(entry)  # still in flight: leave it to the agent (a leak beats a crash)
                    continue
                if reg is not None:
                    self._deregister(reg)
            self._stuck = still
            if not still:  # a transfer still in flight may use the files' registrations too
                for _, _, reg in self._files.values():
                    self._deregister(reg)
                self._files.clear()
        self._posix.close()

    # ---- one batch -----------------------------------------------------------------------
    def _batch(self, kind: str, ops: Sequence[IoOp]) -> list[int]:
        n = len(ops)
        results = [0] * n
        if n == 0:
            return results
        reading = kind == "READ"
        files: dict[int, tuple[int, int, int, bool] | int] = {}  # fd -> (dev, ino, size, direct) or -errno
        nixl: list[int] = []
        posix: list[int] = []
        for i, op in enumerate(ops):
            want = op.nbytes
            if want == 0:
                continue
            st = files.get(op.fd)
            if st is None:
                st = files[op.fd] = _file_state(op.fd)
            if isinstance(st, int):
                results[i] = st
                continue
            why = _check_op(op, reading, st[3])
            if why is not None:
                if why > 0:
                    results[i] = -why
                else:
                    posix.append(i)
                continue
            if reading and op.offset + want > st[2]:
                self.counters["past_eof_ops"] += 1
                posix.append(i)  # a short read: preadv reports how much there was
                continue
            nixl.append(i)
        if len(nixl) < self.min_ops or self._broken or self._closed:
            posix.extend(nixl)
            nixl = []
        for chunk in _chunks(nixl, ops, self.max_descs):
            with self._lock:
                done = not self._closed and self._transfer(kind, ops, chunk, files, results)
            if not done:
                posix.extend(chunk)
        if posix:
            posix.sort()
            moved = self._posix.read([ops[i] for i in posix]) if reading else self._posix.write([ops[i] for i in posix])
            for i, r in zip(posix, moved):
                results[i] = r
            self.counters["posix_ops"] += len(posix)
        return results

    def _transfer(
        self,
        kind: str,
        ops: Sequence[IoOp],
        todo: list[int],
        files: dict[int, tuple[int, int, int, bool] | int],
        results: list[int],
    ) -> bool:
        """One NIXL transfer for ``todo`` (called with the lock held). True if it completed; False if
        it should be redone with POSIX calls. A transfer that timed out or failed and could not be
        cancelled fills ``results`` with ``-ETIMEDOUT`` / ``-EIO``, returns True and turns NIXL off."""
        if self._broken:
            return False
        bufs: list[memoryview] = []
        local: list[tuple[int, int]] = []
        remote: list[tuple[int, int, int]] = []
        nbytes = 0
        for i in todo:
            op = ops[i]
            off = op.offset
            for b in op.bufs:
                if b.nbytes:
                    bufs.append(b)
                    local.append((address(b), b.nbytes))
                    remote.append((off, b.nbytes, op.fd))
                    off += b.nbytes
            nbytes += off - op.offset
        state = self._run(kind, local, [ops[i].fd for i in todo], remote, files, nbytes, bufs)
        if state == "RETRY":
            return False
        if state != "DONE":  # stuck in flight: the kernel may yet touch these buffers and files
            for i in todo:
                results[i] = -errno.ETIMEDOUT if state == "PROC" else -errno.EIO
            return True
        for i in todo:
            results[i] = ops[i].nbytes
        self.counters["nixl_ops"] += len(todo)
        return True

    def _run(
        self,
        kind: str,
        local: list[tuple[int, int]],
        fds: list[int],
        remote: list[tuple[int, int, int]],
        files: dict[int, tuple[int, int, int, bool] | int],
        nbytes: int,
        keep: Any,
        device: int = 0,
        registered: bool = False,
    ) -> str:
        """One NIXL transfer between ``local`` (address, length) regions of this engine's memory
        type and ``remote`` (offset, length, fd) file ranges, called with the lock held.  "DONE";
        "RETRY" if nothing is in flight and the caller should redo the work another way; or the
        state ("PROC" timed out, "ERR" failed) of a transfer that could not be cancelled, after
        which NIXL is off and ``keep`` (the buffers) stays referenced for good.  ``registered``: the
        local memory is already registered (and stays so), so this call neither registers nor frees it."""
        agent = self._agent
        t0 = time.perf_counter()
        try:
            for fd in set(fds):
                st = files[fd]
                assert not isinstance(st, int)
                self._register_file(fd, st[0], st[1])
            mem = (
                None if registered else agent.register_memory(_merge(local, device), self._mem, backends=self._backends)
            )
        except Exception:
            self.counters["failed_transfers"] += 1
            return "RETRY"
        t1 = time.perf_counter()
        self.counters["register_seconds"] += t1 - t0
        handle = None
        state = "ERR"
        try:
            lo = np.array([(a, ln, device) for a, ln in local], np.uint64)
            ro = np.array(remote, np.uint64)
            handle = agent.initialize_xfer(
                kind,
                agent.get_xfer_descs(lo, self._mem),
                agent.get_xfer_descs(ro, "FILE"),
                self._agent_name,
                backends=self._backends,
            )
            state = agent.transfer(handle)
            state = self._wait(handle, state, time.monotonic() + self.timeout_s + nbytes / self.min_rate)
        except Exception:
            state = "ERR"
        self.counters["transfer_seconds"] += time.perf_counter() - t1
        if state == "PROC":
            self.counters["timeouts"] += 1
        elif state != "DONE":
            self.counters["failed_transfers"] += 1
        if handle is not None:
            try:
                handle.release()  # cancels the transfer if it is still running and the backend can
            except Exception:
                if state != "DONE":
                    what = "timed out" if state == "PROC" else "failed"
                    self._broken = f"a NIXL transfer {what} and could not be cancelled; using preadv/pwritev"
                    self._stuck.append((handle, mem, keep))  # keep the registration and buffers alive
                    return state
        if mem is not None:
            self._deregister(mem)
        if state != "DONE":
            return "RETRY"
        self.counters["transfers"] += 1
        return "DONE"

    def _wait(self, handle: Any, state: str, deadline: float) -> str:
        """Poll until DONE or ERR; returns "PROC" if the deadline passed first."""
        check = self._agent.check_xfer_state
        spins = 0
        while state == "PROC":
            if spins < 64:
                spins += 1  # most batches finish within a few polls: stay on the CPU briefly
            else:
                if time.monotonic() > deadline:
                    return "PROC"
                time.sleep(min(2e-4, 2e-5 * (spins - 63)))  # coarser sleeps cost ~3% of a 128 MiB batch
                spins += 1
            state = check(handle)
        return state

    # ---- registrations -------------------------------------------------------------------
    def _register_file(self, fd: int, dev: int, ino: int) -> None:
        cached = self._files.get(fd)
        if cached is not None:
            if cached[0] == dev and cached[1] == ino:
                return
            self._deregister(cached[2])  # the descriptor number now names another file
            del self._files[fd]
        if len(self._files) >= _FILE_CACHE_MAX:
            for _, _, reg in self._files.values():
                self._deregister(reg)
            self._files.clear()
        reg = self._agent.register_memory([(0, 0, fd, "")], "FILE", backends=self._backends)
        self._files[fd] = (dev, ino, reg)

    def _deregister(self, reg: Any) -> None:
        try:
            self._agent.deregister_memory(reg, backends=self._backends)
        except Exception:
            pass

    def stats(self) -> dict[str, Any]:
        return dict(self.counters, broken=self._broken, registered_files=len(self._files))


def _file_state(fd: int) -> tuple[int, int, int, bool] | int:
    """(st_dev, st_ino, size, opened with O_DIRECT) of an open descriptor, or -errno."""
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as e:
        return -(e.errno or errno.EIO)
    return st.st_dev, st.st_ino, st.st_size, bool(flags & getattr(os, "O_DIRECT", 0))


def _check_op(op: IoOp, reading: bool, direct: bool) -> int | None:
    """None if NIXL can take ``op``; a positive errno to report; or -1 to send it to preadv/pwritev."""
    if op.offset < 0:
        return errno.EINVAL
    if direct and op.offset % ALIGN:
        return -1
    for b in op.bufs:
        if not b.contiguous:
            return errno.EINVAL
        if reading and b.readonly:
            return errno.EFAULT
        if direct and b.nbytes and (b.nbytes % ALIGN or address(b) % ALIGN):
            return -1
    return None


def _chunks(todo: list[int], ops: Sequence[IoOp], max_descs: int) -> list[list[int]]:
    """Split ``todo`` into transfers of at most ``max_descs`` descriptors (one per non-empty buffer)."""
    out: list[list[int]] = []
    cur: list[int] = []
    count = 0
    for i in todo:
        k = sum(1 for b in ops[i].bufs if b.nbytes)
        if cur and count + k > max_descs:
            out.append(cur)
            cur, count = [], 0
        cur.append(i)
        count += k
    if cur:
        out.append(cur)
    return out


def _merge(regions: list[tuple[int, int]], device: int = 0) -> np.ndarray:
    """Registration descriptors (address, length, device) covering ``regions``, adjacent ones merged."""
    out: list[list[int]] = []
    for a, ln in sorted(regions):
        if out and a <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], a + ln - out[-1][0])
        else:
            out.append([a, ln, device])
    return np.array(out, np.uint64)
