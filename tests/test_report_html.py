"""A real run's records and report (the shared `tiny_run`, configs/tiny.py; no new run).

* eval_problems.jsonl agrees with eval.json, recomputed here from the records alone
  (pass@1 = mean reward, distinct answers, per level, pass@k by the unbiased estimator
  written out with math.comb);
* a kept E-step sample's provenance reproduces it: the recorded checkpoint, settings and
  key, sampled again in this process, give the kept text token for token;
* report.html loads in headless Chromium (Debian's chromium + chromium-driver, `make
  browser`, driven by selenium) without console errors, its tables and gained/lost lists
  hold what the jsonl files say, and its filters count what a hand filter counts.
The kill-and-resume identity of the records is checked with the runs of tests/test_run.py.
"""
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, subprocess_env

pytestmark = pytest.mark.slow


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _models(workdir):
  """[(eval.json, its records)] in the report's order (base, iterations, sft)."""
  out = []
  for path in glob.glob(os.path.join(workdir, "*", "eval.json")):
    with open(path) as f:
      ev = json.load(f)
    out.append((ev, _jsonl(os.path.join(os.path.dirname(path), "eval_problems.jsonl"))))
  return sorted(out, key=lambda m: (m[0]["iteration"] == "sft", m[0]["iteration"]))


def _config(workdir):
  import ml_collections
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def test_records_agree_with_eval_json(tiny_run):
  from restem_jax import report
  workdir, _ = tiny_run
  cfg = _config(workdir)
  n = cfg.eval.num_samples
  models = _models(workdir)
  assert [m[0]["iteration"] for m in models] == ["000", "001", "002", "sft"]
  loaded = report.load_run(workdir)
  for ev, recs in models:
    test = [r for r in recs if r["split"] == "test"]
    train = [r for r in recs if r["split"] == "train"]
    assert len(test) == ev["num_test"] and len(train) == ev["num_train_eval"]
    assert len({r["problem_id"] for r in test}) == len(test)
    assert np.mean([r["reward"] for r in test]) == pytest.approx(ev["pass@1_greedy_test"],
                                                                  abs=1e-12)
    assert np.mean([r["reward"] for r in train]) == pytest.approx(ev["pass@1_greedy_train"],
                                                                   abs=1e-12)
    assert len({r["answer"] for r in test} - {None}) == ev["distinct_answers_test"]
    by_level = {}
    for r in test:
      by_level.setdefault(r["level"], []).append(r["reward"])
    assert {k: np.mean(v) for k, v in by_level.items()} == pytest.approx(
        ev["pass@1_greedy_test_by_level"])
    correct = []
    for r in test:
      assert sum(g["count"] for g in r["sampled"]) == n
      correct.append(sum(g["count"] for g in r["sampled"] if g["reward"] > 0))
    for k in (1, 2, 4):
      ref = np.mean([1 - math.comb(n - c, k) / math.comb(n, k) for c in correct])
      assert ref == pytest.approx(ev[f"pass@{k}"], abs=1e-12), k
    assert loaded.problems[ev["iteration"]] == recs


