"""What persistent tiers hold, for operators: namespaces, usage, where blocks live, deletes, deep
verification and copies between tiers (``kvbm-fs ls|du|stat|rm|verify|cp`` and ``kvbm://``).

A target is a tier URL or a config file; only tiers other processes can read (disk, remote) are
catalogued. Opening never creates a tier (a missing one is a :class:`ConfigError`), and the tiers are
opened with the geometry they recorded, so no layout is needed. Listings are numpy arrays of hashes
per namespace, and every bulk operation works on :class:`BlockKeys` batches. Design: docs/architecture.md
("Operating persistent tiers").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from . import codec
from .errors import ConfigError, CorruptBlockError, KvbmError
from .keys import BlockKeys, Namespace
from .registry import TierSpec, open_tier, tier_class
from .tier import Tier
from .transfer import move
from .units import parse_size

if TYPE_CHECKING:
    from .tiers.disk import DiskTier
    from .tiers.remote import RemoteTier

Target = str | os.PathLike[str] | list[Any] | tuple[Any, ...]  # URL, config file, or a list of URLs/tier tables
# progress(description, total) -> advance(n): the CLI passes a rich progress bar, library callers nothing
Progress = Callable[[str, int], Callable[[int], None]]
BATCH_BYTES = 64 << 20  # bytes of blocks moved per batch by copy and verify


def quiet(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


@dataclass
class Blocks:
    """The blocks one tier holds in one namespace; ``mtimes`` (seconds) where the tier records write times."""

    ns: int
    hashes: np.ndarray
    parents: np.ndarray
    mtimes: np.ndarray | None

    def keys(self, idx: Any = slice(None)) -> BlockKeys:
        return BlockKeys(self.ns, self.hashes[idx], self.parents[idx])


class Catalog:
    """Open persistent tiers of a target, with their listings (cached until :meth:`refresh`)."""

    def __init__(self, tiers: list[Tier]) -> None:
        self.tiers = tiers
        self._blocks: dict[str, dict[int, Blocks]] = {}
        self._described: dict[str, dict[int, Namespace]] = {}

    @classmethod
    def open(cls, target: Target, *, create: bool = False, block_nbytes: int | None = None, blocks: int = 0) -> Catalog:
        """Open the tiers of ``target`` (a tier URL or a config file). ``create`` (a copy's destination)
        creates a missing tier for ``block_nbytes``-byte blocks instead of refusing (a new disk tier
        without a ``capacity`` gets room for ``blocks``)."""
        tiers: list[Tier] = []
        try:
            for name, spec in target_specs(target):
                tiers.append(open_spec(spec, name, create=create, block_nbytes=block_nbytes, blocks=blocks))
        except BaseException:
            for t in tiers:
                t.close()
            raise
        return cls(tiers)

    def close(self) -> None:
        for t in self.tiers:
            t.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> None:
        self._blocks.clear()
        self._described.clear()

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise ConfigError(f"no tier {name!r}; tiers: {', '.join(t.name for t in self.tiers)}")

    # ---- listings ------------------------------------------------------------------------
    def blocks(self, tier: Tier) -> dict[int, Blocks]:
        if tier.name not in self._blocks:
            self._blocks[tier.name] = _list_blocks(tier)
        return self._blocks[tier.name]

    def described(self, tier: Tier) -> dict[int, Namespace]:
        if tier.name not in self._described:
            self._described[tier.name] = namespace_descriptions(tier)
        return self._described[tier.name]

    def namespace(self, ns: int) -> Namespace | None:
        for t in self.tiers:
            if ns in self.described(t):
                return self.described(t)[ns]
        return None

    def namespace_ids(self) -> list[int]:
        ids: set[int] = set()
        for t in self.tiers:
            ids |= set(self.blocks(t)) | set(self.described(t))
        return sorted(ids)

    def resolve_namespace(self, text: str) -> int:
        """A namespace id from its 16 hex digits or a unique prefix of them."""
        t = text.lower().removeprefix("0x")
        hits = [n for n in self.namespace_ids() if f"{n:016x}".startswith(t)] if t else []
        if len(hits) == 1:
            return hits[0]
        if not hits and len(t) == 16:
            try:
                return int(t, 16)
            except ValueError:
                pass
        why = "matches several" if hits else "matches none"
        raise ConfigError(f"namespace {text!r} {why} of the namespaces here ({len(self.namespace_ids())})")

    # ---- ls and du -----------------------------------------------------------------------
    def ls(self) -> list[dict[str, Any]]:
        """One row per namespace: its description, and blocks, bytes and write times over all tiers."""
        rows = []
        marks = {t.name: t.retained()["marks"] for t in self.tiers if hasattr(t, "retained")}
        for ns in self.namespace_ids():
            row: dict[str, Any] = {"namespace": f"{ns:016x}", **_describe(self.namespace(ns))}
            row["retained"] = {name: m[ns] for name, m in marks.items() if ns in m}  # tier -> share
            per: dict[str, dict[str, int]] = {}
            times: list[np.ndarray] = []
            for t in self.tiers:
                b = self.blocks(t).get(ns)
                if b is not None:
                    per[t.name] = {"blocks": len(b.hashes), "bytes": len(b.hashes) * stored_bytes(t)}
                    if b.mtimes is not None and b.mtimes.size:
                        times.append(b.mtimes)
            row["blocks"] = sum(p["blocks"] for p in per.values())
            row["bytes"] = sum(p["bytes"] for p in per.values())
            allt = np.concatenate(times) if times else None
            row["oldest"] = _iso(float(allt.min())) if allt is not None else None
            row["newest"] = _iso(float(allt.max())) if allt is not None else None
            row["tiers"] = per
            rows.append(row)
        return rows

    def du(self) -> list[dict[str, Any]]:
        """Per tier: capacity, blocks and bytes, in all and per namespace."""
        out = []
        for t in self.tiers:
            per = {
                f"{ns:016x}": {"blocks": len(b.hashes), "bytes": len(b.hashes) * stored_bytes(t)}
                for ns, b in self.blocks(t).items()
            }
            cap = t.capacity_bytes
            out.append(
                dict(
                    tier=t.name,
                    medium=t.medium.value,
                    url=tier_url(t),
                    capacity_bytes=None if cap >= 1 << 62 else cap,
                    block_bytes=stored_bytes(t),
                    blocks=sum(p["blocks"] for p in per.values()),
                    bytes=sum(p["bytes"] for p in per.values()),
                    namespaces=per,
                )
            )
        return out

    # ---- where blocks live ---------------------------------------------------------------
    def locate(self, keys: BlockKeys) -> dict[str, Any]:
        """For each key, the tiers holding it (one ``contains`` batch per tier), and each tier's prefix."""
        where = {t.name: t.contains(keys) for t in self.tiers}
        blocks = [
            {"index": i, "hash": f"{h:016x}", "tiers": [n for n, m in where.items() if m[i]]}
            for i, h in enumerate(keys.hashes.tolist())
        ]
        prefix = {n: int(np.argmin(m)) if not m.all() else len(m) for n, m in where.items()}
        return {
            "namespace": f"{keys.ns:016x}",
            **_describe(self.namespace(keys.ns)),
            "blocks": len(keys),
            "found": {n: int(m.sum()) for n, m in where.items()},
            "prefix": prefix,
            "keys": blocks,
        }

    # ---- deletes -------------------------------------------------------------------------
    def select(
        self, namespace: str | None = None, tenant: str | None = None, older_than: float | None = None
    ) -> list[tuple[Tier, Blocks, np.ndarray]]:
        """(tier, blocks, mask) of what ``rm`` would remove: every block of a namespace, of a tenant's
        namespaces, and/or written more than ``older_than`` seconds ago (tiers that record write times)."""
        if namespace is None and tenant is None and older_than is None:
            raise ConfigError("say what to remove: --namespace ID, --tenant T and/or --older-than AGE")
        want = self.resolve_namespace(namespace) if namespace is not None else None
        cutoff = time.time() - older_than if older_than is not None else None
        out = []
        for t in self.tiers:
            for ns, b in self.blocks(t).items():
                if want is not None and ns != want:
                    continue
                if tenant is not None:
                    d = self.namespace(ns)
                    if d is None or d.tenant != tenant:
                        continue
                mask = np.ones(len(b.hashes), bool)
                if cutoff is not None:
                    if b.mtimes is None:
                        continue  # the tier records no write times: --older-than selects nothing there
                    mask = b.mtimes < cutoff
                if mask.any():
                    out.append((t, b, mask))
        return out

    def remove(self, selected: list[tuple[Tier, Blocks, np.ndarray]], dry_run: bool = False) -> dict[str, Any]:
        rows, total, done = [], 0, 0
        for t, b, mask in selected:
            idx = np.flatnonzero(mask)
            n = 0
            if not dry_run:
                for a in range(0, idx.size, 4096):
                    n += int(t.delete(b.keys(idx[a : a + 4096])).sum())
                if mask.all() and hasattr(t, "retain"):  # the whole namespace went: its retain mark goes too
                    t.retain(b.ns, None)
            rows.append(dict(tier=t.name, namespace=f"{b.ns:016x}", blocks=int(idx.size), removed=n,
                             bytes=int(idx.size) * stored_bytes(t)))  # fmt: skip
            total += int(idx.size)
            done += n
        if not dry_run:
            self.refresh()
        unsupported = [t.name for t in self.tiers if any(b.mtimes is None for b in self.blocks(t).values())]
        return {"dry_run": dry_run, "selected": total, "removed": done, "rows": rows, "no_write_times": unsupported}

    # ---- deep verification ---------------------------------------------------------------
    def verify(self, fix: bool = False, progress: Progress = quiet) -> dict[str, Any]:
        """Re-read every block of every tier and check header, key echo and payload checksums;
        ``fix`` removes the blocks that fail. Disk tiers run their own check (``kvbm-fs check --deep``)."""
        reports = []
        for t in self.tiers:
            if _is_disk(t):
                reports.append({"tier": t.name, **_disk_check(t, fix, progress(f"verify {t.name}", len(t)))})
            else:
                reports.append({"tier": t.name, **self._verify_objects(t, fix, progress)})
        self.refresh()
        return {
            "tiers": reports,
            "entries": sum(r["entries"] for r in reports),
            "bad": sum(r["bad"] for r in reports),
            "fixed": sum(r["fixed"] for r in reports),
        }

    def _verify_objects(self, t: Tier, fix: bool, progress: Progress) -> dict[str, Any]:
        listing = self.blocks(t)
        advance = progress(f"verify {t.name}", sum(len(b.hashes) for b in listing.values()))
        rep: dict[str, Any] = dict(entries=0, ok=0, bad=0, errors=0, bad_keys=[], fixed=0)
        step = max(1, min(1024, BATCH_BYTES // max(1, t.block_nbytes)))
        for ns, b in listing.items():
            d = self.namespace(ns)
            tokens = d.layout.block_size if d is not None else None
            for a in range(0, len(b.hashes), step):
                keys = b.keys(slice(a, a + step))
                res = read_canonical(t, keys, tokens)
                bad = [i for i, r in enumerate(res) if isinstance(r, CorruptBlockError)]
                rep["errors"] += sum(isinstance(r, BaseException) and not isinstance(r, CorruptBlockError) for r in res)
                rep["entries"] += len(keys)
                rep["bad"] += len(bad)
                rep["bad_keys"].extend((f"{ns:016x}/{int(keys.hashes[i]):016x}", str(res[i])) for i in bad[:100])
                if fix and bad:
                    rep["fixed"] += int(t.delete(keys[np.array(bad, np.int64)]).sum())
                advance(len(keys))
        rep["ok"] = rep["entries"] - rep["bad"] - rep["errors"]
        rep["bad_keys"] = rep["bad_keys"][:100]
        return rep

    # ---- copies --------------------------------------------------------------------------
    def copy_to(
        self,
        dst: Tier,
        namespaces: list[str] | None = None,
        limit: int | None = None,
        progress: Progress = quiet,
    ) -> dict[str, Any]:
        """Copy blocks into ``dst`` in batches through ``transfer.move``: each is read through ``Tier.get``
        (verified) and written with ``Tier.put`` (which checksums it again); blocks ``dst`` already holds are skipped, so an
        interrupted copy resumes where it stopped. ``limit`` stops after that many writes."""
        want = {self.resolve_namespace(n) for n in namespaces} if namespaces else None
        have = _list_blocks(dst)
        plan: list[tuple[Tier, Blocks, np.ndarray, Namespace]] = []
        rep: dict[str, Any] = dict(written=0, present=0, failed=0, refused=0, undescribed=[], namespaces={})
        seen: dict[int, np.ndarray] = {}
        for t in self.tiers:
            for ns, b in self.blocks(t).items():
                if want is not None and ns not in want:
                    continue
                d = self.namespace(ns)
                if d is None:  # no layout known: the headers written would lack the token count
                    rep["undescribed"].append(f"{ns:016x}")
                    continue
                before = seen.get(ns, np.empty(0, np.uint64))  # copied from an earlier tier of the source
                at_dst = np.isin(b.hashes, have[ns].hashes) if ns in have else np.zeros(len(b.hashes), bool)
                earlier = np.isin(b.hashes, before)
                todo = ~at_dst & ~earlier
                rep["present"] += int((at_dst & ~earlier).sum())
                seen[ns] = np.concatenate([before, b.hashes])
                if todo.any():
                    plan.append((t, b, np.flatnonzero(todo), d))
        total = sum(idx.size for _, _, idx, _ in plan)
        if limit is not None:
            total = min(total, limit)
        advance = progress(f"copy to {dst.name}", total)
        evict, dst.evict_on_put = dst.evict_on_put, False  # a full destination refuses; it never evicts copies
        try:
            for t, b, idx, d in plan:
                dst.bind_namespace(d)
                _with_block_size((t, dst), d.layout.block_size)
                step = max(1, min(1024, BATCH_BYTES // max(1, t.block_nbytes)))
                rows = np.empty((min(step, idx.size), t.block_nbytes), np.uint8)
                for a in range(0, idx.size, step):
                    if limit is not None and rep["written"] >= limit:
                        break
                    part = idx[a : a + step]
                    if limit is not None:
                        part = part[: limit - rep["written"]]
                    keys = b.keys(part)
                    got, stored = move(keys, t, dst, rows)  # the one byte path (kvbm_fs.transfer)
                    n_got, n_stored = int(got.sum()), int(stored.sum())
                    rep["failed"] += len(keys) - n_got
                    rep["written"] += n_stored
                    rep["refused"] += n_got - n_stored
                    per = rep["namespaces"].setdefault(f"{b.ns:016x}", 0)
                    rep["namespaces"][f"{b.ns:016x}"] = per + n_stored
                    advance(len(keys))
        finally:
            dst.evict_on_put = evict
        return rep


# ---- opening targets ---------------------------------------------------------------------------
def target_specs(target: Target) -> list[tuple[str, TierSpec]]:
    """(tier name, spec) for a tier URL, each tier of a config file, or each of a list of those;
    named as ``mount`` names them (a ``name`` option, else by kind, numbered when repeated)."""
    specs = [s for one in target for s in _specs(one)] if isinstance(target, (list, tuple)) else _specs(target)
    out = []
    for i, s in enumerate(specs):
        name = s.options.pop("name", None)
        if name is None:
            name = _default_name(s)
            if any(_default_name(o) == name for o in specs[:i]):
                name = f"{name}{i}"
        out.append((str(name), s))
    return out


def _specs(target: str | os.PathLike[str] | dict[str, Any]) -> list[TierSpec]:
    from .config import resolve
    from .mount import _spec

    if isinstance(target, dict):  # a tier table {url=..., ...}
        return [_spec(target)]
    text = os.fspath(target)
    if "://" in text:
        return [TierSpec.parse(text)]
    if not os.path.exists(text):
        raise ConfigError(f"{text} is neither a tier URL (scheme://...) nor a config file")
    return [_spec(t) for t in resolve(config=text, env={}).tiers]


def _default_name(spec: TierSpec) -> str:
    return (
        "disk"
        if spec.scheme in ("file", "disk")
        else spec.scheme
        if spec.scheme in ("host", "gpu", "peer")
        else "remote"
    )


def open_spec(
    spec: TierSpec, name: str, *, create: bool = False, block_nbytes: int | None = None, blocks: int = 0
) -> Tier:
    """Open one disk or remote tier with the block size it recorded; refuse (unless ``create``) where
    none exists, rather than creating an empty one."""
    opts = dict(spec.options)
    for k in ("policy", "name"):
        opts.pop(k, None)
    if spec.scheme in ("file", "disk"):
        meta = _disk_meta(spec.location)
        if meta is not None:
            block_nbytes = int(meta["block_nbytes"])
            have = int(meta["num_slots"]) * int(meta["slot_bytes"])
            want = parse_size(opts["capacity"], "disk capacity") if "capacity" in opts and create else 0
            opts["capacity"] = max(have, want)  # never shrinks, and only a copy's destination grows
        elif not create:
            raise ConfigError(f"no kvbm_fs disk tier at {spec.location} (no kvbm_fs.json there)")
        elif block_nbytes is not None and "capacity" not in opts:
            from .tiers.disk import HEADER_PAGE, round_up

            opts["capacity"] = max(blocks, 1) * (HEADER_PAGE + round_up(block_nbytes, HEADER_PAGE))
    elif spec.scheme in ("host", "gpu", "peer"):
        raise ConfigError(
            f"{spec.scheme}:// tiers live in one process's memory; operate on disk (file://) and remote tiers"
        )
    else:
        tier_class(spec.scheme)  # unknown schemes fail here, naming the known ones
        got = _remote_meta(spec)
        if got is not None:
            block_nbytes = int(got)
        elif not create:
            raise ConfigError(f"no kvbm_fs remote tier at {spec.redacted()} (no kvbm_fs.remote.json there)")
        opts.pop("capacity", None)  # unbounded: a bounded tier lists every object at open to count them
    if block_nbytes is None:
        raise ConfigError(f"{spec.redacted()} does not exist yet and no block size was given")
    opts["name"] = name
    return open_tier(TierSpec(spec.scheme, spec.location, opts, spec.url), block_nbytes=block_nbytes)


def _disk_meta(location: str) -> dict[str, Any] | None:
    path = os.path.join(location, "kvbm_fs.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
        int(meta["block_nbytes"]), int(meta["num_slots"]), int(meta["slot_bytes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{location} is not a kvbm_fs disk tier ({path}: {e})") from None
    return dict(meta)


def _remote_meta(spec: TierSpec) -> int | None:
    """The block size a remote tier recorded in ``kvbm_fs.remote.json``, or None where there is none."""
    from .tiers.remote.fs import open_fs as _open_fs

    url = spec.url.split("?", 1)[0].removeprefix("remote+")
    so = dict(spec.options.get("storage_options") or {})
    for k in ("endpoint_url", "anon", "key", "secret", "token", "profile"):
        if k in spec.options:
            so[k] = spec.options[k]
    if url.startswith("file://") and not os.path.isdir(url.removeprefix("file://")):
        return None  # _open_fs would create the folder
    fs, root = _open_fs(url, so)
    try:
        raw = fs.cat_file(f"{root}/kvbm_fs.remote.json")
        return int(json.loads(raw)["block_nbytes"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{spec.redacted()}: kvbm_fs.remote.json is not a tier description ({e})") from None
    except Exception as e:
        raise ConfigError(
            f"cannot read {spec.redacted()} ({type(e).__name__}); check endpoint and credentials"
        ) from None


# ---- per-tier listings and descriptions ----------------------------------------------------------
def stored_bytes(t: Tier) -> int:
    """Bytes one block takes on the tier's medium (a disk slot, a remote object)."""
    return int(getattr(t, "slot_bytes", 0) or getattr(t, "object_bytes", 0) or t.block_nbytes)


def tier_url(t: Tier) -> str:
    return str(getattr(t, "url", None) or (f"file://{t.root}" if hasattr(t, "root") else t.name))


def _list_blocks(t: Tier) -> dict[int, Blocks]:
    """Every block of ``t`` by namespace. Remote objects carry write times (their mtimes); the disk
    index records only access ranks, so disk blocks have none."""
    if _is_remote(t):  # one listing, with mtimes
        found = t.list_blocks()
        if not found:
            return {}
        a = np.array([(ns, h) for ns, h, _ in found], np.uint64).reshape(-1, 2)
        m = np.array([x[2] for x in found], np.float64)
        order = np.lexsort((a[:, 1], a[:, 0]))
        a, m = a[order], m[order]
        cuts = np.flatnonzero(np.diff(a[:, 0])) + 1
        return {
            int(ch[0, 0]): Blocks(int(ch[0, 0]), ch[:, 1].copy(), np.zeros(len(ch), np.uint64), mt)
            for ch, mt in zip(np.split(a, cuts), np.split(m, cuts))
        }
    parts: dict[int, list[BlockKeys]] = {}
    for batch in t.iter_keys():
        parts.setdefault(batch.ns, []).append(batch)
    return {
        ns: Blocks(ns, np.concatenate([k.hashes for k in ks]), np.concatenate([k.parents for k in ks]), None)
        for ns, ks in parts.items()
    }


def namespace_descriptions(t: Tier) -> dict[int, Namespace]:
    """The namespaces a tier describes next to its data: a disk tier's ``namespaces/<id>.json`` files
    and index ``ns/<id>`` entries, a remote tier's ``<ns>/manifest.json`` objects."""
    docs: list[Any] = []
    tier: Any = t
    root = getattr(t, "root", "")
    if _is_disk(t):
        return t.namespaces()
    if _is_remote(t):
        try:
            subs = [p.rstrip("/") for p in tier.fs.ls(root, detail=False)]
        except FileNotFoundError:
            subs = []
        paths = [f"{p}/manifest.json" for p in subs if len(p.rsplit("/", 1)[-1]) == 16]
        got = tier.fs.cat(paths, on_error="return") if paths else {}
        docs.extend(v for v in got.values() if isinstance(v, bytes))
    out: dict[int, Namespace] = {}
    for raw in docs:
        try:
            d = json.loads(raw)
            ns = Namespace.from_dict({k: v for k, v in d.items() if k != "id"} if isinstance(d, dict) else d)
        except (ValueError, TypeError, KvbmError):
            continue  # unreadable descriptions leave the namespace undescribed, never fail the listing
        out.setdefault(ns.id, ns)
    return out


def _is_disk(t: Tier) -> TypeGuard[DiskTier]:
    from .tiers.disk import DiskTier

    return isinstance(t, DiskTier)


def _is_remote(t: Tier) -> TypeGuard[RemoteTier]:
    from .tiers.remote import RemoteTier

    return isinstance(t, RemoteTier)


def _describe(ns: Namespace | None) -> dict[str, Any]:
    if ns is None:
        return dict(model=None, layout=None, tenant=None, rank=None, world_size=None, hash_scheme=None)
    return dict(model=ns.model, layout=ns.layout.to_dict(), tenant=ns.tenant, rank=ns.rank,
                world_size=ns.world_size, hash_scheme=ns.hash_scheme)  # fmt: skip


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _with_block_size(tiers: tuple[Tier, ...], block_size: int) -> None:
    """Tiers opened without a layout write headers with the token count of the namespace being copied."""
    for t in tiers:
        if hasattr(t, "block_size"):
            t.block_size = block_size


def _disk_check(t: DiskTier, fix: bool, advance: Callable[[int], None]) -> dict[str, Any]:
    """``DiskTier.check(deep=True)``, the offline check ``kvbm-fs check`` runs, advancing a progress bar."""
    done = [0]

    def progress(n: int, total: int) -> None:
        advance(n - done[0])
        done[0] = n

    rep = t.check(fix=fix, deep=True, progress=progress)
    rep.setdefault("errors", 0)
    return rep


# ---- raw block reads (kvbm://, verify) ------------------------------------------------------------
def read_canonical(t: Tier, keys: BlockKeys, block_size: int | None = None) -> list[Any]:
    """Each block's canonical bytes (docs/spec.md: header + payload) as stored, verified; per key the
    bytes, FileNotFoundError, CorruptBlockError or the I/O error. Nothing is changed or removed."""
    if _is_disk(t):
        return t.read_canonical(keys, block_size)
    if _is_remote(t):
        paths = [f"{t.root}/{keys.ns:016x}/{h >> 56:02x}/{h:016x}" for h in keys.hashes.tolist()]
        got = t.fs.cat(paths, on_error="return")
        return [
            _checked(got.get(p, FileNotFoundError(p)), keys, i, t.block_nbytes, block_size) for i, p in enumerate(paths)
        ]
    rows = np.empty((len(keys), t.block_nbytes), np.uint8)
    found = t.get(keys, rows)
    return [
        codec.encode(keys[i], int(keys.parents[i]), block_size or 0, rows[i])
        if found[i]
        else FileNotFoundError(str(keys[i]))
        for i in range(len(keys))
    ]


def _checked(raw: Any, keys: BlockKeys, i: int, nbytes: int, block_size: int | None) -> Any:
    if isinstance(raw, BaseException):
        return raw
    try:
        codec.verify(raw, keys[i], nbytes, block_size)
    except CorruptBlockError as e:
        return type(e)(f"{keys[i]}: {e}")
    if len(raw) != codec.HEADER_SIZE + nbytes:
        return CorruptBlockError(f"{keys[i]}: {len(raw)} bytes, a block has {codec.HEADER_SIZE + nbytes}")
    return bytes(raw)


def parse_age(text: str) -> float:
    """Seconds in ``30s``, ``15m``, ``12h``, ``7d`` or ``2w``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ConfigError(f"age {text!r}: use a number and s, m, h, d or w (e.g. 7d)") from None
