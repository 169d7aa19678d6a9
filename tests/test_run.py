"""End to end: the tiny config runs two iterations; a killed run resumes to the same end.

Runs `python -m restem_jax.main` in subprocesses (one CPU device each), exactly
as a user would, and SIGKILLs one of them in the middle of Generate and then in
the middle of Improve.
"""
import glob
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT, main_cmd as _cmd, subprocess_env as _env


def _run(workdir, *extra, timeout=400):
  p = subprocess.run(_cmd(workdir, *extra), cwd=ROOT, env=_env(), capture_output=True,
                     text=True, timeout=timeout)
  return p


def _run_until(workdir, pattern, timeout=300):
  """Starts a run and SIGKILLs it as soon as a file matching `pattern` exists."""
  p = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, start_new_session=True)
  deadline = time.time() + timeout
  try:
    while time.time() < deadline:
      if glob.glob(os.path.join(workdir, pattern)):
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return True
      if p.poll() is not None:
        return False
      time.sleep(0.05)
    raise TimeoutError(pattern)
  finally:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def _evals(workdir):
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "*", "eval.json"))):
    with open(path) as f:
      out[os.path.basename(os.path.dirname(path))] = json.load(f)
  return out


@pytest.fixture
def uninterrupted(tiny_run):
  return tiny_run


def test_two_iterations_layout_and_eval_fields(uninterrupted):
  workdir, proc = uninterrupted
  for rel in ["config.json", "progress.json", "base", "base_eval/eval.json",
              "iter_001/samples", "iter_001/model", "iter_001/eval.json",
              "iter_002/model", "iter_002/eval.json", "sft/eval.json", "summary.json",
              "summary.txt", "pass_at_1.png", "tb"]:
    assert os.path.exists(os.path.join(workdir, rel)), rel
  with open(os.path.join(workdir, "progress.json")) as f:
    done = json.load(f)["done"]
  assert done == ["base", "eval_000", "generate_001", "improve_001", "eval_001",
                  "generate_002", "improve_002", "eval_002", "improve_sft", "eval_sft"]
  ev = _evals(workdir)["iter_002"]
  for key in ["pass@1_greedy_test", "pass@1_greedy_train", "pass@2", "pass@4", "maj@4",
              "pass@1_greedy_test_by_level", "samples_kept", "iteration"]:
    assert key in ev, key
  assert 0.0 <= ev["pass@1_greedy_test"] <= 1.0
  assert ev["pass@1_sampled"] <= ev["pass@2"] + 1e-12 <= ev["pass@4"] + 2e-12
  # Every kept sample in the shards is correct, and the cap holds per problem.
  rows = []
  for path in glob.glob(os.path.join(workdir, "iter_001", "samples", "shard_*.jsonl")):
    with open(path) as f:
      rows += [json.loads(line) for line in f]
  assert all(r["reward"] == 1.0 for r in rows)
  per_problem = {}
  for r in rows:
    per_problem[r["problem_id"]] = per_problem.get(r["problem_id"], 0) + 1
  assert max(per_problem.values(), default=0) <= 2
  assert ev["iteration"] == "002"
  assert "pass@1 test" in proc.stdout  # the summary table is printed


def test_killed_run_resumes_to_the_same_result(uninterrupted, tmp_path):
  full_dir, _ = uninterrupted
  workdir = str(tmp_path / "killed")
  # Kill once inside Generate (after its first chunk), once inside Improve.
  assert _run_until(workdir, "iter_001/samples/stats_00000_p000.jsonl")
  assert _run_until(workdir, "iter_002/improve/*")
  p = _run(workdir)
  assert p.returncode == 0, p.stderr[-3000:]
  a, b = _evals(full_dir), _evals(workdir)
  assert a.keys() == b.keys()
  for name in a:
    assert a[name] == b[name], name


def test_changed_config_is_refused_unless_override(uninterrupted, tmp_path):
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  with open(os.path.join(uninterrupted[0], "config.json")) as f:
    saved = json.load(f)
  saved["sampling"]["num_samples"] = 99
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(saved, f)
  p = _run(workdir, timeout=120)
  assert p.returncode != 0
  assert "config differs from the one saved" in p.stderr
  assert "sampling.num_samples" in p.stderr


