"""The M-step's two batch formats, each a typed pytree that says how it is read.

ExampleBatch (make_batch): one (prompt, target, reward) example per row, right-padded;
position t predicts token t + 1 where loss_mask_BxL is 1, and the loss needs logits only
in a window per row (target_window, found on the host: static, one compile per size).
SharedPromptBatch (make_shared_batch, train.share_prompts): one prompt followed by
several of its targets per row, so the prompt's layers run once; positions, segments and
the predictions are listed explicitly. Both give the same loss for the same examples.

The format is the batch's type: training reads either through `predictions`, never by
looking for keys. Adding a format is one class here with `predictions` and `target_window`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class ExampleBatch:
  """One example per row (make_batch)."""
  tokens_BxL: Any  # prompt + target, right-padded with pad_id
  loss_mask_BxL: Any  # 1 where the next token is a target token
  weights_B: Any  # each example's reward

  def target_window(self) -> int | None:
    """Host side, before the batch goes to the devices: see `target_window`."""
    return target_window(self.loss_mask_BxL)

  def predictions(self, target_len: int | None) -> tuple[dict, Any, Any, Any, Any]:
    """(model.apply kwargs, labels_BxT, mask_BxT, weights_BxT, examples) of the loss.
    target_len (target_window): logits only for that many positions per row, from the
    row's first target position on; None: every position."""
    tokens_BxL, apply_kw = self.tokens_BxL, {}
    mask_BxL = self.loss_mask_BxL.astype(jnp.float32)
    weights_BxT = self.weights_B.astype(jnp.float32)[:, None]
    examples = jnp.sum((jnp.sum(mask_BxL, axis=-1) > 0).astype(jnp.float32))
    # Label at position t is token t + 1; the last position has none (mask is 0 there).
    labels_BxL = jnp.concatenate([tokens_BxL[:, 1:], tokens_BxL[:, :1]], axis=1)
    if target_len is None:
      mask_BxT, labels_BxT = mask_BxL, labels_BxL
    else:
      seq_len = tokens_BxL.shape[1]
      start_B = jnp.argmax(mask_BxL > 0, axis=1)
      at_BxT = start_B[:, None] + jnp.arange(target_len)
      in_row_BxT = at_BxT < seq_len
      at_BxT = jnp.minimum(at_BxT, seq_len - 1)
      mask_BxT = jnp.take_along_axis(mask_BxL, at_BxT, axis=1) * in_row_BxT
      labels_BxT = jnp.take_along_axis(labels_BxL, at_BxT, axis=1)
      apply_kw["logits_at_BxT"] = at_BxT
    return apply_kw, labels_BxT, mask_BxT, weights_BxT, examples


@flax.struct.dataclass
class SharedPromptBatch:
  """Rows of one prompt and several of its targets (make_shared_batch)."""
  tokens_BxL: Any
  positions_BxL: Any  # each target's positions continue from its prompt
  segments_BxL: Any  # 0 on the prompt, k + 1 on target k, -1 on padding
  predict_at_BxT: Any  # the index whose logits predict prediction slot t
  labels_BxT: Any
  loss_mask_BxT: Any
  weights_BxT: Any  # the reward of the target each slot belongs to
  examples_B: Any  # targets per row (the "sequence" normalization's denominator)

  def target_window(self) -> int | None:
    return None  # The predictions are listed: no window to find.

  def predictions(self, target_len: int | None) -> tuple[dict, Any, Any, Any, Any]:
    """As ExampleBatch.predictions; target_len is unused (the slots are listed)."""
    del target_len
    apply_kw = {"positions_BxL": self.positions_BxL, "segments_BxL": self.segments_BxL,
                "logits_at_BxT": self.predict_at_BxT}
    return (apply_kw, self.labels_BxT, self.loss_mask_BxT.astype(jnp.float32),
            self.weights_BxT.astype(jnp.float32),
            jnp.sum(self.examples_B.astype(jnp.float32)))


Batch = ExampleBatch | SharedPromptBatch


def make_batch(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
               weights: Sequence[float], seq_len: int, pad_id: int = 0) -> ExampleBatch:
  """Packs (prompt, target, reward) triples into one right-padded batch.

  tokens_BxL = prompt + target, padded with pad_id; labels are tokens shifted
  left, so loss_mask_BxL[b, t] = 1 iff tokens[b, t + 1] is a target token.
  """
  if not (len(prompts) == len(targets) == len(weights)):
    raise ValueError(f"make_batch: {len(prompts)} prompts, {len(targets)} targets, "
                     f"{len(weights)} weights; they must have the same length")
  b = len(prompts)
  tokens_BxL = np.full((b, seq_len), pad_id, np.int32)
  loss_mask_BxL = np.zeros((b, seq_len), np.float32)
  for i, (p, t) in enumerate(zip(prompts, targets)):
    n = len(p) + len(t)
    if n > seq_len:
      raise ValueError(f"make_batch: example {i} has {len(p)} prompt + {len(t)} target tokens "
                       f"= {n} > seq_len={seq_len}; filter long examples before batching")
    if len(p) == 0 and len(t) > 0:
      # The first target token would have no position predicting it.
      raise ValueError(f"make_batch: example {i} has an empty prompt; at least one prompt token "
                       "(e.g. BOS) is needed to predict the first target token")
    tokens_BxL[i, :n] = np.asarray(list(p) + list(t), np.int32)
    # Position t predicts token t + 1: targets occupy positions len(p)..n-1.
    loss_mask_BxL[i, len(p) - 1:n - 1] = 1.0
  return ExampleBatch(tokens_BxL=tokens_BxL, loss_mask_BxL=loss_mask_BxL,
                      weights_B=np.asarray(weights, np.float32).reshape(b))


