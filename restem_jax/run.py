"""The ReST-EM run: Algorithm 1 of Singh et al. (2024), resumable.

    theta_base = pretrained LM                            (ensure_base)
    for i in 1..I:
        D_i   = Generate(theta_{i-1} or teacher, D_train)  (generate.generate)
        theta_i = Improve(theta_base or theta_{i-1}, D_i)  (improve.improve)
        evaluate(theta_i)                                 (evaluate.evaluate)

Every phase is recorded in progress.json once its outputs are on disk, so
rerunning the same command after a kill continues where it stopped (see
workdir.py for the layout and resume order).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
from etils import epath

from restem_jax import (checkpoints, distributed, evaluate, generate, improve, model,
                        partitioning, report, sampling, tasks, workdir as wd)
from restem_jax.improve import Example
from restem_jax.tasks import samples as samples_lib
from restem_jax.training import NonFiniteLossError

# Errors that mean "your input is wrong": main.py prints them as one line.
USER_ERRORS = (partitioning.ConfigError, wd.WorkdirError, checkpoints.CheckpointError,
               tasks.DataLayoutError, NonFiniteLossError)


def load_vocabulary(task_cfg: ml_collections.ConfigDict) -> Any:
  """The tokenizer named by task.vocab_path (None = the task's default)."""
  path = task_cfg.vocab_path
  if not path:
    return None
  if not wd.exists(path):
    raise partitioning.ConfigError(f"task.vocab_path={path!r} does not exist; point it at a "
                                   "SentencePiece .model, a tokenizer.json or a .gguf file")
  if path.endswith(".model"):
    import seqio  # pylint: disable=import-outside-toplevel
    return seqio.SentencePieceVocabulary(path)
  from restem_jax import importers  # pylint: disable=import-outside-toplevel
  return importers.load_vocabulary(path)


class RunContext:
  """What every phase needs: config, mesh, task, sampler, splits."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config, self.workdir = config, workdir
    self.model_cfg = model.ModelConfig.from_config(config.model)
    self.mesh = partitioning.make_mesh(config.mesh)
    partitioning.check_model_fits_mesh(self.model_cfg, self.mesh)
    self.task = tasks.get_task(config.task, vocabulary=load_vocabulary(config.task))
    vocab = self.task.vocabulary
    if vocab.vocab_size > self.model_cfg.vocab_size:
      raise partitioning.ConfigError(
          f"the task's vocabulary has {vocab.vocab_size} tokens but model.vocab_size="
          f"{self.model_cfg.vocab_size}; raise model.vocab_size")
    max_prompt = self.model_cfg.max_seq_len - config.sampling.max_new_tokens
    if max_prompt <= 0:
      raise partitioning.ConfigError(
          f"sampling.max_new_tokens={config.sampling.max_new_tokens} leaves no room for a prompt "
          f"in model.max_seq_len={self.model_cfg.max_seq_len}")
    self.train = self.task.problems("train", max_prompt_len=max_prompt)
    self.val = (self.task.problems("validation", max_prompt_len=max_prompt)
                if config.task.num_val > 0 else [])
    self.test = self.task.problems("test", max_prompt_len=max_prompt)
    for name, split in (("train", self.train), ("test", self.test)):
      if not split:
        raise partitioning.ConfigError(
            f"task {config.task.name!r} has no {name} problems that fit max_prompt_len="
            f"{max_prompt}; check task.data_dir and model.max_seq_len")
    self.sampler = sampling.Sampler(self.model_cfg, self.mesh, eos_id=vocab.eos_id,
                                    pad_id=vocab.pad_id, stop_strings=self.task.stop_strings,
                                    vocabulary=vocab)

  def log(self, msg: str) -> None:
    if distributed.is_coordinator():
      logging.info(msg)

  def examples(self, pairs: list[tuple[str, str]], weights: list[float]) -> list[Example]:
    """Tokenised (prompt, target) pairs; ones that do not fit are counted and skipped."""
    vocab, out, skipped = self.task.vocabulary, [], 0
    for (prompt, target), w in zip(pairs, weights):
      p, t = vocab.encode(prompt), vocab.encode(target) + [vocab.eos_id]
      if len(p) + len(t) > self.model_cfg.max_seq_len:
        skipped += 1
        continue
      out.append(Example(prompt=p, target=t, weight=float(w)))
    if skipped:
      logging.warning("skipped %d of %d training examples longer than model.max_seq_len=%d",
                      skipped, len(pairs), self.model_cfg.max_seq_len)
    return out

  def finetune(self, init_params: Any, examples: list[Example], out_dir: str, seed: int,
               train_cfg: ml_collections.ConfigDict | None = None,
               validate: bool = True) -> tuple[Any, dict]:
    c = self.config
    eval_fn = (evaluate.make_validation_fn(self.sampler, self.task, self.val,
                                           **evaluate.sampling_budget(c))
               if validate and self.val else None)
    # Pad to the longest example (rounded up to 16), not to max_seq_len: short
    # tasks then train at their own length, with one compile per M-step.
    longest = max((len(e.prompt) + len(e.target) for e in examples), default=1)
    seq_len = min(self.model_cfg.max_seq_len, -(-longest // 16) * 16)
    return improve.improve(model_cfg=self.model_cfg, train_cfg=train_cfg or c.train,
                           mesh=self.mesh, init_params=init_params, examples=examples,
                           seq_len=seq_len, eval_fn=eval_fn,
                           workdir=os.path.join(out_dir, "improve"), seed=seed, log=self.log)

  def evaluate(self, params: Any, seed: int) -> dict:
    c = self.config
    return evaluate.evaluate(params=params, sampler=self.sampler, task=self.task,
                             test_problems=self.test, train_problems=self.train,
                             eval_cfg=c.eval, **evaluate.sampling_budget(c), seed=seed,
                             log=self.log)

  def save(self, path: str, params: Any) -> None:
    checkpoints.save_params(path, params, metadata={"model": self.config.model.to_dict()})

  def restore(self, path: str) -> Any:
    return checkpoints.restore_params(path, self.model_cfg, self.mesh)

  def write_json(self, path: str, obj: Any) -> None:
    if distributed.is_coordinator():
      wd.write_json_atomic(path, obj)


def ensure_base(ctx: RunContext, progress: wd.Progress) -> Any:
  """theta_base: restored from a checkpoint, or pretrained on the human solutions."""
  c = ctx.config
  if c.base.source == "checkpoint":
    if not c.base.path:
      raise partitioning.ConfigError("base.source='checkpoint' needs base.path (an Orbax "
                                     "params dir, e.g. made by python -m restem_jax.importers)")
    return ctx.restore(c.base.path)
  if c.base.source != "pretrain":
    raise partitioning.ConfigError(f"base.source={c.base.source!r}: use 'pretrain' or 'checkpoint'")
  path = os.path.join(ctx.workdir, "base")
  if progress.is_done("base"):
    return ctx.restore(path)
  human = ctx.task.human_solutions()
  if not human:
    raise ValueError(f"base.source='pretrain' needs human solutions, task {c.task.name!r} has none")
  ctx.log(f"pretraining the base model on {len(human)} human solutions ({c.base.steps} steps)")
  pre_cfg = ml_collections.ConfigDict(c.train.to_dict())
  pre_cfg.update(learning_rate=c.base.learning_rate, batch_size=c.base.batch_size,
                 max_steps=c.base.steps, schedule="cosine")
  init = model.init_params(ctx.model_cfg, ctx.mesh, jax.random.key(c.seed))
  examples = ctx.examples([(p.prompt, p.target) for p in human], [1.0] * len(human))
  params, _ = ctx.finetune(init, examples, path + "_train", seed=c.seed, train_cfg=pre_cfg,
                           validate=False)
  ctx.save(path, params)
  progress.mark("base", write=distributed.is_coordinator())
  return params


def phase_eval(ctx: RunContext, progress: wd.Progress, name: str, out_dir: str, params: Any,
               extra: dict) -> dict:
  path = os.path.join(out_dir, "eval.json")
  if progress.is_done(f"eval_{name}"):
    return wd.read_json(path)
  result = {**ctx.evaluate(params, seed=ctx.config.seed), **extra, "iteration": name}
  ctx.write_json(path, result)
  if distributed.is_coordinator():
    report.write_tensorboard(ctx.workdir, name, result)
  progress.mark(f"eval_{name}", write=distributed.is_coordinator())
  return result


def run(config: ml_collections.ConfigDict, workdir: str, override: bool = False) -> list[dict]:
  """Runs (or resumes) the whole experiment; returns one eval dict per model."""
  distributed.initialize(config.distributed)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  wd.check_or_save_config(workdir, config, override, write=distributed.is_coordinator())
  ctx = RunContext(config, workdir)  # all input checks happen here, before long work
  progress = wd.Progress(workdir)
  c = config

  base = ensure_base(ctx, progress)
  results = [phase_eval(ctx, progress, "000", os.path.join(workdir, "base_eval"), base, {})]

  teacher = None
  if c.restem.sample_from == "teacher":
    teacher = ctx.restore(c.restem.teacher_path)
  elif c.restem.sample_from != "self":
    raise partitioning.ConfigError(f"restem.sample_from={c.restem.sample_from!r}: use 'self' or "
                                   "'teacher'")
  if c.restem.finetune_from not in ("base", "previous"):
    raise partitioning.ConfigError(f"restem.finetune_from={c.restem.finetune_from!r}: use 'base' "
                                   "or 'previous'")

  current = base
  for i in range(1, c.restem.num_iterations + 1):
    out_dir = wd.iter_dir(workdir, i)
    samples_dir = os.path.join(out_dir, "samples")
    if not progress.is_done(f"generate_{i:03d}"):
      ctx.log(f"iteration {i}: generate")
      generate.generate(params=teacher if teacher is not None else current, sampler=ctx.sampler,
                        task=ctx.task, problems=ctx.train, sampling_cfg=c.sampling,
                        max_per_problem=c.restem.max_per_problem, iteration=i,
                        out_dir=samples_dir, seed=c.seed, log=ctx.log)
      progress.mark(f"generate_{i:03d}", write=distributed.is_coordinator())
    gen_stats = generate.summarize(samples_dir)
    model_dir = os.path.join(out_dir, "model")
    if progress.is_done(f"improve_{i:03d}"):
      current = ctx.restore(model_dir)
    else:
      ctx.log(f"iteration {i}: improve on {gen_stats['kept']} kept samples "
              f"({gen_stats['problems_solved']}/{gen_stats['problems']} problems solved)")
      rows = samples_lib.read_samples(samples_dir)
      examples = ctx.examples([(r["prompt"], r["sample"]) for r in rows],
                              [r["reward"] for r in rows])
      start = base if c.restem.finetune_from == "base" else current
      if examples:
        current, info = ctx.finetune(start, examples, out_dir, seed=c.seed + i)
      else:
        # An outcome, not bad input: nothing was solved, so there is nothing to
        # learn from; the iterate stays the start model and the run goes on.
        logging.warning("iteration %d: the E-step kept no correct samples; this iteration's "
                        "model is its start model unchanged (more samples or an easier task "
                        "would help)", i)
        current, info = start, {"steps": 0, "stopped": "no_samples"}
      ctx.save(model_dir, current)
      ctx.write_json(os.path.join(out_dir, "improve.json"), info)
      progress.mark(f"improve_{i:03d}", write=distributed.is_coordinator())
    results.append(phase_eval(ctx, progress, f"{i:03d}", out_dir, current,
                              {"samples_kept": gen_stats["kept"],
                               "problems_solved": gen_stats["problems_solved"]}))

  if c.restem.sft_baseline:
    out_dir = os.path.join(workdir, "sft")
    model_dir = os.path.join(out_dir, "model")
    human = ctx.task.human_solutions()
    if progress.is_done("improve_sft"):
      sft = ctx.restore(model_dir)
    else:
      ctx.log(f"SFT baseline: fine-tuning the base on {len(human)} human solutions")
      examples = ctx.examples([(p.prompt, p.target) for p in human], [1.0] * len(human))
      sft, info = ctx.finetune(base, examples, out_dir, seed=c.seed + 1000)
      ctx.save(model_dir, sft)
      ctx.write_json(os.path.join(out_dir, "improve.json"), info)
      progress.mark("improve_sft", write=distributed.is_coordinator())
    results.append(phase_eval(ctx, progress, "sft", out_dir, sft,
                              {"samples_kept": len(human)}))

  if distributed.is_coordinator():
    report.write_summary(workdir, results, c.eval)
  return results
