"""``kvbm://``: the blocks of persistent tiers as a read-only fsspec filesystem.

``fsspec.filesystem("kvbm", config="kvbm.toml")`` (or ``tiers=[...]``, ``url=...``; default
``KVBM_FS_CONFIG``). ``/`` lists namespaces (directories named by their 16-hex id), ``/<ns>`` lists
blocks (files named by their 16-hex sequence hash, with ``size`` and the ``tier`` holding them), and
a block's bytes are its canonical form (docs/spec.md: the 128-byte header, then the payload) exactly
as stored, verified before they are returned: a corrupt block raises :class:`CorruptBlockError`,
never hands out bytes. Only ``rm`` writes. Registered through the ``fsspec.specs`` entry point.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from fsspec.spec import AbstractFileSystem

from . import codec
from .catalog import Catalog, read_canonical
from .errors import ConfigError, CorruptBlockError, KvbmError
from .keys import BlockKeys


class ReadOnlyError(KvbmError, PermissionError):
    """kvbm:// is read-only: blocks are written by stores, not through a filesystem."""


class _BlockFile(io.BytesIO):
    """A block's verified bytes, read whole (blocks are megabytes at most), as an fsspec file."""

    def __init__(self, fs: KvbmFileSystem, path: str, data: bytes) -> None:
        super().__init__(data)
        self.fs, self.path, self.size = fs, path, len(data)

    @property
    def mode(self) -> str:
        return "rb"

    @property
    def name(self) -> str:
        return self.path


