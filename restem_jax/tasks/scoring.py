"""Scoring pieces specs share: the task's worker pools and the math / code rewards.

The rewards themselves live in restem_jax/rewards/ (imported on first use, so
importing the tasks package stays cheap); this module only hands a spec the
pool it needs and turns problems + completions into their arguments.
"""
from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

if TYPE_CHECKING:  # spec.py imports this module: DatasetSpec.score runs REWARDS.
  from restem_jax.tasks.spec import DatasetSpec, Problem


class Workers:
  """The grader processes and sandboxes of one Task, started on first use.

  A spec asks for `math_grader()` / `code_executor()`, or keeps a pool of its own
  under a key with `get(key, make)` (e.g. a dataset's own answer checker run in
  worker processes): made once, kept as long as the Task.
  """

  def __init__(self, task_cfg: Any):
    self._cfg = task_cfg
    self._pools: dict[str, Any] = {}
    self._faults: list[Optional[str]] | None = None

  def record_faults(self, faults: Sequence[Optional[str]]) -> None:
    """A reward function's per-item grader faults (None: the grader gave a verdict;
    else why it could not: "worker died", "sandbox hung", ...), for `take_faults`."""
    self._faults = list(faults)

  def take_faults(self, n: int) -> list[Optional[str]]:
    """The faults recorded by the last scoring call of n items (all None if it recorded
    none: rewards without grader processes cannot fault); clears them."""
    faults, self._faults = self._faults, None
    return faults if faults is not None and len(faults) == n else [None] * n

  def get(self, key: str, make: Callable[[], Any]) -> Any:
    if key not in self._pools:
      self._pools[key] = make()
    return self._pools[key]

  def math_grader(self):
    """rewards.math.MathGrader sized by task.grader_workers / grader_timeout_s."""
    def make():
      from restem_jax.rewards.math import MathGrader  # pylint: disable=import-outside-toplevel
      return MathGrader(
          num_workers=int(self._cfg.get("grader_workers", 2)),
          timeout_s=float(self._cfg.get("grader_timeout_s", 5.0)),
          fallback_last_number=bool(self._cfg.get("fallback_last_number", False)))
    return self.get("math", make)

  def code_executor(self):
    """The process's rewards.code.CodeExecutor with task.code_workers sandboxes."""
    return self.get("code", lambda: _shared_executor(int(self._cfg.get("code_workers", 2))))


@functools.lru_cache(maxsize=None)
def _shared_executor(num_workers: int):
  # One executor per process: its sandboxes run under per-slot uids, and two
  # executors in one process would hand out the same uids.
  from restem_jax.rewards.code import CodeExecutor  # pylint: disable=import-outside-toplevel
  return CodeExecutor(num_workers=num_workers)


def final_answer_key(text: str) -> Optional[str]:
  """Majority-voting key: the normalised final answer (rewards.math's extraction)."""
  from restem_jax.rewards import math as math_reward  # pylint: disable=import-outside-toplevel
  ans = math_reward.extract_answer(text)
  return None if ans is None else math_reward.normalize_answer(ans)


def math_rewards(spec: DatasetSpec, problems: Sequence[Problem], completions: Sequence[str],
                 workers: Workers) -> list[float]:
  """Final answer of each post-processed completion vs the problem's gold answer."""
  grades = workers.math_grader().score_detailed([p.gold for p in problems],
                                               [spec.postprocess(c) for c in completions])
  workers.record_faults([g.fault for g in grades])
  return [g.reward for g in grades]


_FENCED = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.S)


def program_of(completion: str) -> str:
  """The program in a completion: its first fenced block, else the whole text."""
  fenced = _FENCED.search(completion)
  return fenced.group(1) if fenced else completion


def code_job(spec: Any, problem: Problem, completion: str) -> dict:
  """The job dict for rewards/code.py: the problem's test spec (its gold) plus the
  program to run, `spec.completion_to_program(problem, completion)`."""
  job = json.loads(problem.gold)
  job["program"] = spec.completion_to_program(problem, completion)
  return job


def code_rewards(spec: Any, problems: Sequence[Problem], completions: Sequence[str],
                 workers: Workers) -> list[float]:
  """Each completion's program run against its problem's tests in the sandbox."""
  outcomes = workers.code_executor().score_detailed([code_job(spec, p, c)
                                                     for p, c in zip(problems, completions)])
  workers.record_faults([o.fault for o in outcomes])
  return [o.reward for o in outcomes]


# DatasetSpec.reward -> the reward the default DatasetSpec.score runs.
REWARDS: dict[str, Callable[..., list[float]]] = {"math": math_rewards, "code": code_rewards}
