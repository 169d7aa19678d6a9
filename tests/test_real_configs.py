"""The real-model configs' `:runlocal` variants run end to end, as a user types them.

configs/smollm2_135m_rg.py:runlocal and configs/gemma3_270m_rg.py:runlocal are the
README's real-model runs on a tiny random model of each family (the same task, reward,
transfer, SFT and report code paths), one iteration.
Besides the config's own transfer tasks it evaluates, as a transfer task, the very
task it trains on: that column must equal the main test columns, an invariant
between the two evaluation paths (the transfer path rebuilds the task from its dict).
"""
import os
import subprocess

import pytest

from helpers import ROOT, load_config, main_cmd, subprocess_env

from restem_jax import report

# Two real-model :runlocal runs (subprocesses).
pytestmark = pytest.mark.slow


# The seed of each tiny base: one whose test answers are not all alike, so the
# distinct-answer check below is not vacuous (SmolLM2's tiny Llama, per-layer init,
# base distinct answers at seeds 0-3: 1, 5, 0, 3; the tiny Gemma at seeds 0-2: 3, 1, 0).
SEEDS = {"smollm2_135m_rg.py": 1, "gemma3_270m_rg.py": 0}


@pytest.mark.parametrize("config", sorted(SEEDS))
def test_real_model_rg_runlocal_end_to_end(tmp_path, config):
  path = os.path.join(ROOT, "configs", config)
  local = load_config(path).get_config("runlocal")
  same = {"label": "same_as_test", "rg_datasets": tuple(local.task.rg_datasets),
          "num_test": local.task.num_test}
  transfer = tuple(dict(t) for t in local.eval.transfer_tasks) + (same,)
  workdir = str(tmp_path / "run")
  p = subprocess.run(main_cmd(workdir, f"--config.eval.transfer_tasks={transfer!r}",
                              f"--config.seed={SEEDS[config]}", "--config.eval.transfer_sampled=True",
                              config=path + ":runlocal"),
                     cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=1500)
  assert p.returncode == 0, p.stderr[-3000:]
  run = report.load_run(workdir)
  # Base, one ReST-EM iteration, and the SFT baseline (gsm_symbolic has worked solutions).
  assert [e["iteration"] for e in run.evals] == ["000", "001", "sft"]
  # The tiny random model solves nothing here (pass@1 0), but it gives several distinct
  # answers, so the distinct-answer half of the invariant below is not vacuous.
  assert max(e["distinct_answers_test"] for e in run.evals) > 1
  for e in run.evals:
    name = e["iteration"]
    assert e["num_test"] == local.task.num_test
    for t in transfer:
      label = t["label"]
      assert e[f"transfer/{label}/num_test"] == t["num_test"], (name, label)
      assert 0.0 <= e[f"transfer/{label}/pass@1_greedy"] <= 1.0
      assert 0 <= e[f"transfer/{label}/distinct_answers"] <= t["num_test"]
    # The invariant: the trained-on task evaluated as a transfer task gives the main figures.
    assert e["transfer/same_as_test/pass@1_greedy"] == e["pass@1_greedy_test"], name
    assert e["transfer/same_as_test/distinct_answers"] == e["distinct_answers_test"], name
    # eval.transfer_sampled: the same sampling on the same problems, so the same figures.
    sampled = [k for k in e if k.startswith(("pass@", "maj@")) and k != "pass@1_greedy_test"
               and not k.startswith("pass@1_greedy")]
    assert {"pass@1_sampled", f"maj@{local.eval.majority_k}"} <= set(sampled), sorted(e)
    for k in sampled:
      assert e[f"transfer/same_as_test/{k}"] == e[k], (name, k)
      for t in transfer:
        assert 0.0 <= e[f"transfer/{t['label']}/{k}"] <= 1.0, (name, t["label"], k)
  with open(os.path.join(workdir, "summary.md")) as f:
    summary = f.read()
  for t in transfer:
    assert f"{t['label']} (transfer)" in summary
  assert "distinct answers (test)" in summary
  assert f"same_as_test maj@{local.eval.majority_k}" in summary
