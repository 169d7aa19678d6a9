"""Binary reward for reasoning-gym problems: the dataset's own `score_answer`, in workers.

A reasoning-gym scorer is third-party Python run on model output (some parse
expressions, simulate puzzles or call sympy), so it runs where math-verify runs:
in the grader's spawned worker processes, under a CPU-time timer, with a worker
that hangs in C or dies replaced alone. A hanging or crashing scorer costs that
one sample (reward 0), never the run. The pool is MathGrader's; only the check
each worker runs differs.

The task's spec (tasks/datasets/reasoning_gym.py) hands the grader its answer
extractor and its scorer, module-level functions: spawn pickles them by name and
each worker imports them, so rewards/ never imports tasks/.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing.connection
import signal
from typing import Callable, Optional

from restem_jax.rewards import math as math_reward

ScoreAnswer = Callable[[str, str], float]  # (gold locator, extracted answer) -> 0.0 .. 1.0


def _score_in_worker(score_answer: ScoreAnswer, gold: str, answer: str,
                     timeout_s: float) -> bool:
  signal.signal(signal.SIGPROF, math_reward._on_timer)  # pylint: disable=protected-access
  signal.setitimer(signal.ITIMER_PROF, timeout_s)
  try:
    return score_answer(gold, answer) == 1.0
  except BaseException:  # pylint: disable=broad-except
    return False  # A scorer that raises (or runs out of time) scores 0 for this sample.
  finally:
    signal.setitimer(signal.ITIMER_PROF, 0)


def _worker_main(score_answer: ScoreAnswer, conn: multiprocessing.connection.Connection) -> None:
  logging.disable(logging.WARNING)
  import reasoning_gym  # pylint: disable=import-outside-toplevel,unused-import  # warm the import
  math_reward.serve_checks(conn, functools.partial(_score_in_worker, score_answer))


class ReasoningGymGrader(math_reward.MathGrader):
  """Scores (gold locator, completion) pairs with the source datasets' own scorers.

  score_answer(gold, answer) runs in the workers and must be picklable (a module-level
  function); extract_answer(completion) -> the answer text or None runs here.
  """

  _worker_target = staticmethod(_worker_main)  # (score_answer, conn); tests swap it.

  def __init__(self, score_answer: ScoreAnswer,
               extract_answer: Callable[[str], Optional[str]],
               num_workers: int = 2, timeout_s: float = 5.0):
    super().__init__(num_workers=num_workers, timeout_s=timeout_s)
    self._extract_answer = extract_answer
    # An instance attribute shadows the class's target: what each spawned worker runs.
    self._worker_target = functools.partial(type(self)._worker_target, score_answer)

  def score(self, golds: list[str], outputs: list[str]) -> list[float]:
    return [g.reward for g in self.score_detailed(golds, outputs)]

  def score_detailed(self, golds: list[str], outputs: list[str]) -> list[math_reward.Grade]:
    """Grades of (gold locator, post-processed completion) pairs, with grader faults."""
    if len(golds) != len(outputs):
      raise ValueError(f"score: {len(golds)} golds but {len(outputs)} outputs")
    answers = [self._extract_answer(o) for o in outputs]
    # Unique (gold, answer) pairs only: samples repeat answers, and each check is a
    # round trip to a worker. No answer line = reward 0 without a check.
    unique = list(dict.fromkeys((g, a) for g, a in zip(golds, answers) if a is not None))
    verdict = dict(zip(unique, self._run(unique, self.timeout_s))) if unique else {}
    grades = []
    for g, a in zip(golds, answers):
      ok, fault = verdict.get((g, a), (False, None))
      if fault:
        self.faults[fault] += 1
      grades.append(math_reward.Grade(1.0 if ok else 0.0, fault))
    return grades
