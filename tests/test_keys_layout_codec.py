"""Namespaces and keys, KV layouts, and the on-media block codec."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Any

import numpy as np
import pytest
import xxhash

from kvbm_fs import codec, dsum, hashing
from kvbm_fs.errors import (
    ConfigError,
    CorruptBlockError,
    ForeignBlockError,
    FormatVersionError,
    LayoutMismatchError,
    TruncatedBlockError,
)
from kvbm_fs.keys import BlockKey, BlockKeys, Namespace, engine_hash_to_u64
from kvbm_fs.layout import DTYPES, KVLayout

U64 = (1 << 64) - 1

# ======================================================================================
# Namespace
# ======================================================================================
LAYOUT = KVLayout(32, 8, 128, 16, "bfloat16")
NS = Namespace("meta-llama/Llama-3.1-8B", LAYOUT, rank=1, world_size=2, tenant="acme")
# Computed once and frozen here: if this changes, every block ever written becomes foreign.
NS_CANONICAL = (
    b'{"format":"kvbm_fs.namespace.v1","hash_scheme":"kvbm-v1","layout":{"block_size":16,"dtype":"bfloat16",'
    b'"head_dim":128,"mla":false,"num_kv_heads":8,"num_layers":32,"order":"LKTHD"},'
    b'"model":"meta-llama/Llama-3.1-8B","rank":1,"tenant":"acme","world_size":2}'
)
NS_ID = 18220601698835439007


def test_namespace_id_is_frozen() -> None:
    assert NS.canonical_bytes() == NS_CANONICAL
    assert NS.id == NS_ID
    assert NS.short_id == f"{NS_ID:016x}" == "fcdc94b54cf71d9f"


def test_namespace_id_recomputed_independently() -> None:
    assert xxhash.xxh3_64_intdigest(NS_CANONICAL, 0) == NS_ID
    # a fresh but equal object has the same id
    again = Namespace("meta-llama/Llama-3.1-8B", KVLayout(32, 8, 128, 16, "bfloat16"), 1, 2, "acme")
    assert again == NS and again.id == NS_ID and hash(again) == hash(NS)


def test_namespace_dict_roundtrip_keeps_id() -> None:
    d = NS.to_dict()
    back = Namespace.from_dict(d)
    assert back == NS and back.id == NS.id
    # an id in the record must match the content; a KVLayout object is accepted in place of a dict
    assert Namespace.from_dict({**d, "id": NS_ID}).id == NS_ID
    assert Namespace.from_dict({**d, "layout": LAYOUT}).id == NS.id
    for bad in (
        {**d, "id": 123},
        {**d, "format": "something.else"},
        {k: v for k, v in d.items() if k != "format"},
        {k: v for k, v in d.items() if k != "layout"},
        {**d, "layout": "LKTHD"},
        {**d, "bogus": 1},
        {**d, "layout": {**d["layout"], "bogus": 1}},
    ):
        with pytest.raises(ConfigError):
            Namespace.from_dict(bad)


_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("model", {"model": "meta-llama/Llama-3.1-70B"}),
    ("rank", {"rank": 0}),
    ("world_size", {"world_size": 4}),
    ("tenant", {"tenant": "other"}),
    ("tenant-empty", {"tenant": ""}),
    ("hash_scheme", {"hash_scheme": "vllm"}),
    ("num_layers", {"layout": dataclasses.replace(LAYOUT, num_layers=31)}),
    ("num_kv_heads", {"layout": dataclasses.replace(LAYOUT, num_kv_heads=4)}),
    ("head_dim", {"layout": dataclasses.replace(LAYOUT, head_dim=64)}),
    ("block_size", {"layout": dataclasses.replace(LAYOUT, block_size=32)}),
    ("dtype", {"layout": dataclasses.replace(LAYOUT, dtype="float16")}),
    ("order", {"layout": dataclasses.replace(LAYOUT, order="KLTHD")}),
    ("mla", {"layout": KVLayout(32, 1, 128, 16, "bfloat16", order="LTD", mla=True)}),
]


@pytest.mark.parametrize(("field", "change"), _VARIANTS, ids=[v[0] for v in _VARIANTS])
def test_namespace_id_differs_when_any_field_changes(field: str, change: dict[str, Any]) -> None:
    other = dataclasses.replace(NS, **change)
    assert other != NS
    assert other.id != NS.id
    assert xxhash.xxh3_64_intdigest(other.canonical_bytes(), 0) == other.id


def test_namespace_ids_all_distinct() -> None:
    ids = {dataclasses.replace(NS, **c).id for _, c in _VARIANTS} | {NS.id}
    assert len(ids) == len(_VARIANTS) + 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model": ""},
        {"model": None},
        {"model": 3},
        {"rank": -1},
        {"rank": 2, "world_size": 2},
        {"rank": 5, "world_size": 2},
        {"rank": "0"},
        {"rank": 0.0},
        {"world_size": 0},
        {"world_size": -2, "rank": 0},
        {"world_size": "2"},
        {"hash_scheme": "md5"},
        {"hash_scheme": ""},
        {"tenant": None},
        {"tenant": 3},
        {"layout": LAYOUT.to_dict()},
        {"layout": None},
    ],
)
def test_namespace_bad_fields_raise_config_error(kwargs: dict[str, Any]) -> None:
    base: dict[str, Any] = {"model": "m", "layout": LAYOUT, "rank": 0, "world_size": 1}
    with pytest.raises(ConfigError):
        Namespace(**{**base, **kwargs})


def test_namespace_bool_rank_rejected() -> None:
    # Namespace(rank=True) would compare equal to rank=1 but serialise as `true`: another id.
    with pytest.raises(ConfigError):
        Namespace("m", LAYOUT, rank=True, world_size=2)
    with pytest.raises(ConfigError):
        Namespace("m", LAYOUT, rank=0, world_size=True)


def test_keys_for_tokens_is_dynamo_chain_under_namespace() -> None:
    ns = Namespace("m", KVLayout(2, 2, 8, 4))
    toks = list(range(1, 14))
    keys = ns.keys_for_tokens(toks)
    want = hashing.sequence_hashes(toks, 4, hashing.salt_hash())
    assert len(keys) == 3
    assert keys.ns == ns.id
    assert keys.hashes.dtype == np.uint64 and keys.hashes.tolist() == want
    assert keys.parents.tolist() == [0, *want[:-1]]
    salted = ns.keys_for_tokens(toks, cache_salt="s", lora_name="l")
    assert salted.hashes.tolist() == hashing.sequence_hashes(toks, 4, hashing.salt_hash("s", "l"))
    mm = ns.keys_for_tokens(toks, extra_hashes=[None, 9, None])
    assert (
        mm.hashes.tolist()
        == hashing.sequence_hash_array(toks, 4, hashing.salt_hash(), extra_hashes=[None, 9, None]).tolist()
    )
    assert len(ns.keys_for_tokens([1, 2, 3])) == 0


def test_keys_for_tokens_refused_for_engine_namespaces() -> None:
    for scheme in ("vllm", "sglang", "external"):
        with pytest.raises(ConfigError):
            Namespace("m", LAYOUT, hash_scheme=scheme).keys_for_tokens(list(range(32)))


def test_keys_for_tokens_same_tokens_other_namespace_same_hashes_other_ns() -> None:
    a = Namespace("a", LAYOUT).keys_for_tokens(list(range(64)))
    b = Namespace("b", LAYOUT).keys_for_tokens(list(range(64)))
    assert np.array_equal(a.hashes, b.hashes)
    assert a.ns != b.ns and a != b


# ---- engine hashes ------------------------------------------------------------------------------
def test_engine_hash_vllm_sha256_bytes_folded() -> None:
    h = hashlib.sha256(b"block").digest()
    assert len(h) == 32
    assert engine_hash_to_u64(h) == xxhash.xxh3_64_intdigest(h, 0)
    assert engine_hash_to_u64(bytearray(h)) == engine_hash_to_u64(h)  # type: ignore[arg-type]
    assert engine_hash_to_u64(memoryview(h)) == engine_hash_to_u64(h)  # type: ignore[arg-type]


def test_engine_hash_8_bytes_taken_little_endian() -> None:
    h = bytes(range(1, 9))
    assert engine_hash_to_u64(h) == struct.unpack("<Q", h)[0] == 0x0807060504030201


def test_engine_hash_16_bytes_folded() -> None:
    # vLLM's "xxhash" prefix hash is xxh3_128 (16 bytes): folded like any other length != 8
    h = xxhash.xxh3_128_digest(b"x")
    assert engine_hash_to_u64(h) == xxhash.xxh3_64_intdigest(h, 0)


def test_engine_hash_sglang_hex() -> None:
    hexs = hashlib.sha256(b"page").hexdigest()
    assert len(hexs) == 64
    want = xxhash.xxh3_64_intdigest(bytes.fromhex(hexs), 0)
    assert engine_hash_to_u64(hexs) == want
    assert engine_hash_to_u64(hexs.upper()) == want
    assert engine_hash_to_u64(bytes.fromhex(hexs)) == want


def test_engine_hash_ints() -> None:
    assert engine_hash_to_u64(5) == 5
    assert engine_hash_to_u64(U64) == U64
    assert engine_hash_to_u64(-1) == U64
    assert engine_hash_to_u64(np.uint64(7)) == 7  # type: ignore[arg-type]
    assert engine_hash_to_u64(1 << 64) == 0


@pytest.mark.parametrize("bad", ["zz" * 32, "abc", "0x1234", "12 34 zz"])
def test_engine_hash_non_hex_string_raises_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        engine_hash_to_u64(bad)


@pytest.mark.parametrize("bad", [1.5, None, [1, 2], object(), (b"a",)])
def test_engine_hash_wrong_type_raises_type_error(bad: Any) -> None:
    with pytest.raises(TypeError):
        engine_hash_to_u64(bad)


def test_keys_from_engine() -> None:
    ns = Namespace("m", LAYOUT, hash_scheme="vllm")
    hs = [hashlib.sha256(bytes([i])).digest() for i in range(4)]
    keys = ns.keys_from_engine(hs)
    want = [xxhash.xxh3_64_intdigest(h, 0) for h in hs]
    assert keys.ns == ns.id and keys.hashes.tolist() == want
    assert keys.parents.tolist() == [0, *want[:-1]]
    sg = Namespace("m", LAYOUT, hash_scheme="sglang").keys_from_engine([h.hex() for h in hs])
    assert sg.hashes.tolist() == want
    assert len(ns.keys_from_engine([])) == 0
    with pytest.raises(ValueError):
        ns.keys_from_engine(["not-hex"])
    with pytest.raises(TypeError):
        ns.keys_from_engine([1.0])  # type: ignore[list-item]


# ---- BlockKey / BlockKeys ------------------------------------------------------------------------
def test_block_key_str_and_order() -> None:
    k = BlockKey(1, 255)
    assert str(k) == "0000000000000001/00000000000000ff"
    assert sorted([BlockKey(2, 0), BlockKey(1, 5), BlockKey(1, 2)]) == [BlockKey(1, 2), BlockKey(1, 5), BlockKey(2, 0)]
    assert {BlockKey(1, 2): 1}[BlockKey(1, 2)] == 1


def test_block_keys_indexing_slicing_iteration() -> None:
    keys = BlockKeys.chain(7, [10, 20, 30, 40], root_parent=5)
    assert len(keys) == 4
    assert keys[0] == BlockKey(7, 10)
    assert keys[-1] == BlockKey(7, 40)
    assert keys[np.int64(2)] == BlockKey(7, 30)  # type: ignore[call-overload]
    assert list(keys) == [BlockKey(7, h) for h in (10, 20, 30, 40)]
    assert keys.parents.tolist() == [5, 10, 20, 30]
    sl = keys[1:3]
    assert isinstance(sl, BlockKeys)
    assert sl.ns == 7 and sl.hashes.tolist() == [20, 30] and sl.parents.tolist() == [10, 20]
    m = keys[np.array([True, False, True, False])]
    assert m.hashes.tolist() == [10, 30] and m.parents.tolist() == [5, 20]
    fancy = keys[np.array([3, 0])]
    assert fancy.hashes.tolist() == [40, 10] and fancy.parents.tolist() == [30, 5]
    assert len(keys[4:]) == 0


def test_block_keys_equality_and_hash() -> None:
    a = BlockKeys(1, [1, 2, 3])
    b = BlockKeys(1, np.array([1, 2, 3], dtype=np.uint64))
    assert a == b and hash(a) == hash(b)
    assert a != BlockKeys(2, [1, 2, 3])
    assert a != BlockKeys(1, [1, 2])
    assert a != BlockKeys(1, [3, 2, 1])
    assert a != [BlockKey(1, 1), BlockKey(1, 2), BlockKey(1, 3)]
    assert len({a, b}) == 1


def test_block_keys_full_u64_and_negative_ints() -> None:
    keys = BlockKeys(U64, [U64, 0, -1, 1 << 63])
    assert keys.ns == U64
    assert keys.hashes.dtype == np.uint64
    assert keys.hashes.tolist() == [U64, 0, U64, 1 << 63]
    assert BlockKeys(-1, [1]).ns == U64
    signed = BlockKeys(0, np.array([-1, 2], dtype=np.int64))
    assert signed.hashes.tolist() == [U64, 2]


def test_block_keys_chain_empty_and_parents_mismatch() -> None:
    assert len(BlockKeys.chain(1, [])) == 0
    with pytest.raises(ValueError):
        BlockKeys(1, [1, 2, 3], parents=[0, 1])


def test_block_keys_of() -> None:
    ks = BlockKeys.of([BlockKey(4, 1), BlockKey(4, 2)])
    assert ks.ns == 4 and ks.hashes.tolist() == [1, 2]
    assert len(BlockKeys.of([])) == 0
    with pytest.raises(ValueError):
        BlockKeys.of([BlockKey(4, 1), BlockKey(5, 2)])


# ======================================================================================
# KVLayout
# ======================================================================================
@pytest.mark.parametrize(
    ("order", "shape"),
    [
        ("LKTHD", (3, 2, 16, 4, 8)),
        ("KLTHD", (2, 3, 16, 4, 8)),
        ("LKHTD", (3, 2, 4, 16, 8)),
        ("TLKHD", (16, 3, 2, 4, 8)),
        ("DHTKL", (8, 4, 16, 2, 3)),
    ],
)
def test_block_shape_follows_order(order: str, shape: tuple[int, ...]) -> None:
    lay = KVLayout(3, 4, 8, 16, "float16", order=order)
    assert lay.block_shape == shape
    assert lay.block_nbytes == 3 * 2 * 16 * 4 * 8 * 2
    assert lay.layer_nbytes == lay.block_nbytes // 3


@pytest.mark.parametrize(("order", "shape"), [("LTD", (5, 32, 576)), ("TLD", (32, 5, 576)), ("DTL", (576, 32, 5))])
def test_mla_layout(order: str, shape: tuple[int, ...]) -> None:
    lay = KVLayout(5, 1, 576, 32, "bfloat16", order=order, mla=True)
    assert lay.block_shape == shape
    assert lay.block_nbytes == 5 * 32 * 576 * 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mla": True, "order": "LTD", "num_kv_heads": 2},
        {"mla": True},  # default order LKTHD is not an MLA order
        {"mla": True, "order": "LKTD"},
        {"mla": False, "order": "LTD"},
        {"order": "LKTHH"},
        {"order": "LKTH"},
        {"order": "LKTHDX"},
        {"order": "lkthd"},
        {"dtype": "float64"},
        {"dtype": "fp16"},
        {"dtype": "torch.float16"},
        {"num_layers": 0},
        {"num_layers": -1},
        {"num_layers": True},
        {"num_layers": 2.0},
        {"num_kv_heads": 0},
        {"head_dim": "128"},
        {"block_size": 0},
        {"block_size": 24},
        {"block_size": 2048},
        {"block_size": True},
        {"mla": 1},
        {"mla": "false"},
    ],
)
def test_bad_layout_raises_config_error(kwargs: dict[str, Any]) -> None:
    base: dict[str, Any] = {"num_layers": 2, "num_kv_heads": 1, "head_dim": 8, "block_size": 4}
    with pytest.raises(ConfigError):
        KVLayout(**{**base, **kwargs})


def test_layout_numpy_ints_normalised() -> None:
    lay = KVLayout(np.int64(2), np.int32(2), np.uint16(8), np.int64(4))  # type: ignore[arg-type]
    assert lay == KVLayout(2, 2, 8, 4)
    assert all(type(v) is int for v in (lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.block_size))
    assert Namespace("m", lay).id == Namespace("m", KVLayout(2, 2, 8, 4)).id


def test_layout_from_dict() -> None:
    lay = KVLayout(2, 2, 8, 4, "float32", order="KLTHD")
    assert KVLayout.from_dict(lay.to_dict()) == lay
    with pytest.raises(ConfigError):
        KVLayout.from_dict({**lay.to_dict(), "bogus": 1})
    d = lay.to_dict()
    del d["head_dim"]
    with pytest.raises(ConfigError):
        KVLayout.from_dict(d)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_layout_itemsize_and_numpy_dtype(dtype: str) -> None:
    lay = KVLayout(1, 1, 4, 4, dtype)
    assert lay.itemsize == DTYPES[dtype][0] == lay.numpy_dtype.itemsize


# ---- check_blocks --------------------------------------------------------------------------------
SMALL = KVLayout(2, 2, 4, 4, "float16")  # shape (2, 2, 4, 2, 4): 128 elements, 256 B per block
ELEMS = 128


def test_check_blocks_numpy_kv_shaped() -> None:
    data = np.arange(3 * ELEMS, dtype=np.float16).reshape(3, *SMALL.block_shape)
    rows = SMALL.check_blocks(data)
    assert rows.dtype == np.uint8 and rows.shape == (3, SMALL.block_nbytes)
    assert rows.tobytes() == data.tobytes()


def test_check_blocks_numpy_noncontiguous_copied() -> None:
    big = np.arange(6 * ELEMS, dtype=np.float16).reshape(6, *SMALL.block_shape)
    view = big[::2]
    rows = SMALL.check_blocks(view)
    assert rows.shape == (3, SMALL.block_nbytes) and rows.tobytes() == view.tobytes()


def test_check_blocks_raw_uint8_rows() -> None:
    raw = np.zeros((5, SMALL.block_nbytes), dtype=np.uint8)
    out = SMALL.check_blocks(raw)
    assert out.shape == (5, SMALL.block_nbytes) and out.dtype == np.uint8
    assert len(SMALL.check_blocks(np.zeros((0, SMALL.block_nbytes), np.uint8))) == 0


def test_check_blocks_torch_kv_shaped_and_bfloat16() -> None:
    torch = pytest.importorskip("torch")
    t = torch.randn(2, *SMALL.block_shape).to(torch.float16)
    rows = SMALL.check_blocks(t)
    assert rows.dtype == torch.uint8 and tuple(rows.shape) == (2, SMALL.block_nbytes)
    assert rows.numpy().tobytes() == t.numpy().tobytes()
    bf = dataclasses.replace(SMALL, dtype="bfloat16")
    tb = torch.randn(2, *bf.block_shape).to(torch.bfloat16)
    rb = bf.check_blocks(tb)
    assert tuple(rb.shape) == (2, bf.block_nbytes)
    assert rb.numpy().tobytes() == tb.view(torch.int16).numpy().tobytes()
    # torch non-contiguous KV data (a permuted view) is copied to contiguous rows
    pv = torch.randn(*SMALL.block_shape, 2).to(torch.float16).movedim(-1, 0)
    assert tuple(pv.shape) == (2, *SMALL.block_shape) and not pv.is_contiguous()
    assert SMALL.check_blocks(pv).numpy().tobytes() == pv.contiguous().numpy().tobytes()
    raw = torch.zeros(3, SMALL.block_nbytes, dtype=torch.uint8)
    assert SMALL.check_blocks(raw) is raw


def test_check_blocks_bfloat16_host_view_uint16() -> None:
    bf = dataclasses.replace(SMALL, dtype="bfloat16")
    data = np.zeros((2, *bf.block_shape), dtype=bf.numpy_dtype)
    assert bf.check_blocks(data).shape == (2, bf.block_nbytes)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_check_blocks_accepts_layout_numpy_dtype_float8(dtype: str) -> None:
    lay = dataclasses.replace(SMALL, dtype=dtype)
    data = np.zeros((2, *lay.block_shape), dtype=lay.numpy_dtype)
    assert lay.check_blocks(data).shape == (2, lay.block_nbytes)


@pytest.mark.parametrize(
    "shape",
    [(3, 2, 2, 4, 2), (3, 2, 2, 4, 2, 4, 1), (3, 4, 2, 2, 4), (3, 2, 2, 4, 2, 5), (3, 128), (128,), (3, 2, 2, 4, 4, 2)],
)
def test_check_blocks_wrong_shape_message_names_expected(shape: tuple[int, ...]) -> None:
    data = np.zeros(shape, dtype=np.float16)
    with pytest.raises(LayoutMismatchError) as ei:
        SMALL.check_blocks(data)
    msg = str(ei.value)
    assert "2, 2, 4, 2, 4" in msg  # the expected block shape
    assert "LKTHD" in msg
    assert str(SMALL.block_nbytes) in msg
    assert isinstance(ei.value, ValueError)


def test_check_blocks_wrong_raw_row_width() -> None:
    with pytest.raises(LayoutMismatchError):
        SMALL.check_blocks(np.zeros((2, SMALL.block_nbytes + 1), np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint16, np.uint8, np.int8])
def test_check_blocks_wrong_dtype_message_names_expected(dtype: Any) -> None:
    data = np.zeros((2, *SMALL.block_shape), dtype=dtype)
    with pytest.raises(LayoutMismatchError) as ei:
        SMALL.check_blocks(data)
    msg = str(ei.value)
    assert "float16" in msg and np.dtype(dtype).name in msg


def test_check_blocks_wrong_torch_dtype() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(LayoutMismatchError) as ei:
        SMALL.check_blocks(torch.zeros(2, *SMALL.block_shape, dtype=torch.bfloat16))
    assert "float16" in str(ei.value) and "bfloat16" in str(ei.value)
    bf = dataclasses.replace(SMALL, dtype="bfloat16")
    with pytest.raises(LayoutMismatchError):
        bf.check_blocks(torch.zeros(2, *bf.block_shape, dtype=torch.float16))


# ======================================================================================
# Codec
# ======================================================================================
KEY = BlockKey(0x1122334455667788, 0x99AABBCCDDEEFF00)
PARENT = 0x0123456789ABCDEF
PAYLOAD = bytes((i * 37 + 11) & 0xFF for i in range(256))


def _block(payload: bytes = PAYLOAD, key: BlockKey = KEY) -> bytearray:
    return bytearray(codec.encode(key, PARENT, 16, payload))


def _reseal(buf: bytearray) -> bytearray:
    """Recompute the header checksum after editing header fields (to reach the checks behind it)."""
    struct.pack_into("<Q", buf, 72, xxhash.xxh3_64_intdigest(bytes(buf[:72]) + bytes(buf[80:128]), 0))
    return buf


def test_header_layout_matches_spec() -> None:
    blob = _block()
    assert len(blob) == 128 + len(PAYLOAD)
    assert blob[:8] == b"KVBMFSB\x00"
    assert struct.unpack_from("<HHI", blob, 8) == (1, 128, 0)
    assert struct.unpack_from("<QQQ", blob, 16) == (KEY.ns, KEY.seq_hash, PARENT)
    assert struct.unpack_from("<II", blob, 40) == (16, 0)
    assert struct.unpack_from("<Q", blob, 48)[0] == len(PAYLOAD)
    lo, hi = struct.unpack_from("<QQ", blob, 56)
    assert lo | (hi << 64) == xxhash.xxh3_128_intdigest(PAYLOAD)
    assert blob[80:128] == bytes(48)
    # the header checksum covers every header byte but its own eight (docs/spec.md 7.1)
    assert struct.unpack_from("<Q", blob, 72)[0] == xxhash.xxh3_64_intdigest(bytes(blob[:72]) + bytes(48), 0)
    assert blob[128:] == PAYLOAD


def test_encode_verify_roundtrip() -> None:
    blob = _block()
    out = codec.verify(blob, KEY)
    assert bytes(out) == PAYLOAD
    assert bytes(codec.verify(bytes(blob), KEY, expected_len=len(PAYLOAD))) == PAYLOAD
    hdr = codec.decode_header(blob)
    assert hdr == codec.BlockHeader(KEY.ns, KEY.seq_hash, PARENT, 16, len(PAYLOAD), xxhash.xxh3_128_intdigest(PAYLOAD))
    assert hdr.key == KEY


def test_roundtrip_numpy_torch_and_empty_payloads() -> None:
    arr = np.frombuffer(PAYLOAD, dtype=np.uint8).reshape(4, 64)
    assert codec.encode(KEY, PARENT, 16, arr) == bytes(_block())
    f16 = np.arange(64, dtype=np.float16).reshape(2, 32)
    assert bytes(codec.verify(codec.encode(KEY, 0, 1, f16), KEY)) == f16.tobytes()
    nonc = np.arange(128, dtype=np.float32).reshape(8, 16)[:, ::2]
    assert bytes(codec.verify(codec.encode(KEY, 0, 1, nonc), KEY)) == np.ascontiguousarray(nonc).tobytes()
    torch = pytest.importorskip("torch")
    t = torch.frombuffer(bytearray(PAYLOAD), dtype=torch.uint8)
    assert codec.encode(KEY, PARENT, 16, t) == bytes(_block())
    empty = codec.encode(KEY, 0, 0, b"")
    assert len(empty) == 128 and bytes(codec.verify(empty, KEY, expected_len=0)) == b""


def test_encode_torch_bfloat16_payload() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(64, dtype=torch.float32).to(torch.bfloat16)
    raw = t.view(torch.uint8).numpy().tobytes()
    assert codec.encode(KEY, 0, 4, t) == codec.encode(KEY, 0, 4, raw)


def test_verify_returns_payload_only_ignoring_trailing_bytes() -> None:
    blob = _block() + b"\xff" * 64
    assert bytes(codec.verify(blob, KEY)) == PAYLOAD


def test_every_header_bit_flip_is_rejected() -> None:
    blob = _block()
    for byte in range(128):  # fields, the header checksum and the reserved tail
        for bit in range(8):
            bad = bytearray(blob)
            bad[byte] ^= 1 << bit
            with pytest.raises(CorruptBlockError):
                codec.verify(bad, KEY)


@pytest.mark.parametrize(
    ("offset", "fmt", "value"), [(12, "<I", 2), (12, "<I", 1 << 31), (44, "<I", 1), (80, "<B", 1), (127, "<B", 0x80)]
)
def test_unknown_flags_or_reserved_bytes_refused(offset: int, fmt: str, value: int) -> None:
    blob = _block()
    struct.pack_into(fmt, blob, offset, value)
    with pytest.raises(CorruptBlockError, match="header checksum"):
        codec.verify(blob, KEY)
    with pytest.raises(FormatVersionError):  # a well-sealed header from a writer that uses them
        codec.verify(_reseal(blob), KEY)


def test_a_header_may_carry_the_payloads_dsum128_beside_its_xxh3() -> None:
    """Flag 1 (FLAG_DSUM) puts the payload's dsum128 in bytes 80..96; the rest stays reserved."""
    d = dsum.of(PAYLOAD)
    blob = bytearray(codec.encode_header(KEY, 7, 16, PAYLOAD, dsum=d) + PAYLOAD)
    h = codec.decode_header(blob)
    assert h.dsum == d and h.checksum == codec.payload_checksum(PAYLOAD)
    assert struct.unpack_from("<I", blob, 12)[0] == codec.FLAG_DSUM
    assert struct.unpack_from("<QQ", blob, 80) == (d & (2**64 - 1), d >> 64)
    assert bytes(codec.verify(blob, KEY)) == PAYLOAD
    assert codec.decode_header(codec.encode_header(KEY, 7, 16, PAYLOAD)).dsum is None
    struct.pack_into("<B", blob, 96, 1)  # past the dsum: still reserved
    with pytest.raises(FormatVersionError):
        codec.verify(_reseal(blob), KEY)


