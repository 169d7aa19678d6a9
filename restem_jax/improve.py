"""Improve (M-step): fine-tune on the kept samples with validation early stopping.

    params = init_params (base model for ReST-EM, previous iterate for ReST: the caller picks)
    for step in 1..max_steps:
        train on batch(step)                 # deterministic: epoch-wise permutations by seed
        every eval_every steps (and at the end): score = eval_fn(params)  # validation reward
            keep the best params; stop after `patience` evaluations without improvement
        every checkpoint_every steps (and at the end): checkpoint for resume
        after SIGTERM (preemption.py): checkpoint this step, raise Preempted

Resume semantics: the data position is the step (batch s is a pure function of
seed and s), and each mid-phase checkpoint holds the train state, the best params
so far and the early-stop bookkeeping, all as of the same step. A killed run
called again resumes from the latest checkpoint and ends with the same best
params and info as an uninterrupted run. The initial params are not evaluated
(the M-step's result is always a fine-tuned model); eval_fn must not keep the
params it is given, since the next train step donates their buffers. The last checkpoint is marked done, so
calling improve again after it finished returns the stored result without
training.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from restem_jax import batches, checkpoints, lora, preemption, progress, sampling, training
from restem_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class Trained:
  """A model as a run holds it. `params` are what the sampler reads. With train.lora they
  are `base` with `adapters` merged in: a checkpoint then stores the adapters alone (the
  base is stored once, by the run), and `finetune_from = previous` continues the adapters
  on the same frozen base instead of stacking a fresh adapter on merged weights."""
  params: Any  # None: a frozen base only (RunContext.frozen), which nothing samples any more
  adapters: Any = None  # None: full params (no LoRA)
  base: Any = None  # the frozen params the adapters apply to (maybe cast / quantized)

  @property
  def start_params(self) -> Any:
    """What an M-step starting here trains from: the frozen base under adapters, else the
    params (fine-tuned fully, or the base a LoRA M-step puts fresh adapters on)."""
    return self.params if self.base is None else self.base


def restore_model(path: str, model_cfg: model_lib.ModelConfig, mesh: Mesh,
                  base: Trained | None = None) -> Trained:
  """The model saved at `path` (run.RunContext.save_model): its params, or an adapters
  checkpoint merged onto `base` (default: the base path it records, e.g. another run's
  teacher). Runs and export restore through this one function."""
  lora_meta = checkpoints.read_metadata(path).get("lora")
  if not isinstance(lora_meta, dict):
    return Trained(checkpoints.restore_params(path, model_cfg, mesh))
  if base is None:
    if not lora_meta.get("base"):
      raise checkpoints.CheckpointError(
          f"{path} holds LoRA adapters but does not record their base; restore it inside "
          "the run that wrote it, or re-create it")
    base = restore_model(lora_meta["base"], model_cfg, mesh)
  adapters = lora.Adapters(model_cfg, lora.LoraConfig.from_metadata(lora_meta), mesh)
  ad = checkpoints.restore_adapters(path, adapters.abstract())
  # The same merge as the M-step's result (Trainer.model_params), so a restored iterate
  # samples exactly as the one the run held before it was killed.
  frozen = adapters.prepare_base(base.start_params)
  return Trained(adapters.merged(frozen, ad), ad, frozen)


@dataclasses.dataclass(frozen=True)
class Example:
  prompt: list[int]
  target: list[int]  # ends with EOS
  weight: float


def make_examples(vocab: Any, pairs: Sequence[tuple[str, str]], max_seq_len: int,
                  weights: Sequence[float] | None = None) -> list[Example]:
  """Tokenised (prompt, target) pairs, target + EOS; ones longer than max_seq_len are skipped.

  Skipping (with a count in the log) rather than truncating: a cut target would
  teach the model to stop mid-solution.
  """
  weights = [1.0] * len(pairs) if weights is None else weights
  out, skipped = [], 0
  for (prompt, target), w in zip(pairs, weights, strict=True):
    p, t = sampling.encode_prompt(vocab, prompt), vocab.encode(target) + [vocab.eos_id]
    if len(p) + len(t) > max_seq_len:
      skipped += 1
      continue
    out.append(Example(prompt=p, target=t, weight=float(w)))
  if skipped:
    logging.warning("skipped %d of %d training examples longer than model.max_seq_len=%d",
                    skipped, len(pairs), max_seq_len)
  return out


def padded_length(longest: int, seq_len: int) -> int:
  """A batch's length: its longest example rounded up to 16, at most seq_len.

  Short batches then cost less than padding to seq_len, at one compile of the
  train step per distinct length (at most seq_len / 16 of them, a handful in practice).
  """
  return min(seq_len, -(-longest // 16) * 16)


def shared_rows(examples: Sequence[Example], row_len: int) -> list[list[int]]:
  """Examples grouped into rows that share a prompt (batches.make_shared_batch): each
  prompt's examples in order, as many per row as fit in row_len tokens (one copy of
  the prompt + their targets). Deterministic: the same examples give the same rows."""
  by_prompt: dict[tuple[int, ...], list[int]] = {}
  for i, e in enumerate(examples):
    by_prompt.setdefault(tuple(e.prompt), []).append(i)
  rows = []
  for prompt, members in by_prompt.items():
    row, used = [], len(prompt)
    for i in members:
      if row and used + len(examples[i].target) > row_len:
        rows.append(row)
        row, used = [], len(prompt)
      row.append(i)
      used += len(examples[i].target)
    rows.append(row)
  return rows


class BatchStream:
  """Batch s = units at stream positions [s*B, (s+1)*B) of epoch permutations.

  A unit is an example, or with share_prompts a row of examples with the same prompt
  (shared_rows: the prompt's layers then run once per row, not once per example; B
  counts rows). The stream is perm_0 ++ perm_1 ++ ..., perm_e a permutation of all
  units seeded by (seed, e): every example is seen once per epoch, and any step's
  batch is computable without replaying earlier ones (exact resume).
  """

  def __init__(self, examples: Sequence[Example], batch_size: int, seq_len: int, seed: int,
               pad_id: int = 0, share_prompts: bool = False):
    """seq_len: the longest row (with share_prompts, of a prompt and its samples)."""
    self.examples, self.batch_size, self.seq_len, self.seed = examples, batch_size, seq_len, seed
    self.pad_id = pad_id
    self.units = (shared_rows(examples, seq_len) if share_prompts
                  else [[i] for i in range(len(examples))])
    self.share_prompts = share_prompts
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(
          len(self.units))}  # Only the current epoch is ever needed again.
    return self._perms[epoch]

  def indices(self, step: int) -> list[int]:
    """The units (example indices without share_prompts) of batch `step`."""
    n = len(self.units)
    out = []
    for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
      out.append(int(self._perm(pos // n)[pos % n]))
    return out

  def batch(self, step: int) -> batches.Batch:
    units = [[self.examples[i] for i in self.units[u]] for u in self.indices(step)]
    if self.share_prompts:
      rows = [(row[0].prompt, [(e.target, e.weight) for e in row]) for row in units]
      longest = max(len(p) + sum(len(t) for t, _ in ts) for p, ts in rows)
      return batches.make_shared_batch(rows, padded_length(longest, self.seq_len), self.pad_id)
    chosen = [row[0] for row in units]
    length = padded_length(max(len(e.prompt) + len(e.target) for e in chosen), self.seq_len)
    return batches.make_batch([e.prompt for e in chosen], [e.target for e in chosen],
                               [e.weight for e in chosen], length, self.pad_id)


def _validate(examples: Sequence[Example], seq_len: int, train_cfg: ml_collections.ConfigDict,
              eval_fn: Any) -> None:
  if len(examples) == 0:
    raise ValueError("no kept samples to train on: the E-step kept 0 examples; lower the bar "
                     "(reward threshold / max_per_problem) or draw more samples per problem")
  too_long = [i for i, e in enumerate(examples) if len(e.prompt) + len(e.target) > seq_len]
  if too_long:
    raise ValueError(f"{len(too_long)} of {len(examples)} examples are longer than seq_len="
                     f"{seq_len} (first: #{too_long[0]}); filter them before improve")
  for name in ("max_steps", "checkpoint_every") + (("eval_every", "patience") if eval_fn else ()):
    if int(train_cfg[name]) < 1:
      raise ValueError(f"train.{name}={train_cfg[name]} must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Book:
  """The M-step's early-stop book-keeping, saved (as_dict) with every mid-phase checkpoint."""
  step: int = 0  # Train steps done: batch `step` is the next one.
  best_step: int = 0
  best_score: float | None = None  # None until the first evaluation.
  evals: list = dataclasses.field(default_factory=list)  # [[step, score], ...]
  bad_evals: int = 0  # Evaluations since the best one.
  stopped: str | None = None  # "patience" | "max_steps" once stopped.
  done: bool = False
  seed: int | None = None  # What the M-step was started with: a resume must match.
  num_examples: int | None = None

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Book":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When the M-step evaluates, stops and checkpoints (train_cfg's integers)."""
  max_steps: int
  eval_every: int
  patience: int
  checkpoint_every: int
  evaluates: bool  # An eval_fn was given.

  def eval_due(self, step: int) -> bool:
    return self.evaluates and (step % self.eval_every == 0 or step >= self.max_steps)


