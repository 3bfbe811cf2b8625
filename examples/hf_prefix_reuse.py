"""Prefix reuse with a Hugging Face transformers model: prepopulate, restart, then serve from disk.

A tiny Llama with random weights (built from a config: nothing is downloaded) stands in for a real
checkpoint. Offline, ``prepopulate`` prefills a few prompts that share a system prompt and stores their
KV blocks on a disk tier. A fresh store on the same folder (as after a restart) then serves a new prompt
with that system prompt: its prefix loads from disk, only the rest is computed, and greedy generation
equals a full prefill token for token.

Run: .venv/bin/python examples/hf_prefix_reuse.py   (needs ``pip install transformers``)
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
import transformers

from kvbm_fs.integration.transformers import generate_with_cache, mount_model, prepopulate

config = transformers.LlamaConfig(
    num_hidden_layers=2,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config).eval()

rng = np.random.default_rng(0)
system = rng.integers(3, 256, 150)  # a 150-token system prompt: 9 full 16-token blocks
warm = [np.concatenate([system, rng.integers(3, 256, n)]).tolist() for n in (20, 45, 70)]
prompt = np.concatenate([system, rng.integers(3, 256, 30)])

with tempfile.TemporaryDirectory() as root:
    tiers = ("host://?capacity=16MiB", f"file://{root}/kv?capacity=64MiB")
    with mount_model(model, *tiers, name="tiny-llama-random") as store:
        st = prepopulate(model, store, warm, batch_size=2)
        print(f"prepopulated {st.prefilled} prompts, {st.saved_blocks} blocks ({st.tokens} tokens)")

    with mount_model(model, *tiers, name="tiny-llama-random") as store:  # restart: host empty, disk kept
        out = generate_with_cache(model, store, prompt, max_new_tokens=16, do_sample=False)

ids = torch.as_tensor(prompt)[None]
full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
print(f"prompt {out.prompt_tokens} tokens: loaded {out.loaded_tokens}, computed {out.computed_tokens}")
print("generated:", out.sequences[0, len(prompt) :].tolist())
print("outputs match a full prefill:", torch.equal(out.sequences, full))
