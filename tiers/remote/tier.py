"""G4: any fsspec URL as a tier (S3 via s3fs, GCS, Azure, NFS paths, memory://), shared by many instances.

Object layout (one object per block; see docs/architecture.md for why not packed)::

    <root>/kvbm_fs.remote.json                      format + block size, checked on open
    <root>/<ns id:016x>/manifest.json               the namespace (model, layout, rank, tenant)
    <root>/<ns id:016x>/<hash>>56:02x>/<hash:016x>  header + payload (kvbm_fs.codec), written whole

The two-hex fan-out spreads keys over 256 prefixes per namespace, which is what
S3 partitions request rates by.  All I/O is batched and concurrent through
fsspec's async API with bounded concurrency, per-request timeouts and retries
with backoff; a circuit breaker stops calling a dead endpoint and probes it
again after a cool-down.  Failures never raise into the caller: a failed read is
a miss, a failed write a dropped block, each counted and published as an event.

Data path (``io=`` in the URL query or the tier table): ``s3fs`` (default), ``nixl`` (S3 only:
block objects are read and written through NIXL's OBJ backend, :mod:`.nixl_obj`), or ``auto``
(= s3fs; why: docs/architecture.md 1.9).
With ``io=nixl`` manifests, HEADs, listing, delete, capacity and eviction stay on s3fs, and the
NIXL client gets the endpoint, region and credentials botocore resolved for s3fs.  Each batch is
one NIXL transfer per object, posted and polled together, behind the same breaker, retries,
timeout and codec checks.  NIXL reports only "failed", so failed reads are followed by one round
of concurrent HEADs (404: a clean miss; wrong size: corrupt, removed; else: retried, then an
error): a miss costs GET + HEAD instead of one GET.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, TypeVar

import numpy as np

from kvbm_fs import codec
from kvbm_fs.errors import ConfigError, CorruptBlockError, FormatVersionError, LayoutMismatchError, PinnedError
from kvbm_fs.events import VERIFY, EventBus, EventKind
from kvbm_fs.keys import BlockKeys, Namespace
from kvbm_fs.policy import EvictionPolicy, make_policy
from kvbm_fs.registry import TierSpec
from kvbm_fs.resilience import CircuitBreaker, backoff_delay
from kvbm_fs.rows import host_rows, is_torch
from kvbm_fs.tier import (
    DEFAULT_RETAIN_SHARE,
    Admission,
    KeyPinnedTier,
    KeyPins,
    Medium,
    check_share,
    retain_budget,
)
from kvbm_fs.tiers.remote.fs import (
    check_knobs,
    loop_for,
    nixl_client,
    open_fs,
    protocols,
    resolve_io,
    whole_read_kwargs,
)
from kvbm_fs.tiers.remote.retain import CHUNK, Marks, encode, mark_path, parse_path, victims
from kvbm_fs.units import parse_size

log = logging.getLogger(__name__)
FORMAT = "kvbm_fs.remote.v1"
T = TypeVar("T")
UNBOUNDED = 1 << 62


class _Skip(Exception):
    """The breaker is open: the request was not sent."""


# A request the store answered: the object is absent, or present but not a valid block object.
_ANSWERED = (FileNotFoundError, CorruptBlockError)


def _stored_checksum_errors() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import FlexibleChecksumError
    except ImportError:  # no botocore: no S3, and nothing checks stored checksums
        return ()
    return (FlexibleChecksumError,)


_STORED_CHECKSUM_ERRORS = _stored_checksum_errors()


class RemoteTier(KeyPinnedTier):
    medium = Medium.REMOTE
    persistent = True
    shareable = True

    def __init__(
        self,
        url: str,
        block_nbytes: int,
        capacity: int | str | None = None,
        *,
        name: str = "remote",
        block_size: int | None = None,
        events: EventBus | None = None,
        policy: EvictionPolicy | str | None = None,
        storage_options: dict[str, Any] | None = None,
        max_concurrency: int = 32,
        timeout: float = 10.0,
        head_timeout: float | None = None,
        retries: int = 3,
        backoff: float = 0.05,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 5.0,
        io: str = "s3fs",
    ) -> None:

        self.name, self.block_nbytes, self.block_size = name, int(block_nbytes), block_size
        self.events = events or EventBus()
        self.policy = make_policy(policy)
        self.spec = TierSpec.parse(url)
        self.url = self.spec.redacted()
        head_timeout = timeout if head_timeout is None else head_timeout
        check_knobs(max_concurrency=max_concurrency, timeout=timeout, head_timeout=head_timeout, retries=retries,
                     backoff=backoff, breaker_threshold=breaker_threshold, breaker_cooldown=breaker_cooldown)  # fmt: skip
        self.max_concurrency, self.timeout, self.retries, self.backoff = max_concurrency, timeout, retries, backoff
        self.head_timeout = float(head_timeout)  # existence checks: the scheduler waits on them
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown)
        self.capacity = UNBOUNDED if capacity is None else parse_size(capacity, "remote capacity")
        self.object_bytes = codec.HEADER_SIZE + self.block_nbytes
        if self.capacity < self.object_bytes:
            from kvbm_fs.errors import CapacityError

            raise CapacityError(f"remote capacity {self.capacity} B is smaller than one {self.object_bytes} B object")
        self.io = resolve_io(io, url, self.url)
        self.fs, self.root = open_fs(url, storage_options or {}, max_concurrency)
        self._nixl: Any = None  # NixlObjClient: the data path for block objects when io=nixl
        if self.io == "nixl":
            self._bucket = self.root.split("/", 1)[0]
            self._nixl = nixl_client(self.fs, self._bucket, self.url, max_concurrency, timeout)
        self._read_kw = whole_read_kwargs(self.fs)
        self.atomic_rename = "file" in protocols(self.fs)
        self._loop = loop_for(self.fs)
        self._sem: asyncio.Semaphore | None = None
        self._lock = threading.Lock()
        self._room = threading.Lock()
        self._listing = threading.local()  # .held: a put's one listing (_capacity_decision)
        self._pins = KeyPins()
        self._marks = Marks()  # retain marks read from the bucket (.retain)
        self._namespaces: set[int] = set()
        self.counters = dict(get_errors=0, put_errors=0, head_errors=0, load_failures=0, corrupt_removed=0,
                             retries=0, skipped_open_breaker=0, evictions=0)  # fmt: skip
        try:
            self._check_tier_manifest()
            self._count = self._count_objects() if self.capacity != UNBOUNDED else -1
        except BaseException:
            self.close()
            raise
        self.admission = Admission(self.policy, None if self._count < 0 else self.capacity // self.object_bytes)

    # ---- async plumbing ------------------------------------------------------------------
    def _run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    async def _call(
        self, fn: Callable[[], Awaitable[T]], retry_timeouts: bool = True, timeout: float | None = None
    ) -> T:
        """One request: breaker, concurrency bound, timeout, retries with jittered backoff.

        The breaker hears only final outcomes, so throttling that a retry absorbs never opens it.
        A half-open probe gets one try: its caller should not wait (retries + 1) timeouts to learn
        that the endpoint is still down.  With ``retry_timeouts`` off (existence checks, which the
        engine's scheduler waits on) a timed-out try is final: a stalled endpoint then costs the
        scheduler one timeout, not (retries + 1), while resets and 5xx are still retried."""
        if not self.breaker.allow():
            self.counters["skipped_open_breaker"] += 1
            raise _Skip
        tries = self._tries()
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
        for attempt in range(tries):
            try:
                async with self._sem:
                    out = await asyncio.wait_for(fn(), timeout or self.timeout)
                self.breaker.record(True)
                return out
            except (FileNotFoundError, PermissionError, CorruptBlockError) as e:
                self.breaker.record(not isinstance(e, PermissionError))  # the endpoint answered
                raise
            except Exception as e:
                if attempt == tries - 1 or (not retry_timeouts and isinstance(e, TimeoutError)):
                    self.breaker.record(False)
                    raise
                self.counters["retries"] += 1
                log.debug("%s: retry %d after %s", self.url, attempt + 1, type(e).__name__)
                await asyncio.sleep(backoff_delay(self.backoff, attempt))
        raise AssertionError("unreachable")

    def _tries(self) -> int:
        """Tries for a request the breaker just let out: one when it is the half-open probe."""
        return 1 if self.breaker.opened_at is not None else self.retries + 1

    async def _gather(
        self, fns: list[Callable[[], Awaitable[T]]], retry_timeouts: bool = True, timeout: float | None = None
    ) -> list[T | BaseException]:
        return await asyncio.gather(*(self._call(f, retry_timeouts, timeout) for f in fns), return_exceptions=True)

    async def _gather_once(self, fns: list[Callable[[], Awaitable[T]]]) -> list[T | BaseException]:
        """One try each, bounded and timed out, outside the breaker (the caller reports to it)."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
        sem = self._sem

        async def once(fn: Callable[[], Awaitable[T]]) -> T:
            async with sem:
                return await asyncio.wait_for(fn(), self.timeout)

        return await asyncio.gather(*(once(f) for f in fns), return_exceptions=True)

    # ---- the NIXL OBJ data path (io=nixl) --------------------------------------------------
    def _allowed(self, n: int) -> list[int]:
        """Which of ``n`` requests the breaker lets out (all when closed, one probe when half-open)."""
        out = []
        for i in range(n):
            if self.breaker.allow():
                out.append(i)
            else:
                self.counters["skipped_open_breaker"] += 1
        return out

    def _settle(self, sent: list[int], res: list[Any]) -> None:
        """Tell the breaker each request's final outcome: answered (data, absent, corrupt) or failed."""
        for i in sent:
            r = res[i]
            self.breaker.record(not isinstance(r, BaseException) or isinstance(r, _ANSWERED))

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(backoff_delay(self.backoff, attempt))

    def _nixl_read(self, paths: list[str]) -> list[Any]:
        """Whole block objects through NIXL OBJ: per path the bytes (a uint8 array), FileNotFoundError,
        CorruptBlockError (an object of the wrong size) or the error; never raises.

        One batch of NIXL transfers per try, the breaker, retries with backoff and the timeout as for
        s3fs.  NIXL says only "failed", so the failed reads (not the timed-out ones) are followed by one
        concurrent round of HEADs through s3fs: 404 is a clean miss, an object whose size is not one
        block is corrupt (an empty object cannot even be range-read), anything else is retried.  A miss
        therefore costs two round trips (GET, HEAD) where s3fs needs one."""
        res: list[Any] = [_Skip() for _ in paths]

        def attempt(todo: list[int]) -> list[int]:
            got = self._nixl.get([(self._key(paths[i]), self.object_bytes) for i in todo], check_missing=False)
            for i, g in zip(todo, got):
                res[i] = g
            ask = [i for i, g in zip(todo, got) if isinstance(g, BaseException) and not isinstance(g, TimeoutError)]
            if ask:
                heads = self._run(self._gather_once([partial(self._head, paths[i]) for i in ask]))
                for i, h in zip(ask, heads):
                    if isinstance(h, FileNotFoundError):
                        res[i] = FileNotFoundError(paths[i])
                    elif not isinstance(h, BaseException) and _size(h) not in (None, self.object_bytes):
                        res[i] = CorruptBlockError(f"object has {_size(h)} bytes, a block object {self.object_bytes}")
            return [i for i in todo if isinstance(res[i], BaseException) and not isinstance(res[i], _ANSWERED)]

        self._rounds(res, attempt)
        return res

    def _nixl_write(self, objs: list[tuple[str, bytes]]) -> list[BaseException | None]:
        """Whole-object PUTs through NIXL OBJ (atomic, as with s3fs): per object None or the error."""
        res: list[BaseException | None] = [_Skip() for _ in objs]

        def attempt(todo: list[int]) -> list[int]:
            errs = self._nixl.put([(self._key(objs[i][0]), objs[i][1]) for i in todo])
            for i, e in zip(todo, errs):
                res[i] = e
            return [i for i in todo if res[i] is not None]

        self._rounds(res, attempt)
        return res

    def _rounds(self, res: list[Any], attempt: Callable[[list[int]], list[int]]) -> None:
        """Run ``attempt`` on the requests the breaker lets out, then again on those it returns
        (still failing), with backoff, up to the tries allowed; the breaker hears each final outcome."""
        sent = todo = self._allowed(len(res))
        tries = self._tries()
        for n in range(tries):
            todo = attempt(todo)
            if not todo or n == tries - 1:
                break
            self.counters["retries"] += len(todo)
            self._run(self._backoff(n))
        self._settle(sent, res)

    def _key(self, path: str) -> str:
        return path[len(self._bucket) + 1 :]

    # ---- paths and manifests -------------------------------------------------------------
    def _path(self, ns: int, h: int) -> str:
        return f"{self.root}/{ns:016x}/{h >> 56:02x}/{h:016x}"

    def _check_tier_manifest(self) -> None:
        want = {"format": FORMAT, "block_nbytes": self.block_nbytes}
        path = f"{self.root}/kvbm_fs.remote.json"
        got = self._read_json(path)
        if got is None:
            self._write_json(path, want)
            return
        if got.get("format") != FORMAT:
            raise FormatVersionError(
                f"{self.url} holds a remote tier of format {got.get('format')!r}; this build reads {FORMAT!r}"
            )
        if got.get("block_nbytes") != self.block_nbytes:
            raise LayoutMismatchError(
                f"{self.url} holds {got.get('block_nbytes')}-byte blocks; this store needs {self.block_nbytes}-byte blocks"
            )

    def bind_namespace(self, ns: Namespace) -> None:
        super().bind_namespace(ns)
        path = f"{self.root}/{ns.short_id}/manifest.json"
        got = self._read_json(path)
        if got is None:
            self._write_json(path, ns.to_dict())
        elif _namespace_of(got, self.url, ns.short_id) != ns:
            raise LayoutMismatchError(f"{self.url}: namespace {ns.short_id} was written for another layout: {got}")
        self._namespaces.add(ns.id)

    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            raw = self._run(self._call(lambda: self.fs._cat_file(path)))
        except FileNotFoundError:
            return None
        except _Skip:
            raise ConfigError(f"{self.url} is unreachable (circuit open)") from None
        except Exception as e:
            raise ConfigError(
                f"cannot read {self.url} ({type(e).__name__}); check the endpoint and credentials"
            ) from None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise FormatVersionError(f"{path.rsplit('/', 1)[-1]} at {self.url} is not JSON") from None
        if not isinstance(doc, dict):
            raise FormatVersionError(f"{path.rsplit('/', 1)[-1]} at {self.url} is not a JSON object")
        return doc

    def _write_json(self, path: str, doc: dict[str, Any]) -> None:
        try:
            self._run(self._call(lambda: self._write_object(path, json.dumps(doc, sort_keys=True).encode())))
        except Exception as e:
            raise ConfigError(
                f"cannot write to {self.url} ({type(e).__name__}); check the endpoint and credentials"
            ) from None

    async def _read_object(self, path: str) -> Any:
        """A stored object whose bytes fail the checksum S3 keeps for it (botocore checks it on GET)
        is damaged for good: corrupt, so removed, not an error to retry."""
        try:
            return await self.fs._cat_file(path, **self._read_kw)
        except _STORED_CHECKSUM_ERRORS:
            raise CorruptBlockError("the stored object fails its S3 checksum") from None

    async def _write_object(self, path: str, data: bytes) -> None:
        """Readers see a whole object or none: object stores PUT atomically; files go through a rename."""
        if not self.atomic_rename:
            await self.fs._pipe_file(path, data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        await self.fs._pipe_file(tmp, data)
        await self.fs._mv(tmp, path)

    # ---- Tier primitives -----------------------------------------------------------------
    def contains(self, keys: BlockKeys) -> np.ndarray:
        """Concurrent HEADs (bounded), not one round trip after another; errors count as absent."""
        paths = [self._path(keys.ns, h) for h in keys.hashes.tolist()]
        res = self._run(
            self._gather([partial(self._head, p) for p in paths], retry_timeouts=False, timeout=self.head_timeout)
        )
        self.counters["head_errors"] += sum(
            isinstance(r, Exception) and not isinstance(r, FileNotFoundError) for r in res
        )
        return np.array([not isinstance(r, BaseException) for r in res], bool)

    async def _head(self, path: str) -> Any:
        """One HEAD per key. s3fs's ``_info`` follows a 404 with a listing (is it a directory?), a second
        round trip for every miss, so S3 gets a bare HEAD (404 still arrives as FileNotFoundError)."""
        if hasattr(self.fs, "_call_s3"):
            bucket, key, _ = self.fs.split_path(path)
            return await self.fs._call_s3("head_object", Bucket=bucket, Key=key)
        return await self.fs._info(path)

    def prefix_len(self, keys: BlockKeys, chunk: int = 64) -> int:
        """Check the prefix chunk by chunk and stop at the first miss."""
        for a in range(0, len(keys), chunk):
            miss = np.flatnonzero(~self.contains(keys[a : a + chunk]))
            if miss.size:
                return a + int(miss[0])
        return len(keys)

    def get(self, keys: BlockKeys, out: Any) -> np.ndarray:
        self._check_rows(keys, out, "get")
        self.admission.seen(keys)
        paths = [self._path(keys.ns, h) for h in keys.hashes.tolist()]
        if self._nixl is not None:
            res = self._nixl_read(paths)
        else:
            res = self._run(self._gather([partial(self._read_object, p) for p in paths]))
        found = np.zeros(len(keys), bool)
        bad: list[tuple[int, str]] = []
        errors = 0
        for i, r in enumerate(res):
            if isinstance(r, FileNotFoundError):
                continue
            if isinstance(r, CorruptBlockError):
                bad.append((i, str(r)))
                continue
            if isinstance(r, BaseException):
                errors += 1
                continue
            try:
                payload = codec.verify(r, keys[i], self.block_nbytes, self.block_size)
            except CorruptBlockError as e:
                bad.append((i, str(e)))
                continue
            _write_row(out, i, payload)
            found[i] = True
        self._account_get_failures(keys, errors, bad, res)
        return found

    def _account_get_failures(self, keys: BlockKeys, errors: int, bad: list[tuple[int, str]], res: list[Any]) -> None:
        if errors:  # errors, timeouts, throttling and an open breaker: misses the engine recomputes
            self.counters["get_errors"] += errors
            failed = [i for i, r in enumerate(res) if isinstance(r, BaseException) and not isinstance(r, _ANSWERED)]
            self.events.publish(
                EventKind.LOAD_FAILED, self.name, keys[np.array(failed, np.int64)], "remote read failed"
            )
        if bad:
            self.counters["load_failures"] += len(bad)
            idx = np.array([i for i, _ in bad], np.int64)
            self.events.publish(EventKind.LOAD_FAILED, self.name, keys[idx], bad[0][1], VERIFY)
            removed = self._delete_paths([self._path(keys.ns, int(keys.hashes[i])) for i in idx.tolist()])
            self.counters["corrupt_removed"] += sum(removed)

    def put(self, keys: BlockKeys, data: Any) -> np.ndarray:
        self._check_rows(keys, data, "put")
        rows = host_rows(data, len(keys))
        self.admission.seen(keys)
        # Objects are content-addressed and a PUT replaces whole, so an unbounded tier need not ask
        # first (saves a HEAD per block); a bounded one must, to count what it holds.
        bounded = self._count >= 0
        have = self.contains(keys) if bounded else np.zeros(len(keys), bool)
        todo = np.flatnonzero(~have)
        _, first = np.unique(keys.hashes[todo], return_index=True)
        todo = todo[np.sort(first)]
        with self._capacity_decision() if bounded else nullcontext():  # admission, room, reservation
            if self.admission.filter is not None:
                free = self.capacity // self.object_bytes - self._count if bounded else todo.size
                if bounded and not self.evict_on_put:  # nothing is displaced: no victims to weigh (list)
                    todo = todo[: max(0, free)]
                todo = self.admission.trim(self, keys, todo, free)
            if bounded and todo.size:  # the leading blocks that fit, after evicting the oldest
                todo = todo[: self.capacity // self.object_bytes]
                room = self._make_room(todo.size, {(keys.ns, h) for h in keys.hashes[have].tolist()})
                todo = todo[:room]
                with self._lock:
                    self._count += todo.size
        if todo.size == 0:
            return have
        tokens = self.block_size or 0
        objs = [(self._path(keys.ns, int(keys.hashes[i])), codec.encode(keys[i], int(keys.parents[i]), tokens, rows[i]))
                for i in todo.tolist()]  # fmt: skip
        if self._nixl is not None:
            res: list[Any] = self._nixl_write(objs)
        else:
            res = self._run(self._gather([partial(self._write_object, p, b) for p, b in objs]))
        ok = np.array([not isinstance(r, BaseException) for r in res], bool)
        self._account_puts(keys, todo, ok)
        out = have.copy()
        out[todo[ok]] = True
        dup = np.flatnonzero(~have)
        out[dup] = np.isin(keys.hashes[dup], keys.hashes[todo[ok]])
        return out

    def _account_puts(self, keys: BlockKeys, todo: np.ndarray, ok: np.ndarray) -> None:
        if self._count >= 0:
            with self._lock:
                self._count -= int((~ok).sum())  # give back what was reserved but not written
        if ok.any():
            self.events.publish(EventKind.STORED, self.name, keys[todo[ok]])
        if not ok.all():
            self.counters["put_errors"] += int((~ok).sum())
            self.events.publish(EventKind.STORE_FAILED, self.name, keys[todo[~ok]], "remote write dropped")

    def delete(self, keys: BlockKeys) -> np.ndarray:
        with self._lock:
            if any((keys.ns, h) in self._pins for h in keys.hashes.tolist()):
                raise PinnedError(f"{self.name}: cannot delete pinned blocks")
        had = self.contains(keys)
        _, first = np.unique(keys.hashes, return_index=True)
        idx = np.intersect1d(np.flatnonzero(had), first)  # each object once, even if a key repeats
        gone = self._delete_paths([self._path(keys.ns, int(keys.hashes[i])) for i in idx.tolist()])
        done = idx[np.array(gone, bool)] if idx.size else idx
        if self._count >= 0:
            with self._lock:
                self._count -= done.size
        self.events.publish(EventKind.REMOVED, self.name, keys[done])
        return had

    def _delete_paths(self, paths: list[str]) -> list[bool]:
        res = self._run(self._gather([partial(self.fs._rm_file, p) for p in paths]))
        return [not isinstance(r, BaseException) or isinstance(r, FileNotFoundError) for r in res]

    # ---- listing, capacity and eviction --------------------------------------------------
    def list_blocks(self) -> list[tuple[int, int, float]]:
        """(namespace id, hash, write time in seconds) of every block object under the root, in one
        listing (``kvbm-fs ls``); the tier's own accounting uses the same listing."""
        return self._list()

    def _list(self) -> list[tuple[int, int, float]]:
        """(ns, hash, mtime) of every block object under the root."""
        return self._scan()[0]

    def _scan(self) -> tuple[list[tuple[int, int, float]], dict[str, str]]:
        """Every block object under the root (ns, hash, mtime) and every retain mark object's path, with
        its version as listed (ETag, size, mtime: a changed object reads again)."""
        try:
            found = self._run(self._call(lambda: self.fs._find(self.root, detail=True)))
        except FileNotFoundError:
            return [], {}
        out, marks = [], {}
        for path, info in found.items():
            parts = path.rstrip("/").split("/")
            if len(parts) < 3 or len(parts[-1]) != 16 or len(parts[-3]) != 16:
                if parse_path(path) is not None:
                    marks[path] = f"{info.get('ETag') or info.get('etag') or ''}/{info.get('size')}/{_mtime(info)}"
                continue
            try:
                out.append((int(parts[-3], 16), int(parts[-1], 16), _mtime(info)))
            except ValueError:
                continue
        return out, marks

    def _count_objects(self) -> int:
        return len(self._list())

    def _make_room(self, n: int, keep: set[tuple[int, int]]) -> int:
        """Evict the least recently written objects (object stores keep no atime), never a pinned one
        nor one the current put counts as stored (``keep``). Returns how many of ``n`` now fit."""
        cap = self.capacity // self.object_bytes
        over = self._count + n - cap
        if over <= 0:
            return n
        if not self.evict_on_put:  # the daemon demotes from this tier (coldest); a put only takes free room
            return max(0, n - over)
        pick = self._next_victims(over, keep)
        gone = self._delete_paths([self._path(ns, h) for ns, h in pick])
        evicted = [(ns, h) for (ns, h), g in zip(pick, gone) if g]
        with self._lock:
            self._count -= len(evicted)
            room = max(0, cap - self._count)
        self.counters["evictions"] += len(evicted)
        for ns, hs in _by_namespace(evicted):
            self.events.publish(EventKind.EVICTED, self.name, BlockKeys(ns, hs))
        return min(n, room)

    def coldest(self, n: int) -> list[BlockKeys]:
        """The next ``n`` blocks eviction on put would take (:meth:`_next_victims`), without removing
        them: what the placement daemon demotes from a bounded tier that no longer evicts on put. An
        unbounded tier names none: it never passes a watermark, and ranking would list the bucket."""
        if self._count < 0 or n <= 0:
            return []
        return [BlockKeys(ns, hs) for ns, hs in _by_namespace(self._next_victims(n, set()))]

    def _next_victims(self, n: int, keep: set[tuple[int, int]]) -> list[tuple[int, int]]:
        """The ``n`` objects eviction takes next (:func:`.retain.victims`), from one listing, never a
        pinned one nor one in ``keep``: eviction on put and demotion (:meth:`coldest`) share it."""
        with self._lock:
            pinned = set(self._pins) | keep
        held = getattr(self._listing, "held", None)  # inside a put: its one listing
        if held is None:
            blocks, marks = self._scan()
        else:
            if not held:
                held.append(self._scan())
            blocks, marks = held[0]
        shares = self._load_marks(marks).shares()
        budget = retain_budget(shares.values(), self.capacity // self.object_bytes)
        return victims(blocks, self.policy.rank, self._marks.hashes(), budget, n, pinned)

    @contextmanager
    def _capacity_decision(self) -> Iterator[None]:
        """A bounded put's admission and room: one at a time in this process (``_room``; the slots are
        reserved inside), and this thread's victim choices (:meth:`_next_victims`) within it share one
        listing of the bucket: the admission filter weighs the victims (:meth:`coldest`) that eviction
        then takes, one listing, not two."""
        with self._room:
            self._listing.held = []
            try:
                yield
            finally:
                self._listing.held = None

    # ---- retain marks ----------------------------------------------------------------------
    def _load_marks(self, paths: dict[str, str]) -> Marks:
        """Read the mark objects (path -> listed version) not read yet (concurrently); one that fails is
        read next time, one that is not a mark only once it changes (one warning per version)."""
        todo = self._marks.missing(paths)
        if todo:
            for p, r in zip(todo, self._run(self._gather([partial(self._read_object, p) for p in todo]))):
                if isinstance(r, BaseException):
                    log.warning("%s: cannot read retain mark %s (%s)", self.url, p, type(r).__name__)
                    continue
                try:
                    self._marks.add(p, bytes(r))
                except ValueError:
                    self._marks.reject(p, paths[p])
                    log.warning("%s: %s is not a retain mark object; ignored until it changes", self.url, p)
        return self._marks

    def retain(self, ns: int, share: float | None = DEFAULT_RETAIN_SHARE, hashes: np.ndarray | None = None) -> int:
        """Retain the blocks ``hashes`` of namespace ``ns`` the bucket holds (default: all it holds
        now; blocks stored later are ordinary): a bounded tier, this instance or any other on the
        bucket, evicts them after every ordinary object while retained objects hold at most ``share``
        of its capacity (past it the oldest go first). ``None`` unmarks all of ``ns``. The marks are
        objects in the bucket (:mod:`.retain`). Returns blocks newly marked (or unmarked)."""
        if share is not None:
            share = check_share(share)
        blocks, paths = self._scan()
        self._load_marks(paths)
        held = np.unique(np.array([h for n, h, _ in blocks if n == ns], np.uint64))
        marked = self._marks.hashes().get(ns, np.zeros(0, np.uint64))
        if share is None:
            mine = self._marks.paths(ns)
            if not all(self._delete_paths(mine)):
                raise ConfigError(f"cannot delete the retain marks of {ns:016x} at {self.url}; run it again")
            self._marks.missing({p: v for p, v in paths.items() if p not in mine})
            return int(np.isin(held, marked).sum())
        want = held if hashes is None else np.intersect1d(np.asarray(hashes, np.uint64), held)
        new = np.setdiff1d(want, marked)
        if new.size == 0 and self._marks.shares().get(ns) == share:
            return 0
        objs = [
            (mark_path(self.root, ns), encode(share, new[a : a + CHUNK])) for a in range(0, max(new.size, 1), CHUNK)
        ]
        res = self._run(self._gather([partial(self._write_object, p, b) for p, b in objs]))
        if any(isinstance(r, BaseException) for r in res):
            raise ConfigError(f"cannot write retain marks to {self.url}; check the endpoint and run it again")
        for p, b in objs:
            self._marks.add(p, b)
        return int(new.size)

    def retained(self) -> dict[str, Any]:
        """The retain marks ({namespace id: share}), how many held blocks they mark and how many a
        bounded tier keeps (``budget``; None when unbounded: nothing is evicted)."""
        blocks, paths = self._scan()
        self._load_marks(paths)
        shares = self._marks.shares()
        n = 0
        for ns, marked in self._marks.hashes().items():
            n += int(np.isin(np.array([h for b, h, _ in blocks if b == ns], np.uint64), marked).sum())
        cap = None if self._count < 0 else self.capacity // self.object_bytes
        budget = None if cap is None else retain_budget(shares.values(), cap)
        return {"marks": shares, "blocks": n, "budget": budget}

    def iter_keys(self) -> Iterator[BlockKeys]:
        by_ns: dict[int, list[int]] = {}
        for ns, h, _ in self._list():
            by_ns.setdefault(ns, []).append(h)
        for ns, hs in by_ns.items():
            yield BlockKeys(ns, np.array(sorted(hs), np.uint64))

    @property
    def capacity_bytes(self) -> int:
        return self.capacity

    @property
    def used_bytes(self) -> int:
        return len(self) * self.object_bytes

    def __len__(self) -> int:
        return self._count if self._count >= 0 else len(self._list())

    def usage(self) -> tuple[int, int] | None:
        n = self._count  # unbounded: unknown without listing the bucket
        return None if n < 0 else (n, n * self.object_bytes)

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = {"name": self.name, "medium": self.medium.value, "persistent": True}
        if self._count >= 0:  # unbounded tiers would need a full listing for these
            s = super().stats()
        s.update(
            url=self.url, io=self.io, breaker=self.breaker.state, breaker_trips=self.breaker.trips, **self.counters
        )
        if self._nixl is not None:
            s["nixl_timeouts"] = self._nixl.counters["timeouts"]
        return s

    def close(self) -> None:
        """Free the NIXL agent (io=nixl); the fsspec filesystem needs no closing."""
        if self._nixl is not None:
            self._nixl.close()

    def __repr__(self) -> str:
        io = "" if self.io == "s3fs" else f", io={self.io!r}"
        return f"RemoteTier({self.url!r}, block_nbytes={self.block_nbytes}{io})"


def open_remote(spec: TierSpec, **common: Any) -> RemoteTier:
    opts = dict(spec.options)
    so = opts.pop("storage_options", {})
    if not isinstance(so, dict):
        raise ConfigError("storage_options must be a table/mapping")
    so = dict(so)  # the caller's config table stays as it was
    for k in ("endpoint_url", "anon", "key", "secret", "token", "profile"):
        if k in opts:
            so[k] = opts.pop(k)
    for k, conv in (("max_concurrency", int), ("timeout", float), ("head_timeout", float), ("retries", int),
                    ("backoff", float), ("breaker_threshold", int), ("breaker_cooldown", float)):  # fmt: skip
        if k in opts:
            try:
                opts[k] = conv(opts[k])
            except ValueError:
                raise ConfigError(f"remote tier option {k}={opts[k]!r} is not a number") from None
    url = spec.url.split("?", 1)[0].removeprefix("remote+")
    return RemoteTier(url, capacity=opts.pop("capacity", None), storage_options=so, **common, **opts)


def _by_namespace(blocks: list[tuple[int, int]]) -> list[tuple[int, np.ndarray]]:
    """(ns, hashes) per namespace, in the order of each namespace's first block and then the list's."""
    by_ns: dict[int, list[int]] = {}
    for n, h in blocks:
        by_ns.setdefault(n, []).append(h)
    return [(n, np.array(hs, np.uint64)) for n, hs in by_ns.items()]


def _size(head: Any) -> int | None:
    n = head.get("ContentLength", head.get("size")) if isinstance(head, dict) else None
    return int(n) if isinstance(n, int) else None


def _namespace_of(doc: dict[str, Any], url: str, short_id: str) -> Namespace:
    """A stored namespace manifest, or FormatVersionError when it is not one this build reads."""
    try:
        return Namespace.from_dict(doc)
    except ConfigError as e:
        raise FormatVersionError(f"{url}: {short_id}/manifest.json is not a namespace manifest: {e}") from None


def _mtime(info: dict[str, Any]) -> float:
    m = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
    return m.timestamp() if hasattr(m, "timestamp") else float(m)


def _write_row(out: Any, i: int, payload: memoryview) -> None:
    src = np.frombuffer(payload, np.uint8)
    if is_torch(out):
        import torch

        out[i].copy_(torch.from_numpy(src.copy()))
    else:
        out[i] = src
