"""``kvbm-fs prepopulate``'s engine-neutral driver: corpus parsing, shards, priority and budget, trace
synthesis, resume. A stand-in engine stores every full block of each prompt it is handed into a real
disk tier (the vLLM and HF engines are tested in test_prepopulate_vllm.py and test_prepopulate_hf.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kvbm_fs import ConfigError, KVLayout, Namespace, Store, mount
from kvbm_fs import prepopulate as pp

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, dtype="float16")  # 128 B blocks
BS = LAYOUT.block_size


class FakeEngine:
    """Stores the full blocks of every prompt it prefills (what an engine's connector does)."""

    name = "fake"

    def __init__(self, store: Store) -> None:
        assert store.default_namespace is not None
        self.store, self.namespaces = store, [store.default_namespace]
        self.batches: list[list[list[int]]] = []

    def prefill(self, batch: list[np.ndarray]) -> None:
        self.batches.append([p.tolist() for p in batch])
        for p in batch:
            keys = self.namespaces[0].keys_for_tokens(p)
            self.store.put(keys, torch.zeros((len(keys), *LAYOUT.block_shape), dtype=torch.float16))

    def counters(self) -> dict[str, float]:
        return {"batches": len(self.batches)}

    def close(self) -> None:
        self.store.close()


def disk(root: Path) -> Store:
    return mount(f"file://{root}?capacity=1MiB", layout=LAYOUT, model="fake", env={})


def corpus(*token_lists: list[int]) -> pp.Corpus:
    return pp.Corpus([pp.Prompt(np.asarray(t, np.int64), f"c:{i + 1}") for i, t in enumerate(token_lists)])


class WordTokenizer:
    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]

    def chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return [9] + [t for m in messages for t in self.encode(m["content"])]


def test_corpus_lines_bad_lines_and_strict(tmp_path: Path) -> None:
    src = tmp_path / "c.jsonl"
    lines = [
        '{"prompt_token_ids": [5, 6, 7]}',
        "[1, 2]",
        '{"prompt": "aa bbb c"}',
        '{"messages": [{"role": "user", "content": "hello you"}]}',
        "{not json",
        '{"foo": 1}',
        '{"prompt_token_ids": [1, -2]}',
        "",
        '{"prompt_token_ids": []}',
        '"dd e"',
    ]
    src.write_text("\n".join(lines) + "\n")
    c = pp.read_jsonl(str(src), WordTokenizer())
    assert [p.tokens.tolist() for p in c.prompts] == [[5, 6, 7], [1, 2], [2, 3, 1], [9, 5, 3], [2, 1]]
    assert [p.where for p in c.prompts] == [f"{src}:{n}" for n in (1, 2, 3, 4, 10)]
    assert [b["where"].rsplit(":", 1)[1] for b in c.bad] == ["5", "6", "7", "9"]
    assert "non-negative" in c.bad[2]["error"] and "empty" in c.bad[3]["error"]
    no_tok = pp.read_jsonl(str(src), None)  # text and chat lines need a tokenizer: reported, not fatal
    assert {b["where"].rsplit(":", 1)[1] for b in no_tok.bad} >= {"3", "4", "10"}
    with pytest.raises(ConfigError, match=r"c\.jsonl:5"):
        pp.read_jsonl(str(src), WordTokenizer(), strict=True)


def test_shards_cover_the_corpus_exactly_once() -> None:
    rng = np.random.default_rng(0)
    prompts = [pp.Prompt(rng.integers(0, 100, int(rng.integers(1, 30))), f"c:{i}") for i in range(200)]
    parts = [pp.shard(prompts, i, 3) for i in range(3)]
    where = sorted(p.where for part in parts for p in part)
    assert where == sorted(p.where for p in prompts) and all(len(part) > 30 for part in parts)
    again = [pp.shard(list(reversed(prompts)), i, 3) for i in range(3)]  # content decides, not line order
    assert [sorted(p.where for p in a) for a in again] == [sorted(p.where for p in b) for b in parts]
    assert pp.parse_shard("1/4") == (1, 4) and pp.parse_shard(None) == (0, 1)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ConfigError):
            pp.parse_shard(bad)


def test_synthesized_trace_shares_tokens_where_hash_ids_are_shared(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    recs = [
        {"hash_ids": [0, 1, 2], "input_length": 10},
        {"hash_ids": [0, 1, 3], "input_length": 12},
        {"hash_ids": [4], "input_length": 2},
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in recs))
    c = pp.synthesize(str(trace), block_tokens=4, vocab_size=50, seed=3)
    a, b, d = (p.tokens for p in c.prompts)
    assert (a.size, b.size, d.size) == (10, 12, 2)
    assert np.array_equal(a[:8], b[:8]) and not np.array_equal(a[8:10], b[8:10])
    assert a.max() < 50 and pp.synthesize(str(trace), block_tokens=4, vocab_size=50, seed=3).prompts[0].where
    assert np.array_equal(pp.synthesize(str(trace), block_tokens=4, vocab_size=50, seed=3).prompts[1].tokens, b)
    assert not np.array_equal(pp.synthesize(str(trace), block_tokens=4, vocab_size=50, seed=4).prompts[1].tokens, b)


