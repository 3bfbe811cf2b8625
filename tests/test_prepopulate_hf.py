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
    rc, lines = prepopulate(capsys, model_dir, corpus, "--tiers", tier)
    rep = lines[-1]
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
