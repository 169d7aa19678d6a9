"""Rewards of a user's task (task.name = "jsonl"): a completion against its data row.

    final_answer(completion)   the answer part: the last non-empty line, after a
                               trailing "Answer:" / "the answer is" if it has one
    exact_reward(c, answer)    normalised string match (case, spaces, a final ".")
    RowGrader                  fn(completion, row) -> float in grader workers: a user
                               function by import path ("pkg.module:fn" or
                               "/path/reward.py:fn"), or reasoning-gym's scorer of one
                               dataset ("reasoning_gym:<dataset>")

A user reward runs in the grader pool (rewards/pool.py), imported inside each worker,
under a CPU-time timer of task.grader_timeout_s. ReST-EM's reward is binary: it must
return 1.0 or 0.0 (True / False), or, with `threshold` > 0, a value in [0, 1] that
counts as 1 from the threshold up. A reward that raises, runs out of time, hangs or
returns anything else is a grader fault: the sample scores 0, the fault is counted
(restem.max_fault_fraction) and logged with its message; the run goes on.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import re
import sys
from typing import Any, Callable, Sequence

from restem_jax.rewards import pool

_ANSWER_CUE = re.compile(r"(?i)(?:\bthe\s+(?:final\s+)?answer\s+is\b|\banswer\s*:)\s*")


def final_answer(completion: str) -> str:
  """The completion's last non-empty line, from its last answer cue on, stripped."""
  lines = [l for l in str(completion).strip().splitlines() if l.strip()]
  if not lines:
    return ""
  return _ANSWER_CUE.split(lines[-1])[-1].strip()


def normalize(text: Any) -> str:
  """Case-folded, inner whitespace collapsed, surrounding space and a final "." removed."""
  s = " ".join(str(text).split()).casefold()
  return s[:-1].rstrip() if s.endswith(".") else s


def exact_reward(completion: str, answer: Any) -> float:
  """1.0 iff the completion's final answer equals `answer`, both normalised."""
  return 1.0 if normalize(final_answer(completion)) == normalize(answer) else 0.0


# ----------------------------------------------------------------------------- user functions


class RewardImportError(ValueError):
  """task.reward_fn cannot be used: the message is one line naming it."""


def _load_module(path_or_name: str) -> Any:
  if path_or_name.endswith(".py") or os.sep in path_or_name:
    path = os.path.abspath(path_or_name)
    if not os.path.isfile(path):
      raise RewardImportError(f"file {path} does not exist")
    # One module name per file, so that it pickles by reference and loads once.
    name = "restem_user_reward_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if name in sys.modules:
      return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
      spec.loader.exec_module(module)
    except BaseException:
      del sys.modules[name]
      raise
    return module
  return importlib.import_module(path_or_name)


def load_reward_fn(ref: str) -> Callable[[str, dict], Any]:
  """The function `ref` names ("package.module:function" or "/path/file.py:function"),
  imported; RewardImportError (one line) if it cannot be imported or called as
  fn(completion, row)."""
  module_ref, sep, fn_name = str(ref).rpartition(":")
  if not sep or not module_ref or not fn_name.isidentifier():
    raise RewardImportError(f"{ref!r} is not 'package.module:function' or "
                            "'/path/file.py:function'")
  try:
    module = _load_module(module_ref)
  except RewardImportError:
    raise
  except BaseException as e:  # pylint: disable=broad-except  (the user's import-time code)
    first = str(e).splitlines()[0] if str(e) else ""
    raise RewardImportError(f"cannot import {module_ref}: {type(e).__name__}: {first}") from None
  fn = getattr(module, fn_name, None)
  if fn is None:
    raise RewardImportError(f"{module_ref} has no function {fn_name!r}")
  if not callable(fn):
    raise RewardImportError(f"{module_ref}.{fn_name} is not callable "
                            f"(a {type(fn).__name__})")
  try:
    inspect.signature(fn).bind("completion", {})
  except TypeError:
    raise RewardImportError(f"{module_ref}.{fn_name} cannot be called as fn(completion, row)"
                            ) from None
  except ValueError:
    pass  # A builtin without a signature: try it.
  return fn


