"""Workdir and data paths may be URLs (gs://): all their I/O goes through epath.

No bucket is reachable here, so epath's gs:// backend is replaced by one that
maps gs://bucket/... onto a temporary directory (etils.epath.testing). A code
path that used os/open/glob directly would instead create a local "gs:"
directory (or fail to find the data), which the tests check for.
"""
import os
import shutil

import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing

from restem_jax import generate, samples, tasks, workdir as wd

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://bucket/... -> tmp_path/bucket/... for every epath operation."""
  root = str(tmp_path)
  monkeypatch.chdir(tmp_path)  # a stray local "gs:" directory would land here
  # With TensorFlow installed epath sends gs:// to tf.io.gfile, past the mock.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

  def m(path):
    path = os.fspath(path)
    return os.path.join(root, path[len("gs://"):]) if path.startswith("gs://") else path

  def one(orig, path, *a, **k):
    return orig(m(path), *a, **k)

  def two(orig, src, dst, *a, **k):
    return orig(m(src), m(dst), *a, **k)

  fns = {f: one for f in ("exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open",
                          "remove", "rmtree", "stat", "walk")}
  with epath_testing.mock_epath(**fns, rename=two, replace=two, copy=two):
    yield tmp_path


def test_run_files_on_a_url_land_in_the_bucket(bucket):
  d = "gs://bucket/run/iter_001/samples"
  assert wd.absolute(d) == d
  wd.write_json_atomic("gs://bucket/run/progress.json", {"done": ["base"]})
  assert wd.Progress(wd.Layout("gs://bucket/run").progress).is_done("base")
  row = dict(problem_id="p", prompt="q", sample="s", reward=1.0, iteration=1, seed=0)
  wd.write_lines_atomic(f"{d}/shard_00000_p000.jsonl", [row])
  wd.write_lines_atomic(f"{d}/stats_00000_p000.jsonl",
                        [dict(problem_id="p", level="1", num_samples=4, num_correct=2, num_kept=1)])
  wd.write_lines_atomic(f"{d}/shard_00001_p001.jsonl", [row])  # a chunk that never finished

  assert generate._chunks_to_do(d, [range(0, 1), range(1, 2)]) == [1]
  assert samples.summarize(d) == dict(problems=1, samples=4, correct=2, kept=1,
                                      problems_solved=1, grader_faults=0)
  assert samples.read_samples(d) == [samples.KeptSample(**row)]
  on_disk = sorted(os.listdir(bucket / "bucket" / "run" / "iter_001" / "samples"))
  assert on_disk == ["shard_00000_p000.jsonl", "stats_00000_p000.jsonl"]
  assert (bucket / "bucket" / "run" / "progress.json").exists()
  assert not (bucket / "gs:").exists()


@pytest.mark.parametrize("name", ["math", "gsm8k", "apps"])
def test_official_data_reads_the_same_from_a_url(bucket, name):
  local = os.path.join(FIXTURES, name)
  shutil.copytree(local, bucket / "bucket" / "data" / name)
  url = f"gs://bucket/data/{name}"
  spec = tasks.get_spec(name)
  spec.check_layout(url)
  for split in ("train", "test"):
    assert spec.read(url, split) == spec.read(local, split)
  assert not (bucket / "gs:").exists()
  with pytest.raises(tasks.DataLayoutError, match="does not exist"):
    spec.check_layout("gs://bucket/nowhere")


def test_layout_names_the_paths_existing_workdirs_have():
  # workdir.py's docstring, written out by hand: runs made before Layout must resume.
  lay = wd.Layout("gs://b/run")
  assert (lay.config, lay.progress) == ("gs://b/run/config.json", "gs://b/run/progress.json")
  assert lay.base == wd.ModelPaths(
      name="000", model="gs://b/run/base", train="gs://b/run/base_train/improve",
      eval_json="gs://b/run/base_eval/eval.json", trained="base", evaluated="eval_000")
  assert lay.iteration(12) == wd.ModelPaths(
      name="012", model="gs://b/run/iter_012/model", train="gs://b/run/iter_012/improve",
      eval_json="gs://b/run/iter_012/eval.json", trained="improve_012", evaluated="eval_012",
      improve_json="gs://b/run/iter_012/improve.json", samples="gs://b/run/iter_012/samples",
      generated="generate_012")
  assert lay.sft == wd.ModelPaths(
      name="sft", model="gs://b/run/sft/model", train="gs://b/run/sft/improve",
      eval_json="gs://b/run/sft/eval.json", trained="improve_sft", evaluated="eval_sft",
      improve_json="gs://b/run/sft/improve.json")
