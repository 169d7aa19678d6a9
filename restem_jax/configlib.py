"""Every config field, its default and what it means.

Experiment configs (configs/*.py) start from `default_config()` and override
fields. The returned ConfigDict is locked, so a misspelt key in a config file or
on the command line (`--config.trian.steps=3`) fails at once instead of being
silently ignored.
"""
from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Root seed: every phase derives its own key from it (resume-safe).

  # --- Model: a Llama-family decoder (restem_jax/model.py). ---
  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 512  # Embedding rows; >= the task vocabulary's size.
  c.model.d_model = 128  # Residual stream width.
  c.model.n_layers = 2  # Transformer blocks (scanned: compile time is flat in depth).
  c.model.n_heads = 4  # Query heads.
  c.model.n_kv_heads = 4  # Key/value heads (grouped-query attention when < n_heads).
  c.model.head_dim = 0  # 0 means d_model // n_heads.
  c.model.d_ff = 256  # SwiGLU hidden width.
  c.model.rope_base = 10000.0  # Rotary embedding base (theta).
  c.model.norm_eps = 1e-5  # RMSNorm epsilon.
  c.model.tie_embeddings = True  # Output projection = embedding transposed.
  c.model.max_seq_len = 256  # Longest prompt + completion (KV-cache length).
  c.model.dtype = "float32"  # Compute dtype: float32 or bfloat16.
  c.model.param_dtype = "float32"  # Parameter storage dtype.

  # --- Device mesh (restem_jax/partitioning.py). ---
  c.mesh = ml_collections.ConfigDict()
  # (data, fsdp, tensor); one entry may be -1 = all remaining devices.
  c.mesh.shape = (-1, 1, 1)

  # --- Where the starting (base) model comes from. ---
  c.base = ml_collections.ConfigDict()
  # "pretrain": train a small model on the task's human solutions (demo, tests).
  # "checkpoint": restore an Orbax checkpoint from `path` (e.g. an imported model).
  c.base.source = "pretrain"
  c.base.path = ""  # Checkpoint directory when source == "checkpoint".
  c.base.steps = 300  # Pretraining steps when source == "pretrain".
  c.base.learning_rate = 3e-3  # Peak learning rate of that pretraining.
  c.base.batch_size = 32  # Sequences per pretraining step.

  # --- Task (restem_jax/tasks). ---
  c.task = ml_collections.ConfigDict()
  c.task.name = "embedded_arith"  # embedded_arith | gsm8k | gsm8k_tfds | math | apps | humaneval.
  c.task.data_dir = ""  # Directory holding the official files (not for embedded/humaneval).
  c.task.num_train = 0  # Training problems used; 0 = all (paper's data-size ablation).
  c.task.num_val = 64  # Held-out part of train used as D_val for early stopping.
  c.task.num_test = 0  # Test problems evaluated; 0 = all.
  c.task.few_shot = 0  # Exemplars prepended to each question (4 MATH, 8 GSM8K).
  c.task.seed = 0  # Seed of the embedded generator / the train-val split.
  c.task.num_human = 400  # embedded_arith: train problems (first ones) with worked solutions.
  # embedded_arith difficulty: events per problem, number ranges, x2/x3 events.
  c.task.min_steps = 1
  c.task.max_steps = 4
  c.task.max_start = 20
  c.task.max_operand = 10
  c.task.max_value = 40
  c.task.allow_mul = True
  # embedded_arith: the reward also requires every equation of the worked
  # solution to be true (small answers are otherwise hit by chance; see embedded.py).
  c.task.verify_steps = True
  c.task.apps_difficulty = ""  # apps: keep one difficulty ("introductory" in the paper).
  c.task.grader_workers = 2  # Processes for math-verify / sandboxes for programs.
  c.task.grader_timeout_s = 5.0  # Per-answer symbolic-check timeout.
  c.task.fallback_last_number = False  # Math: grade the last number if no final answer.
  c.task.code_workers = 2  # Concurrent sandboxes when scoring programs.
  # Tokenizer: "" = the task's default (the embedded SentencePiece model);
  # else a SentencePiece .model, a tokenizer.json or a .gguf file (imported models).
  c.task.vocab_path = ""

  # --- Generate (E-step) sampling. ---
  c.sampling = ml_collections.ConfigDict()
  c.sampling.num_samples = 32  # N solutions per training problem (32 MATH, 64 APPS).
  c.sampling.temperature = 0.7  # 0 means greedy.
  c.sampling.top_k = 40  # 0 disables top-k.
  c.sampling.top_p = 1.0  # 1.0 disables nucleus sampling.
  c.sampling.max_new_tokens = 128  # Completion budget per sample.
  c.sampling.max_batch = 256  # Rows (prompts x samples) per sampler call: bounds memory.

  # --- ReST-EM iterations. ---
  c.restem = ml_collections.ConfigDict()
  c.restem.num_iterations = 3  # Generate/Improve rounds.
  c.restem.max_per_problem = 10  # Cap on kept correct samples per problem (1 = ReST*).
  # "base": every M-step starts from the base model (ReST-EM).
  # "previous": start from the previous iterate (ReST-style ablation).
  c.restem.finetune_from = "base"
  # "self": the E-step samples from the current iterate. "teacher": from the
  # checkpoint at `teacher_path` (distillation ablation).
  c.restem.sample_from = "self"
  c.restem.teacher_path = ""
  # Also fine-tune the base on the human-written solutions (same M-step recipe)
  # and evaluate it: the SFT baseline the paper compares against. With
  # num_iterations = 0 this is the "SFT only" run.
  c.restem.sft_baseline = False

  # --- Improve (M-step) training. ---
  c.train = ml_collections.ConfigDict()
  c.train.optimizer = "adamw"  # adamw | adafactor.
  c.train.learning_rate = 1e-3  # Peak learning rate.
  c.train.schedule = "cosine"  # cosine | constant (after linear warmup).
  c.train.warmup_steps = 20  # Linear warmup length.
  c.train.weight_decay = 0.0  # Decoupled weight decay (AdamW).
  c.train.grad_clip = 1.0  # Global-norm clip; 0 disables.
  c.train.batch_size = 32  # Examples per optimizer step (across all devices).
  c.train.micro_batches = 1  # Gradient accumulation: batch_size is split into this many.
  c.train.max_steps = 200  # Upper bound on steps per M-step.
  # "token": sum of weighted token NLL / number of target tokens in the batch.
  # "sequence": mean over examples of the weighted per-sequence NLL sum (paper's J).
  c.train.loss_normalization = "token"
  c.train.eval_every = 50  # Steps between validation-reward evaluations.
  c.train.patience = 2  # Evaluations without improvement before stopping.
  c.train.checkpoint_every = 50  # Steps between mid-phase (resume) checkpoints.
  c.train.keep_checkpoints = 2  # Mid-phase checkpoints retained.

  # --- Evaluation of each iteration's model. ---
  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 8  # Samples per test problem for pass@k / maj@k.
  c.eval.temperature = 1.0  # pass@k sampling (paper: T=1.0, top-p 0.95).
  c.eval.top_p = 0.95
  c.eval.top_k = 0
  c.eval.pass_k = (1, 4, 8)  # k values for the unbiased pass@k estimator.
  c.eval.majority_k = 8  # Majority voting over this many samples (math tasks).
  c.eval.on_train = True  # Also greedy pass@1 on (a subset of) train: Fig. 4's gap.
  c.eval.num_train_eval = 256  # Train problems in that measurement.
  # Completion budget and rows per sampler call of every evaluation (greedy,
  # sampled, validation during the M-step); 0 = sampling.max_new_tokens /
  # sampling.max_batch.
  c.eval.max_new_tokens = 0
  c.eval.max_batch = 0

  # --- Multi-host (jax.distributed). ---
  c.distributed = ml_collections.ConfigDict()
  # "auto": initialize when the environment says we are one of several processes
  # (TPU VM slices, or the fields below / JAX_COORDINATOR_ADDRESS are set).
  # "never": single process. "always": call jax.distributed.initialize().
  c.distributed.initialize = "auto"
  c.distributed.coordinator_address = ""  # host:port of process 0 (non-TPU clusters).
  c.distributed.num_processes = 0  # 0 = discover.
  c.distributed.process_id = -1  # -1 = discover.

  c.log_every = 20  # Steps between training log lines.
  c.lock()
  return c


