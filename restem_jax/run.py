"""The ReST-EM run: Algorithm 1 of Singh et al. (2024), resumable.

    theta_base = pretrained LM                            (pretrain_base)
    for i in 1..I:
        D_i   = Generate(theta_{i-1} or teacher, D_train)  (generate.generate)
        theta_i = Improve(theta_base or theta_{i-1}, D_i)  (m_step -> improve.improve)
        evaluate(theta_i)                                 (evaluate.evaluate)

Every phase is recorded in progress.json once its outputs are on disk
(`RunContext.resumable`), so rerunning the same command after a kill continues
where it stopped (see workdir.py for the layout and resume order). Every process
joins the collective work (sampling, training, Orbax saves); process 0 alone
writes the run's other files and logs (`RunContext.coordinator`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, TypeVar

import jax
import ml_collections
from etils import epath

from restem_jax import (checkpoints, configlib, distributed, errors, evaluate, generate,
                        improve, lora, model, partitioning, preemption, preflight, report,
                        runinfo, samples, sampling, tasks, workdir as wd)
from restem_jax import export
from restem_jax.improve import Trained
from restem_jax.tasks import Problem
from restem_jax.importers.common import ImportFormatError
from restem_jax.training import NonFiniteLossError

# Errors that mean "your input is wrong": main.py prints them as one line.
USER_ERRORS = (errors.ConfigError, wd.WorkdirError, checkpoints.CheckpointError,
               tasks.DataLayoutError, NonFiniteLossError, ImportFormatError,
               generate.GraderFaultError)
# A finished phase whose outputs are missing or unreadable: recomputed (resumable).
DAMAGED = (wd.DamagedError, checkpoints.DamagedCheckpointError)

T = TypeVar("T")


def load_vocabulary(task_cfg: ml_collections.ConfigDict, default: str = "") -> Any:
  """The tokenizer named by task.vocab_path, else `default` (an imported base's), else
  None (the task's own)."""
  path = task_cfg.vocab_path or default
  if not path:
    return None
  if not wd.exists(path):
    raise errors.ConfigError(f"task.vocab_path={path!r} does not exist; point it at a "
                                   "SentencePiece .model, a tokenizer.json or a .gguf file")
  if path.endswith(".model"):
    import seqio  # pylint: disable=import-outside-toplevel
    return seqio.SentencePieceVocabulary(path)
  from restem_jax import importers  # pylint: disable=import-outside-toplevel
  return importers.load_vocabulary(path)


@dataclasses.dataclass(frozen=True)
class Splits:
  train: list[Problem]
  val: list[Problem]  # early stopping of the M-step; empty = none
  test: list[Problem]


def load_splits(config: ml_collections.ConfigDict, task: tasks.Task,
                model_cfg: model.ModelConfig) -> Splits:
  """The task's problems whose prompts leave room for sampling.max_new_tokens."""
  vocab = task.vocabulary
  if vocab.vocab_size > model_cfg.vocab_size:
    raise errors.ConfigError(
        f"the task's vocabulary has {vocab.vocab_size} tokens but model.vocab_size="
        f"{model_cfg.vocab_size}; raise model.vocab_size")
  max_prompt = model_cfg.max_seq_len - config.sampling.max_new_tokens
  if max_prompt <= 0:
    raise errors.ConfigError(
        f"sampling.max_new_tokens={config.sampling.max_new_tokens} leaves no room for a prompt "
        f"in model.max_seq_len={model_cfg.max_seq_len}")
  splits = Splits(
      train=task.problems("train", max_prompt_len=max_prompt),
      val=(task.problems("validation", max_prompt_len=max_prompt)
           if config.task.num_val > 0 else []),
      test=task.problems("test", max_prompt_len=max_prompt))
  for name in ("train", "test"):
    if not getattr(splits, name):
      raise errors.ConfigError(
          f"task {config.task.name!r} has no {name} problems that fit max_prompt_len="
          f"{max_prompt}; check task.data_dir and model.max_seq_len")
  return splits


def load_transfer(config: ml_collections.ConfigDict, vocab: Any,
                  model_cfg: model.ModelConfig) -> list[evaluate.TransferTask]:
  """eval.transfer_tasks (checked by preflight.check): config.task with each dict's
  overrides, its test split only, under the dict's "label" (default: its task name)."""
  out = []
  max_prompt = model_cfg.max_seq_len - config.sampling.max_new_tokens
  for overrides in config.eval.transfer_tasks:
    task = tasks.get_task(configlib.transfer_task_cfg(config.task, overrides), vocabulary=vocab)
    out.append(evaluate.TransferTask(configlib.transfer_label(overrides), task,
                                     task.problems("test", max_prompt_len=max_prompt)))
  return out


class RunContext:
  """What every phase needs (config, mesh, task, splits, sampler, workdir), and how it resumes."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, override: bool):
    self.config = config
    # Process 0 writes config/progress/json/TensorBoard files and logs; the
    # others compute the same values (collectives) and write nothing.
    self.coordinator = distributed.is_coordinator()
    self.layout = wd.Layout(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    wd.check_or_save_config(self.layout.config, config, override, write=self.coordinator,
                            defaults=configlib.default_config())
    self.model_cfg = model.ModelConfig.from_config(config.model)
    self.mesh = partitioning.make_mesh(config.mesh)
    partitioning.check_model_fits_mesh(self.model_cfg, self.mesh)
    # Restores check shapes only: a checkpoint of another model variant (RoPE scaling,
    # norms) would load and run wrong, so compare the config it was saved with first.
    if config.base.source == "checkpoint":
      checkpoints.check_model_config(config.base.path, self.model_cfg, "base.path")
    if config.restem.sample_from == "teacher":
      checkpoints.check_model_config(config.restem.teacher_path, self.model_cfg,
                                     "restem.teacher_path")
    imported_vocab = ""
    if config.base.source == "import":  # Once per workdir, before the task needs a tokenizer.
      from restem_jax import importers  # pylint: disable=import-outside-toplevel
      imported_vocab = importers.import_to(self.layout.base.model, config.base.path, self.mesh,
                                           fmt=config.base.format,
                                           expect=self.model_cfg).tokenizer_path
    self.task = tasks.get_task(config.task,
                               vocabulary=load_vocabulary(config.task, imported_vocab))
    self.splits = load_splits(config, self.task, self.model_cfg)
    vocab = self.task.vocabulary
    self.transfer = load_transfer(config, vocab, self.model_cfg)
    self.sampler = sampling.Sampler(self.model_cfg, self.mesh, eos_id=vocab.eos_id,
                                    pad_id=vocab.pad_id, stop_strings=self.task.stop_strings,
                                    vocabulary=vocab)
    self.progress = wd.Progress(self.layout.progress, write=self.coordinator)
    if self.coordinator:  # Command and code version of every start (report.html shows them).
      runinfo.record_launch(workdir)
    # train.lora's adapters (None: full fine-tuning): what the run's models are saved as.
    self.lora = lora.make(self.model_cfg, config.train, self.mesh)

  def log(self, msg: str) -> None:
    if self.coordinator:
      logging.info(msg)

  def write_json(self, path: str, obj: Any) -> None:
    if self.coordinator:
      wd.write_json_atomic(path, obj)

  def resumable(self, phase: str, compute: Callable[[], T], save: Callable[[T], None],
                restore: Callable[[], T]) -> T:
    """`phase`'s result: restored if progress.json lists it, else computed, saved, listed.

    Listed only after `save` returns, so a run killed inside a phase redoes
    that phase (continuing from its own mid-phase checkpoints or shards). A
    listed phase whose outputs are missing or damaged (`restore` raises one of
    DAMAGED) is recomputed the same way, with a warning naming the file: every
    phase is deterministic, so the repaired run ends as an undamaged one would.
    """
    preemption.set_phase(phase)
    if self.progress.is_done(phase):
      try:
        return restore()
      except DAMAGED as e:
        logging.warning("%s is listed as done in %s but %s: recomputing it", phase,
                        self.layout.progress, str(e).split(";")[0])
        self.progress.unmark(phase)
    preemption.check("nothing of it was started")
    start = time.time()
    out = compute()
    save(out)
    self.progress.mark(phase, seconds=time.time() - start)
    return out

  def trained(self, m: wd.ModelPaths, fit: Callable[[], tuple[Trained, dict]],
              base: Trained | None = None) -> Trained:
    """m's model: restored, or fit() and saved (with fit's info as m.improve_json).
    base: the run's base, which a LoRA model's saved adapters apply to."""
    def save(out: tuple[Trained, dict]) -> None:
      self.save_model(m.model, out[0])
      if m.improve_json:
        self.write_json(m.improve_json, out[1])
    out, _ = self.resumable(m.trained, fit, save,
                            restore=lambda: (self.restore(m.model, base), None))
    return out

  def generated(self, m: wd.ModelPaths, params: Any, iteration: int) -> dict:
    """The E-step's shards in m.samples (written if not yet complete); returns their counts."""
    c = self.config
    sampled = (c.restem.teacher_path if c.restem.sample_from == "teacher" else
               self.base_path if iteration == 1 else self.layout.iteration(iteration - 1).model)

    def compute() -> dict:
      self.log(f"iteration {iteration}: generate")
      return generate.generate(params=params, sampler=self.sampler, task=self.task,
                               problems=self.splits.train, sampling_cfg=c.sampling,
                               max_per_problem=c.restem.max_per_problem, iteration=iteration,
                               out_dir=m.samples, seed=c.seed,
                               max_fault_fraction=c.restem.max_fault_fraction, log=self.log,
                               model_path=wd.in_workdir(sampled, self.layout.root),
                               keep_rejected=c.restem.keep_rejected)
    return self.resumable(m.generated, compute, save=lambda _: None,
                          restore=lambda: samples.verify(m.samples, len(self.splits.train)))

  def evaluated(self, m: wd.ModelPaths, params: Any, **extra: Any) -> dict:
    """m's eval.json (computed if not yet written), with `extra` fields and its name."""
    c = self.config

    def compute() -> tuple[dict, list[dict]]:
      result, records = evaluate.evaluate_with_records(
          params=params, sampler=self.sampler, task=self.task, test_problems=self.splits.test,
          train_problems=self.splits.train, eval_cfg=c.eval, **evaluate.sampling_budget(c),
          seed=c.seed, transfer=self.transfer, log=self.log)
      return {**result, **extra, "iteration": m.name}, records

    def save(out: tuple[dict, list[dict]]) -> None:
      if self.coordinator:  # The records first: eval.json is what marks both as written.
        wd.write_lines_atomic(m.eval_problems, out[1])
        wd.write_json_atomic(m.eval_json, out[0])
        report.write_tensorboard(self.layout.root, m.name, out[0], out[1])

    def restore() -> tuple[dict, None]:
      if not wd.exists(m.eval_problems):  # (Deleted, or a workdir older than the records.)
        raise wd.DamagedError(f"{m.eval_problems} is missing; the evaluation is redone")
      return wd.read_json(m.eval_json), None
    return self.resumable(m.evaluated, compute, save, restore)[0]

  def examples(self, pairs: list[tuple[str, str]],
               weights: list[float] | None = None) -> list[improve.Example]:
    return improve.make_examples(self.task.vocabulary, pairs, self.model_cfg.max_seq_len, weights)

  def kept_examples(self, m: wd.ModelPaths) -> list[improve.Example]:
    """The E-step's kept samples in m.samples as M-step examples, weighted by reward."""
    kept = samples.read_samples(m.samples)
    return self.examples([(s.prompt, s.sample) for s in kept], [s.reward for s in kept])

  def validation_fn(self) -> Callable[[Any], float] | None:
    """The M-step's early-stopping reward (greedy pass@1 on validation); None without one."""
    if not self.splits.val:
      return None
    return evaluate.make_validation_fn(self.sampler, self.task, self.splits.val,
                                       **evaluate.sampling_budget(self.config))

  @property
  def base_path(self) -> str:
    """Where theta_base's params are (restored by _run, or written there by pretraining)."""
    c = self.config
    return c.base.path if c.base.source == "checkpoint" else self.layout.base.model

  def finetune(self, start: Trained, examples: list[improve.Example], train_dir: str,
               seed: int, train_cfg: ml_collections.ConfigDict | None = None,
               validate: bool = True) -> tuple[Trained, dict]:
    """improve() from `start`; a LoRA start (adapters on a frozen base) continues its
    adapters on that base, full params with train.lora get fresh adapters."""
    c = self.config
    eval_fn = self.validation_fn() if validate else None
    return improve.improve(model_cfg=self.model_cfg, train_cfg=train_cfg or c.train,
                           mesh=self.mesh, init_params=start.start_params,
                           init_adapters=start.adapters,
                           examples=examples, seq_len=self.model_cfg.max_seq_len,
                           eval_fn=eval_fn, workdir=train_dir, seed=seed, log=self.log)

  def restored_base(self) -> Trained:
    """theta_base of a checkpoint / import base: the params at base_path (merged, if they
    are another run's LoRA iterate: this run's adapters start on top of them)."""
    return Trained(self.restore(self.base_path).params)

  def frozen(self, base: Trained) -> Trained:
    """What the run keeps of theta_base once nothing samples it any more: with a cast or
    quantized LoRA base (train.lora.base_dtype) only that frozen copy, which every M-step
    trains on and every iterate is merged from (the same arrays improve() would make from
    the loaded base); otherwise `base` itself. Frees the loaded base (a bfloat16 model
    with an int8 base then holds the int8 copy alone, not both)."""
    if self.lora is None or not self.lora.cfg.base_dtype:
      return base
    return Trained(params=None, base=self.lora.prepare_base(base.start_params))

  def unchanged(self, start: Trained) -> Trained:
    """`start` as an iterate; a frozen base alone (frozen) gets zero adapters (B = 0), so
    that there are params to sample: the cast / quantized base's."""
    if start.params is not None:
      return start
    zero = self.lora.init(jax.random.key(0))
    return Trained(self.lora.merged(start.base, zero), zero, start.base)

  def save_model(self, path: str, trained: Trained) -> None:
    """Full params, or with train.lora only the adapters (a few MB instead of a model copy
    per iteration) and where their base is: the base is stored once, at base_path."""
    meta = {"model": self.config.model.to_dict()}
    if trained.adapters is None:
      checkpoints.save_params(path, trained.params, metadata=meta)
      return
    meta["lora"] = {**self.lora.cfg.metadata(), "base": wd.absolute(self.base_path)}
    checkpoints.save_params(path, trained.adapters, metadata=meta)

  def restore(self, path: str, base: Trained | None = None) -> Trained:
    """The model saved at `path` (save_model): its params, or an adapters checkpoint merged
    onto `base` (default: the base path it records, e.g. another run's teacher)."""
    return improve.restore_model(path, self.model_cfg, self.mesh, base)


def pretrain_base(ctx: RunContext) -> tuple[Trained, dict]:
  """theta_base for base.source='pretrain': a fresh model fitted to the human solutions."""
  c = ctx.config
  human = ctx.task.human_solutions()
  if not human:
    raise ValueError(f"base.source='pretrain' needs human solutions, task {c.task.name!r} has none")
  ctx.log(f"pretraining the base model on {len(human)} human solutions ({c.base.steps} steps)")
  pre_cfg = ml_collections.ConfigDict(c.train.to_dict())
  pre_cfg.update(learning_rate=c.base.learning_rate, batch_size=c.base.batch_size,
                 max_steps=c.base.steps, schedule="cosine")
  pre_cfg.lora.rank = 0  # A model from scratch trains every weight (train.lora: M-steps only).
  init = model.init_params(ctx.model_cfg, ctx.mesh, jax.random.key(c.seed))
  examples = ctx.examples([(p.prompt, p.target) for p in human])
  return ctx.finetune(Trained(init), examples, ctx.layout.base.train, seed=c.seed,
                      train_cfg=pre_cfg, validate=False)


def m_step(ctx: RunContext, start: Trained, m: wd.ModelPaths, iteration: int,
           stats: dict) -> tuple[Trained, dict]:
  """Improve(start, D_i): fine-tune `start` on the kept samples in m.samples."""
  ctx.log(f"iteration {iteration}: improve on {stats['kept']} kept samples "
          f"({stats['problems_solved']}/{stats['problems']} problems solved)")
  examples = ctx.kept_examples(m)
  if not examples:
    # An outcome, not bad input: nothing was solved, so there is nothing to
    # learn from; the iterate stays the start model and the run goes on.
    logging.warning("iteration %d: the E-step kept no correct samples; this iteration's "
                    "model is its start model unchanged (more samples or an easier task "
                    "would help)", iteration)
    return ctx.unchanged(start), {"steps": 0, "stopped": "no_samples"}
  return ctx.finetune(start, examples, m.train, seed=ctx.config.seed + iteration)


def sft_baseline(ctx: RunContext, base: Trained, human: list[Problem]) -> tuple[Trained, dict]:
  """The paper's baseline: theta_base fine-tuned on the human solutions instead of D_i."""
  ctx.log(f"SFT baseline: fine-tuning the base on {len(human)} human solutions")
  examples = ctx.examples([(p.prompt, p.target) for p in human])
  return ctx.finetune(base, examples, ctx.layout.sft.train, seed=ctx.config.seed + 1000)


def run(config: ml_collections.ConfigDict, workdir: str, override: bool = False) -> list[dict]:
  """Runs (or resumes) the whole experiment; returns one eval dict per model."""
  preflight.check(config)  # main did already; here for callers of the library
  distributed.initialize(config.distributed)
  with preemption.handling():  # SIGTERM: stop at the next safe point (preemption.py)
    return _run(config, workdir, override)


def _run(config: ml_collections.ConfigDict, workdir: str, override: bool) -> list[dict]:
  ctx = RunContext(config, workdir, override)  # all input checks happen here, before long work
  c, layout = config, ctx.layout

  if c.base.source in ("checkpoint", "import"):
    base = ctx.restored_base()
  else:
    base = ctx.trained(layout.base, functools.partial(pretrain_base, ctx))
  results = [ctx.evaluated(layout.base, base.params)]

  teacher = (ctx.restore(c.restem.teacher_path).params if c.restem.sample_from == "teacher"
             else None)
  current = base
  for i in range(1, c.restem.num_iterations + 1):
    it = layout.iteration(i)
    # E-step: sample theta_{i-1} (or the teacher), keep the correct samples.
    stats = ctx.generated(it, teacher if teacher is not None else current.params, i)
    if i == 1:  # theta_base is not sampled after its evaluation and the first E-step.
      base = current = ctx.frozen(base)
    # M-step: fine-tune theta_base (ReST-EM) or theta_{i-1} (ReST; with LoRA: its adapters).
    start = base if c.restem.finetune_from == "base" else current
    # The M-step reads `start` alone: from ReST-EM's base, theta_{i-1} is not held beside
    # it (that would hold two models beside the train state; tests/test_lora.py counts live arrays).
    current = None
    current = ctx.trained(it, functools.partial(m_step, ctx, start, it, i, stats), base)
    results.append(ctx.evaluated(it, current.params, samples_kept=stats["kept"],
                                 problems_solved=stats["problems_solved"],
                                 grader_faults=stats["grader_faults"]))

  human = ctx.task.human_solutions() if c.restem.sft_baseline else []
  if c.restem.sft_baseline and not human:
    # An outcome of the data, not bad input: nothing to fine-tune on.
    logging.warning("restem.sft_baseline: skipped, task %r has no human solutions in its "
                    "train split (e.g. reasoning-gym generators without worked solutions)",
                    c.task.name)
  elif human:
    sft = ctx.trained(layout.sft, functools.partial(sft_baseline, ctx, base, human), base)
    results.append(ctx.evaluated(layout.sft, sft.params, samples_kept=len(human)))

  if ctx.coordinator:
    report.write_summary(workdir, results, c.eval)
    report.write_html(workdir)
    ctx.log(f"export the best iteration: {export.command_for(workdir) or 'none finished'}")
  return results
