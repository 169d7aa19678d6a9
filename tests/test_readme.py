"""Every command in README.md's code blocks exists, and the `:runlocal` ones run.

A command a user copies from the front page must not fail on a renamed module, a moved
config, a missing config option, a Makefile target or a setup.py extra that is gone.
"""
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import ROOT, load_config, subprocess_env


def fenced_commands(path: str) -> list[str]:
  """The command lines of a markdown file's ``` blocks (comments after '#' dropped)."""
  text = open(os.path.join(ROOT, path), encoding="utf-8").read()
  cmds = []
  for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" #", 1)[0].strip()
      if line and not line.startswith("#"):
        cmds.append(line)
  return cmds


def _readme_commands() -> list[str]:
  return fenced_commands("README.md")


def _config_flag(argv: list[str]) -> str | None:
  for a in argv:
    if a.startswith("--config="):
      return a.split("=", 1)[1]
  return None


def _makefile_targets() -> set[str]:
  text = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
  return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.M))


def test_readme_has_commands():
  cmds = _readme_commands()
  assert len(cmds) >= 8, cmds
  assert any(c.startswith("make demo") for c in cmds)
  assert any(c.startswith("make test") for c in cmds)


@pytest.mark.parametrize("cmd", _readme_commands())
def test_readme_command_exists(cmd):
  argv = shlex.split(cmd)
  if argv[0] == "make":
    assert argv[1] in _makefile_targets(), f"{cmd}: no Makefile target {argv[1]}"
    return
  if argv[:2] == ["pip", "install"]:
    extra = re.fullmatch(r"\.\[(\w+)\]", argv[-1])
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    assert extra and f'"{extra.group(1)}"' in setup, f"{cmd}: no such extra in setup.py"
    return
  assert argv[0] == "python", cmd
  if argv[1] == "-m":
    module = argv[2]
    assert importlib.util.find_spec(module) is not None, f"{cmd}: no module {module}"
  else:
    assert os.path.exists(os.path.join(ROOT, argv[1])), f"{cmd}: no file {argv[1]}"
  config = _config_flag(argv)
  if config:
    path, _, arg = config.partition(":")
    assert os.path.exists(os.path.join(ROOT, path)), f"{cmd}: no config {path}"
    cfg = load_config(os.path.join(ROOT, path)).get_config(arg or None)
    assert "task" in cfg and "model" in cfg


def _without_workdir(cmd: str) -> tuple[str, ...]:
  return tuple(a for a in shlex.split(cmd) if not a.startswith("--workdir="))


def _runlocal_commands() -> tuple[list[str], list[str]]:
  """README's `:runlocal` runs: (run here, run by tests/test_your_task_doc.py as written in
  docs/YOUR_TASK.md). The same run twice would cost the suite a run and test nothing more."""
  doc = {_without_workdir(c) for c in fenced_commands("docs/YOUR_TASK.md")}
  cmds = [c for c in _readme_commands() if ":runlocal" in c and "restem_jax.main" in c]
  return ([c for c in cmds if _without_workdir(c) not in doc],
          [c for c in cmds if _without_workdir(c) in doc])


def test_readme_runlocal_commands_all_run_somewhere():
  here, in_doc = _runlocal_commands()
  assert here and in_doc  # the demo smoke run here; "your task" in the doc's test
  from test_your_task_doc import doc_commands  # pylint: disable=import-outside-toplevel
  doc_runs = {_without_workdir(c) for c in doc_commands()}
  assert all(_without_workdir(c) in doc_runs for c in in_doc), in_doc


@pytest.mark.slow
@pytest.mark.parametrize("cmd", _runlocal_commands()[0])
def test_readme_runlocal_command_runs(cmd, tmp_path):
  argv = shlex.split(cmd)
  argv = [sys.executable] + [a for a in argv[1:] if not a.startswith("--workdir=")]
  workdir = tmp_path / "run"
  proc = subprocess.run(argv + [f"--workdir={workdir}"], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "progress.json").exists()
  assert list(workdir.glob("iter_*/eval.json")), "no iteration was evaluated"
