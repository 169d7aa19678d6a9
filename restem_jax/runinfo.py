"""Who started a run, with what: the command and code version of every start.

A run's numbers are only as useful as knowing what produced them. Every start
(the first and each resume) appends one line to WORKDIR/launches.jsonl:
{"time", "command", "code_version", "host"}; report.html shows them beside the
config and the phases' wall times (progress.json).
"""
from __future__ import annotations

import datetime
import os
import shlex
import socket
import subprocess
import sys

from restem_jax import workdir as wd

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def launches_path(workdir: str) -> str:
  return os.path.join(workdir, "launches.jsonl")


def code_version() -> str:
  """The git commit of the checkout this package runs from (`+dirty` with uncommitted
  changes), else the installed distribution's version, else "unknown"."""
  try:
    git = ["git", "-C", _PACKAGE_DIR]
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    return "restem-jax " + metadata.version("restem-jax")
  except Exception:  # pylint: disable=broad-except  (any metadata problem: unknown)
    return "unknown"


def record_launch(workdir: str, argv: list[str] | None = None) -> dict:
  """Appends this start to launches.jsonl (rewritten atomically); returns its line."""
  argv = list(sys.argv if argv is None else argv)
  if argv and argv[0].endswith(os.path.join("restem_jax", "main.py")):
    argv = ["python", "-m", "restem_jax.main"] + argv[1:]  # What the user typed.
  line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": shlex.join(argv), "code_version": code_version(),
          "host": socket.gethostname()}
  path = launches_path(workdir)
  try:
    rows = wd.read_lines(path) if wd.exists(path) else []
  except wd.DamagedError:
    rows = []  # A record for people, not for resuming: a garbled history restarts.
  wd.write_lines_atomic(path, rows + [line])
  return line


def read_launches(workdir: str) -> list[dict]:
  path = launches_path(workdir)
  try:
    return wd.read_lines(path) if wd.exists(path) else []
  except wd.DamagedError:
    return []
