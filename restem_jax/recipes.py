"""Settings shared by several configs/*.py files, so that each config keeps only its own.

    embedded_demo(runlocal)        configs/demo.py, and the base of configs/ablations.py
    paper_math_pod(name, bucket)   the paper's MATH recipe on a pod (llama3_*, gemma3_4b_*)
    llama3_rope(c, factor)         Llama 3.1 / 3.2 RoPE (base and llama3 scaling)
    gemma3_270m(c), gemma3_4b(c)   Gemma 3 text models (the family's switches set once)
    shrink_to_runlocal(c)          a pod config's `:runlocal` variant for a laptop CPU
    lora(c, rank, ...)             LoRA / QLoRA M-steps (configs/demo.py:lora, gemma3_4b_lora_*)

They live in the package (not in configs/) so that one config file can build on
another by a plain import, from any working directory.
"""
from __future__ import annotations

import ml_collections

from restem_jax import configlib


def embedded_demo(runlocal: bool = False) -> ml_collections.ConfigDict:
  """The embedded offline ReST-EM demo (configs/demo.py, `make demo`); see its docstring.

  runlocal: a 1-minute smoke version (one layer, fewer problems, one iteration).
  """
  c = configlib.default_config()
  c.seed = 0

  c.model.vocab_size = 512
  c.model.d_model = 128
  c.model.n_layers = 3
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.d_ff = 384
  c.model.max_seq_len = 128

  c.base.source = "pretrain"
  c.base.steps = 400
  c.base.learning_rate = 3e-3
  c.base.batch_size = 32

  c.task.name = "embedded_arith"
  c.task.num_train = 2000
  c.task.num_test = 400
  c.task.num_val = 128
  # Small numbers, no x2/x3 events: the arithmetic facts are few enough that
  # 400 worked solutions teach most of them; what the base model lacks is
  # chaining them over 1-4 events, which self-training on answer-only problems
  # can teach. (With numbers up to 40 the base model got the facts themselves
  # wrong and no iteration improved test accuracy: see docs/RESULTS.md section 1.)
  c.task.max_value = 20
  c.task.max_operand = 6
  c.task.max_start = 10
  c.task.allow_mul = False

  c.sampling.num_samples = 8
  c.sampling.temperature = 0.7
  c.sampling.top_k = 40
  c.sampling.max_new_tokens = 64
  c.sampling.max_batch = 512

  c.restem.num_iterations = 3
  c.restem.max_per_problem = 4
  c.restem.sft_baseline = True

  c.train.learning_rate = 1e-3
  c.train.batch_size = 32
  c.train.max_steps = 200
  c.train.warmup_steps = 20
  c.train.eval_every = 50
  c.train.patience = 2
  c.train.checkpoint_every = 50

  c.eval.num_samples = 8
  c.eval.pass_k = (1, 4, 8)
  c.eval.majority_k = 8
  c.eval.num_train_eval = 256

  if runlocal:
    c.model.n_layers = 1
    c.base.steps = 50
    c.task.num_train = 64
    c.task.num_test = 32
    c.task.num_val = 16
    c.restem.num_iterations = 1
    c.train.max_steps = 20
    c.train.eval_every = 10
    c.eval.num_train_eval = 32
  return c


def paper_math_pod(name: str, bucket: str) -> ml_collections.ConfigDict:
  """The paper's MATH settings (Singh et al. 2024) for a multi-host run; the pod configs
  add their model, mesh, sampling batch and optimizer (they depend on the model size).

  4-shot Minerva prompt, N=32 samples at T=0.7 / top-k 40, at most 10 kept per
  problem, 3 iterations, every M-step from the base. Paths, for a bucket B:
    gs://B/data/MATH                       the MATH release (train/, test/)
    gs://B/restem/<name>/base              the imported base model (restem_jax.importers)
    gs://B/restem/<name>/tokenizer.json    its tokenizer
  Every host runs the same command; the TPU VMs discover their peers.
  """
  c = configlib.default_config()
  workdir = f"{bucket}/restem/{name}"
  c.distributed.initialize = "always"

  c.base.source = "checkpoint"
  c.base.path = f"{workdir}/base"

  c.task.name = "math"
  c.task.data_dir = f"{bucket}/data/MATH"
  c.task.few_shot = 4
  c.task.num_val = 500
  c.task.vocab_path = f"{workdir}/tokenizer.json"

  c.sampling.num_samples = 32
  c.sampling.temperature = 0.7
  c.sampling.top_k = 40
  c.sampling.top_p = 1.0
  c.sampling.max_new_tokens = 512

  c.restem.num_iterations = 3
  c.restem.max_per_problem = 10
  c.restem.finetune_from = "base"

  c.eval.num_samples = 32
  c.eval.pass_k = (1, 4, 16, 32)
  c.eval.majority_k = 32
  return c


def smollm2_135m(c: ml_collections.ConfigDict) -> None:
  """SmolLM2-135M's architecture (what the importer reads from its GGUF; an imported or
  restored base must match it). max_seq_len stays per config (it sizes the KV cache)."""
  m = c.model
  m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 49152, 576, 30, 9, 3
  m.head_dim, m.d_ff, m.rope_base, m.norm_eps, m.tie_embeddings = 64, 1536, 100000.0, 1e-5, True
  c.mesh.shape = (-1, 1, 1)  # 9 heads / 3 KV heads: no tensor parallelism on small meshes.


