"""The run's directory: layout, atomic writes, the saved config and progress.

    workdir/
      config.json                the config the run was started with
      progress.json              finished phases, in order (the resume point)
      base/                      base model params (Orbax; pretrained runs only)
      base_train/                the base pretraining's mid-phase checkpoints
      base_eval/eval.json        base model evaluation (iteration "000")
      iter_001/samples/          E-step shards (kept samples + per-problem counts)
      iter_001/improve/          M-step mid-phase checkpoints (resume)
      iter_001/model/            this iteration's best params (Orbax)
      iter_001/eval.json         this iteration's metrics
      sft/                       the SFT-on-human-data baseline: model/, improve/, eval.json
      summary.json, summary.txt, pass_at_1.png, tb/

Resume order: a phase is recorded in progress.json only after all its outputs
are written (atomic renames), so a killed run redoes at most the phase it was
in; inside a phase, E-step shards and M-step checkpoints let it continue from
the last completed chunk / checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import ml_collections


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked; the message says what to do."""


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes via a temp file + rename, so readers never see half a file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_lines_atomic(path: str, rows: list[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_")
  with os.fdopen(fd, "w") as f:
    for r in rows:
      f.write(json.dumps(r, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def iter_dir(workdir: str, iteration: int | str) -> str:
  name = iteration if isinstance(iteration, str) else f"iter_{iteration:03d}"
  return os.path.join(workdir, name)


class Progress:
  """Which phases are complete; persisted after each one."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "progress.json")
    self.done: list[str] = read_json(self.path)["done"] if os.path.exists(self.path) else []

  def is_done(self, phase: str) -> bool:
    return phase in self.done

  def mark(self, phase: str, write: bool = True) -> None:
    if phase not in self.done:
      self.done.append(phase)
      if write:
        write_json_atomic(self.path, {"done": self.done})


def check_or_save_config(workdir: str, config: ml_collections.ConfigDict, override: bool,
                         write: bool = True) -> None:
  """A restarted run must use the config it started with (or say --override)."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  if os.path.exists(path):
    saved = read_json(path)
    if saved != current:
      diff = sorted(_diff(saved, current))
      if not override:
        raise WorkdirError(
            f"config differs from the one saved in {path} at {', '.join(diff[:5])}"
            f"{' ...' if len(diff) > 5 else ''}; use a new --workdir, or pass --override to "
            "continue with the new config")
  if write:
    write_json_atomic(path, current)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in set(a) | set(b):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [prefix.rstrip(".")]