def test_payload_bit_flips_rejected() -> None:
    blob = _block()
    rng = np.random.default_rng(0)
    positions = {128, len(blob) - 1, *(int(x) for x in rng.integers(128, len(blob), 200))}
    for pos in sorted(positions):
        for bit in (0, 3, 7):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            with pytest.raises(CorruptBlockError, match="payload checksum"):
                codec.verify(bad, KEY)


def test_every_truncation_rejected() -> None:
    blob = bytes(_block())
    for n in range(len(blob)):
        with pytest.raises(CorruptBlockError) as ei:
            codec.verify(blob[:n], KEY)
        assert isinstance(ei.value, TruncatedBlockError), n
    with pytest.raises(TruncatedBlockError):
        codec.decode_header(blob[:127])


def test_foreign_key_rejected() -> None:
    blob = _block()
    for other in (BlockKey(KEY.ns ^ 1, KEY.seq_hash), BlockKey(KEY.ns, KEY.seq_hash ^ 1), BlockKey(0, 0)):
        with pytest.raises(ForeignBlockError):
            codec.verify(blob, other)
    # a foreign block is a CorruptBlockError too: it must never be served
    with pytest.raises(CorruptBlockError):
        codec.verify(blob, BlockKey(KEY.seq_hash, KEY.ns))


