"""transformers integration: a real tiny Llama (random weights, no download) continues greedy generation from
KV loaded out of kvbm_fs, token for token equal to a full prefill, across tiers, restarts and corruption."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

hf: Any = pytest.importorskip("transformers")

from kvbm_fs import LayoutMismatchError, Store  # noqa: E402
from kvbm_fs.integration import transformers as kt  # noqa: E402

BS = 16
GEN: dict[str, Any] = {"max_new_tokens": 8, "do_sample": False}
RNG = np.random.default_rng(7)
SYSTEM = RNG.integers(3, 256, 70)  # 4 full blocks + 6 tokens shared by every prompt
FIRST = np.concatenate([SYSTEM, RNG.integers(3, 256, 20)])
SECOND = np.concatenate([SYSTEM, RNG.integers(3, 256, 25)])
SHARED = 64  # tokens of SECOND whose blocks FIRST stored: the 4 full blocks of SYSTEM


def tiny_config(**kw: Any) -> Any:
    cfg = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)  # fmt: skip
    return hf.LlamaConfig(**{**cfg, **kw})


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **kw: Any) -> Any:
    torch.manual_seed(seed)
    return hf.LlamaForCausalLM(tiny_config(**kw)).to(dtype).eval()


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_model()


def full_prefill(model: Any, prompt: np.ndarray) -> torch.Tensor:
    ids = torch.as_tensor(prompt)[None]
    out: torch.Tensor = model.generate(ids, attention_mask=torch.ones_like(ids), **GEN)
    return out


def disk_store(model: Any, root: Path, host: bool = True) -> Store:
    tiers = (["host://?capacity=4MiB"] if host else []) + [f"file://{root}?capacity=4MiB"]
    return kt.mount_model(model, *tiers, name="tiny-llama")


def test_host_tier_prefix_reuse_matches_full_prefill(model: Any) -> None:
    with kt.mount_model(model, "host://?capacity=4MiB", name="tiny-llama") as store:
        first = kt.generate_with_cache(model, store, FIRST, **GEN)
        assert (first.loaded_tokens, first.saved_blocks) == (0, len(FIRST) // BS)
        second = kt.generate_with_cache(model, store, SECOND, **GEN)
        assert second.loaded_tokens == SHARED and second.computed_tokens == len(SECOND) - SHARED
        assert second.saved_blocks == len(SECOND) // BS - SHARED // BS
        assert torch.equal(second.sequences, full_prefill(model, SECOND))
        again = kt.generate_with_cache(model, store, SECOND, **GEN)  # every full block but the last token's
        assert again.loaded_tokens == (len(SECOND) - 1) // BS * BS and again.saved_blocks == 0
        assert torch.equal(again.sequences, second.sequences)


def test_loaded_cache_holds_exactly_the_prefix(model: Any) -> None:
    with kt.mount_model(model, "host://?capacity=4MiB") as store:
        ids = torch.as_tensor(FIRST)[None]
        with torch.no_grad():
            cache = model(ids, use_cache=True).cache
        assert kt.save_prefill(store, ids, cache) == len(FIRST) // BS
        got, n = kt.load_prefix(store, SECOND)
        assert got is not None and n == SHARED and got.get_seq_length() == SHARED
        for (k, v), (k0, v0) in zip(kt.cache_layers(got), kt.cache_layers(cache)):
            assert torch.equal(k, k0[:, :, :SHARED]) and torch.equal(v, v0[:, :, :SHARED])
        assert kt.load_prefix(store, FIRST[: 4 * BS])[1] == 3 * BS  # never the whole prompt
        assert kt.load_prefix(store, RNG.integers(3, 256, 40)) == (None, 0)


def test_disk_tier_across_restart(model: Any, tmp_path: Path) -> None:
    with disk_store(model, tmp_path) as store:
        kt.generate_with_cache(model, store, FIRST, **GEN)
    with disk_store(model, tmp_path) as store:  # a fresh process's view: host is empty, disk persisted
        assert store.match(store.keys(SECOND[:SHARED])).by_tier() == {"disk": SHARED // BS}
        second = kt.generate_with_cache(model, store, SECOND, **GEN)
    assert second.loaded_tokens == SHARED
    assert torch.equal(second.sequences, full_prefill(model, SECOND))


def flip_payload(store: Store, prompt: np.ndarray, block: int) -> None:
    """XOR a byte in the middle of one block's payload on disk, behind the tier's back."""
    from kvbm_fs.tiers.disk import HEADER_PAGE

    disk: Any = store.tier("disk")
    keys = store.keys(prompt)
    rec = disk.index.records(keys.ns, keys.hashes[block : block + 1])[0]
    seg, off = disk._locate(rec.slot)
    fd = os.open(disk._segment_path(seg), os.O_RDWR)
    try:
        pos = off + HEADER_PAGE + disk.block_nbytes // 2
        os.pwrite(fd, bytes([os.pread(fd, 1, pos)[0] ^ 0x5A]), pos)
    finally:
        os.close(fd)


def test_corrupt_block_truncates_the_prefix(model: Any, tmp_path: Path) -> None:
    with disk_store(model, tmp_path) as store:
        kt.generate_with_cache(model, store, FIRST, **GEN)
    with disk_store(model, tmp_path, host=False) as store:
        flip_payload(store, SECOND, block=2)
        cache, n = kt.load_prefix(store, SECOND)
        assert n == 2 * BS and cache is not None and cache.get_seq_length() == 2 * BS
        second = kt.generate_with_cache(model, store, SECOND, **GEN)  # the bad block was dropped: 2 blocks
        assert second.loaded_tokens == 2 * BS
        assert torch.equal(second.sequences, full_prefill(model, SECOND))
        third = kt.generate_with_cache(model, store, SECOND, **GEN)  # recomputed blocks were stored again
        assert third.loaded_tokens == (len(SECOND) - 1) // BS * BS


def test_other_configs_get_other_namespaces(model: Any) -> None:
    base = kt.model_namespace(model, name="m")
    others = [
        kt.model_namespace(tiny_model(num_hidden_layers=3), name="m"),
        kt.model_namespace(model, name="m", dtype=torch.bfloat16),
        kt.model_namespace(tiny_model(rope_theta=5000.0), name="m"),  # same layout, other config
        kt.model_namespace(model, 32, name="m"),
        kt.model_namespace(model, name="m2"),
    ]
    assert len({base.id, *(o.id for o in others)}) == 1 + len(others)
    assert kt.model_namespace(tiny_model(seed=1), name="m").id == base.id  # same config: the name tells apart
    assert (
        kt.model_namespace(tiny_model(seed=1), name="m", weights=True).id
        != kt.model_namespace(model, name="m", weights=True).id
    )


def test_same_layout_other_config_never_matches(model: Any) -> None:
    other = tiny_model(rope_theta=5000.0)
    with kt.mount_model(model, "host://?capacity=4MiB", name="m") as store:
        kt.generate_with_cache(model, store, FIRST, **GEN)
        ns = kt.model_namespace(other, name="m")
        assert ns.layout == store.default_namespace.layout if store.default_namespace else False
        assert kt.load_prefix(store, SECOND, namespace=ns) == (None, 0)
        out = kt.generate_with_cache(other, store, SECOND, namespace=ns, **GEN)
        assert out.loaded_tokens == 0
        with pytest.raises(LayoutMismatchError, match="config"):
            kt.generate_with_cache(other, store, SECOND, **GEN)  # into the first model's namespace


def test_wrong_layout_or_dtype_is_refused(model: Any, tmp_path: Path) -> None:
    with kt.mount_model(model, "host://?capacity=4MiB", name="m") as store:
        with pytest.raises(LayoutMismatchError, match="layout"):
            kt.generate_with_cache(tiny_model(num_hidden_layers=3), store, SECOND, **GEN)
        half = tiny_model(dtype=torch.bfloat16)
        with pytest.raises(LayoutMismatchError, match="KV layout"):
            kt.generate_with_cache(half, store, SECOND, **GEN)
        with torch.no_grad():
            cache = half(torch.as_tensor(FIRST)[None], use_cache=True).cache
        with pytest.raises(LayoutMismatchError, match=r"torch\.bfloat16; the namespace layout needs .* float32"):
            kt.save_prefill(store, FIRST, cache)
    with disk_store(model, tmp_path):
        pass
    with pytest.raises(LayoutMismatchError):  # the disk tier holds 4 KiB blocks, bf16 blocks are 2 KiB
        kt.mount_model(tiny_model(dtype=torch.bfloat16), f"file://{tmp_path}?capacity=4MiB", name="tiny-llama")


def test_batches_and_bad_shapes_are_refused(model: Any) -> None:
    with kt.mount_model(model, "host://?capacity=4MiB") as store:
        two = torch.as_tensor(np.stack([FIRST, FIRST]))
        with pytest.raises(kt.UnsupportedCacheError, match="one prompt"):
            kt.load_prefix(store, two)
        with torch.no_grad():
            cache = model(two, use_cache=True).cache
        with pytest.raises(kt.UnsupportedCacheError, match="batch size 1"):
            kt.save_prefill(store, FIRST, cache)
    with pytest.raises(kt.UnsupportedCacheError, match="full-attention"):
        kt.model_layout(tiny_config(sliding_window=32, layer_types=["sliding_attention"] * 2))


def test_prepopulate_then_serve(model: Any, tmp_path: Path) -> None:
    third = np.concatenate([SYSTEM, RNG.integers(3, 256, 40)])
    with disk_store(model, tmp_path) as store:
        st = kt.prepopulate(model, store, [FIRST, third.tolist(), FIRST], batch_size=2)
        assert (st.prompts, st.prefilled, st.skipped) == (3, 2, 1)
        assert st.saved_blocks == len(FIRST) // BS + len(third) // BS - SHARED // BS
        assert kt.prepopulate(model, store, [FIRST, SYSTEM[:10]]).skipped == 2  # stored, or no full block
    with disk_store(model, tmp_path) as store:
        second = kt.generate_with_cache(model, store, SECOND, **GEN)
    assert second.loaded_tokens == SHARED
    assert torch.equal(second.sequences, full_prefill(model, SECOND))


def test_hf_prepopulate_cli(model: Any, tmp_path: Path) -> None:
    src = tmp_path / "prompts.jsonl"
    src.write_text(f"{FIRST.tolist()}\n\n" + '{"token_ids": [1, 2, 3]}\n')
    model.save_pretrained(tmp_path / "model")
    from kvbm_fs.cli import main as cli_main

    tiers = f"file://{tmp_path}/kv?capacity=4MiB"
    assert cli_main(["hf-prepopulate", str(tmp_path / "model"), str(src), "--tiers", tiers, "--name", "t"]) == 0
    with kt.mount_model(model, f"file://{tmp_path}/kv?capacity=4MiB", name="t") as store:
        assert kt.load_prefix(store, SECOND)[1] == SHARED


def test_generation_really_attends_to_the_loaded_kv(model: Any) -> None:
    """Guard against a vacuous equality: blocks of garbage under the prefix's names change the output."""
    with kt.mount_model(model, "host://?capacity=4MiB") as store:
        ns = store.default_namespace
        assert ns is not None
        keys = store.keys(SECOND[:SHARED])
        store.put(keys, torch.randn((len(keys), *ns.layout.block_shape)) * 5)
        out = kt.generate_with_cache(model, store, SECOND, **GEN)
        assert out.loaded_tokens == SHARED
        assert not torch.equal(out.sequences, full_prefill(model, SECOND))


