"""A disk tier's files: its description (``kvbm_fs.json``) and its segment files of fixed slots.

``kvbm_fs.json`` records the geometry (block and slot size, slots per segment, slots), so a tier
is always reopened with the geometry it was made with; only growing is allowed. Segments live
in ``seg/<seg >> 8>/<seg>.seg``, 256 to a folder, preallocated when first written, and each
process keeps one O_DIRECT and one buffered descriptor per segment. docs/architecture.md 1.6.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from typing import Any

from kvbm_fs.errors import ConfigError, FormatVersionError, LayoutMismatchError
from kvbm_fs.tiers.disk.blockio import ALIGN, write_json

FORMAT = "kvbm_fs.disk.v1"
HEADER_PAGE = ALIGN
SEGMENT_TARGET = 1 << 30
META_INTS = ("block_nbytes", "slot_bytes", "segment_slots", "num_slots")


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def segment_path(root: str, seg: int) -> str:
    return os.path.join(root, "seg", f"{seg >> 8:04x}", f"{seg:06x}.seg")


def open_dir(root: str, block_nbytes: int, slot_bytes: int, want_slots: int, segment_bytes: int) -> dict[str, Any]:
    """The tier's description, created (under ``root/.lock``, so two first openers agree) or checked
    against what this process needs; a larger ``want_slots`` grows it, a smaller one is refused."""
    try:
        os.makedirs(root, exist_ok=True)
        lock_fd = os.open(os.path.join(root, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"disk tier directory {root} is not usable: {e.strerror}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        meta_path = os.path.join(root, "kvbm_fs.json")
        if os.path.exists(meta_path):
            return _check_meta(root, meta_path, block_nbytes, slot_bytes, want_slots)
        meta = dict(format=FORMAT, block_nbytes=block_nbytes, slot_bytes=slot_bytes,
                    segment_slots=max(1, segment_bytes // slot_bytes), num_slots=want_slots)  # fmt: skip
        write_json(meta_path, meta)
        return meta
    except OSError as e:
        raise ConfigError(f"disk tier directory {root} is not writable: {e.strerror}") from None
    finally:
        os.close(lock_fd)


def _check_meta(root: str, meta_path: str, block_nbytes: int, slot_bytes: int, want_slots: int) -> dict[str, Any]:
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in META_INTS):
        raise FormatVersionError(f"{meta_path} is not a kvbm_fs disk tier description")
    if meta.get("format") != FORMAT:
        raise FormatVersionError(
            f"{root} holds a disk tier of format {meta.get('format')!r}; this build reads {FORMAT!r}"
        )
    if meta["block_nbytes"] != block_nbytes or meta["slot_bytes"] != slot_bytes:
        raise LayoutMismatchError(
            f"{root} holds {meta['block_nbytes']}-byte blocks; this store needs {block_nbytes}-byte blocks"
        )
    if want_slots > meta["num_slots"]:  # growing is safe: new slots sit above the high-water mark
        meta["num_slots"] = want_slots
        write_json(meta_path, meta)
    elif want_slots < meta["num_slots"]:
        raise ConfigError(
            f"{root} was created with {meta['num_slots'] * slot_bytes} B; shrinking a disk tier is not supported"
        )
    return meta


class Segments:
    """Where each slot lives, and this process's descriptors of the segment files."""

    def __init__(self, root: str, slot_bytes: int, segment_slots: int, num_slots: int, direct: bool) -> None:
        self.root, self.slot_bytes, self.segment_slots, self.num_slots = root, slot_bytes, segment_slots, num_slots
        self.direct = direct
        self._lock = threading.Lock()
        self._fds: dict[int, tuple[int, int]] = {}

    def path(self, seg: int) -> str:
        return segment_path(self.root, seg)

    def locate(self, slot: int) -> tuple[int, int]:
        """(segment, byte offset of the slot's header page in it)."""
        seg, i = divmod(slot, self.segment_slots)
        return seg, i * self.slot_bytes

    def length(self, seg: int) -> int:
        return min(self.segment_slots, self.num_slots - seg * self.segment_slots) * self.slot_bytes

    def fd(self, seg: int, create: bool = False) -> tuple[int, int]:
        """(direct fd or -1, buffered fd) for a segment; creating and preallocating it if asked."""
        with self._lock:
            fds = self._fds.get(seg)
        if fds is not None:
            return fds
        path = self.path(seg)
        if create:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        try:
            if create and os.fstat(fd).st_size < self.length(seg):
                os.posix_fallocate(fd, 0, self.length(seg))
            dfd = os.open(path, os.O_RDWR | os.O_DIRECT) if self.direct else -1
        except OSError:
            os.close(fd)
            raise
        with self._lock:
            if seg in self._fds:  # another thread won the race
                os.close(fd)
                if dfd >= 0:
                    os.close(dfd)
                return self._fds[seg]
            self._fds[seg] = (dfd, fd)
            return dfd, fd

    def sync(self, slots: list[int]) -> None:
        """fdatasync the segments holding ``slots``."""
        for seg in {self.locate(s)[0] for s in slots}:
            os.fdatasync(self.fd(seg)[1])

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for pair in fds:
            for fd in pair:
                if fd >= 0:
                    os.close(fd)