@dataclasses.dataclass(frozen=True)
class Decision:
  """What follows a train step (after_step)."""
  book: Book
  improved: bool  # The step's params are the new best.
  save: bool  # Checkpoint this step.
  preempted: bool  # SIGTERM: save this step, then stop the process.


def after_step(book: Book, step: int, score: float | None, sched: Schedule) -> Decision:
  """After train step `step` and its validation `score` (None when not evaluated): a better
  score is the new best; `patience` worse ones or max_steps stop; a stop, a preemption
  (SIGTERM: this step, not only every checkpoint_every) or checkpoint_every saves.
  Calls preemption.reached() at the same point on every process (not once stopped)."""
  evals, best_step, best_score, bad = book.evals, book.best_step, book.best_score, book.bad_evals
  improved, stopped = False, book.stopped
  if score is not None:
    evals = evals + [[step, score]]
    improved = best_score is None or score > best_score
    best_step, best_score, bad = (step, score, 0) if improved else (best_step, best_score,
                                                                     bad + 1)
    if bad >= sched.patience:
      stopped = "patience"
  if step >= sched.max_steps and stopped is None:
    stopped = "max_steps"
  book = dataclasses.replace(book, step=step, best_step=best_step, best_score=best_score,
                             evals=evals, bad_evals=bad, stopped=stopped,
                             done=stopped is not None)
  preempted = not book.done and preemption.reached()
  return Decision(book, improved, book.done or preempted or step % sched.checkpoint_every == 0,
                  preempted)