SYS = list(range(100, 100 + 3 * BS))  # 3 blocks shared by four prompts


def shared_corpus() -> pp.Corpus:
    rng = np.random.default_rng(1)
    solo = [rng.integers(0, 99, 4 * BS).tolist() for _ in range(3)]  # 4 blocks each, shared by none
    tails = [rng.integers(0, 99, 2 * BS).tolist() for _ in range(4)]
    return corpus(*solo[:2], *[SYS + t for t in tails], solo[2], [*SYS[: 2 * BS], 7])


def test_priority_puts_shared_prefixes_first_and_a_budget_stops_cleanly(tmp_path: Path) -> None:
    with disk(tmp_path / "a") as store:
        eng = FakeEngine(store)
        rep = pp.run(eng, shared_corpus(), batch_size=2, max_blocks=3 + 2 * 2)
        first = [p for b in eng.batches for p in b]
        # the most shared prefix first (its shortest prompt first), then prompts sharing SYS whole
        assert first[0] == [*SYS[: 2 * BS], 7] and all(p[: 3 * BS] == SYS for p in first[1:])
        assert rep.stopped == "max_blocks" and rep.blocks_stored == 2 + 3 + 2 and rep.prefilled == 3
        assert rep.not_reached == 2 + 3 and rep.covered == 0
        ns = store.default_namespace
        assert ns is not None
        assert store.match(ns.keys_for_tokens(np.asarray(SYS))).length == 3
    with disk(tmp_path / "b") as store:
        rep = pp.run(FakeEngine(store), shared_corpus(), max_bytes=LAYOUT.block_nbytes * 10)
        assert rep.stopped == "max_bytes" and rep.blocks_stored == 2 + 3 + 2 + 2  # the 4th SYS+tail: 11 > 10
        rep = pp.run(FakeEngine(store), shared_corpus(), max_bytes=LAYOUT.block_nbytes * 100)
        assert rep.stopped is None


def test_resume_skips_stored_prompts_and_prefills_only_the_rest(tmp_path: Path) -> None:
    c = shared_corpus()
    total = 3 + 4 * 2 + 3 * 4  # distinct blocks: SYS, four tails, three solo prompts
    with disk(tmp_path) as store:
        first = pp.run(FakeEngine(store), c, batch_size=3, max_blocks=9)
    with disk(tmp_path) as store:  # a new process on the same tier: what was stored is skipped
        eng = FakeEngine(store)
        rep = pp.run(eng, c, batch_size=3)
        assert first.prefilled == 4 and rep.already_present == first.prefilled
        assert rep.prefilled == len(c.prompts) - rep.already_present
        assert rep.blocks_already_present == first.blocks_stored
        assert rep.blocks_stored == total - first.blocks_stored == rep.tiers["disk"]["blocks"]
        assert rep.bytes_stored == rep.blocks_stored * LAYOUT.block_nbytes
        assert rep.tiers["disk"]["bytes"] == rep.bytes_stored
        assert rep.failures == [] and rep.blocks == total
        stored_before = {tuple(p.tokens.tolist()) for p in c.prompts[2:5]} | {tuple(c.prompts[7].tokens.tolist())}
        again = {tuple(p) for b in eng.batches for p in b}
        assert len(again) == 4 and not again & stored_before  # nothing stored was prefilled again
    with disk(tmp_path) as store:
        eng = FakeEngine(store)
        rep = pp.run(eng, c)
        assert eng.batches == [] and rep.already_present == len(c.prompts) and rep.blocks_stored == 0


def test_duplicates_and_short_prompts_are_not_prefilled(tmp_path: Path) -> None:
    with disk(tmp_path) as store:
        eng = FakeEngine(store)
        rep = pp.run(eng, corpus(SYS, SYS, SYS[:BS], [1, 2]))
        # the one-block prefix goes first (most shared), so only the second SYS is covered already
        assert (rep.prefilled, rep.covered, rep.too_short) == (2, 1, 1) and rep.tokens == BS + len(SYS)
        assert rep.blocks_stored == 3 and rep.tokens_per_s > 0


class Forgetful(FakeEngine):
    def prefill(self, batch: list[np.ndarray]) -> None:
        self.batches.append([p.tolist() for p in batch])


