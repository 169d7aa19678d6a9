"""docs/YOUR_TASK.md runs as written: its commands, on its example files and config.

The commands are read from the doc's ```bash blocks and run in a copy of the
repository's examples/ and configs/jsonl_task.py (the doc's paths are relative), with
/tmp/countdown* replaced by temporary directories. The run's reward is the example's,
wrapped to record the process it runs in (tests/fixtures/jsonl/rewards.py:countdown),
so the test also sees that it ran in grader workers, not in the run's process.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

DOC = os.path.join(ROOT, "docs", "YOUR_TASK.md")
RECORDING_REWARD = os.path.join(ROOT, "tests", "fixtures", "jsonl", "rewards.py") + ":countdown"


def doc_commands() -> list[str]:
  text = open(DOC).read()
  blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
  return [line.split("  #")[0].strip() for b in blocks for line in b.splitlines()
          if line.strip() and not line.startswith("#")]


def _argv(cmd: str, tmp) -> list[str]:
  cmd = cmd.replace("/tmp/countdown", str(tmp / "countdown"))
  argv = shlex.split(cmd)
  assert argv[0] in ("python", "cat"), cmd
  return [sys.executable] + argv[1:] if argv[0] == "python" else argv


def test_doc_lists_the_commands_in_order():
  cmds = doc_commands()
  assert [c.split()[1] if c.startswith("python") else c.split()[0] for c in cmds] == [
      "examples/countdown/make_data.py", "-m", "cat", "-m", "examples/countdown/generate_hf.py"]
  assert "restem_jax.main" in cmds[1] and "restem_jax.export" in cmds[3]
  assert "--iteration best --format hf" in cmds[3]


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory):
  """The doc's commands up to the results table, in a copy of its files."""
  tmp = tmp_path_factory.mktemp("your_task")
  shutil.copytree(os.path.join(ROOT, "examples"), tmp / "examples")
  (tmp / "configs").mkdir()
  shutil.copy(os.path.join(ROOT, "configs", "jsonl_task.py"), tmp / "configs")
  env = subprocess_env()
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["RESTEM_TEST_PID_DIR"] = str(tmp / "pids")
  (tmp / "pids").mkdir()
  cmds = doc_commands()
  out = {}
  p = subprocess.run(_argv(cmds[0], tmp), cwd=tmp, env=env, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  main = _argv(cmds[1], tmp) + [f"--config.task.reward_fn={RECORDING_REWARD}"]
  proc = subprocess.Popen(main, cwd=tmp, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _, err = proc.communicate(timeout=1200)
  assert proc.returncode == 0, err[-3000:]
  out["main_pid"] = proc.pid
  p = subprocess.run(_argv(cmds[2], tmp), cwd=tmp, env=env, capture_output=True, text=True)
  assert p.returncode == 0, p.stderr
  out["table"] = p.stdout
  return tmp, env, cmds, out


@pytest.mark.slow
def test_doc_run_end_to_end(doc_run):
  tmp, _, _, out = doc_run
  # make_data.py writes what the repository ships.
  for name in ("train.jsonl", "test.jsonl"):
    assert (tmp / "examples" / "countdown" / name).read_text() == \
        open(os.path.join(ROOT, "examples", "countdown", name)).read()
  work = tmp / "countdown"
  # The E-step kept samples the reward called correct, and they are correct by Python.
  kept = [json.loads(l) for f in sorted((work / "iter_001" / "samples").glob("shard_*.jsonl"))
          for l in f.read_text().splitlines() if l.strip()]
  assert kept
  train = {json.loads(l)["question"]: json.loads(l)
           for l in (tmp / "examples" / "countdown" / "train.jsonl").read_text().splitlines()}
  for k in kept[:50]:
    row = train[re.search(r"Question: (.*)\nAnswer:$", k["prompt"]).group(1)]
    expr = k["sample"].strip().split("\n")[0].split("=")[0]
    assert eval(expr) == row["target"], k  # pylint: disable=eval-used
    assert sorted(map(int, re.findall(r"\d+", expr))) == sorted(row["numbers"])
  improve = json.loads((work / "iter_001" / "improve.json").read_text())
  assert improve  # the M-step ran
  for name in ("base_eval", "iter_001"):
    assert "pass@1_greedy_test" in json.loads((work / name / "eval.json").read_text())
  table = [l for l in out["table"].splitlines() if l.startswith("|")]
  # summary.md ends with the command that exports the best iteration.
  assert any(l.startswith("export: python -m restem_jax.export ")
             for l in out["table"].splitlines()), out["table"]
  assert table[0].startswith("| iteration | pass@1 test")
  assert [r.split("|")[1].strip() for r in table[2:]] == ["0 (base)", "001"]
  # The reward ran in grader worker processes, children of the run.
  records = [open(tmp / "pids" / f).read().split() for f in os.listdir(tmp / "pids")]
  assert records
  assert {int(pid) for pid, _ in records}.isdisjoint({out["main_pid"]})
  assert {int(ppid) for _, ppid in records} == {out["main_pid"]}


@pytest.mark.slow
def test_doc_export_and_transformers(doc_run):
  pytest.importorskip("restem_jax.export")
  tmp, env, cmds, _ = doc_run
  for cmd in cmds[3:]:
    p = subprocess.run(_argv(cmd, tmp), cwd=tmp, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, (cmd, p.stderr[-3000:])
  assert p.stdout.startswith("Question: Make ")
