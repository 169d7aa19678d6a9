r"""ReST-EM on GSM8K with Gemma 3 4B (text) and LoRA M-steps, on one 80 GB accelerator.

    python -m restem_jax.main \
      --config=configs/gemma3_4b_lora_gsm.py:base=/path/to/gemma-3-4b-pt,data_dir=/path/to/gsm8k \
      --workdir=/tmp/restem_gemma3_4b_lora
    python -m restem_jax.main --config=configs/gemma3_4b_lora_gsm.py:runlocal --workdir=/tmp/g4l

`base` is what base.source = "import" reads on the first run (a .gguf file or an HF
safetensors directory; restem_jax/importers), imported in bfloat16. `:runlocal` runs the
same pipeline in about a minute on a CPU: a tiny model with every Gemma 3 switch,
pretrained from scratch on the embedded arithmetic task, LoRA M-steps unchanged.
Not run at full size here (no 4B weights or accelerator on the development machine):
the architecture fields below are Gemma 3 4B's published text config, and the memory
figures are arithmetic, not measurements.

Gemma 3 4B (text): 34 layers, d_model 2560, 8 query / 4 KV heads of 256, GeGLU 10240,
262208-token vocabulary (tied), five sliding-window (1024) layers per global one, RoPE
base 1e6 global (linear scaling x8) / 1e4 local. 3.88B params: embedding 0.67B, layers
3.21B.

Memory estimate, one device (GB; bfloat16 params and compute):
  full fine-tuning: params 7.8 + grads 7.8 + AdamW moments (float32) 31.0 = 46.6 before
    activations and the sampler's copies: does not leave room on 80 GB.
  this config (LoRA rank 16 on q, k, v, o, gate, up, down: 29.8M adapter params):
    base 7.8 (frozen, held by the run) + adapters and their AdamW state 0.5
    + inside the step nothing model-sized: the adapters are applied in each Block
      (x W + s (x A) B, restem_jax/lora.py), so there is no merged W' and no dW
    + activations of one micro-batch of 2 x 1024 tokens (train.micro_batches = 4):
      float32 logits 2.1 (x2 with their gradient), attention probabilities 8 heads x
      1024^2 x 34 layers x 2 rows x 2 B = 1.1, the rest ~5 (no rematerialisation)
    = ~19 in the M-step (the previous iterate is not held during it: finetune_from =
      base).
  Saved per iteration: the adapters alone (29.8M floats, 0.12 GB), the base once.
  E-step / evaluation: the merged model 7.8 (read in place: params are per layer, no
    sampler copy) + KV cache (139 KB per token: 34 layers x 2 x 4 heads x 256 x 2 B)
    x 64 rows x 1024 = 9.1 + the frozen base 7.8 = ~25.
  base_dtype = "int8" / "nf4" (QLoRA) keeps the frozen layers in 3.2 / 1.6 (nf4 codes
    are uint4; two per byte only where XLA packs sub-byte types): after the base's
    evaluation and the first E-step the run drops the bfloat16 base it loaded and keeps
    only that (run.RunContext.frozen), so from the first M-step on the base costs
    ~4.6 / ~3.0 GB instead of 7.8 (the 1.3 GB embedding and the norms stay bfloat16);
    the E-steps sample dequantized base + adapters. The option for a 12B model.
"""
from __future__ import annotations

import os

import ml_collections

from restem_jax import configlib, recipes

_FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "tests", "fixtures", "gsm8k")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_config_arg(arg, allowed=("base", "data_dir", "runlocal"))
  c = configlib.default_config()
  recipes.gemma3_4b(c)
  c.model.max_seq_len = 1024  # 8-shot GSM8K prompt (~740 tokens) + 256 new tokens.
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.mesh.shape = (-1, 1, 1)

  c.base.source = "import"
  c.base.path = args.get("base", "")
  c.base.format = "auto"

  c.task.name = "gsm8k"
  c.task.data_dir = args.get("data_dir", _FIXTURE)
  c.task.few_shot = 8
  c.task.num_val = 64 if "data_dir" in args else 1  # The fixture has 4 train problems.
  c.task.vocab_path = ""  # base.source "import": WORKDIR/tokenizer.json.

  c.sampling.num_samples = 32  # The paper's N for MATH / GSM8K.
  c.sampling.max_new_tokens = 256
  c.sampling.max_batch = 64  # Bounds the KV cache (see the estimate above).

  c.restem.num_iterations = 3
  c.restem.max_per_problem = 10

  recipes.lora(c, rank=16, alpha=32.0, learning_rate=1e-4)
  c.train.batch_size = 8
  c.train.micro_batches = 4
  c.train.warmup_steps = 20
  c.train.max_steps = 500
  c.train.eval_every = 100
  c.train.checkpoint_every = 100

  c.eval.num_samples = 8
  c.eval.pass_k = (1, 4, 8)
  c.eval.majority_k = 8
  c.eval.max_batch = 64

  if "runlocal" in args:
    recipes.shrink_to_runlocal(c)
    c.model.head_dim = 16
    c.model.query_pre_attn_scalar = 16.0
    c.model.sliding_window = 32
    c.model.sliding_window_pattern = 2
    c.train.micro_batches = 1
    c.train.learning_rate = 3e-3
    c.eval.max_batch = 0
  return c
