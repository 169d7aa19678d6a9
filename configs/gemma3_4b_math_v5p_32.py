r"""ReST-EM on MATH with Gemma 3 4B (pretrained, text model) on a Cloud TPU v5p-32
(16 chips, 4 hosts).

The paper's MATH recipe (restem_jax/recipes.py: paper_math_pod, which lists the
paths under the bucket) with this model, mesh, sampling batch and optimizer. The
Gemma Terms of Use apply to the weights and what you derive from them:
https://ai.google.dev/gemma/terms

Model: the text model of google/gemma-3-4b-pt (Gemma3ForConditionalGeneration; the
importer reads its `text_config` and language-model tensors and leaves the vision
tower out). Its config.json states only hidden_size 2560, intermediate_size 10240,
34 layers, sliding_window 1024 and rope_scaling {linear, factor 8}; the rest are
transformers' Gemma3TextConfig defaults (checked in tests/test_import.py against
transformers 5.24): 8 query / 4 KV heads of 256, vocabulary 262208 embedding rows
(the tokenizer's 262144 + 64 unused), tied embeddings, RMSNorm eps 1e-6 as
x * (1 + w), GeGLU (tanh GELU), norms before and after attention and MLP, QK-norm,
query_pre_attn_scalar 256, no soft-caps, five sliding-window (local) layers per
global one (29 local, 5 global), RoPE base 1e6 with linear scaling x8 on global
layers and 1e4 unscaled on local ones. tests/test_launch.py imports that config.json
and compares it with this file; the run compares the base checkpoint's recorded
config too and stops with one line naming a differing field. A GGUF of the 4B
model has 262144 embedding rows: with one, set model.vocab_size = 262144.
Parameters: 3.88B (the embedding 0.67B of them).

Mesh (data, fsdp, tensor) = (2, 4, 2) on 16 devices (v5p megacore: 1 device/chip):
  * tensor=2 divides the 8 query / 4 KV heads, d_ff 10240 and the 262208 vocabulary,
    so attention, MLP and logits split in two and the KV cache is not replicated;
  * fsdp=4 with tensor=2 shards each weight 8 ways: 3.88B params x 16 B (f32 params
    and grads, AdamW's two moments) = 62 GB become ~7.8 GB per chip (95 GB HBM); the
    sampler reads the per-layer weights in place (no copy);
  * data=2: decode-time weight all-gathers run over the fsdp axis, within 4 chips.
  Batches must be multiples of data*fsdp = 8.

KV cache (bf16): 34 layers x 2 x 4 KV heads x 256 x 2 B = 136 KB per slot. With
max_batch 512 = 16 prompts x 32 samples: 16 x 1024 prompt slots (shared by their
samples) + 512 rows x 512 generated slots = 2.3 + 35.7 = ~38 GB total, ~2.4 GB/chip.
Local layers keep full-length caches like global ones (the window is a mask; model.py
SharedPrefixCache): a 1024-slot ring buffer would save nothing here, since the prompt
bucket (1024 for ~700-token 4-shot prompts) and the 512 generated slots each fit in
the window; it would only pay for prompts longer than 1024 tokens. Not built.

Commands, from the repo root (B = your bucket, MATH unpacked to gs://B/data/MATH):
  # Import the base model once, from a local HF snapshot (safetensors + tokenizer.json);
  # the tokenizer lands beside it, at gs://B/restem/gemma3_4b_math/tokenizer.json:
  huggingface-cli download google/gemma-3-4b-pt --local-dir $HOME/hf/gemma-3-4b-pt
  python -m restem_jax.importers --format=hf --src=$HOME/hf/gemma-3-4b-pt \
      --out=gs://B/restem/gemma3_4b_math/base
  # Launch on every worker (add --create the first time; rerun it to resume):
  python -m launch.tpu_vm --tpu_name=restem-v5p --zone=us-east5-a --project=P \
      --accelerator_type=v5p-32 --repo_url=https://github.com/ORG/restem-jax \
      --config=configs/gemma3_4b_math_v5p_32.py:bucket=gs://B \
      --workdir=gs://B/restem/gemma3_4b_math --detach
  # CPU smoke test of the same pipeline (tiny model with every Gemma 3 switch, offline
  # embedded task, a window of 32 that the 256-token sequences cross):
  python -m restem_jax.main --config=configs/gemma3_4b_math_v5p_32.py:runlocal \
      --workdir=/tmp/restem_gemma3_4b_runlocal
"""
from __future__ import annotations

import ml_collections

from restem_jax import configlib, recipes

NAME = "gemma3_4b_math"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_config_arg(arg, allowed=("bucket", "runlocal"))
  c = recipes.paper_math_pod(NAME, bucket=args.get("bucket", "gs://YOUR_BUCKET"))
  recipes.gemma3_4b(c)
  c.model.max_seq_len = 2048  # ~700-token 4-shot prompt + question + 512 new tokens.
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.mesh.shape = (2, 4, 2)

  c.sampling.max_batch = 512  # Multiple of 8; KV cache in the docstring.

  c.train.optimizer = "adamw"
  c.train.learning_rate = 1e-5
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.0
  c.train.batch_size = 64
  c.train.max_steps = 3000
  c.train.eval_every = 250
  c.train.checkpoint_every = 250

  if "runlocal" in args:
    recipes.shrink_to_runlocal(c)
  return c
