"""The canonical byte form of one block: a 128-byte versioned header, then the payload.

Every byte that leaves process memory (disk, object store, a peer) travels in
this form so the reader can prove, before use, that the bytes are whole, intact
and belong to the key it asked for.  Encoding hashes the payload once; verifying
hashes it once.  See docs/spec.md for the byte-level specification.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from .errors import CorruptBlockError, ForeignBlockError, FormatVersionError, TruncatedBlockError
from .keys import BlockKey

MAGIC = b"KVBMFSB\x00"
FORMAT_VERSION = 1
HEADER_SIZE = 128
# magic, version, header size, flags, ns, seq hash, parent hash, tokens, reserved, payload len,
# payload xxh3-128 (lo, hi); at 72 the header's own xxh3-64 over bytes [0, 72) ++ [80, 128) (all of the
# header but the checksum itself).  With flag FLAG_DSUM, bytes [80, 96) hold the payload's dsum128
# (lo, hi; kvbm_fs.dsum), a second checksum a GPU can verify; every other byte of [80, 128) is
# reserved and must be zero.
_HEAD = struct.Struct("<8sHHIQQQIIQQQ")
_HEAD_CRC = struct.Struct("<Q")
_M64 = (1 << 64) - 1
_CRC_AT = _HEAD.size  # 72
assert _CRC_AT == 72 and _CRC_AT + 8 <= HEADER_SIZE
FLAG_DSUM = 0x1
KNOWN_FLAGS = FLAG_DSUM
_DSUM = struct.Struct("<QQ")
_DSUM_AT = _CRC_AT + 8  # 80


@dataclass(frozen=True, slots=True)
class BlockHeader:
    ns: int
    seq_hash: int
    parent_hash: int
    num_tokens: int
    payload_len: int
    checksum: int  # xxh3-128 of the payload
    dsum: int | None = None  # dsum128 of the payload, if the writer recorded it (FLAG_DSUM)

    @property
    def key(self) -> BlockKey:
        return BlockKey(self.ns, self.seq_hash)


def payload_checksum(payload: Any) -> int:
    return xxhash.xxh3_128_intdigest(_as_buffer(payload))


def _as_buffer(payload: Any) -> Any:
    if isinstance(payload, np.ndarray):
        return payload if payload.flags.c_contiguous else np.ascontiguousarray(payload)
    if hasattr(payload, "numpy"):  # torch CPU tensor; bytes view works for bfloat16/float8 too
        import torch

        return payload.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return payload


def encode_header(
    key: BlockKey, parent_hash: int, num_tokens: int, payload: Any, dsum: int | None = None, checksum: int | None = None
) -> bytes:
    """The 128-byte header for ``payload`` (one hashing pass; the payload is not copied).  ``dsum``
    is the payload's dsum128 when the writer has it (computed on the GPU the block came from);
    ``checksum`` its xxh3-128 when the caller has just computed it from these bytes (no second pass)."""
    buf = _as_buffer(payload)
    c = xxhash.xxh3_128_intdigest(buf) if checksum is None else checksum
    head = _HEAD.pack(
        MAGIC,
        FORMAT_VERSION,
        HEADER_SIZE,
        0 if dsum is None else FLAG_DSUM,
        key.ns,
        key.seq_hash,
        parent_hash,
        num_tokens,
        0,
        memoryview(buf).nbytes,
        c & 0xFFFFFFFFFFFFFFFF,
        c >> 64,
    )
    tail = bytes(HEADER_SIZE - _DSUM_AT)
    if dsum is not None:
        tail = _DSUM.pack(dsum & _M64, dsum >> 64) + tail[_DSUM.size :]
    return head + _HEAD_CRC.pack(_header_crc(head, tail)) + tail


def _header_crc(head: bytes | memoryview, tail: bytes | memoryview) -> int:
    h = xxhash.xxh3_64(head)
    h.update(tail)
    return h.intdigest()


def encode(key: BlockKey, parent_hash: int, num_tokens: int, payload: Any) -> bytes:
    """Header plus payload as one bytes object (for stores that write whole objects)."""
    return encode_header(key, parent_hash, num_tokens, payload) + memoryview(_as_buffer(payload)).cast("B")


def decode_header(data: Any) -> BlockHeader:
    mv = memoryview(data).cast("B")
    if mv.nbytes < HEADER_SIZE:
        raise TruncatedBlockError(f"block has {mv.nbytes} bytes, less than its {HEADER_SIZE}-byte header")
    magic, ver, hsize, flags, ns, seq, parent, ntok, res0, plen, clo, chi = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptBlockError("bad magic: not a kvbm_fs block")
    if ver != FORMAT_VERSION or hsize != HEADER_SIZE:
        raise FormatVersionError(f"block format version {ver} (header {hsize} B); this build reads {FORMAT_VERSION}")
    (crc,) = _HEAD_CRC.unpack_from(mv, _CRC_AT)
    if crc != _header_crc(mv[:_CRC_AT], mv[_CRC_AT + 8 : HEADER_SIZE]):
        raise CorruptBlockError("header checksum mismatch")
    reserved = _DSUM_AT + (_DSUM.size if flags & FLAG_DSUM else 0)
    if flags & ~KNOWN_FLAGS or res0 or any(mv[reserved:HEADER_SIZE]):
        raise FormatVersionError(
            f"header uses flags {flags:#x} or reserved bytes that format {FORMAT_VERSION} does not define"
        )
    dsum = None
    if flags & FLAG_DSUM:
        lo, hi = _DSUM.unpack_from(mv, _DSUM_AT)
        dsum = lo | hi << 64
    return BlockHeader(ns, seq, parent, ntok, plen, clo | (chi << 64), dsum)


def verify(
    data: Any, expected: BlockKey, expected_len: int | None = None, expected_tokens: int | None = None
) -> memoryview:
    """Check header, key echo, length and payload checksum; return the payload view. Raises CorruptBlockError."""
    mv = memoryview(data).cast("B")
    hdr = decode_header(mv)
    check_header(hdr, expected, expected_len, expected_tokens)
    payload = mv[HEADER_SIZE:]
    if payload.nbytes < hdr.payload_len:
        raise TruncatedBlockError(f"payload has {payload.nbytes} bytes, header says {hdr.payload_len}")
    payload = payload[: hdr.payload_len]
    verify_payload(hdr, payload)
    return payload


def check_header(
    hdr: BlockHeader, expected: BlockKey, expected_len: int | None = None, expected_tokens: int | None = None
) -> None:
    if hdr.ns != expected.ns or hdr.seq_hash != expected.seq_hash:
        raise ForeignBlockError(f"block holds {hdr.key}, expected {expected}")
    if expected_len is not None and hdr.payload_len != expected_len:
        raise CorruptBlockError(f"payload length {hdr.payload_len}, expected {expected_len}")
    if expected_tokens is not None and hdr.num_tokens != expected_tokens:
        raise CorruptBlockError(f"block holds {hdr.num_tokens} tokens, expected {expected_tokens}")


def verify_payload(hdr: BlockHeader, payload: Any) -> None:
    if payload_checksum(payload) != hdr.checksum:
        raise CorruptBlockError(f"payload checksum mismatch for {hdr.key}")


# The header as a numpy record, for checking a batch of headers without a Python object per block.
HEADER_DTYPE = np.dtype(
    [("magic", "S8"), ("version", "<u2"), ("header_size", "<u2"), ("flags", "<u4"), ("ns", "<u8"),
     ("seq_hash", "<u8"), ("parent_hash", "<u8"), ("num_tokens", "<u4"), ("reserved0", "<u4"),
     ("payload_len", "<u8"), ("checksum_lo", "<u8"), ("checksum_hi", "<u8"), ("header_crc", "<u8"),
     ("dsum_lo", "<u8"), ("dsum_hi", "<u8"), ("reserved", "V32")]
)  # fmt: skip
assert HEADER_DTYPE.itemsize == HEADER_SIZE


def verify_batch(
    headers: np.ndarray, ns: int, hashes: np.ndarray, payloads: list[Any], expected_len: int
) -> tuple[np.ndarray, str | None]:
    """Check ``n`` headers (uint8 rows ``[n, 128]``) and their payloads at once: what :func:`verify`
    checks per block, with the field checks vectorised; the two hashes stay one C call each.
    Returns the mask of good blocks and, if any failed, why the first one did."""
    rows = np.ascontiguousarray(headers, dtype=np.uint8).reshape(-1, HEADER_SIZE)
    h = rows.view(HEADER_DTYPE).reshape(-1)
    has_dsum = (h["flags"] & FLAG_DSUM) != 0
    ok = (h["magic"] == MAGIC) & (h["version"] == FORMAT_VERSION) & (h["header_size"] == HEADER_SIZE)
    ok &= ((h["flags"] & ~np.uint32(KNOWN_FLAGS)) == 0) & (h["reserved0"] == 0) & ~rows[:, 96:].any(axis=1)
    ok &= has_dsum | ((h["dsum_lo"] == 0) & (h["dsum_hi"] == 0))
    ok &= (h["ns"] == np.uint64(ns)) & (h["seq_hash"] == hashes) & (h["payload_len"] == expected_len)
    for i in np.flatnonzero(ok).tolist():
        mv = rows[i].data
        crc = xxhash.xxh3_64(mv[:_CRC_AT])
        crc.update(mv[_CRC_AT + 8 :])
        c = payload_checksum(payloads[i])
        ok[i] = (
            crc.intdigest() == int(h["header_crc"][i])
            and c == int(h["checksum_lo"][i]) | int(h["checksum_hi"][i]) << 64
        )
    if ok.all():
        return ok, None
    i = int(np.flatnonzero(~ok)[0])
    try:  # the per-block path, for a precise reason
        hdr = decode_header(rows[i])
        check_header(hdr, BlockKey(ns, int(hashes[i])), expected_len)
        verify_payload(hdr, payloads[i])
    except CorruptBlockError as e:
        return ok, str(e)
    return ok, "block failed verification"