def improve(*, model_cfg: model_lib.ModelConfig, train_cfg: ml_collections.ConfigDict,
            mesh: Mesh, init_params: Any, examples: Sequence[Example], seq_len: int,
            eval_fn: Callable[[Any], float] | None, workdir: str, seed: int,
            log: Callable[[str], None] = logging.info,
            init_adapters: Any = None) -> tuple[Trained, dict]:
  """One M-step. Returns (best model, info); see the module docstring.

  With train.lora, init_params is the frozen base and the state's adapters start as
  `init_adapters` (continuing an earlier M-step's) or, when None, fresh ones (B = 0).

  Every example must fit in seq_len tokens (prompt + target); each batch is
  padded to `padded_length` of its own longest example (or row: train.share_prompts).

  info = {"best_step", "best_score", "steps", "evals": [(step, score)],
          "stopped": "patience" | "max_steps"}. Without eval_fn the final params are
  returned and best_step = steps, best_score = None.
  """
  _validate(examples, seq_len, train_cfg, eval_fn)
  sched = Schedule(int(train_cfg.max_steps), int(train_cfg.eval_every), int(train_cfg.patience),
                   int(train_cfg.checkpoint_every), evaluates=eval_fn is not None)
  trainer = training.Trainer(model_cfg, train_cfg, mesh, total_steps=sched.max_steps)
  share = bool(train_cfg.share_prompts)
  row_len = int(train_cfg.shared_row_len) or seq_len
  stream = BatchStream(examples, trainer.batch_size, row_len if share else seq_len, seed,
                       share_prompts=share)
  if share:
    log(f"improve: {len(examples)} examples in {len(stream.units)} rows of <= {row_len} "
        f"tokens sharing their prompts (train.share_prompts; batch_size "
        f"{trainer.batch_size} rows)")
  if trainer.adapters is not None:
    lc = trainer.adapters.cfg
    log(f"improve: LoRA rank {lc.rank} on {','.join(lc.targets)}: "
        f"{trainer.adapters.count()} trainable params, base frozen "
        f"({lc.base_dtype or 'as loaded'}), "
        f"{'fresh adapters' if init_adapters is None else 'continuing the given adapters'}")
  elif init_adapters is not None:
    raise ValueError("improve: init_adapters given but train.lora.rank = 0 (full fine-tuning)")
  ckpt = checkpoints.TrainCheckpointer(os.path.join(workdir, "checkpoints"),
                                       keep=int(train_cfg.keep_checkpoints))
  try:
    state, best_params, book = _start(trainer, ckpt, init_params, init_adapters,
                                      Book(seed=seed, num_examples=len(examples)), log)
    if not book.done:
      state, best_params, book = _train(trainer, stream, ckpt, state, best_params, book, sched,
                                        eval_fn, log)
    return _result(trainer, best_params, state, book, eval_fn, init_params)
  finally:
    ckpt.close()  # Async writes complete before improve returns (or raises).


