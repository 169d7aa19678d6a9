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

Paths: every file of the run goes through `etils.epath` (as Orbax's do), so the
workdir and the data may be local directories or gs:// URLs; on a pod they
must be shared by all hosts.
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from typing import Any

import ml_collections
from etils import epath


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked; the message says what to do."""


def is_remote(path: str) -> bool:
  """A URL such as gs://bucket/dir (read and written through epath's backends)."""
  return "://" in str(path)


def absolute(path: str) -> str:
  """An absolute local path; URLs unchanged (pathlib would mangle 'gs://')."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def write_text_atomic(path: str, text: str) -> None:
  """Writes via a temp file + rename, so readers never see half a file.

  Local files are also fsynced before the rename. On object stores (gs://)
  the rename is a copy + delete, but a reader still never sees a partial
  object under `path`.
  """
  if is_remote(path):
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".tmp_{p.name}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    tmp.replace(p)
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_")
  with os.fdopen(fd, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def write_lines_atomic(path: str, rows: list[dict]) -> None:
  """One JSON object per line (the E-step's shard format)."""
  write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_json(path: str) -> Any:
  return json.loads(epath.Path(path).read_text())


def read_lines(path: str) -> list[dict]:
  """The rows of a write_lines_atomic file."""
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def glob(directory: str, pattern: str) -> list[str]:
  """Sorted paths in `directory` matching `pattern` (`*`, `?`, `[...]`; may contain '/')."""
  return sorted(str(p) for p in epath.Path(directory).glob(pattern))


def iter_dir(workdir: str, iteration: int | str) -> str:
  name = iteration if isinstance(iteration, str) else f"iter_{iteration:03d}"
  return os.path.join(workdir, name)


class Progress:
  """Which phases are complete; persisted after each one."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "progress.json")
    self.done: list[str] = read_json(self.path)["done"] if exists(self.path) else []

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
  if exists(path):
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