def parse_config_arg(arg: str | None) -> dict[str, str]:
  """'runlocal,bucket=gs://b' -> {'runlocal': '1', 'bucket': 'gs://b'} (big_vision style)."""
  out = {}
  for part in filter(None, (arg or "").split(",")):
    k, _, v = part.partition("=")
    out[k.strip()] = v.strip() if v else "1"
  return out


def paper_math_recipe(c: ml_collections.ConfigDict, *, bucket: str, workdir: str) -> None:
  """The paper's MATH settings (Singh et al. 2024), shared by the pod configs.

  4-shot Minerva prompt, N=32 samples at T=0.7 / top-k 40, at most 10 kept per
  problem, 3 iterations, every M-step from the base; base model and tokenizer
  imported into `workdir`, MATH unpacked under `bucket`/data/MATH. Model, mesh,
  sampling batch and optimizer stay per config (they depend on the model size).
  """
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
  c.log_every = 50


def shrink_to_runlocal(c: ml_collections.ConfigDict) -> None:
  """A real-scale config's `:runlocal` variant: the same pipeline on a laptop CPU
  (tiny model of the same family, offline embedded task, seconds per phase).
  Optimizer, tying and loss settings are kept, so their code paths still run."""
  c.model.vocab_size = 512  # The embedded SentencePiece vocabulary.
  c.model.d_model = 64
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.head_dim = 16
  c.model.d_ff = 128
  c.model.max_seq_len = 256
  c.model.dtype = "float32"
  c.mesh.shape = (-1, 1, 1)
  c.distributed.initialize = "auto"
  c.base.source = "pretrain"
  c.base.path = ""
  c.base.steps = 20
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
  c.log_every = 5

