"""Evaluation metrics: unbiased pass@k, majority voting, difficulty buckets."""
from __future__ import annotations

import collections
from typing import Hashable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k estimator 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

  n samples of which c are correct. Computed as a product so that large n does
  not overflow and small probabilities keep their precision.
  """
  if not 0 <= c <= n:
    raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
  if k > n:
    raise ValueError(f"pass@{k} needs at least k={k} samples per problem, got n={n}")
  if n - c < k:
    return 1.0
  prob_all_wrong = 1.0
  for i in range(n - c + 1, n + 1):
    prob_all_wrong *= 1.0 - k / i
  return 1.0 - prob_all_wrong


def mean_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> float:
  if not correct_counts:
    return float("nan")
  return sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)


def majority_vote(answers: Sequence[Hashable | None]) -> Hashable | None:
  """Most frequent non-None answer; ties go to the answer seen first.

  Ties are broken by first occurrence rather than at random so that maj@k is a
  deterministic function of the samples (resumed runs report the same number).
  """
  counts = collections.Counter(a for a in answers if a is not None)
  if not counts:
    return None
  best = max(counts.values())
  for a in answers:
    if a is not None and counts[a] == best:
      return a
  return None  # unreachable


def majority_correct(answers: Sequence[Hashable | None], rewards: Sequence[float]) -> float:
  """1.0 if the majority answer is correct.

  Correctness of the voted answer is read off a sample that produced it, so
  the grader (with its notion of equivalence) is the judge, not string equality
  with the gold.
  """
  voted = majority_vote(answers)
  if voted is None:
    return 0.0
  return float(next(r for a, r in zip(answers, rewards) if a == voted) > 0)


def by_bucket(levels: Sequence[str], values: Sequence[float]) -> dict[str, float]:
  """Mean of `values` per difficulty bucket (Fig. 8 of the paper)."""
  sums: dict[str, list[float]] = collections.defaultdict(list)
  for lvl, v in zip(levels, values):
    sums[lvl].append(v)
  return {lvl: sum(v) / len(v) for lvl, v in sorted(sums.items())}



def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
  """95% Wilson score interval of a binomial proportion (better than p +- 1.96 se near 0/1)."""
  if n <= 0 or not 0 <= successes <= n:
    raise ValueError(f"wilson_interval needs 0 <= successes <= n and n > 0, got {successes}/{n}")
  p = successes / n
  denom = 1 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
  # Exact ends at 0 / n successes (the bound is the rate itself; rounding would move it).
  return (0.0 if successes == 0 else max(0.0, center - half),
          1.0 if successes == n else min(1.0, center + half))
