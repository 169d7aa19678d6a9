"""Reward-weighted NLL training: train state, optimizer, sharded train/eval steps.

The M-step objective (ReST-EM, eq. 2 of the paper):

    J(theta) = E_(x,y) [ r(x, y) * sum_t log p_theta(y_t | y_<t, x) ]

is trained as a next-token loss over the *target* tokens only: the prompt
(few-shot exemplars + question) and the right padding are masked, and each
example's token NLLs are scaled by its reward. Both normalisations share one
numerator  N = sum_b w_b * sum_t m_bt * nll_bt  and differ in the denominator:

  * "token":    N / (number of target tokens in the batch). Long and short
                solutions weigh per token; the usual LM fine-tuning loss.
  * "sequence": N / (number of examples with >= 1 target token). The paper's J
                (mean over examples of the weighted sequence NLL); rows with no
                target token (batch padding) are not examples and do not count.

Zero-weight examples add nothing to N but their tokens/rows still count in the
denominator (they are real examples that earned reward 0).

Batches (batches.py) come one example per row (ExampleBatch, make_batch) or, with
train.share_prompts, as rows of one prompt followed by several of its targets
(SharedPromptBatch, make_shared_batch: the prompt runs once); both give the same N and
counts for the same examples.

Because N and the denominator are sums, gradient accumulation is exact: each
micro-batch contributes grad(N_micro); the sum is divided once by the
full-batch denominator (never a mean of per-micro-batch means).
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from restem_jax import batches as batches_lib
from restem_jax import configlib, errors
from restem_jax import lora as lora_lib
from restem_jax import model as model_lib
from restem_jax import partitioning

NORMALIZATIONS = configlib.CHOICES["train.loss_normalization"]
_COUNT_KEYS = ("tokens", "examples", "nll_sum", "weighted_nll")


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN/Inf; the message names the step."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any  # What is trained: the model's params, or with train.lora its adapters.
  opt_state: Any


# ----------------------------------------------------------------------------- loss


def _numerator_and_counts(params: Any, batch: batches_lib.Batch, model: nn.Module,
                          target_len: int | None = None, lora: Any = None
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """N = sum_b w_b sum_t m_bt nll_bt, plus the counts both denominators need.

  `batch`'s format (batches.py) says which logits predict which labels. target_len
  (ExampleBatch only: its target_window): logits only for that many positions per row;
  None: every position. lora: None, or LoRA adapters the model applies inside its
  Blocks (lora.ModelAdapters) on `params`, the frozen base."""
  pred_kw, labels_BxT, mask_BxT, weights_BxT, examples = batch.predictions(target_len)
  apply_kw = {**({} if lora is None else {"lora": lora}), **pred_kw}
  logits_BxTxV, _ = model.apply({"params": params}, batch.tokens_BxL, **apply_kw)
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  # Select the label logit with an elementwise compare rather than a gather, so a
  # vocab dimension sharded over the tensor axis needs only a reduction.
  vocab_V = jnp.arange(logits_BxTxV.shape[-1], dtype=labels_BxT.dtype)
  label_logit_BxT = jnp.sum(jnp.where(labels_BxT[..., None] == vocab_V, logits_BxTxV, 0.0), -1)
  nll_BxT = (jax.nn.logsumexp(logits_BxTxV, axis=-1) - label_logit_BxT) * mask_BxT
  numerator = jnp.sum(weights_BxT * nll_BxT)
  counts = {
      "tokens": jnp.sum(mask_BxT),
      "examples": examples,
      "nll_sum": jnp.sum(nll_BxT),  # Unweighted, for monitoring.
      "weighted_nll": numerator,
  }
  return numerator, counts


def _denominator(counts: dict[str, jax.Array], normalization: str) -> jax.Array:
  key = {"token": "tokens", "sequence": "examples"}[normalization]
  return jnp.maximum(counts[key], 1.0)  # An all-masked batch gives loss 0, not NaN.


def check_normalization(normalization: str) -> None:
  configlib.check_choice("train.loss_normalization", normalization)


def loss_fn(params: Any, batch: batches_lib.Batch, model: nn.Module, normalization: str,
            target_len: int | None = None, lora: Any = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reward-weighted next-token NLL of `batch` (see the module docstring). Pure.
  target_len: target_window(batch mask) or None (the same loss, less work). lora: None,
  or adapters applied inside the model on the base `params` (lora.Adapters.apply)."""
  check_normalization(normalization)
  numerator, counts = _numerator_and_counts(params, batch, model, target_len, lora)
  loss = numerator / _denominator(counts, normalization)
  return loss, {**counts, "unweighted_token_nll": counts["nll_sum"] / jnp.maximum(
      counts["tokens"], 1.0)}