def test_foreign_namespace_from_real_namespaces() -> None:
    a = Namespace("a", SMALL).keys_for_tokens(list(range(8)))
    b = Namespace("b", SMALL).keys_for_tokens(list(range(8)))
    blob = codec.encode(a[0], 0, 4, PAYLOAD)
    assert bytes(codec.verify(blob, a[0])) == PAYLOAD
    with pytest.raises(ForeignBlockError):
        codec.verify(blob, b[0])
    with pytest.raises(ForeignBlockError):
        codec.verify(blob, a[1])


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_wrong_version_raises_format_version_error(version: int) -> None:
    blob = _block()
    struct.pack_into("<H", blob, 8, version)
    with pytest.raises(FormatVersionError):  # the version is checked before the header checksum
        codec.verify(blob, KEY)
    with pytest.raises(FormatVersionError):
        codec.verify(_reseal(blob), KEY)


def test_wrong_header_size_raises_format_version_error() -> None:
    blob = _block()
    struct.pack_into("<H", blob, 10, 256)
    with pytest.raises(FormatVersionError):
        codec.decode_header(blob)
    with pytest.raises(FormatVersionError):
        codec.decode_header(_reseal(blob))


@pytest.mark.parametrize("magic", [b"KVBMFSB\x01", b"\x00" * 8, b"LMCACHE!"])
def test_bad_magic(magic: bytes) -> None:
    blob = _block()
    blob[:8] = magic
    _reseal(blob)
    with pytest.raises(CorruptBlockError, match="magic") as ei:
        codec.verify(blob, KEY)
    assert type(ei.value) is CorruptBlockError


