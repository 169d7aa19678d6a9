"""report.load_run reads a workdir back; report.summary_table labels rows as asked."""
import json
import os

import pytest

from restem_jax import configlib, report


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def _jsonl(rows):
  return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def workdir(tmp_path):
  """A run cut off in its second E-step chunk: chunk 1 has a shard but no stats yet."""
  w = str(tmp_path)
  c = configlib.default_config()
  _write(os.path.join(w, "config.json"), c.to_json_best_effort())
  evals = {"base_eval": {"iteration": "000", "pass@1_greedy_test": 0.25},
           "sft": {"iteration": "sft", "pass@1_greedy_test": 0.5},
           "iter_001": {"iteration": "001", "pass@1_greedy_test": 0.375}}
  for d, r in evals.items():
    _write(os.path.join(w, d, "eval.json"), json.dumps(r))
  s = os.path.join(w, "iter_001", "samples")
  stats0 = [{"problem_id": "p0", "level": "1", "num_samples": 4, "num_correct": 2, "num_kept": 2},
            {"problem_id": "p1", "level": "2", "num_samples": 4, "num_correct": 0, "num_kept": 0}]
  kept0 = [{"problem_id": "p0", "prompt": "q0", "sample": s_, "reward": 1.0, "iteration": 1,
            "seed": 0} for s_ in ("a", "b")]
  _write(os.path.join(s, "stats_00000_p000.jsonl"), _jsonl(stats0))
  _write(os.path.join(s, "shard_00000_p000.jsonl"), _jsonl(kept0))
  _write(os.path.join(s, "shard_00001_p000.jsonl"), _jsonl([{**kept0[0], "problem_id": "p2"}]))
  return w, stats0, kept0


def test_load_run(workdir):
  w, stats0, kept0 = workdir
  run = report.load_run(w)
  assert [r["iteration"] for r in run.evals] == ["000", "001", "sft"]
  assert run.evals[1] == {"iteration": "001", "pass@1_greedy_test": 0.375}
  assert run.config.eval.pass_k == [1, 4, 8]  # JSON has no tuples
  assert run.stats == {"iter_001": stats0}
  assert run.kept == {"iter_001": kept0}  # the cut-off chunk's shard is not counted


def test_load_run_of_a_missing_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    report.load_run(str(tmp_path / "nope"))


def test_summary_table_labels(workdir):
  run = report.load_run(workdir[0])
  default = report.summary_table(run.evals, run.config.eval)
  assert "| 0 (base) | 25.0 |" in default and "| 001 | 37.5 |" in default
  named = report.summary_table(run.evals, run.config.eval,
                               label=lambda it: {"000": "base"}.get(it) or it.upper())
  assert "| base | 25.0 |" in named and "| SFT | 50.0 |" in named


@pytest.mark.parametrize("rate", [0.0, 1.0, 0.25])
def test_pass_at_1_plot_with_intervals_at_the_ends(tmp_path, rate):
  # A rate of 0 or 1 puts an interval end on the point (up to rounding): still a plot.
  results = [{"iteration": it, "pass@1_greedy_test": rate, "num_test": 12,
              "pass@1_greedy_train": 1.0 - rate, "num_train_eval": 8} for it in ("000", "001")]
  report.plot_pass_at_1(results, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 1000
  lo, hi = report.interval_pct(rate, 12)
  assert lo <= 100 * rate <= hi
