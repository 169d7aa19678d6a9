"""gsm8k_tfds: GSM8K read through a prepared TFDS data_dir, offline.

The prepared dataset is built here by the real TFDS gsm8k builder (its
download_and_prepare), with its downloads answered by the repo's GSM8K fixture
files (official jsonl format) instead of the network.
"""
import glob
import json
import os
import time

import pytest

from helpers import task_cfg
from restem_jax import tasks

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")  # Imported up front: the timed checks time the failure.

GSM8K_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "gsm8k")


def _fixture_downloads(requested):
  """Local fixture paths for the builder's URL dict ({"train": ".../train.jsonl", ...});
  the *_socratic files get the plain ones (same jsonl format)."""
  assert isinstance(requested, dict), requested
  out = {}
  for key, url in requested.items():
    base = os.path.basename(url).replace("_socratic", "")
    assert url.startswith("https://") and base in ("train.jsonl", "test.jsonl"), url
    out[key] = os.path.join(GSM8K_FIXTURE, base)
  return out


def _no_download(*args, **kwargs):
  raise AssertionError(f"unexpected download {args[1:]} {kwargs}")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A real prepared TFDS gsm8k (<data_dir>/gsm8k/1.0.0/...) made from the fixtures."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  requested = []

  def download_and_extract(self, url_or_urls):
    requested.append(url_or_urls)
    return _fixture_downloads(url_or_urls)

  with pytest.MonkeyPatch.context() as mp:
    dm = tfds.download.DownloadManager
    mp.setattr(dm, "download_and_extract", download_and_extract)
    for name in ("download", "extract", "download_checksums", "download_kaggle_data"):
      if hasattr(dm, name):
        mp.setattr(dm, name, _no_download)
    builder = tfds.builder("gsm8k", data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  assert len(requested) == 1 and {"train", "test"} <= set(requested[0])
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 4
  assert builder.info.splits["test"].num_examples == 3
  version_dir = os.path.join(data_dir, "gsm8k", str(builder.version))
  assert glob.glob(os.path.join(version_dir, "gsm8k-train.tfrecord-*"))
  assert os.path.isfile(os.path.join(version_dir, "dataset_info.json"))
  return data_dir


def _by_question(task, splits=("train", "test")):
  out = {}
  for split in splits:
    for p in task.problems(split):
      assert p.question not in out
      out[p.question] = (split, p)
  return out


def test_gsm8k_tfds_matches_jsonl_source(tfds_dir):
  jsonl = tasks.get_task(task_cfg("gsm8k", GSM8K_FIXTURE, num_val=0, few_shot=8))
  via_tfds = tasks.get_task(task_cfg("gsm8k_tfds", tfds_dir, num_val=0, few_shot=8))
  assert via_tfds.reward_kind == jsonl.reward_kind == "math"
  assert via_tfds.stop_strings == jsonl.stop_strings
  assert via_tfds.format == jsonl.format
  assert via_tfds.name != jsonl.name and via_tfds.name.startswith("restem_gsm8k_tfds_")

  want, got = _by_question(jsonl), _by_question(via_tfds)
  assert len(want) == 7 and set(got) == set(want)
  for question, (split, p) in want.items():
    got_split, q = got[question]
    assert got_split == split
    assert (q.question, q.prompt, q.target, q.gold, q.level) == (
        p.question, p.prompt, p.target, p.gold, p.level)
    assert q.id.startswith(f"gsm8k_tfds/{split}/")
  # The golds are the official "#### N" answers (commas dropped), not re-derived.
  with open(os.path.join(GSM8K_FIXTURE, "test.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  assert {got[r["question"]][1].gold for r in rows} == {
      r["answer"].split("####")[1].strip().replace(",", "") for r in rows}
  ids = [p.id for _, p in got.values()]
  assert len(set(ids)) == len(ids)

  # Same postprocessing of completions; a validation carve-out works as for jsonl.
  text = "3 + 4 = 7. The answer is 7.\n\nQ: next"
  assert via_tfds.postprocess(text) == jsonl.postprocess(text) == "3 + 4 = 7. The answer is 7."
  carved = tasks.get_task(task_cfg("gsm8k_tfds", tfds_dir, num_val=1, few_shot=0))
  train, val = carved.problems("train"), carved.problems("validation")
  assert (len(train), len(val)) == (3, 1)
  assert {p.question for p in train + val} == {q for q, (s, _) in want.items() if s == "train"}
  # Deterministic: the same config reads the same problems in the same order.
  again = tasks.get_task(task_cfg("gsm8k_tfds", tfds_dir, num_val=1, few_shot=0))
  assert again.problems("validation") == val and again.problems("train") == train


@pytest.fixture
def downloads(monkeypatch):
  """Records any download the TFDS layer attempts (none may happen)."""
  calls = []
  dm = tfds.download.DownloadManager
  for name in ("download", "download_and_extract", "extract", "download_checksums"):
    if hasattr(dm, name):
      monkeypatch.setattr(dm, name, lambda self, *a, _n=name, **k: calls.append((_n, a)))
  return calls


def _assert_fast_layout_error(data_dir, needle):
  start = time.monotonic()
  with pytest.raises(tasks.DataLayoutError) as e:
    tasks.get_task(task_cfg("gsm8k_tfds", data_dir, num_val=0)).problems("train")
  took = time.monotonic() - start
  msg = str(e.value)
  assert took < 10, f"{took:.1f}s to fail: {msg}"
  assert "\n" not in msg and needle in msg, msg
  assert "gsm8k/<version>/" in msg and "tfds build gsm8k --data_dir=" in msg, msg
  return msg


def test_missing_or_unprepared_tfds_dir_fails_fast(tmp_path, downloads):
  _assert_fast_layout_error("", "not set")
  missing = tmp_path / "nope"
  _assert_fast_layout_error(str(missing), "does not exist")
  assert not missing.exists()  # Nothing created on the way.
  empty = tmp_path / "empty"
  empty.mkdir()
  _assert_fast_layout_error(str(empty), "dataset_info.json")
  assert not list(empty.iterdir())
  # A gsm8k folder TFDS cannot read (only some other version): tfds.load itself
  # fails at once with download=False, try_gcs=False, and that becomes the error.
  other = tmp_path / "other_version"
  (other / "gsm8k" / "0.0.1").mkdir(parents=True)
  (other / "gsm8k" / "0.0.1" / "dataset_info.json").write_text("{}")
  msg = _assert_fast_layout_error(str(other), "holds no readable TFDS gsm8k")
  assert "could not find data" in msg, msg
  # The jsonl layout is not a TFDS layout.
  _assert_fast_layout_error(GSM8K_FIXTURE, "dataset_info.json")
  assert downloads == []