def make_shared_batch(rows: Sequence[tuple[Sequence[int], Sequence[tuple[Sequence[int], float]]]],
                      seq_len: int, pad_id: int = 0) -> SharedPromptBatch:
  """Rows of one prompt followed by several targets that share it (ReST-EM keeps up to
  10 correct samples per problem, all after the same few-shot prompt): the prompt's
  layers then run once per row instead of once per sample. Same loss as make_batch on
  the unpacked (prompt, target, weight) examples.

  rows: [(prompt, [(target, weight), ...])]. A row is the prompt, then each target in
  turn; target k's positions continue from the prompt (len(prompt) + t) and its
  segments_BxL is k + 1 (0 on the prompt, -1 on padding: model.Transformer's
  segments_BxL). Every target's first token is predicted at the prompt's last position,
  so the predictions are listed: predict_at_BxT (the index whose logits predict),
  labels_BxT, loss_mask_BxT, weights_BxT (the target's reward), over T = the most
  target tokens in a row rounded up to a power of two (>= 8: a handful of compiles).
  examples_B counts each row's targets (the "sequence" normalization's denominator).
  """
  b = len(rows)
  t_len = _window_size(max([sum(len(t) for t, _ in targets) for _, targets in rows] + [1]))
  out = {"tokens_BxL": np.full((b, seq_len), pad_id, np.int32),
         "positions_BxL": np.zeros((b, seq_len), np.int32),
         "segments_BxL": np.full((b, seq_len), -1, np.int32),
         "predict_at_BxT": np.zeros((b, t_len), np.int32),
         "labels_BxT": np.zeros((b, t_len), np.int32),
         "loss_mask_BxT": np.zeros((b, t_len), np.float32),
         "weights_BxT": np.zeros((b, t_len), np.float32),
         "examples_B": np.zeros((b,), np.float32)}
  for r, (prompt, targets) in enumerate(rows):
    n = len(prompt) + sum(len(t) for t, _ in targets)
    if len(prompt) == 0:
      raise ValueError(f"make_shared_batch: row {r} has an empty prompt; at least one prompt "
                       "token (e.g. BOS) is needed to predict the first target token")
    if n > seq_len:
      raise ValueError(f"make_shared_batch: row {r} has {n} tokens > seq_len={seq_len}; "
                       "put fewer targets in a row")
    lp = len(prompt)
    out["tokens_BxL"][r, :lp] = prompt
    out["positions_BxL"][r, :lp] = np.arange(lp)
    out["segments_BxL"][r, :lp] = 0
    at, j = lp, 0  # next free index; next prediction slot
    for k, (target, weight) in enumerate(targets):
      m = len(target)
      if m == 0:
        continue
      out["tokens_BxL"][r, at:at + m] = target
      out["positions_BxL"][r, at:at + m] = lp + np.arange(m)
      out["segments_BxL"][r, at:at + m] = k + 1
      # Token t of the target is predicted at the index holding token t - 1 (the
      # prompt's last token for t = 0).
      out["predict_at_BxT"][r, j:j + m] = np.concatenate([[lp - 1], at + np.arange(m - 1)])
      out["labels_BxT"][r, j:j + m] = target
      out["loss_mask_BxT"][r, j:j + m] = 1.0
      out["weights_BxT"][r, j:j + m] = weight
      out["examples_B"][r] += 1
      at, j = at + m, j + m
  return SharedPromptBatch(**out)


def _window_size(n: int) -> int:
  """Prediction slots for n target tokens: a power of two >= n, at least 8 (one compile
  per size, a handful in a run)."""
  return max(8, 1 << (n - 1).bit_length())


def target_window(loss_mask_BxL: np.ndarray) -> int | None:
  """How many positions per row the loss needs logits for (static: one compile each).

  A row's masked positions lie in one window starting at its first masked position;
  T covers the widest row, rounded up to a power of two (>= 8) so that a run
  compiles a handful of variants. None: the whole row (no saving, no gather).
  """
  mask = np.asarray(loss_mask_BxL) > 0
  seq_len = mask.shape[1]
  rows = np.flatnonzero(mask.any(axis=1))
  if rows.size == 0:
    return None
  first = mask[rows].argmax(axis=1)
  last = seq_len - 1 - mask[rows, ::-1].argmax(axis=1)
  window = _window_size(int(np.max(last - first)) + 1)
  return None if window >= seq_len else window
