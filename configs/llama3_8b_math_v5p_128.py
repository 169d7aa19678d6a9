r"""ReST-EM on MATH with Llama-3.1-8B on a Cloud TPU v5p-128 (64 chips, 16 hosts).

The paper's MATH recipe (restem_jax/recipes.py: paper_math_pod, which lists the
paths under the bucket) with this model, mesh, sampling batch and optimizer.
Adafactor (factored second moments): its state is ~0.1x the params instead of
AdamW's 2x.

Mesh (data, fsdp, tensor) = (4, 8, 2) on 64 devices (v5p megacore: 1 device/chip):
  * tensor=2 divides n_heads=32, n_kv_heads=8, d_ff=14336 and vocab=128256, so
    attention, MLP and logits split in two and the KV cache is not replicated;
  * fsdp=8 with tensor=2 shards each weight 16 ways: 8.03B f32 params + grads
    (~64 GB) become ~4 GB per chip (95 GB HBM), leaving room for sampling batches;
  * data=4: decode-time weight all-gathers stay within groups of 8 chips.
  Batches must be multiples of data*fsdp = 32.

Model: Llama-3.1-8B as its config.json states it (tests/test_launch.py compares): 32
layers, d_model 4096, 32 query / 8 KV heads of 128, SwiGLU 14336, vocabulary 128256
(untied output head), RMSNorm eps 1e-5, RoPE base 5e5 with the llama3 scaling
(factor 8, low/high frequency factors 1 / 4, original context 8192).

Commands as in configs/llama3_1b_math_v4_32.py, with this model and slice (the
importer writes the tokenizer to gs://B/restem/llama3_8b_math/tokenizer.json):
  huggingface-cli download meta-llama/Llama-3.1-8B --local-dir $HOME/hf/Llama-3.1-8B
  python -m restem_jax.importers --format=hf --src=$HOME/hf/Llama-3.1-8B \
      --out=gs://B/restem/llama3_8b_math/base
  python -m launch.tpu_vm --tpu_name=restem-v5p --zone=us-east5-a --project=P \
      --accelerator_type=v5p-128 --repo_url=https://github.com/ORG/restem-jax \
      --config=configs/llama3_8b_math_v5p_128.py:bucket=gs://B \
      --workdir=gs://B/restem/llama3_8b_math --detach
  python -m restem_jax.main --config=configs/llama3_8b_math_v5p_128.py:runlocal \
      --workdir=/tmp/restem_8b_runlocal
"""
from __future__ import annotations

import ml_collections

from restem_jax import configlib, recipes

NAME = "llama3_8b_math"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_config_arg(arg, allowed=("bucket", "runlocal"))
  c = recipes.paper_math_pod(NAME, bucket=args.get("bucket", "gs://YOUR_BUCKET"))

  # Llama-3.1-8B.
  c.model.vocab_size = 128256
  c.model.d_model = 4096
  c.model.n_layers = 32
  c.model.n_heads = 32
  c.model.n_kv_heads = 8
  c.model.head_dim = 128
  c.model.d_ff = 14336
  c.model.norm_eps = 1e-5
  recipes.llama3_rope(c, factor=8.0)
  c.model.tie_embeddings = False
  c.model.max_seq_len = 2048  # ~700-token 4-shot prompt + question + 512 new tokens.
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.mesh.shape = (4, 8, 2)

  # Multiple of 32. bf16 KV cache (128 KB/slot): 32 prompts x 1024 prompt slots (shared by
  # their 32 samples) + 1024 rows x 512 generated slots = ~71 GB total, ~1.1 GB/chip.
  c.sampling.max_batch = 1024

  c.train.optimizer = "adafactor"
  c.train.learning_rate = 1e-5
  c.train.warmup_steps = 100
  c.train.batch_size = 128
  c.train.max_steps = 2000
  c.train.eval_every = 200
  c.train.checkpoint_every = 200

  if "runlocal" in args:
    recipes.shrink_to_runlocal(c)
  return c
