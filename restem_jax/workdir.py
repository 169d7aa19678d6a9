"""The run's directory: layout, atomic writes, the saved config and progress.

    workdir/
      config.json                the config the run was started with
      progress.json              finished phases, in order (the resume point)
      base/                      base model params (Orbax; pretrained runs only)
      base_train/                the base pretraining's mid-phase checkpoints
      base_eval/eval.json        base model evaluation (iteration "000")
      iter_001/samples/          E-step shards (kept samples + per-problem counts, samples.py)
      iter_001/improve/          M-step mid-phase checkpoints (resume)
      iter_001/model/            this iteration's best params (Orbax; with train.lora its
                                 adapters alone, and the base path they apply to)
      iter_001/improve.json      the M-step's info (steps, evals, best step, why it stopped)
      iter_001/eval.json         this iteration's metrics
      iter_001/eval_problems.jsonl  one record per evaluated problem (every eval.json has one)
      sft/                       the SFT-on-human-data baseline: model/, improve/,
                                 improve.json, eval.json
      summary.json, summary.md, pass_at_1.png, report.html, tb/
      launches.jsonl             command and code version of every start (runinfo.py)

`Layout(workdir)` names these paths (samples.py names the shards inside
samples/, report.py the summary files).

Resume order: a phase is recorded in progress.json only after all its outputs
are written (atomic renames), so a killed run redoes at most the phase it was
in; inside a phase, E-step shards and M-step checkpoints let it continue from
the last completed chunk / checkpoint.

Paths: every file of the run goes through `etils.epath` (as Orbax's do), so the
workdir and the data may be local directories or gs:// URLs; on a pod they
must be shared by all hosts.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import uuid
from typing import Any

import ml_collections
from etils import epath


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked; the message says what to do."""


class DamagedError(WorkdirError):
  """A file of the run is missing, truncated or garbled; the message names it.

  The run repairs what it can by recomputing the phase that wrote the file
  (run.RunContext.resumable); elsewhere this is a one-line error.
  """


def _damaged(path: str, e: BaseException) -> DamagedError:
  if isinstance(e, FileNotFoundError):
    why = "is missing"
  elif isinstance(e, json.JSONDecodeError):
    why = f"is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}: truncated or garbled?)"
  else:
    why = f"is unreadable ({type(e).__name__}: {e})"
  return DamagedError(f"{path} {why}; delete it and rerun the same command to recompute it, "
                      "or restore it from a copy")


def _cannot_write(path: str, e: OSError) -> WorkdirError:
  return WorkdirError(f"cannot write {path}: {e.strerror or e}; free disk space (or fix "
                      "permissions) and rerun the same command: the run resumes from what is "
                      "saved")


def is_remote(path: str) -> bool:
  """A URL such as gs://bucket/dir (read and written through epath's backends)."""
  return "://" in str(path)