def _reasoning_gym_fn(dataset: str) -> Callable[[str, dict], float]:
  import reasoning_gym  # pylint: disable=import-outside-toplevel
  score = reasoning_gym.get_score_answer_fn(dataset)

  def fn(completion: str, row: dict) -> float:
    # Partial credit (some datasets give it for a near miss) is not ReST-EM's reward.
    return 1.0 if score(final_answer(completion), row) == 1.0 else 0.0
  return fn


@functools.lru_cache(maxsize=None)
def resolve(kind: str, target: str) -> Callable[[str, dict], Any]:
  """The row reward in this process: kind "fn" (target: import path) or
  "reasoning_gym" (target: the dataset name)."""
  if kind == "reasoning_gym":
    return _reasoning_gym_fn(target)
  if kind == "fn":
    return load_reward_fn(target)
  raise ValueError(f"unknown row reward kind {kind!r}")


def binary(value: Any, threshold: float) -> pool.Verdict:
  """A reward's return value as ReST-EM's binary reward, or the fault it is."""
  if isinstance(value, bool) or type(value).__name__ == "bool_":
    return pool.Verdict(bool(value))
  if not isinstance(value, numbers.Real) or math.isnan(float(value)):
    return pool.Verdict(False, "reward not a number", f"returned {value!r:.80}")
  v = float(value)
  if v in (0.0, 1.0):
    return pool.Verdict(v == 1.0)
  if threshold > 0 and 0.0 <= v <= 1.0:
    return pool.Verdict(v >= threshold)
  why = ("is outside [0, 1]" if threshold > 0 else
         "is not 1.0 or 0.0 (ReST-EM's reward is binary; set task.reward_threshold to say "
         "where 1 starts)")
  return pool.Verdict(False, "reward not 0 or 1", f"returned {v!r}, which {why}")


def check_in_worker(kind: str, target: str, threshold: float, completion: str, row_json: str,
                    timeout_s: float) -> pool.Verdict:
  """One (completion, row) in a grader worker: the reward under a CPU-time limit."""
  fn = resolve(kind, target)
  row = json.loads(row_json)
  try:
    with pool.cpu_time_limit(timeout_s):
      value = fn(completion, row)
  except pool.CheckTimeout:
    return pool.Verdict(False, "reward timed out", f"over {timeout_s:g} s of CPU time")
  except BaseException as e:  # pylint: disable=broad-except  (SystemExit too: a user's exit())
    first = str(e).splitlines()[0] if str(e) else ""
    return pool.Verdict(False, "reward raised", f"{type(e).__name__}: {first:.200}")
  return binary(value, threshold)


def _setup_in_worker(kind: str, target: str) -> None:
  resolve(kind, target)  # Import (and warm) the reward once, before the first sample.


class RowGrader(pool.GraderPool):
  """Scores (completion, row) pairs with a row reward run in grader workers."""

  start_hint = "the reward cannot be imported in a fresh process"

  def __init__(self, kind: str, target: str, threshold: float = 0.0, num_workers: int = 2,
               timeout_s: float = 5.0):
    super().__init__(check=functools.partial(check_in_worker, kind, target, float(threshold)),
                     setup=functools.partial(_setup_in_worker, kind, target),
                     num_workers=num_workers, timeout_s=timeout_s)
    self.kind, self.target = kind, target

  def score(self, completions: Sequence[str], rows: Sequence[dict]) -> list[float]:
    return [g.reward for g in self.score_detailed(completions, rows)]

  def score_detailed(self, completions: Sequence[str], rows: Sequence[dict]
                     ) -> list[pool.Grade]:
    """A Grade per (completion, row): unique pairs checked once, faults counted per sample."""
    if len(completions) != len(rows):
      raise ValueError(f"score: {len(completions)} completions but {len(rows)} rows")
    keys = [(str(c), json.dumps(r, sort_keys=True)) for c, r in zip(completions, rows)]
    unique = list(dict.fromkeys(keys))
    verdict = dict(zip(unique, self._run_verdicts(unique, self.timeout_s))) if unique else {}
    grades = []
    for k in keys:
      v = verdict[k]
      if v.fault:
        self.faults[v.fault] += 1
      grades.append(pool.Grade(1.0 if v.ok else 0.0, v.fault))
    return grades
