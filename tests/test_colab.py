"""The colab/ notebooks: committed without outputs, and inspect_run.ipynb runs on a real workdir.

The notebook is executed headless with nbclient against the workdir of the shared `tiny_run`
fixture (configs/tiny.py), and what it shows is checked against the workdir's files read here
independently: the plots exist, the samples table names the problems, the per-level counts
equal a hand count of stats_*.jsonl.
"""
import glob
import html
import json
import os
import re
import sys

import pytest

from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLAB = os.path.join(ROOT, "colab")
INSPECT = os.path.join(COLAB, "inspect_run.ipynb")


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(COLAB, "*.ipynb"))),
                         ids=os.path.basename)
def test_committed_notebook_has_no_outputs(path):
  # Outputs in git are large, churn on every run and can leak a local workdir's contents;
  # this keeps a notebook that was saved after running from being committed as is.
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{os.path.basename(path)} cell {i} has outputs: clear them"
      assert cell.execution_count is None, f"{os.path.basename(path)} cell {i} execution_count"


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch):
  """A `python3` kernelspec that starts this interpreter.

  The spec ipykernel installs into the venv does that already ("python" in its argv is replaced
  by sys.executable), but a user-level spec (~/.local/share/jupyter/kernels/python3) pointing at
  another Python would shadow it outside a venv; JUPYTER_PATH is searched before both.
  """
  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (restem-jax tests)", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  return "python3"


def _execute(workdir, kernel_name, **params):
  nb = nbformat.read(INSPECT, as_version=4)
  [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  src = cell.source
  for name, value in {"WORKDIR": workdir, **params}.items():
    src, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", src, flags=re.M)
    assert n == 1, f"parameter {name} not found in the parameters cell"
  assert re.search(r"^RUN_TINY = False\b", src, flags=re.M), "the test must not start a run"
  cell.source = src
  nbclient.NotebookClient(nb, timeout=300, kernel_name=kernel_name,
                          resources={"metadata": {"path": ROOT}}).execute()
  return nb


def _outputs(nb):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def test_inspect_run_notebook(tiny_run, venv_kernel):
  workdir, _ = tiny_run
  nb = _execute(workdir, venv_kernel, MAX_PROBLEMS=1000)
  outs = _outputs(nb)
  errors = [o for o in outs if o.output_type == "error"]
  assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]

  # Plots: pass@1 per iteration, pass@k + maj@k, train vs test, kept vs discarded.
  pngs = [o for o in outs if "image/png" in o.get("data", {})]
  assert len(pngs) >= 4, f"{len(pngs)} plots"

  # Metrics table: every iteration's greedy test pass@1 as read from its eval.json.
  markdown = "".join(o["data"]["text/markdown"] for o in outs
                     if "text/markdown" in o.get("data", {}))
  iter_evals = sorted(glob.glob(os.path.join(workdir, "iter_*", "eval.json")))
  assert len(iter_evals) == 2
  for path in iter_evals:
    with open(path) as f:
      r = json.load(f)
    assert f"| {int(r['iteration'])} | {100 * r['pass@1_greedy_test']:.1f} |" in markdown

  # Samples table: every problem with a kept sample is a row, and kept samples are shown.
  table = "".join(o["data"]["text/html"] for o in outs if "text/html" in o.get("data", {}))
  kept = [r for p in sorted(glob.glob(os.path.join(workdir, "iter_*", "samples", "shard_*.jsonl")))
          for r in _read_jsonl(p)]
  assert kept, "the tiny run kept no samples: nothing to check the table against"
  for pid in {r["problem_id"] for r in kept}:
    assert html.escape(pid) in table, pid
  assert html.escape(kept[0]["sample"]) in table

  # Per-level counts: the notebook's tab-separated lines against a hand count of the stats files.
  expected = {}
  for path in glob.glob(os.path.join(workdir, "iter_*", "samples", "stats_*.jsonl")):
    it = os.path.basename(os.path.dirname(os.path.dirname(path)))
    for s in _read_jsonl(path):
      c = expected.setdefault((it, str(s["level"])), [0, 0, 0, 0])
      c[0] += 1
      c[1] += s["num_samples"]
      c[2] += s["num_correct"]
      c[3] += s["num_kept"]
  expected = {key: (p, n, c, k, n - k) for key, (p, n, c, k) in expected.items()}
  printed = {}
  text = "".join(o.text for o in outs if o.output_type == "stream")
  for line in text.splitlines():
    f = line.split("\t")
    if len(f) == 7 and f[0].startswith("iter_"):
      printed[(f[0], f[1])] = tuple(int(x) for x in f[2:])
  assert printed == expected
  # The kept counts also add up to the number of lines in the shards.
  assert sum(v[3] for v in printed.values()) == len(kept)

  # Per-problem records: pass@1, distinct answers and gained / lost per model, against a count
  # of the eval_problems.jsonl files made here.
  tests = {}
  for path in glob.glob(os.path.join(workdir, "*", "eval_problems.jsonl")):
    with open(os.path.join(os.path.dirname(path), "eval.json")) as f:
      it = json.load(f)["iteration"]
    tests[it] = {r["problem_id"]: r for r in _read_jsonl(path) if r["split"] == "test"}
  before = {"001": "000", "002": "001", "sft": "000"}
  rows = {f[1]: f[2:7] for f in (line.split("\t") for line in text.splitlines())
          if len(f) == 8 and f[0] == "records" and f[1] != "model"}
  assert set(rows) == set(tests) == {"000", "001", "002", "sft"}
  for it, recs in tests.items():
    solved = {p for p, r in recs.items() if r["reward"] > 0}
    prev = {p for p, r in tests[before[it]].items() if r["reward"] > 0} if it in before else None
    assert rows[it] == [str(len(recs)), f"{100 * len(solved) / len(recs):.1f}",
                        str(len({r["answer"] for r in recs.values()} - {None})),
                        str(len(solved - prev)) if prev is not None else "-",
                        str(len(prev - solved)) if prev is not None else "-"], it
  # Provenance lines: the first kept sample of iteration 1, with the checkpoint that drew it.
  first = _read_jsonl(sorted(glob.glob(os.path.join(workdir, "iter_001/samples/shard_*")))[0])[0]
  assert (f"iter_001 kept: {first['problem_id']} sample {first['sample_index']} "
          f"reward {first['reward']} from base key") in text
