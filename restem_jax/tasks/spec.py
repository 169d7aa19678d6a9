"""What a dataset is: the frozen spec each module under tasks/datasets/ defines.

A spec says where the problems come from (reader + layout check, splits), how
they are prompted (format, exemplars, stop strings) and how a completion is
post-processed and scored; `Task` (task.py) composes one with seqio registration,
a vocabulary and robust scoring. Adding a dataset = one module defining `SPEC`
and one line in tasks/datasets/__init__.py.

Readers return raw records: dicts of strings
  id        stable unique id, e.g. "gsm8k/train/00017"
  question  the raw question
  hint      text between question and answer cue (APPS starter code + format line)
  target    human solution in the prompt's format, "" when there is none
  gold      what `score` compares against (math: final answer; code: JSON job)
  level     difficulty bucket (`DatasetSpec.difficulty` says what it holds)
"""
from __future__ import annotations

import dataclasses
import functools
import random
from typing import Any, Callable, Optional, Sequence

from etils import epath

from restem_jax.tasks import prompts, scoring

SplitBuilder = Callable[[str], list]  # split ("train"/"validation"/"test") -> records


class DataLayoutError(ValueError):
  """The dataset is unknown, or its data_dir is missing or not in the expected layout."""


@dataclasses.dataclass(frozen=True)
class Problem:
  id: str  # Stable unique id, e.g. "gsm8k/train/00017".
  question: str  # The raw question.
  prompt: str  # Few-shot exemplars + question, formatted; the model continues after it.
  target: str  # A human-written solution ("" when the split has answers only).
  gold: str  # math: final answer; code: JSON job dict for rewards/code.py.
  level: str  # Difficulty bucket ("Level 3", "introductory", "steps=3", ...).


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset. Subclasses override the methods; the fields are constants."""

  name: str  # config.task.name.
  # What `score` checks: a built-in reward kind (scoring.REWARDS: "math", "code") that the
  # default `score` runs, or a label of the spec's own `score` ("exact_int", "reasoning_gym").
  reward: str
  stop_strings: tuple[str, ...]  # Where a completion stops being an answer.
  difficulty: str  # What Problem.level holds.
  splits: tuple[str, ...] = ("train", "test")  # The splits the source has.
  human_solutions: bool = True  # Train problems can carry a human solution (SFT, pretraining).
  layout: str = ""  # The data_dir layout expected (for errors); "" = needs no data_dir.
  exemplars: str = ""  # Few-shot exemplar file under tasks/data/; "" = none shipped.
  # Majority voting groups samples by this key of a completion; None = no voting.
  answer_key: Optional[Callable[[str], Optional[str]]] = None
  # task.prompt_format = "chat": the text before the question in the last user
  # message (tasks/chat.py); None = the dataset has no chat format.
  chat_before: Optional[str] = None

  # --- data ------------------------------------------------------------------------

  def layout_error(self, data_dir: str, why: str) -> DataLayoutError:
    return DataLayoutError(f"{self.name}: data_dir {data_dir!r} {why}; expected {self.layout}")

  def for_config(self, task_cfg: Any) -> "DatasetSpec":
    """The spec a task_cfg uses: itself, or (a spec whose constants come from the config,
    e.g. jsonl's stop strings) a copy with those fields set."""
    del task_cfg
    return self

  def check_layout(self, data_dir: str, task_cfg: Any = None) -> None:
    """The data's checks before a model loads (built-in specs: paths only, nothing read;
    jsonl also reads its files with task_cfg): one-line DataLayoutError naming the layout."""
    del task_cfg
    if not self.layout:
      return
    if not data_dir:
      raise self.layout_error(data_dir, "is not set (task.data_dir)")
    if not epath.Path(data_dir).is_dir():
      raise self.layout_error(data_dir, "does not exist")
    self.check_files(data_dir)

  def check_files(self, data_dir: str) -> None:
    """The dataset's own files under an existing data_dir (see check_layout)."""

  def check_readable(self, data_dir: str) -> None:
    """A deeper check run when the task is built (may import a reader library)."""

  def config_key(self, task_cfg: Any) -> dict:
    """The spec's own task_cfg fields that change its problems (hashed into the
    seqio task name with data_dir, few_shot, seed and the split sizes)."""
    del task_cfg
    return {}

  def split_builder(self, task_cfg: Any, data_dir: str) -> SplitBuilder:
    """split -> the records of that final split, carved and capped per task_cfg."""
    raise NotImplementedError

  # --- prompts and completions ------------------------------------------------------

  def prompt_format(self, few_shot: int) -> prompts.PromptFormat:
    raise NotImplementedError

  def prompt_format_for(self, task_cfg: Any) -> prompts.PromptFormat:
    """The format for this task_cfg; a spec whose exemplars depend on more than
    few_shot (e.g. drawn from its generators by seed) overrides this."""
    return self.prompt_format(int(task_cfg.few_shot))

  def chat_exemplars(self, task_cfg: Any) -> list[tuple[str, str]]:
    """task.prompt_format = "chat": the few-shot exemplars as (user, assistant) messages,
    the user one starting with `chat_before`, the assistant one in the answer format."""
    raise NotImplementedError(f"{self.name} has no chat format")

  def postprocess(self, completion: str) -> str:
    """The answer part of a sampled completion: cut where the next exemplar starts."""
    return prompts.truncate(self.stop_strings, completion)

  def score(self, problems: Sequence[Problem], completions: Sequence[str], task_cfg: Any,
            workers: Any) -> list[float]:
    """Binary rewards of raw completions. `workers` (scoring.Workers) hands out the
    task's grader processes / sandboxes; Task makes this robust to failing items.
    This runs the built-in reward named by `reward`; a spec with its own check overrides it."""
    del task_cfg
    if self.reward not in scoring.REWARDS:
      raise NotImplementedError(f"{self.name}: reward {self.reward!r} is not built in "
                                f"({', '.join(scoring.REWARDS)}); override DatasetSpec.score")
    return scoring.REWARDS[self.reward](self, problems, completions, workers)


# --- Official train/test files: validation carved out of train, test capped, by seed.

def select(records: Sequence[dict], num_val: int, num_train: int, seed: int,
           protect: int = 0) -> tuple[list[dict], list[dict]]:
  """(train, validation) from the official train records, deterministic in `seed`.

  Validation is a seeded random subset of records[protect:]; the first `protect`
  records always stay in train. `num_train` > 0 keeps a seeded random subset of
  train (protected ones first); order within a split is the source order.
  """
  rng = random.Random(f"restem_split/{seed}")
  candidates = list(range(protect, len(records)))
  rng.shuffle(candidates)
  val_idx = set(candidates[:num_val])
  rest = list(range(protect)) + candidates[num_val:]
  if num_train > 0:
    rest = rest[:num_train]
  keep = set(rest)
  train = [r for i, r in enumerate(records) if i in keep]
  val = [r for i, r in enumerate(records) if i in val_idx]
  return train, val


def cap(records: Sequence[dict], n: int, seed: int) -> list[dict]:
  """A seeded random subset of n records in source order (all when n <= 0)."""
  if n <= 0 or n >= len(records):
    return list(records)
  idx = list(range(len(records)))
  random.Random(f"restem_cap/{seed}").shuffle(idx)
  keep = set(idx[:n])
  return [r for i, r in enumerate(records) if i in keep]


@dataclasses.dataclass(frozen=True)
class OfficialDataset(DatasetSpec):
  """A dataset with official splits read by `read`; splits it lacks are empty."""

  def read(self, data_dir: str, split: str, task_cfg: Any = None) -> list[dict]:
    """All records of an official split, in a stable order."""
    raise NotImplementedError

  def config_key(self, task_cfg: Any) -> dict:
    # Part of every official dataset's seqio name since apps_difficulty exists:
    # kept for all of them so that the names stay what they were.
    return {"apps_difficulty": str(task_cfg.get("apps_difficulty", ""))}

  def split_builder(self, task_cfg: Any, data_dir: str) -> SplitBuilder:
    @functools.lru_cache(maxsize=None)
    def official(split: str) -> tuple[dict, ...]:
      if split not in self.splits:
        return ()
      return tuple(self.read(data_dir, split, task_cfg))

    def build(split: str) -> list[dict]:
      if split == "test":
        return cap(official("test"), int(task_cfg.num_test), int(task_cfg.seed))
      train, val = select(official("train"), int(task_cfg.num_val), int(task_cfg.num_train),
                          int(task_cfg.seed))
      return train if split == "train" else val
    return build