def _start(trainer: training.Trainer, ckpt: checkpoints.TrainCheckpointer, init_params: Any,
           init_adapters: Any, fresh: Book, log: Callable[[str], None]) -> tuple[Any, Any, Book]:
  """(train state, best params so far, book): the latest checkpoint's, else fresh ones."""
  # With train.lora the state and the best-so-far are adapters: checkpoints hold those
  # (and their optimizer state) only; the result is merged with the base at the end.
  abstract = {"train": trainer.abstract_state(), "best": trainer.abstract_state().params}
  # A damaged newest checkpoint is removed (warning) and an earlier one used.
  latest = ckpt.restore_latest(abstract, log)
  if latest is None:
    state = trainer.init_state(init_params, rng=jax.random.key(fresh.seed),
                               adapters=init_adapters)
    # Best-so-far starts as the initial params, so the pytree is always full;
    # it is replaced by the first evaluation (best_score None < any score).
    return state, trainer.copy_params(state.params), fresh
  start, restored, saved = latest
  book = Book.from_dict(saved)
  if (book.seed, book.num_examples) != (fresh.seed, fresh.num_examples):
    raise checkpoints.CheckpointError(
        f"checkpoint {ckpt.directory}/{start} was written for seed={book.seed} and "
        f"{book.num_examples} examples, not seed={fresh.seed} and {fresh.num_examples}; use a "
        "fresh workdir for a different M-step")
  trainer.attach_base(init_params)
  log(f"improve: resumed from {ckpt.directory} at step {book.step}")
  return restored["train"], restored["best"], book


def _train(trainer: training.Trainer, stream: BatchStream, ckpt: checkpoints.TrainCheckpointer,
           state: Any, best_params: Any, book: Book, sched: Schedule, eval_fn: Any,
           log: Callable[[str], None]) -> tuple[Any, Any, Book]:
  """Train steps from book.step until after_step stops them; checkpoints as it says."""
  # One line per M-step (progress.py): steps/s, ETA and the latest loss, not a line per step.
  bar = progress.Progress("improve", sched.max_steps, "steps", initial=book.step, log=log,
                          enabled=jax.process_index() == 0)
  while not book.done:
    state, metrics = trainer.step(state, stream.batch(book.step))
    step, score = book.step + 1, None
    bar.update(1, f"loss {metrics['loss']:.4f} tokens {metrics['tokens']:.0f} grad_norm "
                  f"{metrics['grad_norm']:.3f} lr {metrics['lr']:.2e}")
    if sched.eval_due(step):
      with preemption.deferred():  # The step's checkpoint below includes its validation.
        score = float(eval_fn(trainer.model_params(state.params)))
    then = after_step(book, step, score, sched)
    book = then.book
    if then.improved:
      best_params = trainer.copy_params(state.params)
    if score is not None:
      bar.log(f"improve eval at step {step}: {score:.4f} (best {book.best_score:.4f} at "
              f"step {book.best_step})")
    if then.save:
      ckpt.save(step, {"train": state, "best": best_params}, book.as_dict())
    if then.preempted:
      ckpt.wait()  # The async save is complete before the process exits.
      preemption.stop(f"M-step checkpoint at step {step}/{sched.max_steps} saved in "
                      f"{ckpt.directory}")
  bar.close()
  log(f"improve: stopped ({book.stopped}) after {book.step} steps; best step "
      f"{book.best_step} score {book.best_score}")
  return state, best_params, book


def _result(trainer: training.Trainer, best_params: Any, state: training.TrainState,
            book: Book, eval_fn: Any, init_params: Any) -> tuple[Trained, dict]:
  info = {"best_step": int(book.best_step) if eval_fn else int(book.step),
          "best_score": book.best_score,
          "steps": int(book.step),
          "evals": [(int(s), float(v)) for s, v in book.evals],
          "stopped": book.stopped}
  trained = best_params if eval_fn is not None else state.params
  if trainer.adapters is None:
    return Trained(trained), info
  return Trained(trainer.model_params(trained), adapters=trained, base=init_params), info