class KvbmFileSystem(AbstractFileSystem):
    protocol = "kvbm"
    root_marker = ""

    def __init__(
        self,
        config: str | os.PathLike[str] | None = None,
        tiers: list[Any] | None = None,
        url: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        given = [x for x in (config, tiers, url) if x]
        if len(given) > 1:
            raise ConfigError("kvbm:// takes one of config=, tiers= or url=")
        target: Any = given[0] if given else os.environ.get("KVBM_FS_CONFIG")
        if not target:
            raise ConfigError("kvbm:// needs config='kvbm.toml', tiers=[URL, ...] or url=URL (or KVBM_FS_CONFIG)")
        self.catalog = Catalog.open(target)

    # ---- paths ---------------------------------------------------------------------------
    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        p = str(path)
        p = p.removeprefix("kvbm://").removeprefix("kvbm:")
        return p.strip("/")

    def _parse(self, path: str) -> tuple[int | None, int | None]:
        """(namespace, hash) of a path; None where the path stops above."""
        parts = [p for p in self._strip_protocol(path).split("/") if p]
        if len(parts) > 2:
            raise FileNotFoundError(path)
        try:
            vals = [int(p, 16) for p in parts]
        except ValueError:
            raise FileNotFoundError(path) from None
        if any(len(p) != 16 for p in parts):
            raise FileNotFoundError(path)
        ns = vals[0] if vals else None
        return ns, vals[1] if len(vals) > 1 else None

    # ---- listing -------------------------------------------------------------------------
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        ns, h = self._parse(path)
        if ns is None:
            out = [self._ns_info(n) for n in self.catalog.namespace_ids()]
        elif h is None:
            if ns not in self.catalog.namespace_ids():
                raise FileNotFoundError(path)
            out = self._blocks(ns)
        else:
            out = [self.info(path)]
        return out if detail else [o["name"] for o in out]

    def _ns_info(self, ns: int) -> dict[str, Any]:
        d = self.catalog.namespace(ns)
        blocks = {t.name: len(b.hashes) for t in self.catalog.tiers if (b := self.catalog.blocks(t).get(ns))}
        return {
            "name": f"{ns:016x}",
            "size": 0,
            "type": "directory",
            "model": d.model if d else None,
            "tenant": d.tenant if d else None,
            "rank": d.rank if d else None,
            "blocks": blocks,
        }

    def _blocks(self, ns: int) -> list[dict[str, Any]]:
        """Every block of ``ns`` once, with the fastest tier holding it and all tiers that do."""
        held = [(t, b.hashes) for t in self.catalog.tiers if (b := self.catalog.blocks(t).get(ns)) is not None]
        if not held:
            return []
        hashes = np.unique(np.concatenate([hs for _, hs in held]))
        where = np.stack([np.isin(hashes, hs) for _, hs in held])  # [tiers, blocks]
        first = np.argmax(where, axis=0)
        names = [t.name for t, _ in held]
        size = self._size(held[0][0].block_nbytes)
        return [
            {"name": f"{ns:016x}/{h:016x}", "size": size, "type": "file", "tier": names[f],
             "tiers": [names[i] for i in np.flatnonzero(where[:, j]).tolist()]}
            for j, (h, f) in enumerate(zip(hashes.tolist(), first.tolist()))
        ]  # fmt: skip

    @staticmethod
    def _size(block_nbytes: int) -> int:
        return codec.HEADER_SIZE + block_nbytes

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        ns, h = self._parse(path)
        if ns is None:
            return {"name": "", "size": 0, "type": "directory"}
        if h is None:
            if ns not in self.catalog.namespace_ids():
                raise FileNotFoundError(path)
            return self._ns_info(ns)
        key = BlockKeys(ns, np.array([h], np.uint64))
        tiers = [t for t in self.catalog.tiers if t.contains(key)[0]]
        if not tiers:
            raise FileNotFoundError(path)
        return {"name": f"{ns:016x}/{h:016x}", "size": self._size(tiers[0].block_nbytes), "type": "file",
                "tier": tiers[0].name, "tiers": [t.name for t in tiers]}  # fmt: skip

    # ---- reading -------------------------------------------------------------------------
    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        ns, h = self._parse(path)
        if ns is None or h is None:
            raise IsADirectoryError(path)
        key = BlockKeys(ns, np.array([h], np.uint64))
        d = self.catalog.namespace(ns)
        bad: list[BaseException] = []
        for t in self.catalog.tiers:
            got = read_canonical(t, key, d.layout.block_size if d else None)[0]
            if isinstance(got, bytes):
                return got[start:end]
            if not isinstance(got, FileNotFoundError):
                bad.append(got)
        if bad:  # present, but no tier holds an intact copy
            if any(isinstance(b, CorruptBlockError) for b in bad):
                raise CorruptBlockError(f"kvbm://{ns:016x}/{h:016x} failed verification: {bad[0]}")
            raise OSError(f"kvbm://{ns:016x}/{h:016x} could not be read: {bad[0]!r}")
        raise FileNotFoundError(path)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if mode != "rb":
            raise ReadOnlyError(f"kvbm:// is read-only: cannot open {path} with mode {mode!r}")
        return _BlockFile(self, self._strip_protocol(path), self.cat_file(path))

    # ---- the one write: rm ---------------------------------------------------------------
    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        for p in path if isinstance(path, list) else [path]:
            ns, h = self._parse(p)
            if ns is None:
                raise ReadOnlyError("kvbm:// cannot remove its root; remove namespaces one by one")
            if h is None and not recursive:
                raise IsADirectoryError(f"{p} is a namespace: pass recursive=True to remove all its blocks")
            for t in self.catalog.tiers:
                if h is not None:
                    t.delete(BlockKeys(ns, np.array([h], np.uint64)))
                elif (b := self.catalog.blocks(t).get(ns)) is not None:
                    for a in range(0, len(b.hashes), 4096):
                        t.delete(b.keys(slice(a, a + 4096)))
        self.catalog.refresh()
        self.invalidate_cache()

    def rm_file(self, path: str) -> None:
        _, h = self._parse(path)
        if h is None:
            raise IsADirectoryError(path)
        self.rm(path)

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def invalidate_cache(self, path: str | None = None) -> None:
        self.catalog.refresh()
        super().invalidate_cache(path)

    def close(self) -> None:
        self.catalog.close()

    # ---- everything else writes ----------------------------------------------------------
    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise ReadOnlyError("kvbm:// is read-only (only rm writes): stores write blocks")

    mkdir = makedirs = rmdir = cp_file = mv = put_file = pipe_file = touch = _read_only