def test_non_block_data_rejected() -> None:
    with pytest.raises(CorruptBlockError):
        codec.verify(bytes(512), KEY)
    with pytest.raises(CorruptBlockError):
        codec.verify(PAYLOAD, KEY)


def test_expected_len_mismatch() -> None:
    blob = _block()
    for want in (0, len(PAYLOAD) - 1, len(PAYLOAD) + 1):
        with pytest.raises(CorruptBlockError, match="length") as ei:
            codec.verify(blob, KEY, expected_len=want)
        assert not isinstance(ei.value, (ForeignBlockError, FormatVersionError))


def test_expected_tokens_mismatch() -> None:
    blob = _block()
    assert bytes(codec.verify(blob, KEY, expected_tokens=16)) == PAYLOAD
    for want in (0, 15, 17):
        with pytest.raises(CorruptBlockError, match="tokens") as ei:
            codec.verify(blob, KEY, expected_len=len(PAYLOAD), expected_tokens=want)
        assert type(ei.value) is CorruptBlockError


def test_header_payload_len_larger_than_data_is_truncation() -> None:
    blob = _block()
    struct.pack_into("<Q", blob, 48, len(PAYLOAD) + 1)
    with pytest.raises(TruncatedBlockError):
        codec.verify(_reseal(blob), KEY)