def absolute(path: str) -> str:
  """An absolute local path; URLs unchanged (pathlib would mangle 'gs://')."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def in_workdir(path: str, root: str) -> str:
  """`path` relative to the workdir `root` if it lies inside it (so records stay valid when
  a workdir is copied or moved), else absolute."""
  path, root = absolute(path).rstrip("/"), absolute(root).rstrip("/")
  return path[len(root) + 1:] if path.startswith(root + "/") else path


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
  tmp = None
  try:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:  # ENOSPC, EDQUOT, EACCES...: no half file left, one line.
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)
    raise _cannot_write(path, e) from e


def write_json_atomic(path: str, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def write_lines_atomic(path: str, rows: list[dict]) -> None:
  """One JSON object per line (the E-step's shard format)."""
  write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_json(path: str) -> Any:
  """A JSON file of the run; DamagedError (one line naming it) if missing or garbled."""
  try:
    return json.loads(epath.Path(path).read_text())
  except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
    raise _damaged(path, e) from e


def read_lines(path: str) -> list[dict]:
  """The rows of a write_lines_atomic file; DamagedError if missing or garbled."""
  try:
    return [json.loads(line) for line in epath.Path(path).read_text().splitlines()
            if line.strip()]
  except (OSError, ValueError) as e:
    raise _damaged(path, e) from e


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def glob(directory: str, pattern: str) -> list[str]:
  """Sorted paths in `directory` matching `pattern` (`*`, `?`, `[...]`; may contain '/')."""
  return sorted(str(p) for p in epath.Path(directory).glob(pattern))


@dataclasses.dataclass(frozen=True)
class ModelPaths:
  """Where one model of the run lives, and its entries in progress.json.

  name is the model's "iteration" in eval.json and summary.json: "000" (the
  base), "001", ..., "sft".
  """
  name: str
  model: str  # the params (Orbax)
  train: str  # the fine-tuning's mid-phase checkpoints (improve()'s workdir)
  eval_json: str
  trained: str  # progress entry once `model` (and improve_json) are written
  evaluated: str  # progress entry once eval_json is written
  improve_json: str | None = None  # the M-step's info; None for the base
  samples: str | None = None  # the E-step's shards (samples.py), iterations only
  generated: str | None = None  # progress entry once the E-step's shards are complete

  @property
  def eval_problems(self) -> str:
    """The evaluation's per-problem records (evaluate.problem_records), beside eval_json."""
    return os.path.join(os.path.dirname(self.eval_json), "eval_problems.jsonl")


@dataclasses.dataclass(frozen=True)
class Layout:
  """The paths of a run's workdir (see the module docstring)."""
  root: str

  @property
  def config(self) -> str:
    return os.path.join(self.root, "config.json")

  @property
  def progress(self) -> str:
    return os.path.join(self.root, "progress.json")

  @property
  def base(self) -> ModelPaths:
    return ModelPaths(name="000", model=os.path.join(self.root, "base"),
                      train=os.path.join(self.root, "base_train", "improve"),
                      eval_json=os.path.join(self.root, "base_eval", "eval.json"),
                      trained="base", evaluated="eval_000")

  def iteration(self, i: int) -> ModelPaths:
    d = os.path.join(self.root, f"iter_{i:03d}")
    return ModelPaths(name=f"{i:03d}", model=os.path.join(d, "model"),
                      train=os.path.join(d, "improve"), eval_json=os.path.join(d, "eval.json"),
                      trained=f"improve_{i:03d}", evaluated=f"eval_{i:03d}",
                      improve_json=os.path.join(d, "improve.json"),
                      samples=os.path.join(d, "samples"), generated=f"generate_{i:03d}")

  @property
  def sft(self) -> ModelPaths:
    d = os.path.join(self.root, "sft")
    return ModelPaths(name="sft", model=os.path.join(d, "model"), train=os.path.join(d, "improve"),
                      eval_json=os.path.join(d, "eval.json"), trained="improve_sft",
                      evaluated="eval_sft", improve_json=os.path.join(d, "improve.json"))


class Progress:
  """Which phases are complete; persisted (when `write`) after each one."""

  def __init__(self, path: str, write: bool = True):
    self.path, self.write = path, write
    self.done: list[str] = []
    # Wall seconds of each phase's last computation (report.html); a restored phase keeps
    # the time it took when it ran.
    self.seconds: dict[str, float] = {}
    if exists(path):
      try:
        saved = read_json(path)
        done = saved["done"]
        if not isinstance(done, list) or not all(isinstance(d, str) for d in done):
          raise TypeError("'done' is not a list of phase names")
        self.done = done
        seconds = saved.get("seconds", {})
        self.seconds = dict(seconds) if isinstance(seconds, dict) else {}
      except (DamagedError, KeyError, TypeError) as e:
        # Every phase can be redone from its own saved outputs (finished chunks,
        # M-step checkpoints), so a damaged list costs time, never correctness.
        logging.warning("%s is damaged (%s); starting from an empty list: each phase is "
                        "redone from what it saved", path, str(e).split(";")[0])

  def is_done(self, phase: str) -> bool:
    return phase in self.done

  def unmark(self, phase: str) -> None:
    """Forgets `phase` (its outputs turned out damaged); it is recomputed and marked again."""
    if phase in self.done:
      self.done.remove(phase)
      self._save()

  def mark(self, phase: str, seconds: float | None = None) -> None:
    if phase not in self.done:
      self.done.append(phase)
      if seconds is not None:
        self.seconds[phase] = round(float(seconds), 3)
      self._save()

  def _save(self) -> None:
    if self.write:
      write_json_atomic(self.path, {"done": self.done, "seconds": self.seconds})


def check_or_save_config(path: str, config: ml_collections.ConfigDict, override: bool,
                         write: bool = True,
                         defaults: ml_collections.ConfigDict | None = None) -> None:
  """A restarted run must use the config it started with (or say --override).

  defaults (configlib.default_config()): a field added since the run started and left
  at its default there is no change, so an old workdir resumes without --override.
  """
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  default = {} if defaults is None else json.loads(defaults.to_json_best_effort(sort_keys=True))
  if exists(path):
    try:
      saved = read_json(path)
    except DamagedError as e:
      if not override:
        raise WorkdirError(f"{str(e).split(';')[0]}; if this workdir was started with this "
                           "config, pass --override to rewrite it, else use a new --workdir") from e
      saved = current  # --override: the damaged copy is replaced below.
    diff = sorted(d for d in _diff(saved, current)
                  if not _added_at_default(saved, current, default, d))
    if diff:
      if not override:
        raise WorkdirError(
            f"config differs from the one saved in {path} at {', '.join(diff[:5])}"
            f"{' ...' if len(diff) > 5 else ''}; use a new --workdir, or pass --override to "
            "continue with the new config")
  if write:
    write_json_atomic(path, current)


_ABSENT = object()


def _lookup(tree: Any, dotted: str) -> Any:
  for k in dotted.split("."):
    if not isinstance(tree, dict) or k not in tree:
      return _ABSENT
    tree = tree[k]
  return tree


def _added_at_default(saved: dict, current: dict, default: dict, field: str) -> bool:
  """A field this version added since the run started, left at its default: not a change
  (the run behaves as before), so an old workdir resumes without --override."""
  value = _lookup(current, field)
  return (_lookup(saved, field) is _ABSENT and value is not _ABSENT
          and value == _lookup(default, field))


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in set(a) | set(b):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [prefix.rstrip(".")]
