"""kvbm_fs.hashing against the Dynamo KVBM v1 sequence-hash spec (brief section 2).

The reference below is written from the spec with nothing but ``struct`` and
``xxhash``: each token is packed on its own with ``struct.pack("<I", t)``, pairs of
hashes with ``struct.pack("<QQ", a, b)``, and the salt JSON is assembled by hand.
It shares no code with the implementation under test.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_fs import hashing
from kvbm_fs.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
U64 = (1 << 64) - 1


# ---- independent reference ---------------------------------------------------------------
def ref_xxh3(data: bytes, seed: int) -> int:
    return xxhash.xxh3_64_intdigest(data, seed)


def ref_salt_bytes(salt: str | None, lora: str | None) -> bytes:
    """Compact JSON, keys in the order salt, lora_name, absent fields left out (strings that need no escape)."""
    parts = []
    if salt is not None:
        parts.append(b'"salt":"' + salt.encode("utf-8") + b'"')
    if lora is not None:
        parts.append(b'"lora_name":"' + lora.encode("utf-8") + b'"')
    return b"{" + b",".join(parts) + b"}"


def ref_salt_hash(salt: str | None = None, lora: str | None = None) -> int:
    return ref_xxh3(ref_salt_bytes(salt, lora), 0)


def ref_block_hashes(
    tokens: list[int], block_size: int, seed: int, extras: list[int | None] | None = None
) -> list[int]:
    out = []
    for b in range(len(tokens) // block_size):
        blk = tokens[b * block_size : (b + 1) * block_size]
        h = ref_xxh3(b"".join(struct.pack("<I", t) for t in blk), seed)
        if extras is not None and b < len(extras) and extras[b] is not None:
            h = ref_xxh3(struct.pack("<QQ", h, extras[b]), seed)
        out.append(h)
    return out


def ref_sequence_hashes(
    tokens: list[int],
    block_size: int,
    seed: int,
    parent: int | None = None,
    extras: list[int | None] | None = None,
) -> list[int]:
    seq: list[int] = []
    prev = parent
    for h in ref_block_hashes(tokens, block_size, seed, extras):
        cur = h if prev is None else ref_xxh3(struct.pack("<QQ", prev, h), seed)
        seq.append(cur)
        prev = cur
    return seq


# ---- Dynamo's own test vectors -------------------------------------------------------------
# ai-dynamo/dynamo, lib/llm/src/tokens.rs, `mod tests` (commit 21c2355a38f8e988f4be04c0d28af3b3685c4208):
#   TEST_SALT_HASH = 1337
#   HASH_1_4  = 14643705804678351452   // hash([1,2,3,4], 1337)          SEQ_HASH_1_4 = HASH_1_4
#   HASH_5_8  = 16777012769546811212   // hash([5,6,7,8], 1337)          SEQ_HASH_5_8 = 4945711292740353085
#   HASH_9_12 = 483935686894639516     // hash([9,10,11,12], 1337)       SEQ_HASH_9_12 = 12583592247330656132
# The same constants appear in Dynamo's block-pool tests and its C++ TokenSequence tests.
DYNAMO_SALT = 1337
DYNAMO_BLOCK = [14643705804678351452, 16777012769546811212, 483935686894639516]
DYNAMO_SEQ = [14643705804678351452, 4945711292740353085, 12583592247330656132]


def test_dynamo_vectors_block_hashes() -> None:
    assert hashing.block_hashes(list(range(1, 13)), 4, DYNAMO_SALT) == DYNAMO_BLOCK


def test_dynamo_vectors_sequence_hashes() -> None:
    assert hashing.sequence_hashes(list(range(1, 13)), 4, DYNAMO_SALT) == DYNAMO_SEQ


def test_dynamo_vectors_partial_tail() -> None:
    # tokens.rs test_new_sequence: [1..=9] with block size 4 -> two full blocks, [9] stays partial.
    assert hashing.sequence_hashes(list(range(1, 10)), 4, DYNAMO_SALT) == DYNAMO_SEQ[:2]
    # tokens.rs: with salt 0 the first block hash differs from HASH_1_4.
    assert hashing.block_hashes([1, 2, 3, 4, 5], 4, 0)[0] != DYNAMO_BLOCK[0]


def test_dynamo_vectors_match_reference() -> None:
    assert ref_block_hashes(list(range(1, 13)), 4, DYNAMO_SALT) == DYNAMO_BLOCK
    assert ref_sequence_hashes(list(range(1, 13)), 4, DYNAMO_SALT) == DYNAMO_SEQ


def test_dynamo_vectors_parent_continues_chain() -> None:
    out = hashing.sequence_hash_array([9, 10, 11, 12], 4, DYNAMO_SALT, parent=DYNAMO_SEQ[1])
    assert out.tolist() == [DYNAMO_SEQ[2]]


# ---- salt hash -------------------------------------------------------------------------------
def test_salt_hash_empty_is_braces() -> None:
    assert hashing.salt_hash() == xxhash.xxh3_64_intdigest(b"{}", 0)
    assert hashing.salt_hash(None, None) == ref_salt_hash()


@pytest.mark.parametrize(
    ("salt", "lora"),
    [("abc", None), (None, "my-lora"), ("abc", "my-lora"), ("", None), (None, ""), ("tenant-7/x", "l:1")],
)
def test_salt_hash_matches_reference(salt: str | None, lora: str | None) -> None:
    assert hashing.salt_hash(salt, lora) == ref_salt_hash(salt, lora)


def test_salt_hash_field_order_is_salt_then_lora() -> None:
    want = xxhash.xxh3_64_intdigest(b'{"salt":"s","lora_name":"l"}', 0)
    assert hashing.salt_hash("s", "l") == want
    assert hashing.salt_hash("s", "l") != xxhash.xxh3_64_intdigest(b'{"lora_name":"l","salt":"s"}', 0)


def test_salt_hash_empty_string_is_not_none() -> None:
    # KVBM v1 (SaltPayload with skip_serializing_if = Option::is_none) serialises Some("") as "".
    assert hashing.salt_hash("") == xxhash.xxh3_64_intdigest(b'{"salt":""}', 0)
    assert hashing.salt_hash("") != hashing.salt_hash(None)
    assert hashing.salt_hash(lora_name="") != hashing.salt_hash()


def test_salt_hash_salt_and_lora_are_not_interchangeable() -> None:
    assert hashing.salt_hash("x", None) != hashing.salt_hash(None, "x")


@pytest.mark.parametrize(
    ("salt", "json_bytes"),
    [
        # serde_json: UTF-8 passes through unescaped ...
        ("caf\u00e9 \u6f22", '{"salt":"caf\u00e9 \u6f22"}'.encode()),
        # ... quote and backslash escaped, the five short escapes, other controls as lowercase \u00XX, DEL raw.
        ('a"b\\c', b'{"salt":"a\\"b\\\\c"}'),
        ("\n\r\t\b\f", b'{"salt":"\\n\\r\\t\\b\\f"}'),
        ("\x01\x1f\x7f", b'{"salt":"\\u0001\\u001f\x7f"}'),
        ("/", b'{"salt":"/"}'),
    ],
)
def test_salt_hash_json_escaping_like_serde(salt: str, json_bytes: bytes) -> None:
    assert hashing.salt_hash(salt) == xxhash.xxh3_64_intdigest(json_bytes, 0)


# ---- block / sequence hashes against the reference ------------------------------------------------
tokens_st = st.lists(st.integers(0, 2**32 - 1), max_size=70)
bs_st = st.sampled_from([1, 2, 4, 8, 16])
seed_st = st.one_of(st.sampled_from([0, 1, U64, DYNAMO_SALT]), st.integers(0, U64))


@settings(max_examples=60, deadline=None)
@given(tokens=tokens_st, bs=bs_st, seed=seed_st)
def test_block_and_sequence_hashes_match_reference(tokens: list[int], bs: int, seed: int) -> None:
    assert hashing.block_hashes(tokens, bs, seed) == ref_block_hashes(tokens, bs, seed)
    assert hashing.sequence_hashes(tokens, bs, seed) == ref_sequence_hashes(tokens, bs, seed)


@settings(max_examples=60, deadline=None)
@given(
    tokens=tokens_st,
    bs=bs_st,
    seed=seed_st,
    parent=st.one_of(st.none(), st.integers(0, U64)),
    extra=st.lists(st.one_of(st.none(), st.integers(0, U64)), min_size=70, max_size=70),
)
def test_sequence_hash_array_parent_and_extras_match_reference(
    tokens: list[int], bs: int, seed: int, parent: int | None, extra: list[int | None]
) -> None:
    got = hashing.sequence_hash_array(tokens, bs, seed, parent=parent, extra_hashes=extra)
    assert got.dtype == np.uint64
    assert got.tolist() == ref_sequence_hashes(tokens, bs, seed, parent, extra)
    got_bh = hashing.block_hash_array(tokens, bs, seed, extra_hashes=extra)
    assert got_bh.tolist() == ref_block_hashes(tokens, bs, seed, extra)


def test_parent_zero_is_a_parent_not_none() -> None:
    toks = list(range(8))
    with_zero = hashing.sequence_hash_array(toks, 4, 5, parent=0).tolist()
    assert with_zero == ref_sequence_hashes(toks, 4, 5, parent=0)
    assert with_zero != hashing.sequence_hashes(toks, 4, 5)


def test_extra_none_entries_leave_block_unchanged() -> None:
    toks = list(range(1, 13))
    plain = hashing.sequence_hash_array(toks, 4, DYNAMO_SALT)
    all_none = hashing.sequence_hash_array(toks, 4, DYNAMO_SALT, extra_hashes=[None, None, None])
    assert plain.tolist() == all_none.tolist() == DYNAMO_SEQ
    # tokens.rs test_split_tokens_mm_extra_on_some_blocks: only the middle block gets an extra.
    mm = hashing.sequence_hash_array(toks, 4, DYNAMO_SALT, extra_hashes=[None, 0xCAFE, None])
    bh_mm = hashing.block_hash_array(toks, 4, DYNAMO_SALT, extra_hashes=[None, 0xCAFE, None])
    assert mm[0] == plain[0]
    assert bh_mm[1] != DYNAMO_BLOCK[1] and mm[1] != plain[1]
    assert bh_mm[2] == DYNAMO_BLOCK[2] and mm[2] != plain[2]
    assert int(bh_mm[1]) == ref_xxh3(struct.pack("<QQ", DYNAMO_BLOCK[1], 0xCAFE), DYNAMO_SALT)


def test_extra_hashes_as_numpy_uint64() -> None:
    toks = list(range(8))
    ex = np.array([7, 2**64 - 1], dtype=np.uint64)
    got = hashing.sequence_hash_array(toks, 4, 3, extra_hashes=ex).tolist()
    assert got == ref_sequence_hashes(toks, 4, 3, extras=[7, 2**64 - 1])


def test_extra_hashes_shorter_than_blocks_rejected() -> None:
    # docs/spec.md 4.4: the extra list MUST have one entry per full block (ValueError otherwise).
    # Dynamo's split_tokens_mm instead treats missing entries as None (tokens.rs
    # test_split_tokens_mm_extra_shorter_than_blocks); kvbm_fs refuses rather than guessing, so every
    # key it does produce still equals Dynamo's.
    toks = list(range(1, 9))
    with pytest.raises(ValueError):
        hashing.sequence_hash_array(toks, 4, DYNAMO_SALT, extra_hashes=[0xFF])
    with pytest.raises(ValueError):
        hashing.block_hash_array(toks, 4, DYNAMO_SALT, extra_hashes=[])
    # padded with None it is Dynamo's answer; extra entries past the last full block are ignored
    padded = hashing.sequence_hash_array(toks, 4, DYNAMO_SALT, extra_hashes=[0xFF, None, 7, 8]).tolist()
    assert padded == ref_sequence_hashes(toks, 4, DYNAMO_SALT, extras=[0xFF, None])
    assert hashing.sequence_hash_array([1, 2, 3], 4, 0, extra_hashes=[]).size == 0


# ---- docs/spec.md section 9 vectors ---------------------------------------------------------------
def test_spec_9_1_salt_vectors() -> None:
    assert hashing.salt_hash() == 0x1349CDE127705C16 == 1389868326933519382
    assert hashing.salt_hash("tenant-a") == 0x1223173DE9F1D8CC == 1306913871552960716
    assert hashing.salt_hash(None, "my-lora") == 0x11D6F31146A04DB3
    assert hashing.salt_hash("tenant-a", "my-lora") == 0x000C984EB7F00203 == 3545163581358595
    assert hashing.salt_hash("") == 0xDE1056719F67CD1C
    weird = 'caf\u00e9 "q"\\\n\x01\x7f/'
    assert len(weird) == 13
    want = bytes.fromhex(
        "7b 22 73 61 6c 74 22 3a 22 63 61 66 c3 a9 20 5c 22 71 5c 22 5c 5c 5c 6e 5c 75 30 30 30 31 7f 2f 22 7d"
    )
    assert len(want) == 34
    assert xxhash.xxh3_64_intdigest(want, 0) == 0xC84C1005706F1709
    assert hashing.salt_hash(weird) == 0xC84C1005706F1709


def test_spec_9_3_block_and_sequence_vectors() -> None:
    salt = hashing.salt_hash()
    assert hashing.block_hashes(list(range(32)), 16, salt) == [0x830D22E0C9126A99, 0x58CBFF662B6883D2]
    assert hashing.sequence_hashes(list(range(32)), 16, salt) == [0x830D22E0C9126A99, 0xC9A9947C51654B2E]
    assert hashing.sequence_hashes(list(range(35)), 16, salt) == [0x830D22E0C9126A99, 0xC9A9947C51654B2E]
    assert hashing.sequence_hashes(list(range(15)), 16, salt) == []
    assert hashing.sequence_hashes(list(range(32)), 16, hashing.salt_hash("tenant-a")) == [
        0x5FF76F4E5AFA34B2,
        0xB685D7F05339C51D,
    ]
    mm_b = hashing.block_hash_array(list(range(32)), 16, salt, extra_hashes=[None, 0x1234567890ABCDEF])
    assert mm_b.tolist() == [0x830D22E0C9126A99, 0x45991506E5A7BC86]
    mm_s = hashing.sequence_hash_array(list(range(32)), 16, salt, extra_hashes=[None, 0x1234567890ABCDEF])
    assert mm_s.tolist() == [0x830D22E0C9126A99, 0xC39FFF4256FD87CA]


# ---- input forms -------------------------------------------------------------------------------
TOKS = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 17, 99, 123456, 5, 6, 7, 8, 1000, 2000, 3000, 4000, 42, 43]


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32, np.uint64, ">u4", ">i8"])
def test_numpy_inputs_same_as_list(dtype: str) -> None:
    toks = [t for t in TOKS if t < 2**31] if np.dtype(dtype) == np.int32 else TOKS
    arr = np.array(toks, dtype=dtype)
    want = ref_sequence_hashes(toks, 4, 11)
    assert hashing.sequence_hashes(arr, 4, 11) == want
    assert hashing.sequence_hashes(toks, 4, 11) == want


def test_noncontiguous_numpy_input() -> None:
    base = np.array(TOKS * 2, dtype=np.uint32)
    view = base[::2]
    assert not view.flags.c_contiguous
    assert hashing.sequence_hashes(view, 4, 1) == ref_sequence_hashes(view.tolist(), 4, 1)


@pytest.mark.parametrize("dtype_name", ["int32", "int64"])
def test_torch_inputs_same_as_list(dtype_name: str) -> None:
    torch = pytest.importorskip("torch")
    toks = [t for t in TOKS if t < 2**31]
    t = torch.tensor(toks, dtype=getattr(torch, dtype_name))
    assert hashing.sequence_hashes(t, 4, 9) == ref_sequence_hashes(toks, 4, 9)
    assert hashing.block_hashes(t, 4, 9) == ref_block_hashes(toks, 4, 9)


def test_torch_noncontiguous_input() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(64, dtype=torch.int64)[::2]
    assert hashing.sequence_hashes(t, 8, 2) == ref_sequence_hashes(list(range(0, 64, 2)), 8, 2)


def test_partial_tail_not_hashed() -> None:
    toks = list(range(23))
    assert len(hashing.block_hashes(toks, 8, 0)) == 2
    assert hashing.sequence_hashes(toks, 8, 0) == hashing.sequence_hashes(toks[:16], 8, 0)
    assert hashing.sequence_hashes(toks[:7], 8, 0) == []


@pytest.mark.parametrize("empty", [[], np.array([], dtype=np.int64), np.array([], dtype=np.float64), ()])
def test_empty_input(empty: object) -> None:
    assert hashing.block_hashes(empty, 4, 0) == []
    assert hashing.sequence_hashes(empty, 4, 0) == []
    out = hashing.sequence_hash_array(empty, 4, 0, parent=5)
    assert out.dtype == np.uint64 and out.size == 0


# ---- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [0, -1, -4, 3, 6, 12, 1000, 2048, 4096, True, False, 4.0, "4", None])
def test_bad_block_size_raises_config_error(bs: object) -> None:
    with pytest.raises(ConfigError) as ei:
        hashing.sequence_hashes([1, 2, 3, 4], bs, 0)  # type: ignore[arg-type]
    assert isinstance(ei.value, ValueError)
    with pytest.raises(ConfigError):
        hashing.block_hashes([1, 2, 3, 4], bs, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("bs", [1, 2, 4, 64, 512, 1024, np.int64(16)])
def test_good_block_sizes(bs: int) -> None:
    toks = list(range(2048))
    assert hashing.block_hashes(toks, bs, 0) == ref_block_hashes(toks, int(bs), 0)


@pytest.mark.parametrize(
    "tokens",
    [
        [1, -1, 2, 3],
        np.array([1, -1, 2, 3], dtype=np.int64),
        np.array([-(2**31), 0, 0, 0], dtype=np.int32),
        [2**32, 0, 0, 0],
        np.array([2**32, 0, 0, 0], dtype=np.int64),
        np.array([2**63, 0, 0, 0], dtype=np.uint64),
        [2**64, 0, 0, 0],
        [-1, 2**64 - 1, 0, 0],
        [1.5, 2, 3, 4],
        [True, False, True, False],
    ],
)
def test_out_of_range_or_non_integer_tokens_raise(tokens: object) -> None:
    with pytest.raises(ValueError):
        hashing.sequence_hashes(tokens, 4, 0)


def test_negative_torch_tokens_raise() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError):
        hashing.sequence_hashes(torch.tensor([1, -5, 2, 3]), 4, 0)


@pytest.mark.parametrize("tokens", [[[1, 2], [3, 4]], np.zeros((2, 4), dtype=np.int64), np.int64(3)])
def test_non_1d_tokens_raise(tokens: object) -> None:
    with pytest.raises(ValueError):
        hashing.sequence_hashes(tokens, 2, 0)


def test_2d_torch_tokens_raise() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError):
        hashing.block_hashes(torch.zeros((2, 4), dtype=torch.int64), 2, 0)


@pytest.mark.parametrize("seed", [-1, 2**64, -(2**63)])
def test_salt_hash_out_of_u64_range_raises(seed: int) -> None:
    with pytest.raises(ConfigError):
        hashing.sequence_hashes([1, 2, 3, 4], 4, seed)


@pytest.mark.parametrize("parent", [-1, 2**64])
def test_parent_out_of_u64_range_raises_config_error(parent: int) -> None:
    with pytest.raises(ConfigError):
        hashing.sequence_hash_array([1, 2, 3, 4], 4, 0, parent=parent)


# ---- properties --------------------------------------------------------------------------------
def test_salt_changes_every_hash() -> None:
    toks = list(range(64))
    a = hashing.sequence_hashes(toks, 8, hashing.salt_hash("a"))
    b = hashing.sequence_hashes(toks, 8, hashing.salt_hash("b"))
    c = hashing.sequence_hashes(toks, 8, hashing.salt_hash(None, "a"))
    assert len(a) == 8
    assert all(x != y for x, y in zip(a, b))
    assert all(x != y for x, y in zip(a, c))
    ba = hashing.block_hashes(toks, 8, hashing.salt_hash("a"))
    bb = hashing.block_hashes(toks, 8, hashing.salt_hash("b"))
    assert all(x != y for x, y in zip(ba, bb))


@settings(max_examples=40, deadline=None)
@given(
    a_blocks=st.integers(0, 5),
    tail=st.lists(st.integers(0, 2**32 - 1), max_size=30),
    seed=st.integers(0, U64),
    bs=st.sampled_from([1, 4, 8]),
    data=st.data(),
)
def test_chaining_with_parent_equals_concatenation(
    a_blocks: int, tail: list[int], seed: int, bs: int, data: st.DataObject
) -> None:
    head = data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=a_blocks * bs, max_size=a_blocks * bs))
    whole = hashing.sequence_hashes(head + tail, bs, seed)
    first = hashing.sequence_hashes(head, bs, seed)
    parent = first[-1] if first else None
    rest = hashing.sequence_hash_array(tail, bs, seed, parent=parent).tolist()
    assert whole == first + rest


def test_chain_hashes_public_helper() -> None:
    bh = hashing.block_hash_array(list(range(1, 13)), 4, DYNAMO_SALT)
    assert hashing.chain_hashes(bh, DYNAMO_SALT).tolist() == DYNAMO_SEQ
    assert hashing.chain_hashes(bh[1:], DYNAMO_SALT, parent=DYNAMO_SEQ[0]).tolist() == DYNAMO_SEQ[1:]
    assert hashing.chain_hashes(np.zeros(0, np.uint64), 0).size == 0


def test_a_changed_token_changes_its_block_and_every_later_sequence_hash() -> None:
    toks = list(range(32))
    base_b = hashing.block_hashes(toks, 8, 0)
    base_s = hashing.sequence_hashes(toks, 8, 0)
    toks[9] += 1
    b = hashing.block_hashes(toks, 8, 0)
    s = hashing.sequence_hashes(toks, 8, 0)
    assert b[0] == base_b[0] and b[2:] == base_b[2:] and b[1] != base_b[1]
    assert s[0] == base_s[0] and all(x != y for x, y in zip(s[1:], base_s[1:]))


_CHILD = """
import json, sys
from kvbm_fs import hashing
from kvbm_fs.keys import Namespace
from kvbm_fs.layout import KVLayout
toks = list(range(100, 260))
salt = hashing.salt_hash("tenant-a", "lora-b")
ns = Namespace("org/model", KVLayout(4, 8, 128, 16, "bfloat16"), rank=1, world_size=2)
print(json.dumps({
    "salt": salt,
    "seq": hashing.sequence_hashes(toks, 16, salt),
    "blk": hashing.block_hashes(toks, 16, salt),
    "ns": ns.id,
    "keys": ns.keys_for_tokens(toks, "tenant-a", "lora-b").hashes.tolist(),
}))
"""


def _in_process() -> dict[str, object]:
    from kvbm_fs.keys import Namespace
    from kvbm_fs.layout import KVLayout

    toks = list(range(100, 260))
    salt = hashing.salt_hash("tenant-a", "lora-b")
    ns = Namespace("org/model", KVLayout(4, 8, 128, 16, "bfloat16"), rank=1, world_size=2)
    return {
        "salt": salt,
        "seq": hashing.sequence_hashes(toks, 16, salt),
        "blk": hashing.block_hashes(toks, 16, salt),
        "ns": ns.id,
        "keys": ns.keys_for_tokens(toks, "tenant-a", "lora-b").hashes.tolist(),
    }


def test_hashes_stable_across_processes_and_hash_seeds() -> None:
    here = _in_process()
    assert here["seq"] == ref_sequence_hashes(list(range(100, 260)), 16, ref_salt_hash("tenant-a", "lora-b"))
    outs = []
    for seed in ("0", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        r = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=True
        )
        outs.append(json.loads(r.stdout))
    assert outs[0] == outs[1] == json.loads(json.dumps(here))