def test_header_payload_len_shorter_fails_checksum() -> None:
    blob = _block()
    struct.pack_into("<Q", blob, 48, len(PAYLOAD) - 1)
    with pytest.raises(CorruptBlockError, match="payload checksum"):
        codec.verify(_reseal(blob), KEY)


def test_check_header_and_verify_payload_split_path() -> None:
    blob = _block()
    hdr = codec.decode_header(blob[:128])
    codec.check_header(hdr, KEY, len(PAYLOAD))
    codec.verify_payload(hdr, PAYLOAD)
    with pytest.raises(CorruptBlockError):
        codec.verify_payload(hdr, PAYLOAD[:-1] + b"\x00")
    assert codec.payload_checksum(PAYLOAD) == hdr.checksum
    assert codec.encode_header(KEY, PARENT, 16, PAYLOAD) == bytes(blob[:128])


# ======================================================================================
# docs/spec.md section 9 vectors (namespace, engine hashes, a full block)
# ======================================================================================
SPEC_NS = Namespace(
    "meta-llama/Llama-3.1-8B-Instruct",
    KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16"),
)
SPEC_B0, SPEC_S1 = 0x830D22E0C9126A99, 0xC9A9947C51654B2E
SPEC_DUMP = """
0000  4b 56 42 4d 46 53 42 00 01 00 80 00 00 00 00 00
0010  53 58 14 20 e6 6c e9 7e 2e 4b 65 51 7c 94 a9 c9
0020  99 6a 12 c9 e0 22 0d 83 10 00 00 00 00 00 00 00
0030  20 00 00 00 00 00 00 00 97 d6 fc b6 66 95 7d 45
0040  d2 ee 4c 42 b3 c9 e7 25 ec 7c c8 30 ec 5e 79 22
0050  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0060  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0070  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0080  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f
0090  10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f
"""
SPEC_BLOCK = bytes.fromhex("".join(line[6:] for line in SPEC_DUMP.strip().splitlines()))


