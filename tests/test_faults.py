"""Damaged run files, a full disk and a failing grader: named in one line or repaired.

The table test damages a copy of a finished tiny run (tests/conftest.py `tiny_run`)
one way per case and reruns the same command: either the run repairs the damage
by recomputing what wrote the file (status 0, a warning naming the file, and
every eval.json / kept sample equal to the undamaged run's), or it stops with one
`error:` line naming the file and what to do. Never a traceback.
"""
import dataclasses
import errno
import glob
import json
import os
import shutil
import subprocess

import pytest

from conftest import ROOT, main_cmd, subprocess_env

from restem_jax import workdir as wd


def _evals(workdir):
  """Every eval.json, and the text of its eval_problems.jsonl (per-problem records)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "*", "eval.json"))):
    with open(path) as f:
      out[os.path.relpath(path, workdir)] = json.load(f)
    with open(os.path.join(os.path.dirname(path), "eval_problems.jsonl")) as f:
      out[os.path.relpath(f.name, workdir)] = f.read()
  return out


def _sample_lines(workdir):
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "*", "samples", "*.jsonl"))):
    with open(path) as f:
      out[os.path.relpath(path, workdir)] = f.read()
  return out


def _truncate(path, keep=0.5):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:max(1, int(len(data) * keep))])


def _garble(path):
  size = os.path.getsize(path)
  with open(path, "wb") as f:
    f.write(bytes((i * 151 + 7) % 256 for i in range(max(size, 16))))


def _drop_last_line(path):
  with open(path) as f:
    lines = f.read().splitlines(keepends=True)
  assert len(lines) >= 2, path  # The case needs a shard of several kept samples.
  with open(path, "w") as f:
    f.writelines(lines[:-1])


def _array_files(ckpt_dir):
  files = [p for p in glob.glob(os.path.join(ckpt_dir, "**", "d", "*"), recursive=True)
           if os.path.isfile(p)]
  assert files, ckpt_dir
  return files


def _largest_shard(w, it):
  return max(glob.glob(os.path.join(w, it, "samples", "shard_*.jsonl")), key=os.path.getsize)


def _rmtree(path):
  shutil.rmtree(path)


def _unlink_arrays(ckpt_dir):
  for f in _array_files(ckpt_dir):
    os.unlink(f)


def _garble_arrays(ckpt_dir):
  for f in _array_files(ckpt_dir):
    _garble(f)


def _newest_train_ckpt_corrupt(w):
  shutil.rmtree(os.path.join(w, "iter_002/model"))
  path = os.path.join(w, "iter_002/improve/checkpoints/6")
  _garble_arrays(path)
  return path


def _on(rel, damage):
  """damage(path of `rel` in the workdir); returns that path (what the message must name)."""
  def fn(w):
    path = os.path.join(w, rel) if rel else rel
    damage(path)
    return path
  return fn


def _on_largest_shard(it, damage):
  def fn(w):
    path = _largest_shard(w, it)
    damage(path)
    return path
  return fn


# case: (group, damage(workdir) -> the path the message must name, expected outcome).
# Cases of one group damage independent phases of one copy, repaired by one rerun (a
# tiny run costs ~15 s to start): the repairs must not mask each other, and each
# case's own warning must name its file.
CASES = {
    "truncated shard": ("a", _on("iter_001/samples/shard_00000_p000.jsonl",
                                 lambda p: _truncate(p, 0.6)), "repaired"),
    "garbled stats file": ("a", _on("iter_001/samples/stats_00001_p000.jsonl", _garble),
                           "repaired"),
    "half-written eval.json": ("a", _on("iter_002/eval.json", _truncate), "repaired"),
    "params checkpoint with corrupt array files": ("a", _on("base", _garble_arrays),
                                                   "repaired"),
    "newest M-step checkpoint corrupt (and the model gone)": ("a", _newest_train_ckpt_corrupt,
                                                              "repaired"),
    "shard cut at a line boundary": ("b", _on("iter_002/samples/shard_00000_p000.jsonl",
                                              _drop_last_line), "repaired"),
    "progress names an E-step whose samples are gone": ("b", _on("iter_001/samples", _rmtree),
                                                        "repaired"),
    "params checkpoint missing its array files": ("b", _on("iter_001/model", _unlink_arrays),
                                                  "repaired"),
    "progress names a phase whose model is gone": ("b", _on("sft/model", _rmtree), "repaired"),
    "an evaluation's per-problem records are gone": ("b", _on("iter_002/eval_problems.jsonl",
                                                              os.unlink), "repaired"),
    "garbled progress.json": ("c", _on("progress.json", lambda p: _truncate(p, 0.4)),
                              "repaired"),
    "garbled config.json": ("d", _on("config.json", lambda p: _truncate(p, 0.3)), "error"),
}


@pytest.fixture(scope="module")
def damaged_runs(tiny_run, tmp_path_factory):
  """group -> (workdir, {case: the path it damaged}, the rerun's CompletedProcess), made
  on first use."""
  ref, _ = tiny_run
  cache = {}

  def get(group):
    if group not in cache:
      work = str(tmp_path_factory.mktemp(f"damaged_{group}") / "w")
      shutil.copytree(ref, work)
      named = {case: damage(work) for case, (g, damage, _) in CASES.items() if g == group}
      p = subprocess.run(main_cmd(work), cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=900)
      cache[group] = (work, named, p)
    return cache[group]
  return get


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_file_is_repaired_or_named_in_one_line(tiny_run, damaged_runs, case):
  ref, _ = tiny_run
  group, _, expected = CASES[case]
  work, named, p = damaged_runs(group)
  named = named[case]  # An absolute path: the messages name files by their full path.
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  if expected == "error":
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and named in last and "--override" in last, last
    return
  assert p.returncode == 0, p.stderr[-3000:]
  warnings = [line for line in p.stderr.splitlines() if named in line and
              ("recomputing" in line or "redoing" in line or "removing" in line
               or "damaged" in line)]
  assert warnings, f"no warning names {named}:\n{p.stderr[-3000:]}"
  assert _evals(work) == _evals(ref)
  assert _sample_lines(work) == _sample_lines(ref)
  with open(os.path.join(work, "progress.json")) as f, \
      open(os.path.join(ref, "progress.json")) as g:
    assert sorted(json.load(f)["done"]) == sorted(json.load(g)["done"])


# ----------------------------------------------------------------------------- full disk


def test_enospc_during_a_shard_write_names_the_file_and_leaves_no_partial_file(
    tmp_path, monkeypatch):
  from restem_jax import samples

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(os, "fsync", full)  # The write's data reaches the disk at fsync.
  row = samples.ProblemStats(problem_id="p", level="1", num_samples=4, num_correct=1,
                             num_kept=0)
  with pytest.raises(wd.WorkdirError) as e:
    samples.write_chunk(str(tmp_path), 3, 0, [], [row])
  msg = str(e.value)
  assert "\n" not in msg and "shard_00003_p000.jsonl" in msg and "No space left" in msg
  assert "rerun the same command" in msg
  assert os.listdir(tmp_path) == []  # No temp file, no half shard.


def _can_mount_tmpfs(tmp_path):
  probe = tmp_path / "probe"
  probe.mkdir()
  try:
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs "
                           f"{probe}"], capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


def test_enospc_during_a_checkpoint_save_is_one_line_and_the_run_resumes(tiny_run, tmp_path):
  """A real full disk: the workdir is a 600 KB tmpfs in a user namespace (unprivileged where
  the kernel allows it; skipped elsewhere), too small for the first M-step checkpoint."""
  if shutil.which("unshare") is None or not _can_mount_tmpfs(tmp_path):
    pytest.skip("no unprivileged user + mount namespace to mount a small tmpfs")
  disk = tmp_path / "disk"
  disk.mkdir()
  work = str(disk / "w")
  inner = " ".join(f"'{a}'" for a in main_cmd(work))
  p = subprocess.run(["unshare", "-rm", "sh", "-c",
                      f"mount -t tmpfs -o size=600k tmpfs {disk} && {inner}"],
                     cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert p.returncode == 2, p.stderr[-3000:]
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: cannot ") and work in last, last  # a checkpoint or a file
  assert "No space left on device" in last and "free disk space" in last, last


# ----------------------------------------------------------------------------- grader faults


def _dying_worker_main(conn):
  """A math-verify worker that is OOM-killed (dies) on every check of the answer 13."""
  from restem_jax.rewards import math as math_reward

  def check(gold, pred, timeout_s):
    if pred.strip() == "13":
      os._exit(137)  # As the kernel's OOM killer would end it.
    return math_reward._check_in_worker(gold, pred, timeout_s)  # pylint: disable=protected-access
  math_reward.serve_checks(conn, check)


def test_e_step_stops_when_too_many_samples_lose_their_grade_to_grader_faults(tmp_path):
  """A real grader pool whose worker dies on one answer, in a real E-step: each such
  sample costs its reward (0) and is counted in its problem's stats; over
  restem.max_fault_fraction the E-step stops with one line naming the fraction, at or
  under it the E-step ends with the count in its summary."""
  import jax
  from conftest import task_cfg
  from restem_jax import configlib, generate, model as M, partitioning as P, sampling, samples
  from restem_jax import tasks
  from restem_jax.rewards import math as math_reward
  from restem_jax.tasks import scoring
  from restem_jax.tasks import task as task_lib

  class DyingGrader(math_reward.MathGrader):
    _worker_target = staticmethod(_dying_worker_main)

  task = tasks.get_task(task_cfg(num_train=3, num_val=0, num_test=4, num_human=0))
  problems = task.problems("train")
  workers = scoring.Workers({})
  workers._pools["math"] = DyingGrader(num_workers=1)  # pylint: disable=protected-access
  # What the model "answers" per problem (gold: 12): 12 and 6 + 6 are right, 13 kills
  # the worker. Hand count: faults 1, 2, 0 = 3 of 12 samples; correct 2, 2, 1.
  answers = [["12", "13", "6 + 6", "7"], ["13", "13", "12", "12"], ["5", "12", "11", "10"]]

  class Spec:
    @staticmethod
    def postprocess(text):
      return text

  class GradedTask:  # The sampled texts are replaced by the canned answers above.
    vocabulary, stop_strings = task.vocabulary, task.stop_strings

    @staticmethod
    def score_detailed(ps, texts):
      seen: dict = {}
      canned = []
      for p in ps:
        k = seen[p.id] = seen.get(p.id, -1) + 1
        canned.append(f"The answer is {answers[[q.id for q in problems].index(p.id)][k]}")
      gold = [dataclasses.replace(p, gold="12") for p in ps]

      def batch_fn(idx):
        rewards = scoring.math_rewards(Spec, [gold[i] for i in idx], [canned[i] for i in idx],
                                       workers)
        return rewards, workers.take_faults(len(idx))
      return task_lib._robust_score(batch_fn, len(ps), fail_if_all=False, what="t")  # pylint: disable=protected-access

  c = configlib.default_config()
  c.mesh.shape = (1, 1, 1)
  mesh = P.make_mesh(c.mesh, jax.devices()[:1])
  cfg = M.ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                      max_seq_len=64)
  params = M.init_params(cfg, mesh, jax.random.key(0))
  c.sampling.update(num_samples=4, max_batch=8, max_new_tokens=4)
  sampler = sampling.Sampler(cfg, mesh, eos_id=task.vocabulary.eos_id,
                             pad_id=task.vocabulary.pad_id, vocabulary=task.vocabulary)

  def e_step(out_dir, max_fraction):
    return generate.generate(params=params, sampler=sampler, task=GradedTask(),
                             problems=problems, sampling_cfg=c.sampling, max_per_problem=4,
                             iteration=1, out_dir=out_dir, seed=0,
                             max_fault_fraction=max_fraction, log=lambda _: None)
  try:
    a = str(tmp_path / "a")
    with pytest.raises(generate.GraderFaultError) as e:
      e_step(a, 0.2)
    msg = str(e.value)
    assert "\n" not in msg and "3 of 12 samples (25.0%)" in msg
    assert "restem.max_fault_fraction=0.2" in msg and a in msg
    # Chunks of 2 problems: after the first, 3 faults are already over 20% of the 12
    # samples the E-step will draw, so it stops there (the chunk's stats are written).
    stats = {r.problem_id: r for r in samples.read_stats(a)}
    assert sorted(stats) == sorted(p.id for p in problems[:2])
    assert [stats[p.id].num_faults for p in problems[:2]] == [1, 2]
    assert [stats[p.id].num_correct for p in problems[:2]] == [2, 2]
    assert workers._pools["math"].faults == {"worker died": 3}  # pylint: disable=protected-access
    # At the limit the E-step goes on (the pool replaced its dead workers), counting them.
    b = str(tmp_path / "b")
    summary = e_step(b, 0.25)
    assert summary["grader_faults"] == 3 and summary["samples"] == 12
    assert summary["correct"] == 5
    stats = {r.problem_id: r for r in samples.read_stats(b)}
    assert [stats[p.id].num_faults for p in problems] == [1, 2, 0]
  finally:
    workers._pools["math"].close()  # pylint: disable=protected-access