def llama3_rope(c: ml_collections.ConfigDict, factor: float) -> None:
  """Llama 3.1 / 3.2 RoPE: base 5e5 and the `llama3` frequency scaling of their
  config.json (`factor` 8 for 3.1-8B, 32 for 3.2-1B; the other three are shared)."""
  m = c.model
  m.rope_base = 500000.0
  m.rope_scaling = "llama3"
  m.rope_scaling_factor = factor
  m.rope_low_freq_factor = 1.0
  m.rope_high_freq_factor = 4.0
  m.rope_original_max_len = 8192


def _gemma3_family(c: ml_collections.ConfigDict, sliding_window: int) -> None:
  """The switches every Gemma 3 text model shares: (1 + w) norms before and after each
  sublayer, sqrt(d) embedding scale, GeGLU (tanh GELU), QK-norm, head_dim 256 with
  query_pre_attn_scalar 256, tied embeddings, 5 local : 1 global layers with RoPE bases
  10k (local) / 1M (global)."""
  m = c.model
  m.head_dim = 256
  m.query_pre_attn_scalar = 256.0
  m.norm_eps = 1e-6
  m.tie_embeddings = True
  m.rope_base = 1_000_000.0
  m.rope_local_base = 10_000.0
  m.qk_norm = True
  m.norm_unit_offset = True
  m.embed_scale = True
  m.mlp_activation = "gelu_tanh"
  m.post_norms = True
  m.sliding_window = sliding_window
  m.sliding_window_pattern = 6


def gemma3_270m(c: ml_collections.ConfigDict) -> None:
  """config.model of Gemma 3 270M (the GGUF's metadata + llama.cpp's gemma3 constants)."""
  _gemma3_family(c, sliding_window=512)
  m = c.model
  m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = (
      262144, 640, 18, 4, 1, 2048)


def gemma3_4b(c: ml_collections.ConfigDict) -> None:
  """config.model of Gemma 3 4B's text model, as the HF importer reads google/gemma-3-4b-pt
  (vocab 262208: its config.json states none, transformers' Gemma3TextConfig default; a
  GGUF of the 4B has 262144 rows)."""
  _gemma3_family(c, sliding_window=1024)
  m = c.model
  m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = (
      262208, 2560, 34, 8, 4, 10240)
  m.rope_scaling = "linear"  # Global layers only (model.inv_frequencies).
  m.rope_scaling_factor = 8.0


def shrink_to_runlocal(c: ml_collections.ConfigDict) -> None:
  """A real-scale config's `:runlocal` variant: the same pipeline on a laptop CPU
  (tiny model of the same family, offline embedded task, seconds per phase).
  Optimizer, tying, loss settings and the family switches (RoPE scaling, norms,
  soft-caps, ...) are kept, so their code paths still run; a sliding window
  shrinks to 32 with a local and a global layer, so the 256-token sequences cross it."""
  c.model.vocab_size = 512  # The embedded SentencePiece vocabulary.
  c.model.d_model = 64
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.head_dim = 16
  c.model.d_ff = 128
  c.model.max_seq_len = 256
  c.model.dtype = "float32"
  if c.model.query_pre_attn_scalar:  # Gemma: the real models' value is their head_dim.
    c.model.query_pre_attn_scalar = float(c.model.head_dim)
  if c.model.sliding_window:  # Pattern 2: layer 0 local, layer 1 global.
    c.model.sliding_window = 32
    c.model.sliding_window_pattern = 2
  c.mesh.shape = (-1, 1, 1)
  c.distributed.initialize = "auto"
  c.base.source = "pretrain"
  c.base.path = ""
  c.base.steps = 20
  c.base.batch_size = 8  # 20 x 8 rows: seconds, not minutes, for a smoke run's base.
  c.task.name = "embedded_arith"
  c.task.data_dir = ""
  c.task.vocab_path = ""
  c.task.few_shot = 2
  c.task.num_train = 16
  c.task.num_val = 8
  c.task.num_test = 8
  c.sampling.num_samples = 4
  c.sampling.max_new_tokens = 32
  c.sampling.max_batch = 64
  c.restem.num_iterations = 2
  c.train.batch_size = 8
  c.train.warmup_steps = 2
  c.train.max_steps = 10
  c.train.eval_every = 5
  c.train.checkpoint_every = 5
  c.eval.num_samples = 4
  c.eval.pass_k = (1, 4)
  c.eval.majority_k = 4
  c.eval.num_train_eval = 8



def lora(c: ml_collections.ConfigDict, rank: int, alpha: float, learning_rate: float,
         targets: tuple[str, ...] = configlib.LORA_TARGETS, base_dtype: str = "") -> None:
  """M-steps (and the SFT baseline) train rank-`rank` adapters of `targets` over a frozen
  base (restem_jax/lora.py). Adapters start at zero and usually want a higher learning
  rate than full fine-tuning, so the config states its own."""
  c.train.lora.rank = rank
  c.train.lora.alpha = alpha
  c.train.lora.targets = tuple(targets)
  c.train.lora.base_dtype = base_dtype
  c.train.learning_rate = learning_rate