# ----------------------------------------------------------------------------- optimizer


def make_schedule(train_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  # preflight.check checked the choice already; this is for library callers.
  configlib.check_choice("train.schedule", train_cfg.schedule)
  peak, warmup = float(train_cfg.learning_rate), int(train_cfg.warmup_steps)
  if train_cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  else:  # cosine
    after = optax.cosine_decay_schedule(peak, decay_steps=max(total_steps - warmup, 1))
  if warmup <= 0:
    return after
  # Warmup starts at peak/warmup, not 0: step 0 must already move the params.
  return optax.join_schedules(
      [optax.linear_schedule(peak / warmup, peak, warmup), after], [warmup])


def _decay_mask(params: Any) -> Any:
  # No weight decay on RMSNorm scales (their natural value is 1, not 0).
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, "key", None) == "scale" for k in path), params)


def make_optimizer(train_cfg: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (b2 = 0.95, the usual LM value) or Adafactor, after global-norm clipping."""
  configlib.check_choice("train.optimizer", train_cfg.optimizer)
  schedule = make_schedule(train_cfg, total_steps)
  wd = float(train_cfg.weight_decay)
  if train_cfg.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd, mask=_decay_mask)
  else:  # adafactor: factored second moments, O(rows + cols) state per matrix.
    opt = optax.adafactor(schedule, weight_decay_rate=wd or None, weight_decay_mask=_decay_mask)
  if train_cfg.grad_clip and train_cfg.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(float(train_cfg.grad_clip)), opt)
  return opt, schedule


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
  """Optimizer-state shardings that follow the params' logical axes.

  An optimizer-state leaf whose key path ends with a param's key path and has
  that param's shape (Adam's mu/nu, momentum) gets the param's sharding; other
  leaves (step counts, Adafactor's factored row/column statistics) are
  replicated: they are scalars or O(rows + cols).
  """
  by_path = {}
  for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                          jax.tree.leaves(param_shardings)):
    by_path[tuple(path)] = (p.shape, s)
  depth = {len(k) for k in by_path}

  def one(path, leaf):
    for d in depth:
      hit = by_path.get(tuple(path[-d:])) if len(path) >= d else None
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return partitioning.replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


# ----------------------------------------------------------------------------- trainer


def _copy_tree(tree: Any) -> Any:
  # jnp.copy is a primitive, so jit returns fresh buffers instead of forwarding
  # its inputs: the caller's params survive the donation of the train state.
  return jax.tree.map(jnp.copy, tree)


class Trainer:
  """Sharded reward-weighted NLL training of `model_lib.Transformer`.

  With train.lora.rank > 0 the state's params are LoRA adapters (lora.py): the frozen
  base is set by init_state / attach_base, passed to the jitted step as an argument that
  is neither differentiated nor donated, and the model applies the adapters to it inside
  each Block (x W + s (x A) B): gradients exist for A and B only.
  `model_params(state.params)` is the model's params in both modes.
  """

  def __init__(self, model_cfg: model_lib.ModelConfig, train_cfg: ml_collections.ConfigDict,
               mesh: Mesh, total_steps: int | None = None):
    partitioning.check_model_fits_mesh(model_cfg, mesh)
    check_normalization(train_cfg.loss_normalization)
    self.model_cfg, self.train_cfg, self.mesh = model_cfg, train_cfg, mesh
    self.normalization = str(train_cfg.loss_normalization)
    self.micro_batches = int(train_cfg.micro_batches)
    self.total_steps = int(total_steps if total_steps is not None else train_cfg.max_steps)
    dp = partitioning.data_parallel_size(mesh)
    bs = int(train_cfg.batch_size)
    if self.micro_batches < 1 or bs % (self.micro_batches * dp):
      raise errors.ConfigError(
          f"train.batch_size={bs} must be a multiple of train.micro_batches="
          f"{self.micro_batches} x the mesh's data-parallel size {dp}")
    self.batch_size = bs
    self.model = model_lib.Transformer(model_cfg, mesh)
    self.optimizer, self.schedule = make_optimizer(train_cfg, self.total_steps)

    self.param_shardings = model_lib.param_shardings(model_cfg, mesh)
    self.adapters = lora_lib.make(model_cfg, train_cfg, mesh)  # None: full fine-tuning
    self._base = None  # The frozen base (LoRA only).
    if self.adapters is None:
      abstract_trainable = nn.unbox(model_lib.abstract_params(model_cfg))
      self.trainable_shardings = self.param_shardings
    else:
      abstract_trainable = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                        self.adapters.abstract())
      self.trainable_shardings = self.adapters.shardings
    abstract_opt = jax.eval_shape(self.optimizer.init, abstract_trainable)
    rep = partitioning.replicated(mesh)
    self._state_shardings = TrainState(
        step=rep, params=self.trainable_shardings,
        opt_state=opt_state_shardings(abstract_opt, abstract_trainable,
                                      self.trainable_shardings, mesh))
    self._abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                                params=abstract_trainable, opt_state=abstract_opt)
    base_shardings = None if self.adapters is None else self.adapters.base_shardings
    # Every batch array (either format) is split over the data axes by its leading dim.
    batch_in = partitioning.batch_sharding(mesh, 1)

    self._init = jax.jit(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=_copy_tree(p),
                             opt_state=self.optimizer.init(p)),
        in_shardings=(self.trainable_shardings,), out_shardings=self._state_shardings)
    # One compile per (batch length, target window) pair: a handful in a run.
    self._step = jax.jit(self._train_step,
                         in_shardings=(self._state_shardings, base_shardings, batch_in),
                         out_shardings=(self._state_shardings, rep), donate_argnums=(0,),
                         static_argnums=(3,))
    self._loss = jax.jit(
        lambda p, b, target_len: loss_fn(p, b, self.model, self.normalization, target_len)[0],
        in_shardings=(self.param_shardings, batch_in), out_shardings=rep,
        static_argnums=(2,))
    self._copy_params = jax.jit(_copy_tree, in_shardings=(self.trainable_shardings,),
                                out_shardings=self.trainable_shardings)

  # --- state -------------------------------------------------------------------------

  def state_shardings(self) -> TrainState:
    return self._state_shardings

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs carrying this mesh's shardings: restore targets."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self._abstract, self._state_shardings)

  def init_state(self, params: Any, rng: jax.Array | None = None,
                 adapters: Any = None) -> TrainState:
    """Fresh optimizer state around a *copy* of `params` (the caller's stay valid).

    LoRA: `params` become the frozen base (attach_base) and the state holds a copy of
    `adapters` (an earlier M-step's, continued) or, when None, fresh ones drawn from
    `rng` (default key 0) with B = 0."""
    if self.adapters is None:
      params = jax.tree.map(partitioning.put_global, params, self.param_shardings)
      return self._init(params)
    self.attach_base(params)
    if adapters is None:
      return self._init(self.adapters.init(jax.random.key(0) if rng is None else rng))
    if jax.tree.structure(adapters) != jax.tree.structure(self.adapters.shardings):
      raise errors.ConfigError(
          "the adapters to continue were trained with other train.lora.targets than "
          f"{','.join(self.adapters.cfg.targets)}; keep train.lora as it was, or set "
          "restem.finetune_from='base' to start fresh adapters")
    return self._init(jax.tree.map(partitioning.put_global, adapters, self.adapters.shardings))

  def attach_base(self, params: Any) -> None:
    """LoRA: the frozen base the adapters apply to (a resumed state needs it again).
    Cast or quantized per train.lora.base_dtype. No-op for full fine-tuning."""
    if self.adapters is not None:
      self._base = self.adapters.prepare_base(params)

  def copy_params(self, params: Any) -> Any:
    """A device copy of trained params (or adapters) that survives donation of the state."""
    return self._copy_params(params)

  def model_params(self, trained: Any) -> Any:
    """The model's params for `trained` (state.params): itself, or base merged with the
    adapters (a fresh copy in model.param_dtype: sampling, checkpoints)."""
    if self.adapters is None:
      return trained
    return self.adapters.merged(self._require_base(), trained)

  def _require_base(self) -> Any:
    if self._base is None:
      raise RuntimeError("Trainer with train.lora: call init_state or attach_base with the "
                         "base params first")
    return self._base

  # --- steps -------------------------------------------------------------------------

  def _micro_split(self, x: jax.Array) -> jax.Array:
    # [B, ...] -> [M, B/M, ...] taking rows m, m+M, m+2M, ... into micro-batch m:
    # with the batch dimension split contiguously over devices, every micro-batch
    # then has rows on every device (a plain reshape would put micro-batch 0 on
    # the first devices only).
    m = self.micro_batches
    x = x.reshape((x.shape[0] // m, m) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return partitioning.constrain(x, self.mesh, (None, "act_batch") + (None,) * (x.ndim - 2))

  def _train_step(self, state: TrainState, base: Any, batch: batches_lib.Batch,
                  target_len: int | None = None) -> tuple[TrainState, dict]:
    rng = None  # LoRA dropout's key: one per step (the same again after a resume).
    if self.adapters is None:
      objective = lambda p, b, rng: _numerator_and_counts(p, b, self.model, target_len)
    else:  # Applied inside the model: the base gets no gradient, the adapters do.
      objective = lambda a, b, rng: _numerator_and_counts(base, b, self.model, target_len,
                                                          self.adapters.apply(a, rng))
      if self.adapters.cfg.dropout:
        rng = jax.random.fold_in(jax.random.key(lora_lib.DROPOUT_SEED), state.step)
    grad_fn = jax.grad(objective, has_aux=True)
    if self.micro_batches == 1:
      numerator_grads, counts = grad_fn(state.params, batch, rng)
    else:
      micro = jax.tree.map(self._micro_split, batch)
      if rng is not None:  # Each micro-batch its own dropout key.
        micro = (micro, jax.random.split(rng, self.micro_batches))

      def body(acc, mb):
        mb, key = mb if rng is not None else (mb, None)
        g, c = grad_fn(state.params, mb, key)
        return jax.tree.map(jnp.add, acc, (g, c)), None

      zeros = (jax.tree.map(jnp.zeros_like, state.params),
               {k: jnp.zeros((), jnp.float32) for k in _COUNT_KEYS})
      (numerator_grads, counts), _ = jax.lax.scan(body, zeros, micro)
    denom = _denominator(counts, self.normalization)
    grads = jax.tree.map(lambda g: g / denom, numerator_grads)
    loss = counts["weighted_nll"] / denom
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "tokens": counts["tokens"], "grad_norm": optax.tree.norm(grads),
               "lr": self.schedule(state.step),
               "unweighted_token_nll": counts["nll_sum"] / jnp.maximum(counts["tokens"], 1.0)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _device_batch(self, batch: batches_lib.Batch) -> tuple[batches_lib.Batch, int | None]:
    """(the batch on the mesh, its target window, static: found on the host)."""
    if not isinstance(batch, (batches_lib.ExampleBatch, batches_lib.SharedPromptBatch)):
      raise ValueError(f"batch is a {type(batch).__name__}; build it with batches.make_batch "
                       "or batches.make_shared_batch")
    device_batch = jax.tree.map(lambda x: partitioning.put_global(
        x, partitioning.batch_sharding(self.mesh, np.ndim(x))), batch)
    return device_batch, batch.target_window()

  def step(self, state: TrainState, batch: batches_lib.Batch
           ) -> tuple[TrainState, dict[str, float]]:
    """One optimizer step (state is donated). Raises NonFiniteLossError on NaN/Inf."""
    if batch.tokens_BxL.shape[0] != self.batch_size:
      raise ValueError(f"batch has {batch.tokens_BxL.shape[0]} rows but train.batch_size="
                       f"{self.batch_size}")
    device_batch, window = self._device_batch(batch)
    step_before = int(state.step)
    base = None if self.adapters is None else self._require_base()
    state, metrics = self._step(state, base, device_batch, window)
    # Checked every step: the metrics come back to the host anyway (the device
    # sync costs a little dispatch overlap, negligible next to a real step).
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(metrics["loss"]) or not np.isfinite(metrics["grad_norm"]):
      raise NonFiniteLossError(
          f"training loss is {metrics['loss']} (grad norm {metrics['grad_norm']}) at step "
          f"{step_before}; check the learning rate, the params and the batch")
    return state, metrics

  def loss(self, params: Any, batch: batches_lib.Batch) -> float:
    """Eval loss (train.loss_normalization) of `batch`; no update."""
    return float(self._loss(params, *self._device_batch(batch)))