def test_spec_9_4_namespace_vectors() -> None:
    want = (
        b'{"format":"kvbm_fs.namespace.v1","hash_scheme":"kvbm-v1","layout":{"block_size":16,'
        b'"dtype":"bfloat16","head_dim":128,"mla":false,"num_kv_heads":8,"num_layers":32,'
        b'"order":"LKTHD"},"model":"meta-llama/Llama-3.1-8B-Instruct","rank":0,"tenant":"",'
        b'"world_size":1}'
    )
    assert len(want) == 258 and SPEC_NS.canonical_bytes() == want
    assert SPEC_NS.id == 0x7EE96CE620145853 and SPEC_NS.block_nbytes == 2097152
    cafe = dataclasses.replace(SPEC_NS, rank=1, world_size=2, tenant="caf\u00e9")
    assert b'"tenant":"caf\\u00e9"' in cafe.canonical_bytes()
    assert cafe.id == 0xA6DA3A80F9E629BC
    ks = SPEC_NS.keys_for_tokens(list(range(32)))
    assert [str(k) for k in ks] == ["7ee96ce620145853/830d22e0c9126a99", "7ee96ce620145853/c9a9947c51654b2e"]
    assert ks.parents.tolist() == [0, SPEC_B0]


@pytest.mark.parametrize(
    ("h", "want"),
    [
        (bytes(range(1, 9)), 0x0807060504030201),
        ("0102030405060708", 0x0807060504030201),
        (bytes(range(16)), 0x8355E3A6F61770DB),
        ("ab" * 32, 0xDFF3B9108FD4C4B4),
        (5, 5),
        (-1, U64),
    ],
)
def test_spec_9_5_engine_hash_vectors(h: Any, want: int) -> None:
    assert engine_hash_to_u64(h) == want


