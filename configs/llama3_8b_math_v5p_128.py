r"""ReST-EM on MATH with Llama-3.1-8B on a Cloud TPU v5p-128 (64 chips, 16 hosts).

Paper settings (Singh et al. 2024, MATH): 4-shot Minerva prompt, N=32 samples per
problem at T=0.7 / top-k 40, at most 10 correct kept per problem, 3 iterations,
every M-step fine-tunes the base model. Adafactor (factored second moments):
its state is ~0.1x the params instead of AdamW's 2x.

Mesh (data, fsdp, tensor) = (4, 8, 2) on 64 devices (v5p megacore: 1 device/chip):
  * tensor=2 divides n_heads=32, n_kv_heads=8, d_ff=14336 and vocab=128256, so
    attention, MLP and logits split in two and the KV cache is not replicated;
  * fsdp=8 with tensor=2 shards each weight 16 ways: 8.03B f32 params + grads
    (~64 GB) become ~4 GB per chip (95 GB HBM), leaving room for sampling batches;
  * data=4: decode-time weight all-gathers stay within groups of 8 chips.
  Batches must be multiples of data*fsdp = 32.

Commands (B = your bucket; run from the repo root on your workstation):

  # 1. Data: the MATH release (hendrycks) unpacked to gs://B/data/MATH (train/, test/).
  # 2. Import the base model once, from a local HF snapshot (safetensors + tokenizer.json,
  #    e.g. `huggingface-cli download meta-llama/Llama-3.1-8B --local-dir $HOME/hf/Llama-3.1-8B`):
  python -m restem_jax.importers --format=hf --src=$HOME/hf/Llama-3.1-8B \
      --out=gs://B/restem/llama3_8b_math/base
  gsutil cp $HOME/hf/Llama-3.1-8B/tokenizer.json gs://B/restem/llama3_8b_math/tokenizer.json
  # 3. Launch on every worker (add --create the first time):
  python -m launch.tpu_vm --tpu_name=restem-v5p --zone=us-east5-a --project=P \
      --accelerator_type=v5p-128 --repo_url=https://github.com/ORG/restem-jax \
      --config=configs/llama3_8b_math_v5p_128.py:bucket=gs://B \
      --workdir=gs://B/restem/llama3_8b_math --detach
  # 4. Resume after preemption / a kill: rerun exactly the same command.

CPU smoke test of the same pipeline (tiny model, offline embedded task):
  python -m restem_jax.main --config=configs/llama3_8b_math_v5p_128.py:runlocal \
      --workdir=/tmp/restem_8b_runlocal
"""
from __future__ import annotations

import ml_collections

from restem_jax import configlib

NAME = "llama3_8b_math"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_config_arg(arg)
  bucket = args.get("bucket", "gs://YOUR_BUCKET")
  workdir = f"{bucket}/restem/{NAME}"
  c = configlib.default_config()

  # Llama-3.1-8B.
  c.model.vocab_size = 128256
  c.model.d_model = 4096
  c.model.n_layers = 32
  c.model.n_heads = 32
  c.model.n_kv_heads = 8
  c.model.head_dim = 128
  c.model.d_ff = 14336
  c.model.rope_base = 500000.0
  c.model.tie_embeddings = False
  c.model.max_seq_len = 2048  # ~700-token 4-shot prompt + question + 512 new tokens.
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"

  c.mesh.shape = (4, 8, 2)
  c.distributed.initialize = "always"  # 16 hosts; TPU VMs discover their peers.

  configlib.paper_math_recipe(c, bucket=bucket, workdir=workdir)
  # Multiple of 32. bf16 KV cache (128 KB/slot): 32 prompts x 1024 prompt slots (shared by
  # their 32 samples) + 1024 rows x 512 generated slots = ~71 GB total, ~1.1 GB/chip.
  c.sampling.max_batch = 1024

  c.train.optimizer = "adafactor"
  c.train.learning_rate = 1e-5
  c.train.warmup_steps = 100
  c.train.batch_size = 128
  c.train.max_steps = 2000
  c.train.eval_every = 200
  c.train.patience = 2
  c.train.checkpoint_every = 200

  if "runlocal" in args:
    configlib.shrink_to_runlocal(c)
  return c
