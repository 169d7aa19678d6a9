r"""ReST-EM on MATH with Llama-3.2-1B on a Cloud TPU v4-32 (16 chips, 4 hosts).

The paper's MATH recipe (restem_jax/recipes.py: paper_math_pod, which lists the
paths under the bucket) with this model, mesh, sampling batch and optimizer.

Mesh (data, fsdp, tensor) = (4, 4, 1) on 16 devices (v4 megacore: 1 device/chip):
  * fsdp=4 shards params + AdamW state (1.24B x 12 B/param ~ 15 GB f32) to ~4 GB
    per chip (32 GB HBM), leaving room for the KV cache of large sampling batches;
  * data=4 replicates the weights over groups of 4 only, so each decode step
    all-gathers weights within 4 chips, not 16 (the E-step is decode-bound);
  * tensor=1: a 1B model does not need it (2048-wide matmuls would be tiny per chip).
  Batches must be multiples of data*fsdp = 16.

Model: Llama-3.2-1B as its config.json states it (tests/test_launch.py imports that
config.json and compares): 16 layers, d_model 2048, 32 query / 8 KV heads of 64, SwiGLU
8192, vocabulary 128256 (tied embeddings), RMSNorm eps 1e-5, RoPE base 5e5 with the
llama3 scaling (factor 32, low/high frequency factors 1 / 4, original context 8192).
The run compares these with the model config the importer recorded in the base
checkpoint and stops with one line naming any field that differs (max_seq_len and
the dtypes are the run's own choice).

Commands, from the repo root (B = your bucket, MATH unpacked to gs://B/data/MATH):
  # Import the base model once, from a local HF snapshot (safetensors + tokenizer.json);
  # the tokenizer lands beside it, at gs://B/restem/llama3_1b_math/tokenizer.json:
  huggingface-cli download meta-llama/Llama-3.2-1B --local-dir $HOME/hf/Llama-3.2-1B
  python -m restem_jax.importers --format=hf --src=$HOME/hf/Llama-3.2-1B \
      --out=gs://B/restem/llama3_1b_math/base
  # Launch on every worker (add --create the first time; rerun it to resume):
  python -m launch.tpu_vm --tpu_name=restem-v4 --zone=us-central2-b --project=P \
      --accelerator_type=v4-32 --repo_url=https://github.com/ORG/restem-jax \
      --config=configs/llama3_1b_math_v4_32.py:bucket=gs://B \
      --workdir=gs://B/restem/llama3_1b_math --detach
  # CPU smoke test of the same pipeline (tiny model, offline embedded task):
  python -m restem_jax.main --config=configs/llama3_1b_math_v4_32.py:runlocal \
      --workdir=/tmp/restem_1b_runlocal
"""
from __future__ import annotations

import ml_collections

from restem_jax import configlib, recipes

NAME = "llama3_1b_math"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_config_arg(arg, allowed=("bucket", "runlocal"))
  c = recipes.paper_math_pod(NAME, bucket=args.get("bucket", "gs://YOUR_BUCKET"))

  # Llama-3.2-1B.
  c.model.vocab_size = 128256
  c.model.d_model = 2048
  c.model.n_layers = 16
  c.model.n_heads = 32
  c.model.n_kv_heads = 8
  c.model.head_dim = 64
  c.model.d_ff = 8192
  c.model.norm_eps = 1e-5
  recipes.llama3_rope(c, factor=32.0)
  c.model.tie_embeddings = True
  c.model.max_seq_len = 2048  # ~700-token 4-shot prompt + question + 512 new tokens.
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.mesh.shape = (4, 4, 1)

  # Multiple of 16. bf16 KV cache (32 KB/slot): 16 prompts x 1024 prompt slots (shared by
  # their 32 samples) + 512 rows x 512 generated slots = ~9 GB total, ~0.6 GB/chip.
  c.sampling.max_batch = 512

  c.train.optimizer = "adamw"
  c.train.learning_rate = 2e-5
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.0
  c.train.batch_size = 64
  c.train.max_steps = 3000
  c.train.eval_every = 250
  c.train.checkpoint_every = 250

  if "runlocal" in args:
    recipes.shrink_to_runlocal(c)
  return c