def test_spec_9_6_full_block_bytes() -> None:
    key = BlockKey(0x7EE96CE620145853, SPEC_S1)
    assert len(SPEC_BLOCK) == 160
    blob = codec.encode(key, SPEC_B0, 16, bytes(range(32)))
    assert blob == SPEC_BLOCK
    assert codec.payload_checksum(bytes(range(32))) == 0x25E7C9B3424CEED2457D9566B6FCD697
    assert struct.unpack_from("<Q", SPEC_BLOCK, 72)[0] == 0x22795EEC30C87CEC
    assert bytes(codec.verify(SPEC_BLOCK, key, expected_len=32)) == bytes(range(32))


def test_spec_9_6_damage_table() -> None:
    key = BlockKey(0x7EE96CE620145853, SPEC_S1)

    def flipped(i: int) -> bytes:
        b = bytearray(SPEC_BLOCK)
        b[i] ^= 0xFF
        return bytes(b)

    with pytest.raises(TruncatedBlockError):
        codec.verify(SPEC_BLOCK[:100], key)
    with pytest.raises(CorruptBlockError, match="magic"):
        codec.verify(flipped(0), key)
    with pytest.raises(CorruptBlockError, match="header checksum"):
        codec.verify(flipped(20), key)
    v2 = bytearray(SPEC_BLOCK)
    struct.pack_into("<H", v2, 8, 2)
    with pytest.raises(FormatVersionError):
        codec.verify(v2, key)
    with pytest.raises(CorruptBlockError, match="header checksum"):
        codec.verify(flipped(100), key)
    with pytest.raises(FormatVersionError):
        codec.verify(_reseal(bytearray(flipped(100))), key)
    with pytest.raises(ForeignBlockError):
        codec.verify(SPEC_BLOCK, BlockKey(0x7EE96CE620145853, SPEC_B0))
    with pytest.raises(CorruptBlockError) as ei:
        codec.verify(SPEC_BLOCK, key, expected_len=64)
    assert type(ei.value) is CorruptBlockError
    with pytest.raises(TruncatedBlockError):
        codec.verify(SPEC_BLOCK[:150], key)
    with pytest.raises(CorruptBlockError, match="payload checksum"):
        codec.verify(flipped(130), key)
    assert bytes(codec.verify(SPEC_BLOCK + b"\x00\x00", key)) == bytes(range(32))