def test_tensorboard_has_greedy_answers_and_kept_samples_as_text(tiny_run):
  import tensorflow as tf
  workdir, _ = tiny_run
  texts = {}
  for path in glob.glob(os.path.join(workdir, "tb", "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.metadata.plugin_data.plugin_name == "text":
          texts[(v.tag, event.step)] = tf.make_ndarray(v.tensor).item().decode()
  models = _models(workdir)
  for ev, recs in models:
    tag, step = ("sft", 0) if ev["iteration"] == "sft" else ("eval", int(ev["iteration"]))
    first = next(r for r in recs if r["split"] == "test")
    assert first["problem_id"] in texts[(f"{tag}/greedy_answers", step)]
  for i in (1, 2):
    [shard, *_] = sorted(glob.glob(os.path.join(workdir, f"iter_{i:03d}/samples/shard_*")))
    assert _jsonl(shard)[0]["problem_id"] in texts[("eval/kept_samples", i)]


def test_kept_sample_provenance_reproduces_it(tiny_run):
  import jax
  from restem_jax import (checkpoints, model as M, partitioning, run, samples, sampling,
                          tasks)
  workdir, _ = tiny_run
  cfg = _config(workdir)
  model_cfg = M.ModelConfig.from_config(cfg.model)
  mesh = partitioning.make_mesh(cfg.mesh, jax.devices()[:1])  # the run's one CPU device
  task = tasks.get_task(cfg.task)
  vocab = task.vocabulary
  train = run.load_splits(cfg, task, model_cfg).train
  sampled_by = {1: "base", 2: os.path.join("iter_001", "model")}  # in the workdir: relative
  for i, model_path in sampled_by.items():
    d = os.path.join(workdir, f"iter_{i:03d}", "samples")
    kept = samples.read_samples(d)
    stats = {s.problem_id: s for s in samples.read_stats(d)}
    assert kept and all(s.iteration == i and s.model == model_path for s in kept)
    model_path = os.path.join(workdir, model_path)
    assert os.path.isdir(model_path)
    # The key: the E-step's, fold_in(key(seed), iteration), written out here.
    want_key = np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed), i)))
    assert all(s.rng_key == want_key.ravel().tolist() for s in kept)
    params = checkpoints.restore_params(model_path, model_cfg, mesh)
    s = kept[len(kept) // 2]
    assert train[s.problem_index].id == s.problem_id and train[s.problem_index].prompt == s.prompt
    st = s.sampling
    assert (st["temperature"], st["top_k"], st["num_samples"]) == (
        cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.num_samples)
    sampler = sampling.Sampler(model_cfg, mesh, eos_id=vocab.eos_id, pad_id=vocab.pad_id,
                               vocabulary=vocab)
    out = sampler.sample(params, [sampling.encode_prompt(vocab, s.prompt)],
                         num_samples=st["num_samples"], max_new_tokens=st["max_new_tokens"],
                         mode=sampling.SamplingMode(st["temperature"], st["top_k"], st["top_p"]),
                         rng=jax.random.wrap_key_data(np.asarray(s.rng_key, np.uint32)),
                         prompt_ids=[s.problem_index], stop_strings=st["stop_strings"])
    assert sampling.decode_completions(vocab, out)[0][s.sample_index] == s.sample
    assert task.score([train[s.problem_index]], [s.sample]) == [s.reward] and s.reward > 0
    # restem.keep_rejected: the first that many failed samples of each problem, apart.
    rejected = samples.read_rejected(d)
    assert all(r.reward == 0 for r in rejected)
    per = {}
    for r in rejected:
      per.setdefault(r.problem_id, set()).add(r.sample_index)
    assert {p: len(v) for p, v in per.items() if v} == {
        p: min(cfg.restem.keep_rejected, x.num_samples - x.num_correct) for p, x in stats.items()
        if x.num_samples > x.num_correct}
    kept_idx = {(k.problem_id, k.sample_index) for k in kept}
    assert not kept_idx & {(r.problem_id, r.sample_index) for r in rejected}


def _count_changes(workdir):
  """(from, to) -> (gained, lost), counted from the jsonl files."""
  recs = {ev["iteration"]: {r["problem_id"]: r["reward"] > 0 for r in rs if r["split"] == "test"}
          for ev, rs in _models(workdir)}
  pairs = [("000", "001"), ("001", "002"), ("000", "sft")]
  return {(a, b): (sum(recs[b][p] and not recs[a][p] for p in recs[a]),
                   sum(recs[a][p] and not recs[b][p] for p in recs[a])) for a, b in pairs}


def _chromium():
  """A headless Chromium driven by selenium, or a skip saying what is missing."""
  webdriver = pytest.importorskip("selenium.webdriver",
                                  reason="selenium missing: pip install -e '.[test]'")
  from selenium.webdriver.chrome.service import Service
  binary = shutil.which("chromium")
  driver = shutil.which("chromedriver")
  if not (binary and driver):
    pytest.skip("Debian's chromium / chromium-driver missing: run `make browser` (as root) or "
                "apt-get install chromium chromium-driver")
  opts = webdriver.ChromeOptions()
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,2000"):
    opts.add_argument(arg)
  opts.binary_location = binary
  opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  return webdriver.Chrome(service=Service(driver), options=opts)


def test_report_in_a_browser(tiny_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run[0], workdir)
  os.remove(os.path.join(workdir, "report.html"))  # written by the run: the CLI rewrites it
  p = subprocess.run([sys.executable, "-m", "restem_jax.report", workdir], cwd=ROOT,
                     env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  page = os.path.join(workdir, "report.html")
  assert p.stdout.strip() == page
  bad = subprocess.run([sys.executable, "-m", "restem_jax.report", str(tmp_path / "nope")],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
  assert bad.returncode == 2 and "nope" in bad.stderr.strip().splitlines()[-1]
  with open(page) as f:
    text = f.read()
  assert "http://" not in text.replace("http://www.w3.org", "")  # nothing to fetch
  assert "https://" not in text and "<link" not in text and " src=" not in text

  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select
  browser = _chromium()
  try:
    browser.get("file://" + page)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    models = _models(workdir)
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.models tr.model-row")) == len(models)
    for (a, b), (gained, lost) in _count_changes(workdir).items():
      sec = browser.find_element(By.ID, f"change-{a}-{b}")
      assert (int(sec.get_attribute("data-gained")), int(sec.get_attribute("data-lost"))) == (
          gained, lost), (a, b)
      assert len(sec.find_elements(By.CSS_SELECTOR, "ul.gained li")) == gained
      assert len(sec.find_elements(By.CSS_SELECTOR, "ul.lost li")) == lost
    distinct = [int(e.text) for e in browser.find_elements(By.CSS_SELECTOR,
                                                           "table.answers .distinct")]
    assert distinct == [ev["distinct_answers_test"] for ev, _ in models]
    shot = tmp_path / "report.png"
    browser.set_window_size(1300, min(browser.execute_script(
        "return document.body.scrollHeight") + 100, 8000))
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # The greedy-answer browser: model 002, then reward > 0, then a search.
    root = browser.find_element(By.ID, "greedy-browser")
    count = lambda: int(root.find_element(By.CSS_SELECTOR, ".count").get_attribute(  # noqa
        "data-count"))
    test = [r for r in models[2][1] if r["split"] == "test"]
    Select(root.find_element(By.CSS_SELECTOR, "select.set")).select_by_index(2)
    assert count() == len(test)
    Select(root.find_element(By.CSS_SELECTOR, "select.reward")).select_by_value("pos")
    assert count() == sum(r["reward"] > 0 for r in test)
    Select(root.find_element(By.CSS_SELECTOR, "select.reward")).select_by_value("")
    level = test[0]["level"]
    Select(root.find_element(By.CSS_SELECTOR, "select.level")).select_by_value(level)
    assert count() == sum(r["level"] == level for r in test)
    Select(root.find_element(By.CSS_SELECTOR, "select.level")).select_by_value("")
    q = test[3]["problem_id"][-5:]
    root.find_element(By.CSS_SELECTOR, "input.q").send_keys(q)
    assert count() == sum(any(q.lower() in str(r[k]).lower() for k in ("problem_id", "question",
                                                                         "answer", "greedy"))
                          for r in test) >= 1
    assert len(root.find_elements(By.CSS_SELECTOR, "tbody tr.row")) == min(count(), 25)
    # The samples browser: iteration 1's rejected samples (reward 0).
    root = browser.find_element(By.ID, "samples-browser")
    Select(root.find_element(By.CSS_SELECTOR, "select.set")).select_by_value("iter_001")
    Select(root.find_element(By.CSS_SELECTOR, "select.reward")).select_by_value("zero")
    rejected = sum(len(_jsonl(p)) for p in glob.glob(
        os.path.join(workdir, "iter_001/samples/rejected_*.jsonl")))
    assert count() == rejected > 0
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
  finally:
    browser.quit()