def test_generate_arguments(model: Any) -> None:
    with kt.mount_model(model, "host://?capacity=4MiB") as store:
        with pytest.raises(ValueError, match="do not pass one"):
            kt.generate_with_cache(model, store, FIRST, cache=hf.DynamicCache(), **GEN)
        with pytest.raises(kt.UnsupportedCacheError, match="padded"):
            kt.generate_with_cache(model, store, FIRST, attention_mask=torch.zeros(1, len(FIRST)), **GEN)
        out = kt.generate_with_cache(model, store, FIRST, return_dict_in_generate=True, **GEN)
        assert out.output.sequences is out.sequences
        assert kt.generate_with_cache(model, store, FIRST, **GEN).output is not None


def test_prepopulate_and_generate_publish_kv_events_with_their_tokens(model: Any) -> None:
    pytest.importorskip("zmq")
    from zmq_sub import subscribe

    from kvbm_fs.kv_events import BlockStored, publisher_of

    events = {"endpoint": "tcp://127.0.0.1:0", "bind": True}
    with kt.mount_model(model, "host://?capacity=4MiB", name="tiny-llama", env={}, events=events) as store:
        pub = publisher_of(store)
        assert pub is not None
        with subscribe(pub) as sub:
            kt.prepopulate(model, store, [FIRST])
            kt.generate_with_cache(model, store, SECOND, **GEN)  # its blocks after SYSTEM's are new
            evs = sub.read_upto(pub)
        per_block: dict[Any, list[int]] = {}
        for e in evs:
            if isinstance(e, BlockStored):
                for j, h in enumerate(e.block_hashes):
                    per_block[h] = e.token_ids[j * BS : (j + 1) * BS]
        for prompt in (FIRST, SECOND):
            keys = store.keys(prompt)
            assert [t for h in keys.hashes.tolist() for t in per_block[h]] == prompt[: len(keys) * BS].tolist()
