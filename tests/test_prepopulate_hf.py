"""``kvbm-fs prepopulate --engine hf`` with a real tiny transformers Llama (random weights, no download):
the report, resume, bad lines, and shards 0/2 + 1/2 against one moto S3 bucket storing exactly the
blocks of one unsharded run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

hf: Any = pytest.importorskip("transformers")

from kvbm_fs.catalog import Catalog  # noqa: E402
from kvbm_fs.cli import main as cli_main  # noqa: E402
from kvbm_fs.integration import transformers as kt  # noqa: E402

BS = 16
RNG = np.random.default_rng(11)
SYSTEM = RNG.integers(3, 256, 3 * BS).tolist()
PROMPTS = [SYSTEM + RNG.integers(3, 256, int(n)).tolist() for n in RNG.integers(5, 40, 10)]
PROMPTS += [RNG.integers(3, 256, 2 * BS + 3).tolist() for _ in range(4)]
BLOCKS = 3 + sum(len(p) // BS - 3 for p in PROMPTS[:10]) + 4 * 2  # distinct full blocks: SYSTEM's shared


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)  # fmt: skip
    d = tmp_path_factory.mktemp("tiny") / "model"
    hf.LlamaForCausalLM(cfg).float().eval().save_pretrained(d)
    return d


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    src = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt_token_ids": p}) for p in PROMPTS]
    lines.insert(3, '{"prompt_token_ids": "oops"}')
    src.write_text("\n".join(lines) + "\n")
    return src


def prepopulate(capsys: pytest.CaptureFixture[str], model_dir: Path, corpus: Path, *args: str) -> tuple[int, Any]:
    rc = cli_main(["prepopulate", str(corpus), "--engine", "hf", "--model", str(model_dir), "--name", "tiny",
                   "--json", "--batch-size", "4", *args])  # fmt: skip
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert all(x["event"] == "progress" for x in lines[:-1]) and lines[-1]["event"] == "report"
    return rc, lines


def test_report_resume_and_serving(capsys: pytest.CaptureFixture[str], model_dir: Path, corpus: Path) -> None:
    tier = f"file://{corpus.parent}/kv?capacity=4MiB"
    rc, lines = prepopulate(capsys, model_dir, corpus, "--tiers", tier, "--max-blocks", "12")
    first = lines[-1]
    assert rc == 0 and first["stopped"] == "max_blocks" and first["blocks_stored"] <= 12
    assert first["bad_lines"] == [
        {"where": f"{corpus}:4", "error": "token ids must be a list of non-negative integers"}
    ]
    assert lines[0]["done"] <= lines[0]["total"] and lines[-2]["done"] == first["prefilled"] > 0
    rc, lines = prepopulate(capsys, model_dir, corpus, "--tiers", tier, "--verify")
    rep = lines[-1]
    assert rep["verified"] == {"disk": {"blocks": rep["blocks_stored"], "failed": 0}}
    assert rc == 0 and rep["stopped"] is None and rep["failures"] == []
    assert rep["already_present"] == first["prefilled"] and rep["prefilled"] == len(PROMPTS) - first["prefilled"]
    assert rep["blocks_already_present"] == first["blocks_stored"]
    assert rep["engine_counters"]["saved_blocks"] == rep["blocks_stored"] == rep["tiers"]["disk"]["blocks"]
    assert first["blocks_stored"] + rep["blocks_stored"] == rep["blocks"] == BLOCKS
    rc, lines = prepopulate(capsys, model_dir, corpus, "--tiers", tier)
    assert lines[-1]["already_present"] == len(PROMPTS) and lines[-1]["prefilled"] == 0
    model = hf.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    with kt.mount_model(model, tier, name="tiny") as store:
        for p in PROMPTS:
            assert kt.load_prefix(store, p)[1] == (len(p) - 1) // BS * BS
    assert cli_main(["prepopulate", str(corpus), "--engine", "hf", "--model", str(model_dir), "--tiers", tier,
                     "--strict"]) == 2  # fmt: skip
    assert "prompts.jsonl:4" in capsys.readouterr().err


def blocks_in(url: str) -> set[tuple[int, int]]:
    with Catalog.open(url) as cat:
        return {(ns, int(h)) for t in cat.tiers for ns, b in cat.blocks(t).items() for h in b.hashes}


def test_two_shards_store_what_one_run_stores(
    capsys: pytest.CaptureFixture[str], model_dir: Path, corpus: Path, moto_s3: Any, bucket: str
) -> None:
    so = moto_s3.storage_options()
    creds = f"endpoint_url={so['endpoint_url']}&key={so['key']}&secret={so['secret']}"
    sharded, whole = f"s3://{bucket}/sharded?{creds}", f"s3://{bucket}/whole?{creds}"
    done = []
    for i in range(2):
        rc, lines = prepopulate(capsys, model_dir, corpus, "--tiers", sharded, "--shard", f"{i}/2")
        assert rc == 0 and lines[-1]["shard"] == f"{i}/2"
        done.append(lines[-1]["prompts"])
    assert sum(done) == len(PROMPTS) and min(done) > 0
    rc, lines = prepopulate(capsys, model_dir, corpus, "--tiers", whole)
    assert rc == 0 and lines[-1]["blocks_stored"] == BLOCKS
    assert blocks_in(sharded) == blocks_in(whole) and len(blocks_in(whole)) == BLOCKS


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer (w0 .. w199) with a chat template, saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i + 3 for i in range(200)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = hf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(d)
    return d


def words(n: int, seed: int) -> str:
    return " ".join(f"w{i}" for i in np.random.default_rng(seed).integers(0, 200, n))


def test_text_chat_system_prompts_and_trace_inputs(
    capsys: pytest.CaptureFixture[str], model_dir: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    system = words(40, 1)
    src, sys_file = tmp_path / "c.jsonl", tmp_path / "system.jsonl"
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": words(30, 2)}]
    src.write_text(json.dumps({"prompt": system + " " + words(25, 3)}) + "\n" + json.dumps({"messages": msgs}) + "\n")
    sys_file.write_text(json.dumps({"prompt": system}) + "\n")
    tier = f"file://{tmp_path}/kv?capacity=4MiB"
    report = tmp_path / "r.json"
    rc = cli_main(["prepopulate", str(src), "--engine", "hf", "--model", str(model_dir), "--tokenizer",
                   str(tokenizer_dir), "--system-prompts", str(sys_file), "--tiers", tier, "--name", "tiny",
                   "--report", str(report)])  # fmt: skip
    out = capsys.readouterr().out
    rep = json.loads(report.read_text())
    assert rc == 0 and "blocks_stored" in out and rep["prompts"] == 3 and rep["bad_lines"] == []
    assert "prompts/s" not in out  # the progress bar goes to stderr, the table to stdout
    assert (
        rep["prefilled"] == 3 and rep["blocks_stored"] == 2 + 2 + 4
    )  # system (40 tokens), the text's tail, all 72 chat tokens
    tok = hf.AutoTokenizer.from_pretrained(tokenizer_dir)
    chat = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    model = hf.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    with kt.mount_model(model, tier, name="tiny") as store:
        assert kt.load_prefix(store, chat)[1] == (len(chat) - 1) // BS * BS > 0  # the chat template's tokens
        assert kt.load_prefix(store, tok(system + " " + words(25, 3))["input_ids"])[1] == 64
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"hash_ids": [0, 1], "input_length": 40}\n{"hash_ids": [0, 2], "input_length": 40}\n')
    tier2 = f"file://{tmp_path}/kv2?capacity=4MiB"
    rc, lines = prepopulate(capsys, model_dir, trace, "--synthesize", "--trace-block-tokens", "16", "--vocab-size",
                            "256", "--tiers", tier2)  # fmt: skip
    assert rc == 0 and lines[-1]["prompts"] == 2 and lines[-1]["blocks_stored"] == 3  # hash id 0's block once
