"""Metrics against independent references: exact combinatorics and enumeration."""
import itertools
import math
from fractions import Fraction

import pytest

from restem_jax import metrics


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 2), (6, 3, 4), (10, 0, 3), (10, 10, 3),
                                   (8, 1, 8), (20, 7, 5), (1, 1, 1), (3, 0, 1)])
def test_pass_at_k_equals_exact_binomial_formula(n, c, k):
  exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
  assert metrics.pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_equals_enumeration_over_subsets():
  # pass@k is the probability that a random k-subset holds a correct sample.
  samples = [1, 0, 0, 1, 0, 0, 0]
  for k in range(1, 8):
    subsets = list(itertools.combinations(samples, k))
    frac = sum(any(s) for s in subsets) / len(subsets)
    assert metrics.pass_at_k(len(samples), sum(samples), k) == pytest.approx(frac)


def test_pass_at_1_is_the_fraction_correct_and_large_n_is_stable():
  assert metrics.pass_at_k(64, 16, 1) == pytest.approx(0.25)
  # comb(1000, 500) overflows floats; the product form must not.
  p = metrics.pass_at_k(1000, 1, 500)
  assert p == pytest.approx(0.5)


def test_pass_at_k_rejects_bad_counts():
  with pytest.raises(ValueError, match="needs at least k=4 samples"):
    metrics.pass_at_k(3, 1, 4)
  with pytest.raises(ValueError, match="0 <= c <= n"):
    metrics.pass_at_k(3, 4, 1)


def test_majority_vote_counts_and_breaks_ties_by_first_seen():
  assert metrics.majority_vote(["3", "5", "5", None, "3", "5"]) == "5"
  assert metrics.majority_vote(["7", "2", "2", "7"]) == "7"
  assert metrics.majority_vote([None, None]) is None
  assert metrics.majority_correct(["4", "4", "9"], [1.0, 1.0, 0.0]) == 1.0
  assert metrics.majority_correct(["4", "9", "9"], [1.0, 0.0, 0.0]) == 0.0
  assert metrics.majority_correct([None, None], [0.0, 0.0]) == 0.0


def test_by_bucket_hand_count():
  levels = ["L1", "L2", "L1", "L3", "L1"]
  vals = [1.0, 0.0, 0.0, 1.0, 1.0]
  assert metrics.by_bucket(levels, vals) == {"L1": pytest.approx(2 / 3), "L2": 0.0, "L3": 1.0}


@pytest.mark.parametrize("k,n", [(81, 263), (0, 20), (20, 20), (50, 100), (3, 500)])
def test_wilson_interval_matches_scipy(k, n):
  from scipy.stats import binomtest  # Independent implementation (scipy comes with jax).
  ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
  assert metrics.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