def test_dtype_names_round_trip_through_torch() -> None:
    import torch

    from kvbm_fs.layout import DTYPES, dtype_name, torch_dtype

    for name in DTYPES:
        assert dtype_name(torch_dtype(name)) == name
    assert dtype_name(torch.float64) is None and dtype_name(torch.complex64) is None


def _blocks(n: int, nbytes: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` encoded blocks as (headers [n,128], payloads [n,nbytes], hashes); block 1 carries a dsum128."""
    rng = np.random.default_rng(7)
    payloads = rng.integers(0, 256, (n, nbytes), np.uint8)
    hashes = rng.integers(1, 2**63, n, dtype=np.uint64)
    headers = np.stack([
        np.frombuffer(codec.encode_header(BlockKey(5, int(h)), 0, 16, p, dsum.of(p) if i == 1 else None), np.uint8)
        for i, (h, p) in enumerate(zip(hashes.tolist(), payloads))
    ])  # fmt: skip
    return headers, payloads, hashes


DAMAGE = {
    "magic": lambda h, p: h.__setitem__((0, 0), h[0, 0] ^ 1),
    "version": lambda h, p: h.__setitem__((0, 8), 9),
    "flags": lambda h, p: h.__setitem__((0, 12), 0x80),
    "key echo": lambda h, p: h.__setitem__((0, 24), h[0, 24] ^ 1),
    "namespace": lambda h, p: h.__setitem__((0, 16), h[0, 16] ^ 1),
    "length": lambda h, p: h.__setitem__((0, 48), h[0, 48] ^ 1),
    "header checksum": lambda h, p: h.__setitem__((0, 72), h[0, 72] ^ 1),
    "tokens (covered by the header checksum)": lambda h, p: h.__setitem__((0, 40), h[0, 40] ^ 1),
    "reserved": lambda h, p: h.__setitem__((0, 120), 1),
    "dsum area without the flag": lambda h, p: h.__setitem__((0, 85), 1),
    "payload": lambda h, p: p.__setitem__((0, 100), p[0, 100] ^ 1),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_verify_batch_agrees_with_per_block_verify(damage: str) -> None:
    headers, payloads, hashes = _blocks(4)
    ok, why = codec.verify_batch(headers, 5, hashes, list(payloads), 4096)
    assert ok.all() and why is None
    DAMAGE[damage](headers, payloads)
    ok, why = codec.verify_batch(headers, 5, hashes, list(payloads), 4096)
    assert ok.tolist() == [False, True, True, True] and why
    with pytest.raises(CorruptBlockError) as err:  # the per-block path refuses block 0 too, for the same reason
        codec.verify(headers[0].tobytes() + payloads[0].tobytes(), BlockKey(5, int(hashes[0])), 4096)
    assert str(err.value) == why


def test_verify_batch_refuses_blocks_of_another_namespace_or_length() -> None:
    headers, payloads, hashes = _blocks(3)
    assert not codec.verify_batch(headers, 6, hashes, list(payloads), 4096)[0].any()
    assert not codec.verify_batch(headers, 5, hashes, list(payloads), 4095)[0].any()
    assert codec.verify_batch(headers, 5, hashes[::-1].copy(), list(payloads), 4096)[0].tolist() == [False, True, False]
