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
import threading
import time

import pytest

from helpers import ROOT, main_cmd as _cmd, subprocess_env as _env

# Every test starts `python -m restem_jax.main`.
pytestmark = pytest.mark.slow


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


def _terminate_when(workdir, pattern, timeout=1800):
  """Starts a run, sends it SIGTERM (as a preempting scheduler does) once a file matching
  `pattern` exists, and returns (exit code, stderr) after it stopped by itself."""
  log = os.path.join(os.path.dirname(workdir), "stderr.txt")  # A pipe would fill and block.
  with open(log, "w") as err_file:
    p = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=err_file)
  deadline = time.time() + timeout
  try:
    while not glob.glob(os.path.join(workdir, pattern)):
      assert p.poll() is None, f"the run ended before {pattern} appeared"
      assert time.time() < deadline, pattern
      time.sleep(0.05)
    p.send_signal(signal.SIGTERM)  # The main process only: what Kubernetes / TPU VMs do.
    p.wait(timeout=timeout)
    with open(log) as f:
      return p.returncode, f.read()
  finally:
    if p.poll() is None:
      p.kill()
      p.wait()


def _evals(workdir):
  """name -> eval.json, and name + "/records" -> the text of its eval_problems.jsonl (a
  killed evaluation rewrites both, identically)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "*", "eval.json"))):
    name = os.path.basename(os.path.dirname(path))
    with open(path) as f:
      out[name] = json.load(f)
    with open(os.path.join(os.path.dirname(path), "eval_problems.jsonl")) as f:
      out[name + "/records"] = f.read()
  return out


@pytest.fixture
def uninterrupted(tiny_run):
  return tiny_run


def test_two_iterations_layout_and_eval_fields(uninterrupted):
  workdir, proc = uninterrupted
  for rel in ["config.json", "progress.json", "base", "base_eval/eval.json",
              "iter_001/samples", "iter_001/model", "iter_001/eval.json",
              "iter_002/model", "iter_002/eval.json", "sft/eval.json", "summary.json",
              "summary.md", "pass_at_1.png", "tb", "report.html", "launches.jsonl",
              "base_eval/eval_problems.jsonl", "sft/eval_problems.jsonl"]:
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


# Where the SIGTERM test stops its run: (the file whose appearance sends SIGTERM, the phase
# the run is then in).
STOPS = (("base/commit_success.txt", "eval_000"), ("iter_001/samples", "generate_001"),
         ("iter_002/improve/checkpoints", "improve_002"))


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
  """The SIGTERM test's run, stopped at each of STOPS and then rerun to its end, in a thread
  that the killed-run test starts too, so that the two tests' runs overlap (a tiny run
  leaves a core mostly idle). What each stop left is recorded when it stopped: exit code,
  stderr, progress.json's done list, the first E-step chunk's stats file, the M-step's
  checkpoints. Yields (workdir, thread, record)."""
  workdir = str(tmp_path_factory.mktemp("preempted") / "preempted")
  record = {"stops": []}

  def sequence():
    try:
      for pattern, _ in STOPS:
        rc, err = _terminate_when(workdir, pattern)
        checkpoints = os.path.join(workdir, "iter_002/improve/checkpoints")
        record["stops"].append({
            "rc": rc, "err": err, "done": _done(workdir),
            "stats": glob.glob(os.path.join(workdir, "iter_001/samples/stats_00000_p000.jsonl")),
            "steps": sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit())
                     if os.path.isdir(checkpoints) else []})
        if rc != 75:  # The test fails on this stop: nothing after it is needed.
          return
      record["rerun"] = _run(workdir)
    except Exception as e:  # pylint: disable=broad-except  # Raised again by the test.
      record["error"] = e

  thread = threading.Thread(target=sequence, daemon=True)
  thread.start()
  yield workdir, thread, record
  thread.join()


def test_killed_run_resumes_to_the_same_result(uninterrupted, preempted, tmp_path):
  del preempted  # Started here to overlap this test's runs; checked by the SIGTERM test.
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


def _done(workdir):
  with open(os.path.join(workdir, "progress.json")) as f:
    return json.load(f)["done"]


def test_sigterm_stops_cleanly_in_each_phase_and_resumes_to_the_same_result(uninterrupted,
                                                                            preempted):
  """SIGTERM (preemption) in Evaluate, Generate and Improve: each time the run stops at its
  next safe point with status 75 and one line naming the phase, having kept what a resume
  needs; the rerun ends with the uninterrupted run's eval.json files."""
  full_dir, _ = uninterrupted
  workdir, thread, record = preempted
  thread.join()
  if "error" in record:
    raise record["error"]
  stops = iter(record["stops"])

  def stopped_in(pattern, phase):
    assert (pattern, phase) in STOPS
    stop = next(stops)
    rc, err = stop["rc"], stop["err"]
    last = err.strip().splitlines()[-1]
    assert rc == 75, err[-3000:]
    assert last.startswith(f"preempted (SIGTERM) during {phase}") and last.endswith(
        "rerun the same command to continue"), last
    assert "Traceback" not in err
    assert phase not in stop["done"]
    return stop

  # Evaluate: the base model is saved, its evaluation (seconds of compiling) runs.
  stop = stopped_in("base/commit_success.txt", "eval_000")
  assert stop["done"] == ["base"]
  # Generate: iteration 1's E-step has started sampling; the chunk in flight is written.
  stop = stopped_in("iter_001/samples", "generate_001")
  assert stop["stats"]
  # Improve: iteration 2's M-step compiles its train step; the step it finishes is
  # checkpointed (not only every train.checkpoint_every = 3 steps).
  stop = stopped_in("iter_002/improve/checkpoints", "improve_002")
  steps = stop["steps"]
  assert steps and steps[-1] % 3 != 0, steps

  p = record["rerun"]
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