@pytest.mark.parametrize("flags,expect", [
    (["--config.base.source=checkpoint", "--config.base.path=/nonexistent/base"],
     "/nonexistent/base"),
    (["--config.model.n_kv_heads=3"], "n_heads=2 is not divisible by model.n_kv_heads=3"),
    (["--config.task.name=gsm8k", "--config.task.data_dir=/nonexistent/gsm8k"],
     "/nonexistent/gsm8k"),
    (["--config.sampling.max_new_tokens=96"], "leaves no room for a prompt"),
])
def test_bad_input_fails_in_one_line_before_work(tmp_path, flags, expect):
  workdir = str(tmp_path / "w")
  p = _run(workdir, *flags, timeout=120)
  assert p.returncode == 2, p.stderr[-2000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expect in last, last
  assert "Traceback" not in p.stderr
  assert not os.path.exists(os.path.join(workdir, "base"))  # no long work started


def test_misspelt_config_key_is_refused(tmp_path):
  p = _run(str(tmp_path / "w"), "--config.trian.max_steps=3", timeout=120)
  assert p.returncode != 0
  assert "trian" in p.stderr


def test_base_checkpoint_of_another_model_fails_in_one_line(tmp_path):
  """base.source = "checkpoint": the model config recorded with the params (by the
  importer, or a run) must match config.model. A RoPE scaling changes no shape, so the
  restore alone would load these params and run them wrong."""
  from conftest import load_config, mesh_of  # pylint: disable=import-outside-toplevel
  from restem_jax import checkpoints, model  # pylint: disable=import-outside-toplevel
  c = load_config(os.path.join(ROOT, "configs", "tiny.py")).get_config()
  cfg = model.ModelConfig.from_config(c.model)
  import jax  # pylint: disable=import-outside-toplevel
  params = model.init_params(cfg, mesh_of((1, 1, 1), jax.devices()[:1]), jax.random.key(0))
  base = str(tmp_path / "base")
  checkpoints.save_params(base, params, metadata={"model": c.model.to_dict()})
  workdir = str(tmp_path / "w")
  p = _run(workdir, "--config.base.source=checkpoint", f"--config.base.path={base}",
           "--config.model.rope_scaling=linear", "--config.model.rope_scaling_factor=8.0",
           timeout=120)
  assert p.returncode == 2, p.stderr[-2000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last == (f"error: base.path={base}: the checkpoint holds another model than "
                  "config.model: model.rope_scaling='linear' (checkpoint: 'none'), "
                  "model.rope_scaling_factor=8.0 (checkpoint: 1.0); set these config.model "
                  "fields to the checkpoint's values"), last
  assert "Traceback" not in p.stderr


# The pod configs' `:runlocal` variants (configs/*_math_*.py): the same pipeline and
# family switches (llama3 RoPE scaling; Gemma 3's norms, GeGLU, QK-norm, a sliding
# window the sequences cross, linear RoPE scaling on the global layer) on one CPU,
# cut to one short iteration.
POD_RUNLOCAL = ["llama3_1b_math_v4_32", "llama3_8b_math_v5p_128", "gemma3_4b_math_v5p_32"]


@pytest.mark.parametrize("name", POD_RUNLOCAL)
def test_pod_config_runlocal_runs_end_to_end(name, tmp_path):
  workdir = str(tmp_path / "w")
  config = os.path.join(ROOT, "configs", name + ".py") + ":runlocal"
  p = subprocess.run(
      _cmd(workdir, "--config.restem.num_iterations=1", "--config.base.steps=4",
           "--config.train.max_steps=2", "--config.train.eval_every=2",
           "--config.train.checkpoint_every=2", config=config),
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
  assert p.returncode == 0, p.stderr[-3000:]
  evals = _evals(workdir)
  assert sorted(evals) == ["base_eval", "iter_001"], evals
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)["model"]
  assert saved["d_model"] <= 256 and saved["rope_scaling"] != "none"  # tiny, same family