def test_blocks_an_engine_did_not_store_are_failures(tmp_path: Path) -> None:
    with disk(tmp_path) as store:
        rep = pp.run(Forgetful(store), corpus(SYS))
        assert rep.blocks_failed == 3 and rep.failures == [{"where": "c:1", "error": "3 blocks not stored"}]


def test_namespaces_of_every_rank_must_hold_a_block(tmp_path: Path) -> None:
    with disk(tmp_path) as store:
        eng = FakeEngine(store)
        other = store.add_namespace(Namespace("fake", LAYOUT, rank=1, world_size=2))
        eng.namespaces = [eng.namespaces[0], other]
        eng.prefill([np.asarray(SYS)])  # rank 0 only
        rep = pp.run(eng, corpus(SYS))
        assert rep.already_present == 0 and rep.prefilled == 1 and rep.blocks_failed == 3  # rank 1 never stored


def test_layout_siblings_name_the_same_model_stored_under_another_layout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from kvbm_fs.engine import layout_siblings, warn_layout_siblings

    url = f"remote+file://{tmp_path}/kv"
    model = "/models/tiny@vllm/CPU_ATTN"
    # a tier holds blocks of one byte size: the siblings that can share it differ in block size and dtype
    # together (bfloat16 vs float16, or here 2 float32 tokens vs 4 float16), or in attention backend
    other = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, block_size=2, dtype="float32")
    for m, tenant in ((model, ""), ("/models/other@vllm/CPU_ATTN", ""), (model, "acme")):
        with mount(url, layout=other, model=m, tenant=tenant, env={}) as store:
            keys = store.keys(np.arange(32))
            store.put(keys, torch.zeros((len(keys), *other.block_shape)))
    with mount(url, layout=LAYOUT, model="/models/tiny@vllm/TORCH_SDPA", env={}) as store:  # block size 4
        ns = store.default_namespace
        assert ns is not None
        assert store.match(ns.keys_for_tokens(np.arange(32))).length == 0  # another layout never matches
        sib = layout_siblings(store, ns)
        assert [(s.model, s.layout.block_size, s.tenant) for s in sib] == [(model, 2, "")]
        with caplog.at_level("WARNING", logger="kvbm_fs"):
            assert warn_layout_siblings(store, ns, "test") == sib
        assert "block_size 2 != 4, dtype float32 != float16" in caplog.text and sib[0].short_id in caplog.text
    with mount(url, layout=other, model=model, env={}) as store:  # from the other side: the one mounted above
        assert store.default_namespace is not None
        assert [s.model for s in layout_siblings(store, store.default_namespace)] == ["/models/tiny@vllm/TORCH_SDPA"]


class Picky(FakeEngine):
    """Refuses a batch holding a prompt longer than it takes (as vLLM refuses one over max_model_len)."""

    def prefill(self, batch: list[np.ndarray]) -> None:
        if any(p.size > 5 * BS for p in batch):
            raise ValueError("prompt too long")
        super().prefill(batch)


def test_a_batch_the_engine_refuses_is_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    long, short = rng.integers(0, 99, 8 * BS).tolist(), rng.integers(0, 99, 2 * BS).tolist()
    with disk(tmp_path) as store:
        rep = pp.run(Picky(store), corpus(long, short), batch_size=2)  # retried one by one: only one fails
        assert rep.prefilled == 1 and rep.blocks_stored == 2 and rep.blocks_failed == 8
        assert rep.failures == [{"where": "c:1", "error": "ValueError: prompt too long"}]


def test_verify_reads_stored_blocks_back_from_persistent_tiers(tmp_path: Path) -> None:
    with disk(tmp_path) as store:
        rep = pp.run(FakeEngine(store), corpus(SYS), verify=True)
        assert rep.verified == {"disk": {"blocks": 3, "failed": 0}} and rep.failures == []
    with disk(tmp_path / "bad") as store:
        eng = Corrupting(store)
        rep = pp.run(eng, corpus(SYS), verify=True)  # present, so stored; but it does not read back
        assert rep.blocks_stored == 3 and rep.verified == {"disk": {"blocks": 2, "failed": 1}}
        assert rep.failures == [{"where": "verify", "error": "1 stored blocks did not read back verified"}]
    with mount("host://?capacity=64KiB", layout=LAYOUT, model="fake", env={}) as store:
        rep = pp.run(FakeEngine(store), corpus(SYS), verify=True)
        assert rep.verified == {} and rep.failures[0]["where"] == "verify"


class Corrupting(FakeEngine):
    """Stores each prompt, then flips payload bytes of its first block on disk behind the tier's back."""

    def prefill(self, batch: list[np.ndarray]) -> None:
        from disk_helpers import corrupt_payload

        super().prefill(batch)
        for p in batch:
            corrupt_payload(self.store.tier("disk"), self.namespaces[0].keys_for_tokens(p)[:1])  # type: ignore[arg-type]