# What TensorFlow, CUDA probing and tensorflow-text's SentencePiece printed before the
# first useful line of a CPU run (issue 17), written out here, not taken from quiet.py.
STARTUP_NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cudart_stub",
                 "Could not find cuda drivers", "cuInit", "cpu_feature_guard",
                 "precompiled_charsmap", "normalizer.cc")


def test_a_cpu_run_starts_with_our_first_line_and_no_native_noise(tmp_path):
  """A user's CPU run (no TF_CPP_MIN_LOG_LEVEL / CUDA_VISIBLE_DEVICES of our own): stderr
  starts with the run's first log line and holds none of the native start-up noise."""
  env = _env()
  for k in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES"):
    env.pop(k, None)
  p = subprocess.run(_cmd(str(tmp_path), "--config.base.steps=2", "--config.restem.num_iterations=0",
                          "--config.restem.sft_baseline=False", "--config.eval.on_train=False",
                          "--config.eval.num_samples=1", "--config.eval.pass_k=(1,)",
                          "--config.eval.majority_k=1"),
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert p.returncode == 0, p.stderr[-3000:]
  lines = p.stderr.splitlines()
  assert "pretraining the base model on" in lines[0], lines[:5]
  noisy = [l for l in lines if any(n in l for n in STARTUP_NOISE)]
  assert not noisy, noisy
  # The phases' progress lines are there, a bounded number of them.
  assert sum(" steps (" in l for l in lines) <= 2 and any("eval: 12/24 samples" in l
                                                          for l in lines), lines


def test_base_checkpoint_of_another_model_fails_in_one_line(tmp_path):
  """base.source = "checkpoint": the model config recorded with the params (by the
  importer, or a run) must match config.model. A RoPE scaling changes no shape, so the
  restore alone would load these params and run them wrong."""
  from helpers import load_config, mesh_of  # pylint: disable=import-outside-toplevel
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
# (The 8B Llama is the 1B with other sizes: its runlocal variant adds no code path.)
# gemma3_4b_lora_gsm: the same with LoRA M-steps on a GSM8K-format task.
POD_RUNLOCAL = ["llama3_1b_math_v4_32", "gemma3_4b_math_v5p_32", "gemma3_4b_lora_gsm"]


@pytest.fixture(scope="module")
def pod_runs(tmp_path_factory):
  """The POD_RUNLOCAL runs, started together so that their mostly single-threaded work
  (tiny models: compiles, Python) overlaps on the cores: name -> (process, workdir,
  stderr file); each test waits for its own."""
  started = {}
  try:
    for name in POD_RUNLOCAL:
      out = tmp_path_factory.mktemp(name)
      workdir = str(out / "w")
      config = os.path.join(ROOT, "configs", name + ".py") + ":runlocal"
      with open(out / "stderr.txt", "w") as err:  # A pipe would fill and block.
        p = subprocess.Popen(
            _cmd(workdir, "--config.restem.num_iterations=1", "--config.base.steps=4",
                 "--config.train.max_steps=2", "--config.train.eval_every=2",
                 "--config.train.checkpoint_every=2", config=config),
            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
      started[name] = (p, workdir, str(out / "stderr.txt"))
    yield started
  finally:
    for p, _, _ in started.values():
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.mark.parametrize("name", POD_RUNLOCAL)
def test_pod_config_runlocal_runs_end_to_end(name, pod_runs):
  p, workdir, stderr = pod_runs[name]
  returncode = p.wait(timeout=400 * len(POD_RUNLOCAL))
  with open(stderr) as f:
    assert returncode == 0, f.read()[-3000:]
  evals = _evals(workdir)
  assert sorted(evals) == ["base_eval", "base_eval/records", "iter_001", "iter_001/records"]
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)["model"]
  assert saved["d_model"] <= 256 and saved["rope_scaling"] != "none"  # tiny, same family
